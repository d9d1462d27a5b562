"""Completeness check of a run directory, before anything is merged.

What the reducer trusts: a shard with a completion marker whose Parquet metadata carries the
run's fingerprint. What it expects: every manifest row of the run's views. A video is

- *complete* when its status is ``ok`` or ``frame_count_mismatch`` and its shards hold exactly
  the windows ``0 .. T-1`` with ``T = max(0, (N - span) // hop + 1)`` and ``N`` the frames
  really decoded (pieces of a split video stitch with no gap and no overlap);
- *expected absent* when its status is permanent (empty, unreadable, too short): listed, never
  an error;
- *incomplete* otherwise: its shard is missing, failed or interrupted, the video failed
  transiently (``unavailable`` included: the file could not be read at extract time), its file
  changed after the manifest was written (``changed``: rebuild the manifest), or the rows
  disagree with the counts. Incomplete input makes the reducer fail unless ``--allow-partial``,
  which is how a video is left out on purpose (or a rebuilt manifest without it).

Only the small ``window_index`` column is read here; features are read once, by the merge.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow.parquet as pq

from videofeat.manifests import fsutil
from videofeat.manifests.manifest import read_manifest_rows
from videofeat.manifests.ledger import DONE, INTERRUPTED, RunDir, ShardRecord
from videofeat.manifests.run_record import RunRecord
from videofeat.manifests.status import HAS_WINDOWS, PERMANENT, REBUILD_MANIFEST_HINT, STALE_MANIFEST, TRANSIENT
from videofeat.manifests.views import canonical_view
from videofeat.workers.shard_io import read_shard_metadata

log = logging.getLogger(__name__)

MAX_MARKER_WAIT_S = 60.0


@dataclass(frozen=True)
class Piece:
    """One manifest row: a whole video (piece 0 of 1) or the windows starting in [start, end)."""

    shard_id: Optional[int]
    piece_index: int
    start: int
    end: int


@dataclass
class VideoCheck:
    """The verdict on one video. ``sources`` is what the merge reads: (shard, row groups)."""

    video_id: str
    session_id: str
    view: str
    status: str
    error: Optional[str]
    fps: Optional[float]
    duration_s: Optional[float]
    pieces: list[Piece]
    verdict: str = "incomplete"          # complete | absent | incomplete
    reason: str = ""
    windows: int = 0
    frames_decoded: int = 0
    sources: list[tuple[int, list[int]]] = field(default_factory=list)


@dataclass
class CheckReport:
    info: RunRecord
    videos: list[VideoCheck]
    shards: dict[int, ShardRecord]
    foreign_shards: dict[int, str]
    shard_meta: dict[int, dict]
    stats: dict[int, dict]

    def by_verdict(self, verdict: str) -> list[VideoCheck]:
        return [v for v in self.videos if v.verdict == verdict]

    @property
    def complete(self) -> bool:
        return not self.by_verdict("incomplete")

    def bad_shards(self) -> dict[str, list[int]]:
        """Needed shards that are not usable, by state (missing, failed, interrupted, ...)."""
        out: dict[str, list[int]] = defaultdict(list)
        for shard_id, record in sorted(self.shards.items()):
            if shard_id in self.foreign_shards:
                out["other fingerprint"].append(shard_id)
            elif record.state != DONE:
                out[record.state].append(shard_id)
        return dict(out)

    def rerun_commands(self) -> list[str]:
        """The commands that recompute what is incomplete."""
        incomplete = self.by_verdict("incomplete")
        commands = []
        if any(v.status in STALE_MANIFEST for v in incomplete):
            commands.append(f"videofeat manifest ... -o NEW_MANIFEST.parquet   # {REBUILD_MANIFEST_HINT}")
        incomplete = [v for v in incomplete if v.status not in STALE_MANIFEST]
        if any(v.status not in TRANSIENT or not _shard_done(self, v) for v in incomplete):
            commands.append(self.info.rerun_command(rerun_failed=False))
        if any(v.status in TRANSIENT and _shard_done(self, v) for v in incomplete):
            commands.append(self.info.rerun_command(rerun_failed=True))
        for shard_id in sorted(self.foreign_shards):
            commands.append(f"rm {self.info.url}/shards/{shard_id:05d}.done   "
                            f"# shard {shard_id} holds another run's rows; then rerun")
        return commands

    def describe_incomplete(self, limit: int = 20) -> str:
        lines = []
        for state, ids in self.bad_shards().items():
            names = ", ".join(f"{s:05d}" for s in ids[:limit]) + (" ..." if len(ids) > limit else "")
            lines.append(f"  shards {state} ({len(ids)}): {names}")
            for shard_id in ids[:3]:
                failure = self.shards[shard_id].last_failure
                if failure and failure.get("message"):
                    lines.append(f"    {shard_id:05d}: {failure['message'].strip().splitlines()[-1][:200]}")
        incomplete = self.by_verdict("incomplete")
        lines.append(f"  videos incomplete ({len(incomplete)}):")
        for video in incomplete[:limit]:
            lines.append(f"    {video.video_id} [{video.view}]: {video.reason}")
        if len(incomplete) > limit:
            lines.append(f"    ... and {len(incomplete) - limit} more")
        lines.append("  rerun with:")
        lines += [f"    {c}" for c in self.rerun_commands()]
        return "\n".join(lines)


def _shard_done(report: CheckReport, video: VideoCheck) -> bool:
    return all(p.shard_id is not None and report.shards.get(p.shard_id) is not None
               and report.shards[p.shard_id].state == DONE and p.shard_id not in report.foreign_shards
               for p in video.pieces)


# ----- reading the manifest ------------------------------------------------------------------
def read_expected(info: RunRecord) -> list[VideoCheck]:
    """One entry per video of the run's views, in (view, video_id) order, pieces in order."""
    fs, path = fsutil.filesystem(info.manifest)
    if not fs.exists(path):
        raise FileNotFoundError(f"manifest {info.manifest} (named in {info.url}/run.json) does not exist; "
                                "pass --manifest with its current location")
    videos: dict[str, VideoCheck] = {}
    for row in read_manifest_rows(info.manifest):
        view = canonical_view(row.view)
        if info.views and view not in info.views:
            continue
        piece = Piece(row.shard_id, row.piece_index, row.piece_start_frame, row.piece_end_frame)
        video = videos.get(row.video_id)
        if video is None:
            video = videos[row.video_id] = VideoCheck(
                video_id=row.video_id, session_id=row.session_id, view=view, status=row.status or "ok",
                error=row.error, fps=row.fps_float, duration_s=row.duration_s, pieces=[])
        video.pieces.append(piece)
    for video in videos.values():
        video.pieces.sort(key=lambda p: (p.start, p.piece_index))
    return sorted(videos.values(), key=lambda v: (v.view, v.video_id))


# ----- the check -----------------------------------------------------------------------------
def check_run(run_dir: RunDir, info: RunRecord, marker_wait_s: float = MAX_MARKER_WAIT_S) -> CheckReport:
    """Judge every video of the run; reads stats, footers and ``window_index`` columns only."""
    videos = read_expected(info)
    needed = sorted({p.shard_id for v in videos for p in v.pieces if p.shard_id is not None})
    records = {r.shard_id: r for r in run_dir.records(needed)}
    records = _wait_for_markers(run_dir, records, min(marker_wait_s, MAX_MARKER_WAIT_S))
    shard_meta: dict[int, dict] = {}
    foreign: dict[int, str] = {}
    stats: dict[int, dict] = {}
    for shard_id, record in records.items():
        if record.state != DONE:
            continue
        meta = read_shard_metadata(run_dir.shard_path(shard_id), run_dir.fs)
        shard_meta[shard_id] = meta
        stats[shard_id] = record.stats or {}
        if meta.get("fingerprint") != info.fingerprint:
            foreign[shard_id] = str(meta.get("fingerprint"))
            log.warning("shard %05d carries fingerprint %s, the run's is %s: ignored",
                        shard_id, meta.get("fingerprint"), info.fingerprint)
    report = CheckReport(info, videos, records, foreign, shard_meta, stats)
    stats_index = {(shard_id, v["video_id"], int(v.get("piece_start_frame") or 0)): v
                   for shard_id, s in stats.items() for v in s.get("videos", [])}
    with ShardFiles(run_dir) as files:
        for video in videos:
            _judge(report, video, stats_index, files)
    return report


def _wait_for_markers(run_dir: RunDir, records: dict[int, ShardRecord], budget_s: float) -> dict[int, ShardRecord]:
    """Give markers written on another node time to show up on a shared filesystem.

    Only shards that started an attempt and left neither a marker nor a failure record can be
    in flight; shards never attempted, or that failed, are not waited for. On a local disk a
    marker is visible the moment it is written, so nothing is waited for there.
    """
    pending = [s for s, r in records.items() if r.state == INTERRUPTED and r.killed]
    if not pending or budget_s <= 0:
        return records
    if not fsutil.late_writes_plausible(run_dir.fs, run_dir.root):
        return records
    deadline = time.monotonic() + budget_s
    for shard_id in pending:
        remaining = max(0.0, deadline - time.monotonic())
        if fsutil.exists_with_backoff(run_dir.fs, run_dir.marker_path(shard_id), remaining):
            records[shard_id] = run_dir.records([shard_id])[0]
    return records


def _judge(report: CheckReport, video: VideoCheck, stats_index: dict, files: ShardFiles) -> None:
    if all(p.shard_id is None for p in video.pieces):
        if video.status in PERMANENT:
            video.verdict, video.reason = "absent", video.error or video.status
        else:
            video.reason = (f"manifest status {video.status} ({video.error or 'no error text'}) and no shard: "
                            "rebuild the manifest with `videofeat manifest`")
        return
    entries = []
    for piece in video.pieces:
        record = report.shards.get(piece.shard_id)
        if piece.shard_id is None or record is None:
            video.reason = f"piece {piece.piece_index} has no shard in the manifest"
            return
        if record.state != DONE:
            video.reason = f"shard {piece.shard_id:05d} is {record.state}"
            return
        if piece.shard_id in report.foreign_shards:
            video.reason = f"shard {piece.shard_id:05d} holds rows of another fingerprint"
            return
        entry = stats_index.get((piece.shard_id, video.video_id, piece.start))
        if entry is None:
            video.reason = f"shard {piece.shard_id:05d} is done but its stats have no record of this video"
            return
        entries.append((piece, entry))
    statuses = [e.get("status") for _, e in entries]
    transient = [s for s in statuses if s in TRANSIENT]
    if transient:
        video.status = transient[0]
        errors = [e.get("error") for _, e in entries if e.get("status") in TRANSIENT]
        video.error = errors[0]
        video.reason = f"{transient[0]}: {video.error or 'no error text'} (transient: rerun with --rerun-failed)"
        return
    stale = [e for _, e in entries if e.get("status") in STALE_MANIFEST]
    if stale:
        video.status, video.error = stale[0]["status"], stale[0].get("error")
        video.reason = f"{video.status}: {video.error or REBUILD_MANIFEST_HINT}"
        return
    permanent = [s for s in statuses if s in PERMANENT]
    # A piece past the real end of a video (shorter than probed) is too short on its own while
    # the pieces before it hold the windows: only a video whose every piece is permanent is absent.
    if permanent and len(permanent) == len(statuses):
        video.status = permanent[0]
        video.error = next((e.get("error") for _, e in entries if e.get("status") in PERMANENT), None)
        video.verdict, video.reason = "absent", video.error or video.status
        return
    unknown = [s for s in statuses if s not in HAS_WINDOWS and s not in PERMANENT]
    if unknown:
        video.reason = f"unexpected status {unknown[0]!r} in the shard stats"
        return
    video.status = "frame_count_mismatch" if "frame_count_mismatch" in statuses or permanent else "ok"
    video.error = next((e.get("error") for _, e in entries if e.get("error")), video.error)
    _check_windows(report, video, entries, files)


def _check_windows(report: CheckReport, video: VideoCheck, entries: list, files: ShardFiles) -> None:
    info = report.info
    # A piece decodes from the start of its first window (the first multiple of hop at or after
    # its start frame), so the video's decoded length is where the furthest piece stopped; for a
    # whole video that is simply frames_decoded.
    hop = info.hop
    frames = max((-(-piece.start // hop) * hop + int(e.get("frames_decoded") or 0)) for piece, e in entries)
    total = info.sampling.num_windows(frames)
    video.frames_decoded, video.windows = frames, total
    got_parts: list[np.ndarray] = []
    sources: list[tuple[int, list[int]]] = []
    for shard_id in dict.fromkeys(p.shard_id for p, _ in entries):
        groups = report.shard_meta[shard_id].get("row_groups", {}).get(video.video_id, [])
        if groups:
            got_parts.append(files.get(shard_id).read_row_groups(groups, columns=["window_index"])
                             .column("window_index").to_numpy())
            sources.append((shard_id, list(groups)))
    got = np.concatenate(got_parts) if got_parts else np.zeros(0, dtype=np.int32)
    stated = sum(int(e.get("windows") or 0) for _, e in entries)
    want = np.arange(total)
    if got.size == total and np.array_equal(np.sort(got), want):
        if stated != total:
            video.reason = f"stats record {stated} windows, the shards hold {total}"
            return
        video.verdict, video.reason, video.sources = "complete", "", sources
        return
    unique, counts = np.unique(got, return_counts=True)
    duplicates = unique[counts > 1]
    absent = np.setdiff1d(want, unique)
    extra = np.setdiff1d(unique, want)
    parts = [f"expected {total} windows from {frames} decoded frames (span {info.span}, hop {info.hop}), "
             f"found {got.size}"]
    if duplicates.size:
        parts.append(f"duplicate window_index {_ranges(duplicates)}")
    if absent.size:
        parts.append(f"missing window_index {_ranges(absent)}")
    if extra.size:
        parts.append(f"unexpected window_index {_ranges(extra)}")
    video.reason = "; ".join(parts)


class ShardFiles:
    """Shard files opened lazily; a few stay open because neighbouring videos share shards."""

    def __init__(self, run_dir: RunDir, keep: int = 8):
        self._run_dir = run_dir
        self._keep = keep
        self._open: dict[int, tuple[Any, pq.ParquetFile]] = {}

    def get(self, shard_id: int) -> pq.ParquetFile:
        if shard_id not in self._open:
            if len(self._open) >= self._keep:
                self._close(next(iter(self._open)))
            handle = self._run_dir.fs.open(self._run_dir.shard_path(shard_id), "rb")
            self._open[shard_id] = (handle, pq.ParquetFile(handle))
        return self._open[shard_id][1]

    def _close(self, shard_id: int) -> None:
        handle, parquet = self._open.pop(shard_id)
        parquet.close()
        handle.close()

    def close(self) -> None:
        for shard_id in list(self._open):
            self._close(shard_id)

    def __enter__(self) -> "ShardFiles":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _ranges(values: Sequence[int], limit: int = 6) -> str:
    """``[0, 1, 2, 7]`` -> ``0-2, 7``."""
    values = sorted(int(v) for v in values)
    spans: list[list[int]] = []
    for v in values:
        if spans and v == spans[-1][1] + 1:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    text = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans[:limit])
    return text + (" ..." if len(spans) > limit else "")
