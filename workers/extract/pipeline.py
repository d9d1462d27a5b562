"""One shard: decode its videos in the pool, batch windows across videos, infer, write rows.

Per-video problems become records (status, error, failed-at frame) and the shard completes;
only per-shard problems (storage, the model, a signal) raise. Each video's rows are written as
soon as every video before it is finished, so memory holds the features of a few videos, never
the whole shard's frames.

One decode can feed several outputs (feature sets): outputs that share a sampling and a resize
form a group, which assembles its windows and batches once and runs each output's model on
the same batches. A group holds about one span of frames per video in flight. A video that
fails to decode fails the same way for every group.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from videofeat.manifests.manifest import ManifestRow
from videofeat.manifests.status import CHANGED, FRAME_COUNT_MISMATCH, OK, TOO_SHORT, VideoRecord
from videofeat.manifests.windows import Sampling

from videofeat.workers.decode.pool import DecodeEvent, DecodeJob, DecodePool
from videofeat.workers.extract import preflight
from videofeat.workers.extract.presets import WindowAssembler, window_times
from videofeat.workers.shard_io import ShardWriter

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """SIGTERM or SIGUSR2 arrived: stop at the next batch, leave no marker."""


@dataclass
class _Video:
    row: ManifestRow
    first_window: int
    stop_window: Optional[int]
    decode_start: int
    decode_end: Optional[int]
    expected_frames: int
    assembler: Optional[WindowAssembler] = None
    features: list = field(default_factory=list)  # per output: window -> feature
    probs: list = field(default_factory=list)
    outstanding: int = 0
    frames_seen: int = 0  # frames of this video's own range, as a decode of that range alone counts them
    finished: bool = False
    record: Optional[VideoRecord] = None
    started: float = field(default_factory=time.monotonic)


def _plan_video(row: ManifestRow, sampling: Sampling) -> _Video:
    """Which windows and frames one manifest row (a whole video or a piece) covers."""
    n = row.num_frames
    first = -(-row.piece_start_frame // sampling.hop)
    # The last piece (or a whole video) runs to the end of what really decodes.
    stop = None if row.piece_stop is None else -(-row.piece_stop // sampling.hop)
    decode_start = sampling.start(first)
    decode_end = None if stop is None else max(decode_start, sampling.end(stop - 1))
    expected = (n if decode_end is None else min(decode_end, n)) - decode_start
    return _Video(row, first, stop, decode_start, decode_end, max(0, expected))


Infer = Callable[[np.ndarray], tuple[np.ndarray, Optional[np.ndarray]]]


@dataclass(frozen=True)
class ShardOutput:
    """One feature set's share of a shard: its windows, which resized frame feeds it, its model and file."""

    sampling: Sampling
    infer: Infer
    writer: ShardWriter
    frame: int = 0  # index into the decode event's frames (one per distinct resize of the pool)
    name: str = ""
    # --resize-on device: frames arrive full-size and are resized here, on the model's device.
    frame_transform: Optional[Callable[[np.ndarray], np.ndarray]] = None


class _Group:
    """Outputs sharing a sampling and a resized frame: one set of windows and batches, one model each."""

    def __init__(self, rows: list[ManifestRow], outputs: list[ShardOutput], batch_size: int, feature_dtype: type,
                 should_stop: Callable[[], bool], on_windows: Callable[[str, int], None]):
        self.outputs = outputs
        self.sampling = outputs[0].sampling
        self.frame = outputs[0].frame
        self.frame_transform = outputs[0].frame_transform
        self.batch_size = batch_size
        self.feature_dtype = feature_dtype
        self.should_stop = should_stop
        self.on_windows = on_windows
        self.videos = [_plan_video(r, self.sampling) for r in rows]
        for video in self.videos:
            video.features, video.probs = [{} for _ in outputs], [{} for _ in outputs]
        self._batch: list[tuple[int, int, list[np.ndarray]]] = []  # (video, window, its frames)
        self._next_write = 0
        self.windows_written = [0] * len(outputs)

    def _in_range(self, video: _Video, index: int) -> bool:
        return index >= video.decode_start and (video.decode_end is None or index < video.decode_end)

    def on_frame(self, event: DecodeEvent) -> None:
        video = self.videos[event.key]
        if not self._in_range(video, event.index):
            return  # another group's range of this video (pieces of different spans)
        video.frames_seen += 1
        if video.assembler is None:
            video.assembler = WindowAssembler(self.sampling, video.first_window, video.stop_window)
        frame = event.frames[self.frame]
        frame = frame if self.frame_transform is None else self.frame_transform(frame)
        for window, clip in video.assembler.add(event.index, frame, event.pts):
            self._batch.append((event.key, window, clip))
            video.outstanding += 1
            if len(self._batch) >= self.batch_size:
                self.flush()

    def refuse(self, key: int, status: str, error: str) -> None:
        """A video the pre-decode check turned away: a record, no decode, no rows."""
        video = self.videos[key]
        video.record = VideoRecord(video.row.video_id, status, error)
        video.finished = True

    def on_end(self, event: DecodeEvent, changed: Optional[str] = None) -> None:
        video = self.videos[event.key]
        frames = video.frames_seen
        if changed:
            video.record = VideoRecord(video.row.video_id, CHANGED, changed, frames, 0, None,
                                       time.monotonic() - video.started)
        elif event.kind == "done":
            windows = video.assembler.emitted if video.assembler else 0
            if windows == 0:
                status, error = TOO_SHORT, (f"{frames} frames decoded, fewer than one window of "
                                            f"{self.sampling.span} frames")
            elif frames != video.expected_frames:
                status, error = FRAME_COUNT_MISMATCH, (f"decoded {frames} frames where the manifest "
                                                       f"expects {video.expected_frames}")
            else:
                status, error = OK, None
            video.record = VideoRecord(video.row.video_id, status, error, frames, windows, None,
                                       time.monotonic() - video.started)
        else:
            video.record = VideoRecord(video.row.video_id, event.status, event.error, frames, 0,
                                       event.failed_at_frame, time.monotonic() - video.started)
            # A failed video keeps no rows: drop its queued windows and any features.
            self._batch = [b for b in self._batch if b[0] != event.key]
            video.outstanding = 0
            video.features, video.probs = [{} for _ in self.outputs], [{} for _ in self.outputs]
        video.assembler = None if video.record.status not in (OK, FRAME_COUNT_MISMATCH) else video.assembler
        video.finished = True
        self.write_ready()

    def flush(self) -> None:
        if self.should_stop():
            raise Interrupted("stop requested (SIGTERM/SIGUSR2)")
        if not self._batch:
            return
        clips = [clip for _, _, clip in self._batch]
        for k, output in enumerate(self.outputs):
            feats, probs = output.infer(clips)
            for j, (key, window, _) in enumerate(self._batch):
                video = self.videos[key]
                video.features[k][window] = feats[j]
                if probs is not None:
                    video.probs[k][window] = probs[j]
            self.on_windows(output.name, len(self._batch))
        for key, _, _ in self._batch:
            self.videos[key].outstanding -= 1
        self._batch = []
        self.write_ready()

    def write_ready(self) -> None:
        while self._next_write < len(self.videos):
            video = self.videos[self._next_write]
            if not video.finished or video.outstanding:
                return
            if video.record.status in (OK, FRAME_COUNT_MISMATCH):
                for k, output in enumerate(self.outputs):
                    if video.features[k]:
                        self._write(video, k, output)
            video.features, video.probs, video.assembler = [], [], None
            self._next_write += 1

    def _write(self, video: _Video, k: int, output: ShardOutput) -> None:
        row, features, probs = video.row, video.features[k], video.probs[k]
        windows = range(min(features), max(features) + 1)
        if len(windows) != len(features):
            raise RuntimeError(f"{row.video_id}: windows are not contiguous; this is a bug")
        fps = row.fps
        pts = video.assembler.pts if (row.vfr and video.assembler is not None) else None
        start_s, end_s, center_s = window_times(self.sampling, windows, fps, pts)
        output.writer.write_video(
            video_id=row.video_id, session_id=row.session_id, view=row.view, window_index=list(windows),
            start_frame=[self.sampling.start(w) for w in windows], end_frame=[self.sampling.end(w) for w in windows],
            start_s=start_s, end_s=end_s, center_s=center_s,
            feature=np.stack([features[w] for w in windows]).astype(self.feature_dtype),
            probs=np.stack([probs[w] for w in windows]) if probs else None)
        self.windows_written[k] += len(windows)

    def stats(self) -> list[dict]:
        out = []
        for video in self.videos:
            record = video.record.to_dict()
            record["piece_start_frame"] = video.row.piece_start_frame
            record["piece_end_frame"] = video.row.piece_end_frame
            out.append(record)
        return out


class ShardPipeline:
    """Runs the rows of one shard through ``pool`` once, into every output's model and writer."""

    def __init__(self, rows: list[ManifestRow], outputs: Sequence[ShardOutput], pool: DecodePool, batch_size: int,
                 feature_dtype: str, should_stop: Callable[[], bool],
                 on_windows: Callable[[str, int], None] = lambda name, n: None,
                 on_frames: Callable[[int], None] = lambda n: None):
        self.rows = rows
        self.pool = pool
        self.should_stop = should_stop
        self.on_frames = on_frames
        dtype = np.float16 if feature_dtype == "float16" else np.float32
        grouped: dict[tuple, list[int]] = {}
        for i, output in enumerate(outputs):
            grouped.setdefault((output.sampling, output.frame, id(output.frame_transform)), []).append(i)
        self.groups = [_Group(rows, [outputs[i] for i in members], batch_size, dtype, should_stop, on_windows)
                       for members in grouped.values()]
        # Output i is output ``_where[i][1]`` of group ``_where[i][0]``.
        self._where = {i: (g, k) for g, members in enumerate(grouped.values()) for k, i in enumerate(members)}
        self.frames_decoded = 0  # frames the decoder delivered, whatever number of outputs they fed
        self.decode_cpu_s = 0.0  # CPU the decode processes spent on the videos that decoded to the end
        self.started = time.monotonic()
        self.first_frame_s: Optional[float] = None  # start-up latency: spawning and warming the decoders
        self._changed: dict[int, str] = {}  # the decoder found another file than the manifest's: frames ignored

    def run(self) -> list[list[dict]]:
        """Process every row; returns the per-video stats records of each output, in output order."""
        jobs = []
        for i, row in enumerate(self.rows):
            refused = preflight.check_file(row)
            if refused:
                log.warning("%s: %s: %s", row.video_id, *refused)
                for group in self.groups:
                    group.refuse(i, *refused)
                continue
            plans = [group.videos[i] for group in self.groups]
            starts = [v.decode_start for v in plans]
            ends = [v.decode_end for v in plans]
            jobs.append(DecodeJob(i, row.uri, min(starts), None if None in ends else max(ends), row.crop))
        for group in self.groups:
            group.write_ready()
        for event in self.pool.run(jobs, self.should_stop):
            if event.kind == "opened":
                refused = preflight.check_opened(self.rows[event.key], event.info)
                if refused:
                    self._changed[event.key] = refused[1]
                    log.warning("%s: %s: %s", self.rows[event.key].video_id, CHANGED, refused[1])
            elif event.kind == "frame":
                if self.first_frame_s is None:
                    self.first_frame_s = time.monotonic() - self.started
                self.frames_decoded += 1
                self.on_frames(1)
                if event.key in self._changed:
                    continue
                for group in self.groups:
                    group.on_frame(event)
            elif event.kind in ("done", "failed"):
                self.decode_cpu_s += event.cpu_s or 0.0
                if event.kind == "failed":
                    log.warning("%s: %s: %s", self.rows[event.key].video_id, event.status, event.error)
                for group in self.groups:
                    group.on_end(event, self._changed.get(event.key))
        for group in self.groups:
            group.flush()  # raises Interrupted if the pool stopped early for a signal
            group.write_ready()
        return [self.groups[g].stats() for g, _ in (self._where[i] for i in range(len(self._where)))]

    def windows_written(self, output: int) -> int:
        g, k = self._where[output]
        return self.groups[g].windows_written[k]
