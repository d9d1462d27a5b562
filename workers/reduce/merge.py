"""The reducer: completed shards -> one Parquet file per view, plus ``summary.json``.

It walks videos in ``(view, video_id)`` order through the manifest's ``shard_id`` and reads only
each video's row groups (the shard metadata maps video ids to row groups), so peak memory is
about one video's rows however many shards the run has. Each output file is sorted by
``video_id, window_index``, holds one row group per video and carries the run's lineage and
its own row-group map under the ``videofeat`` metadata key, like a shard does.

Reducing twice gives the same files: rows come only from the shard the manifest assigns, and a
video's rows must be exactly windows ``0 .. T-1``, so a shard committed twice or a stray copy of
a video in another shard can never duplicate rows.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from videofeat.manifests import fsutil, temporaries
from videofeat.manifests.ledger import RunDir, utc_now
from videofeat.workers.reduce.check import MAX_MARKER_WAIT_S, CheckReport, ShardFiles, VideoCheck, check_run
from videofeat.workers.shard_io import METADATA_KEY

log = logging.getLogger(__name__)

SUMMARY_NAME = "summary.json"


@dataclass(frozen=True)
class ReduceConfig:
    """Options of ``videofeat reduce``."""

    run_dir: str
    output: Optional[str] = None          # default RUN_DIR/dataset
    manifest: Optional[str] = None        # default: the manifest named in run.json
    allow_partial: bool = False
    marker_wait_s: float = MAX_MARKER_WAIT_S

    def __post_init__(self) -> None:
        if not self.run_dir:
            raise ValueError("RUN_DIR is required")
        if not 0 <= self.marker_wait_s <= MAX_MARKER_WAIT_S:
            raise ValueError(f"--marker-wait must be between 0 and {MAX_MARKER_WAIT_S:.0f} seconds, "
                             f"got {self.marker_wait_s}")


class IncompleteRun(RuntimeError):
    """The run lacks shards or videos; the message names them and the command that reruns them."""

    def __init__(self, report: CheckReport):
        self.report = report
        super().__init__(f"{report.info.url} is incomplete; nothing was written "
                         f"(--allow-partial writes what exists):\n{report.describe_incomplete()}")


def reduce_run(config: ReduceConfig) -> dict:
    """Check, merge and summarize; returns the summary (also written as ``summary.json``)."""
    began = time.monotonic()
    run_dir = RunDir(config.run_dir)
    info = run_dir.load_record().with_manifest(config.manifest)
    report = check_run(run_dir, info, config.marker_wait_s)
    if not report.complete and not config.allow_partial:
        raise IncompleteRun(report)
    if config.output:
        out_fs, out_root = fsutil.filesystem(config.output)
    else:
        out_fs, out_root = run_dir.fs, run_dir.dataset_dir
    out_fs.makedirs(out_root, exist_ok=True)
    # A reduce killed mid-write leaves a view-sized temporary; a later one clears those of
    # writers that are gone (never a live reducer's).
    temporaries.remove_stale(out_fs, out_root, lambda base: base.endswith(".parquet") or base == SUMMARY_NAME)
    files_written = {}
    with ShardFiles(run_dir) as files:
        for view in _views(report):
            videos = [v for v in report.videos if v.view == view]
            path = fsutil.join(out_root, f"{view}.parquet")
            if _merge_view(report, view, videos, files, out_fs, path):
                files_written[view] = path
            elif out_fs.exists(path):
                out_fs.rm(path)  # an earlier reduce's file would contradict this summary
    summary = build_summary(report, files_written, time.monotonic() - began)
    fsutil.write_json_atomic(out_fs, fsutil.join(out_root, SUMMARY_NAME), summary)
    return summary


def _views(report: CheckReport) -> list[str]:
    present = {v.view for v in report.videos}
    ordered = [v for v in report.info.views if v in present] if report.info.views else []
    return ordered + sorted(present - set(ordered))


def _merge_view(report: CheckReport, view: str, videos: list[VideoCheck], files: ShardFiles,
                fs: Any, path: str) -> bool:
    """Write one view's file under a temporary name, then move it into place."""
    sources = [s for v in videos if v.verdict == "complete" for s, _ in v.sources]
    if not sources:
        log.warning("view %s has no extracted windows; no file written", view)
        return False
    schema = files.get(sources[0]).schema_arrow
    lineage = {k: v for k, v in report.shard_meta[sources[0]].items() if k != "row_groups"}
    tmp = f"{path}.tmp-{fsutil.unique_suffix()}"
    row_groups: dict[str, list[int]] = {}
    # Dictionary pages and statistics pay off for the id columns only; on feature floats they
    # cost most of the write time and save nothing.
    ids = [name for name in ("video_id", "session_id", "view") if name in schema.names]
    writer = pq.ParquetWriter(tmp, schema, filesystem=fs, compression="zstd", use_dictionary=ids,
                              write_statistics=ids + ["window_index"])
    try:
        for video in videos:
            if video.verdict != "complete" or not video.sources:
                continue
            table = _read_video(video, files, schema)
            writer.write_table(table, row_group_size=max(table.num_rows, 1))
            row_groups[video.video_id] = [len(row_groups)]
        incomplete = [v.video_id for v in videos if v.verdict == "incomplete"]
        metadata = dict(lineage, view=view, fingerprint=report.info.fingerprint, row_groups=row_groups,
                        reduced_at=utc_now(), partial=bool(incomplete), incomplete_videos=incomplete)
        writer.add_key_value_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})
    finally:
        writer.close()
    fs.mv(tmp, path)
    return True


def _read_video(video: VideoCheck, files: ShardFiles, schema: pa.Schema) -> pa.Table:
    parts = []
    for shard_id, groups in video.sources:
        table = files.get(shard_id).read_row_groups(groups)
        if not table.schema.equals(schema, check_metadata=False):
            raise ValueError(f"shard {shard_id:05d} has schema {table.schema} but this view's first shard has "
                             f"{schema}: shards of one run must share feature dim, dtype and head")
        parts.append(table)
    table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
    index = table.column("window_index").to_numpy()
    if (index[1:] < index[:-1]).any():
        table = table.sort_by("window_index")
    return table.combine_chunks()


# ----- the summary ---------------------------------------------------------------------------
def build_summary(report: CheckReport, files: dict[str, str], reduce_seconds: float) -> dict:
    info = report.info
    per_view: dict[str, dict] = {}
    for view in _views(report):
        videos = [v for v in report.videos if v.view == view]
        done = [v for v in videos if v.verdict == "complete"]
        per_view[view] = {"file": files.get(view), "videos": len(done),
                          "windows": sum(v.windows for v in done),
                          "expected_absent": sum(v.verdict == "absent" for v in videos),
                          "incomplete": sum(v.verdict == "incomplete" for v in videos)}
    by_status = Counter(v.status for v in report.videos)
    not_extracted = [{"video_id": v.video_id, "view": v.view, "status": v.status, "verdict": v.verdict,
                      "reason": v.reason} for v in report.videos if v.verdict != "complete"]
    feature_dim, num_classes, dtype = _head_shape(report)
    summary = {
        "run_dir": info.url, "fingerprint": info.fingerprint, "manifest": info.manifest,
        "reduced_at": utc_now(), "complete": report.complete, "partial": not report.complete,
        "views": per_view, "feature_dim": feature_dim, "num_classes": num_classes, "feature_dtype": dtype,
        "preset": {"span": info.sampling.span, "hop": info.sampling.hop, "num_frames": info.sampling.num_frames,
                   "step": info.sampling.step},
        "videos_by_status": dict(sorted(by_status.items())),
        "not_extracted": not_extracted,
        "shards": {"needed": len(report.shards), "done_used": len(report.shard_meta) - len(report.foreign_shards),
                   "unusable": report.bad_shards()},
        "sessions_view_mismatch": sessions_view_mismatch(report.videos),
        "run": run_timing(report),
        "reduce_seconds": round(reduce_seconds, 3),
        "rerun": report.rerun_commands() if not report.complete else [],
    }
    return summary


def _head_shape(report: CheckReport) -> tuple[Optional[int], Optional[int], Optional[str]]:
    """Feature dim, class count and feature dtype, from a shard's schema (run.json as fallback)."""
    feature_dim, num_classes, dtype = report.info.feature_dim, report.info.num_classes, None
    run_dir = RunDir(report.info.url)
    for video in report.videos:
        if video.sources:
            schema = pq.read_schema(run_dir.shard_path(video.sources[0][0]), filesystem=run_dir.fs)
            feature = schema.field("feature").type
            feature_dim, dtype = feature.list_size, feature.value_type.to_pandas_dtype().__name__
            num_classes = schema.field("probs").type.list_size if "probs" in schema.names else 0
            break
    return feature_dim, num_classes, dtype


def sessions_view_mismatch(videos: list[VideoCheck]) -> list[dict]:
    """Sessions whose extracted views differ by more than one window (one hop) in length."""
    sessions: dict[str, dict[str, int]] = defaultdict(dict)
    for video in videos:
        if video.verdict == "complete":
            sessions[video.session_id][video.view] = video.windows
    out = []
    for session_id, counts in sorted(sessions.items()):
        if len(counts) > 1 and max(counts.values()) - min(counts.values()) > 1:
            out.append({"session_id": session_id, "windows": dict(sorted(counts.items()))})
    return out


def run_timing(report: CheckReport) -> dict:
    """Wall time of the extraction (first shard start to last shard end) and its throughput."""
    started, finished, windows, frames, busy = [], [], 0, 0, 0.0
    for stats in report.stats.values():
        for key, bucket in (("started", started), ("finished", finished)):
            stamp = _parse_time(stats.get(key))
            if stamp is not None:
                bucket.append(stamp)
        windows += int(stats.get("windows") or 0)
        frames += int(stats.get("frames_decoded") or 0)
        busy += float(stats.get("seconds") or 0.0)
    wall = (max(finished) - min(started)).total_seconds() if started and finished else None
    if wall is not None:
        # run.json timestamps have one-second resolution; the longest shard bounds the wall time below.
        longest = max((float(s.get("seconds") or 0.0) for s in report.stats.values()), default=0.0)
        wall = max(wall, longest) or None
    return {"started": min(started).isoformat() if started else None,
            "finished": max(finished).isoformat() if finished else None,
            "wall_s": None if wall is None else round(wall, 3), "shard_seconds": round(busy, 3),
            "windows": windows, "frames_decoded": frames,
            "windows_per_s": round(windows / wall, 2) if wall else None}


def _parse_time(value: Any) -> Optional[_dt.datetime]:
    if isinstance(value, (int, float)):
        return _dt.datetime.fromtimestamp(value, _dt.timezone.utc)
    if isinstance(value, str):
        try:
            stamp = _dt.datetime.fromisoformat(value)
        except ValueError:
            return None
        return stamp if stamp.tzinfo else stamp.replace(tzinfo=_dt.timezone.utc)
    return None


def format_summary(summary: dict) -> str:
    """The terminal table printed by ``videofeat reduce``."""
    lines = [f"{'view':<10} {'videos':>7} {'windows':>9} {'absent':>7} {'incomplete':>10}  file"]
    for view, row in summary["views"].items():
        lines.append(f"{view:<10} {row['videos']:>7} {row['windows']:>9} {row['expected_absent']:>7} "
                     f"{row['incomplete']:>10}  {row['file'] or '-'}")
    lines.append(f"feature dim {summary['feature_dim']} ({summary['feature_dtype']}), "
                 f"{summary['num_classes']} classes; preset span {summary['preset']['span']}, "
                 f"hop {summary['preset']['hop']}")
    lines.append("videos by status: " + ", ".join(f"{k} {v}" for k, v in summary["videos_by_status"].items()))
    for row in summary["not_extracted"][:20]:
        lines.append(f"  {row['verdict']:<10} {row['video_id']} [{row['view']}] {row['status']}: {row['reason']}")
    if len(summary["not_extracted"]) > 20:
        lines.append(f"  ... {len(summary['not_extracted']) - 20} more in summary.json")
    timing = summary["run"]
    if timing["wall_s"] is not None:
        lines.append(f"extraction: {timing['windows']} windows in {timing['wall_s']:.1f} s wall "
                     f"({timing['windows_per_s']} windows/s); reduce took {summary['reduce_seconds']:.1f} s")
    if summary["sessions_view_mismatch"]:
        lines.append(f"{len(summary['sessions_view_mismatch'])} session(s) whose views differ by more than one hop "
                     "(see summary.json sessions_view_mismatch)")
    if summary["partial"]:
        lines.append("PARTIAL: incomplete videos were left out; rerun with:")
        lines += [f"  {c}" for c in summary["rerun"]]
    return "\n".join(lines)
