"""Probing a video: frame count, exact frame rate, timing, size and whether it decodes at all.

Runs in a separate process under the manifest command (a hostile file may hang or crash the
demuxer). Returns a plain dict, so ``manifests/`` never needs to import a decoder.
"""

from __future__ import annotations

import os
from fractions import Fraction
from typing import Any, Optional

from videofeat.manifests import fsutil
from videofeat.manifests.status import EMPTY, OK, UNREADABLE

# Packets read to judge variable frame rate; enough to see dash-cam timing jitter without
# reading a whole 9-minute file over the network.
VFR_SAMPLE_PACKETS = 600
VFR_SPREAD = 0.01


def _open_input(uri: str):
    fs, path = fsutil.filesystem(uri)
    if fsutil.is_local(fs):
        return path, fs.size(path), None
    handle = fs.open(path, "rb")
    return handle, fs.size(path), handle


def probe_video(uri: str) -> dict[str, Any]:
    """Probe ``uri``; never raises for a bad video: the record's ``status`` and ``error`` say why."""
    record: dict[str, Any] = {"num_frames": 0, "fps_num": None, "fps_den": None, "fps": None,
                              "start_time_s": None, "duration_s": None, "vfr": False, "width": None,
                              "height": None, "codec": None, "size_bytes": None, "status": OK, "error": None}
    try:
        source, size, handle = _open_input(uri)
    except (FileNotFoundError, OSError) as exc:
        return {**record, "status": UNREADABLE, "error": f"cannot read {uri}: {exc}"}
    record["size_bytes"] = size
    # A FIFO or device also reports size 0; only a regular file of size 0 is known empty. The
    # rest is opened, and the caller's timeout guards against a read that never returns.
    if size == 0 and (handle is not None or os.path.isfile(source)):
        return {**record, "status": EMPTY, "error": f"{uri} is an empty (zero-byte) file"}
    import av

    try:
        with av.open(source, mode="r", timeout=30) as container:
            if not container.streams.video:
                return {**record, "status": UNREADABLE, "error": f"{uri} has no video stream"}
            stream = container.streams.video[0]
            rate: Optional[Fraction] = stream.average_rate or stream.guessed_rate or stream.base_rate
            record.update(
                width=stream.codec_context.width,
                height=stream.codec_context.height,
                codec=stream.codec_context.name,
            )
            if rate:
                record.update(fps_num=rate.numerator, fps_den=rate.denominator, fps=float(rate))
            time_base = stream.time_base
            if stream.start_time is not None and time_base:
                record["start_time_s"] = float(stream.start_time * time_base)
            num_frames = int(stream.frames or 0)
            durations, counted = [], 0
            last_pts = None
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue  # flush packets carry no frame
                counted += 1
                if packet.pts is not None and len(durations) < VFR_SAMPLE_PACKETS:
                    durations.append(packet.pts)
                if num_frames and counted >= VFR_SAMPLE_PACKETS:
                    break  # the container index has the count; the sample is enough for VFR
            if not num_frames:
                num_frames = counted  # no index: the count comes from demuxing every packet
            record["num_frames"] = num_frames
            record["vfr"] = _is_vfr(durations)
            if stream.duration is not None and time_base:
                record["duration_s"] = float(stream.duration * time_base)
            elif rate:
                record["duration_s"] = num_frames / float(rate)
            if num_frames == 0:
                record.update(status=EMPTY, error=f"{uri} has a video stream with no frames")
    except Exception as exc:  # PyAV raises many subclasses of FFmpegError and OSError
        record.update(status=UNREADABLE, error=f"{uri} cannot be opened as a video: {type(exc).__name__}: {exc}")
    finally:
        if handle is not None:
            handle.close()
    return record


def _is_vfr(pts: list[int]) -> bool:
    """Variable frame rate when frame durations (from sorted timestamps) spread by more than 1%."""
    if len(pts) < 3:
        return False
    ordered = sorted(pts)
    steps = [b - a for a, b in zip(ordered, ordered[1:]) if b > a]
    if not steps:
        return False
    mean = sum(steps) / len(steps)
    return (max(steps) - min(steps)) / mean > VFR_SPREAD
