"""One shard: decode its videos in the pool, batch windows across videos, infer, write rows.

Per-video problems become records (status, error, failed-at frame) and the shard completes;
only per-shard problems (storage, the model, a signal) raise. Each video's rows are written as
soon as every video before it is finished, so memory holds the features of a few videos, never
the whole shard's frames.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

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
    features: dict = field(default_factory=dict)
    probs: dict = field(default_factory=dict)
    outstanding: int = 0
    finished: bool = False
    record: Optional[VideoRecord] = None
    started: float = field(default_factory=time.monotonic)
    changed: Optional[str] = None  # the decoder found another file than the manifest's: frames ignored


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


class ShardPipeline:
    """Runs the rows of one shard through ``pool`` and ``infer`` into ``writer``."""

    def __init__(self, rows: list[ManifestRow], sampling: Sampling, pool: DecodePool,
                 infer: Callable[[np.ndarray], tuple[np.ndarray, Optional[np.ndarray]]], batch_size: int,
                 writer: ShardWriter, feature_dtype: str, should_stop: Callable[[], bool],
                 on_windows: Callable[[int], None] = lambda n: None):
        self.sampling = sampling
        self.pool = pool
        self.infer = infer
        self.batch_size = batch_size
        self.writer = writer
        self.feature_dtype = np.float16 if feature_dtype == "float16" else np.float32
        self.should_stop = should_stop
        self.on_windows = on_windows
        self.videos = [_plan_video(r, sampling) for r in rows]
        self._batch: list[tuple[int, int, np.ndarray]] = []
        self._next_write = 0
        self.windows_written = 0
        self.fps_by_video: dict[str, float] = {}

    def run(self) -> list[dict]:
        """Process every row; returns the per-video stats records."""
        jobs = []
        for i, video in enumerate(self.videos):
            refused = preflight.check_file(video.row)
            if refused:
                self._refuse(video, *refused)
            else:
                jobs.append(DecodeJob(i, video.row.uri, video.decode_start, video.decode_end, video.row.crop))
        self._write_ready()
        for event in self.pool.run(jobs, self.should_stop):
            self._on_event(event)
        self._flush()  # raises Interrupted if the pool stopped early for a signal
        self._write_ready()
        return [self._stats(v) for v in self.videos]

    def _on_event(self, event: DecodeEvent) -> None:
        video = self.videos[event.key]
        if event.kind == "opened":
            refused = preflight.check_opened(video.row, event.info)
            if refused:
                video.changed = refused[1]
                log.warning("%s: %s: %s", video.row.video_id, CHANGED, video.changed)
            return
        if event.kind == "frame":
            if video.changed:
                return
            if video.assembler is None:
                video.assembler = WindowAssembler(self.sampling, video.first_window, video.stop_window)
            for window, clip in video.assembler.add(event.index, event.frame, event.pts):
                self._batch.append((event.key, window, clip))
                video.outstanding += 1
                if len(self._batch) >= self.batch_size:
                    self._flush()
            return
        frames = event.frames_decoded
        if video.changed:
            video.record = VideoRecord(video.row.video_id, CHANGED, video.changed, frames, 0, None,
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
            video.outstanding, video.features, video.probs = 0, {}, {}
            log.warning("%s: %s: %s", video.row.video_id, event.status, event.error)
        video.assembler = None if video.record.status not in (OK, FRAME_COUNT_MISMATCH) else video.assembler
        video.finished = True
        self._write_ready()

    def _refuse(self, video: _Video, status: str, error: str) -> None:
        """A video the pre-decode check turned away: a record, no decode, no rows."""
        video.record = VideoRecord(video.row.video_id, status, error)
        video.finished = True
        log.warning("%s: %s: %s", video.row.video_id, status, error)

    def _flush(self) -> None:
        if self.should_stop():
            raise Interrupted("stop requested (SIGTERM/SIGUSR2)")
        if not self._batch:
            return
        clips = np.stack([clip for _, _, clip in self._batch])
        feats, probs = self.infer(clips)
        for j, (key, window, _) in enumerate(self._batch):
            video = self.videos[key]
            video.features[window] = feats[j]
            if probs is not None:
                video.probs[window] = probs[j]
            video.outstanding -= 1
        self.on_windows(len(self._batch))
        self._batch = []
        self._write_ready()

    def _write_ready(self) -> None:
        while self._next_write < len(self.videos):
            video = self.videos[self._next_write]
            if not video.finished or video.outstanding:
                return
            if video.record.status in (OK, FRAME_COUNT_MISMATCH) and video.features:
                self._write(video)
            video.features, video.probs, video.assembler = {}, {}, None
            self._next_write += 1

    def _write(self, video: _Video) -> None:
        row = video.row
        windows = range(min(video.features), max(video.features) + 1)
        if len(windows) != len(video.features):
            raise RuntimeError(f"{row.video_id}: windows are not contiguous; this is a bug")
        fps = row.fps
        pts = video.assembler.pts if (row.vfr and video.assembler is not None) else None
        start_s, end_s, center_s = window_times(self.sampling, windows, fps, pts)
        self.writer.write_video(
            video_id=row.video_id, session_id=row.session_id, view=row.view, window_index=list(windows),
            start_frame=[self.sampling.start(w) for w in windows], end_frame=[self.sampling.end(w) for w in windows],
            start_s=start_s, end_s=end_s, center_s=center_s,
            feature=np.stack([video.features[w] for w in windows]).astype(self.feature_dtype),
            probs=np.stack([video.probs[w] for w in windows]) if video.probs else None)
        self.fps_by_video[row.video_id] = fps
        self.windows_written += len(windows)

    def _stats(self, video: _Video) -> dict:
        record = video.record.to_dict()
        record["piece_start_frame"] = video.row.piece_start_frame
        record["piece_end_frame"] = video.row.piece_end_frame
        return record
