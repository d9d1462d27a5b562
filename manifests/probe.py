"""Probing a video: frame count, exact frame rate, timing, size and whether it decodes at all.

Runs in a separate process under the manifest command (a hostile file may hang or crash the
demuxer). Returns a plain dict, so ``manifests/`` never needs to import a decoder.
"""

from __future__ import annotations

import os
import struct
from fractions import Fraction
from typing import Any, Optional

from videofeat.manifests import fsutil
from videofeat.manifests.status import EMPTY, OK, UNREADABLE

# Packets read to judge variable frame rate; enough to see dash-cam timing jitter without
# reading a whole 9-minute file over the network.
VFR_SAMPLE_PACKETS = 600
VFR_SPREAD = 0.01


def file_signature(uri: str) -> tuple[Optional[int], Optional[int]]:
    """(size in bytes, mtime in ns) of a local path or fsspec URL; None where the store has none.

    Raises OSError (FileNotFoundError, PermissionError, ...) when the file cannot be stat'ed.
    """
    fs, path = fsutil.filesystem(uri)
    if fsutil.is_local(fs):
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    info = fs.info(path)
    mtime = info.get("mtime") or info.get("LastModified") or info.get("updated")
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    try:
        mtime_ns = None if mtime is None else int(float(mtime) * 1e9)
    except (TypeError, ValueError):
        mtime_ns = None
    return info.get("size"), mtime_ns


def frame_orientation(frame: Any) -> tuple[int, bool]:
    """(degrees a player rotates ``frame`` by, counter-clockwise, in [0, 360); whether it mirrors it).

    Both come from the frame's display matrix (FFmpeg attaches the container's matrix, or the
    legacy ``rotate`` tag it was made from, to every decoded frame).
    """
    for data in frame.side_data:
        if getattr(data.type, "name", str(data.type)).endswith("DISPLAYMATRIX"):
            a, b, _, c, d = struct.unpack("<5i", bytes(data)[:20])
            return round(frame.rotation or 0) % 360, a * d - b * c < 0
    return 0, False


def orientation_problem(uri: str, rotation: int, mirrored: bool) -> Optional[str]:
    """Why frames of this orientation cannot come out as a player shows them, or None."""
    if mirrored or rotation % 90:
        what = "mirrors the picture" if mirrored else f"rotates it by {rotation} degrees"
        return (f"{uri}: its display matrix {what}; videofeat applies only rotations by multiples of "
                "90 degrees, so rotation is not applied and the video is left out (re-encode it upright)")
    return None


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
                              "height": None, "codec": None, "size_bytes": None, "mtime_ns": None, "rotation": 0,
                              "status": OK, "error": None}
    try:
        record["size_bytes"], record["mtime_ns"] = file_signature(uri)
        source, size, handle = _open_input(uri)
    except (FileNotFoundError, OSError) as exc:
        return {**record, "status": UNREADABLE, "error": f"cannot read {uri}: {exc}"}
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
            orientation: Optional[tuple[int, bool]] = None
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue  # flush packets carry no frame
                if orientation is None:
                    # The display matrix is read off the first decoded frame, as decoders see it.
                    try:
                        orientation = next((frame_orientation(f) for f in packet.decode()), None)
                    except av.error.FFmpegError:
                        pass  # a damaged first packet: the next one tells the orientation
                counted += 1
                if packet.pts is not None and len(durations) < VFR_SAMPLE_PACKETS:
                    durations.append(packet.pts)
                if num_frames and counted >= VFR_SAMPLE_PACKETS:
                    break  # the container index has the count; the sample is enough for VFR
            if not num_frames:
                num_frames = counted  # no index: the count comes from demuxing every packet
            record["num_frames"] = num_frames
            record["vfr"] = _is_vfr(durations)
            rotation, mirrored = orientation or (0, False)
            record["rotation"] = rotation
            if rotation in (90, 270):  # the manifest holds the size a player shows
                record.update(width=record["height"], height=record["width"])
            problem = orientation_problem(uri, rotation, mirrored)
            if problem:
                record.update(status=UNREADABLE, error=problem)
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
