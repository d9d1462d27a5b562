"""The manifest: one immutable Parquet file listing every video (or piece) with its shard.

It is the only input of a run. Rows: one per (video, piece); non-ok videos keep a row (with
their status and error, and no shard) so nothing is dropped silently. The file carries a
content fingerprint in its metadata, which every run records.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from videofeat.manifests import fsutil
from videofeat.manifests.discover import DiscoveredVideo
from videofeat.manifests.shards import ShardingConfig, WorkUnit, assign_shards, whole_video_unit
from videofeat.manifests.status import OK, TOO_SHORT

METADATA_KEY = b"videofeat.manifest"
DEFAULT_MIN_FRAMES = 32

SCHEMA = pa.schema([
    ("video_id", pa.string()), ("session_id", pa.string()), ("view", pa.string()),
    ("user_id", pa.string()), ("uri", pa.string()),
    ("num_frames", pa.int64()), ("fps_num", pa.int64()), ("fps_den", pa.int64()), ("fps", pa.float64()),
    ("start_time_s", pa.float64()), ("duration_s", pa.float64()), ("vfr", pa.bool_()),
    ("width", pa.int32()), ("height", pa.int32()), ("codec", pa.string()), ("size_bytes", pa.int64()),
    ("mtime_ns", pa.int64()), ("rotation", pa.int32()), ("status", pa.string()), ("error", pa.string()),
    ("crop_x", pa.int32()), ("crop_y", pa.int32()), ("crop_w", pa.int32()), ("crop_h", pa.int32()),
    ("shard_id", pa.int32()), ("piece_index", pa.int32()), ("num_pieces", pa.int32()),
    ("piece_start_frame", pa.int64()), ("piece_end_frame", pa.int64()),
])
PROBE_FIELDS = ("num_frames", "fps_num", "fps_den", "fps", "start_time_s", "duration_s", "vfr",
                "width", "height", "codec", "size_bytes", "mtime_ns", "rotation", "status", "error")
CROP_FIELDS = ("crop_x", "crop_y", "crop_w", "crop_h")


class ManifestError(ValueError):
    pass


@dataclass(frozen=True)
class ManifestConfig:
    sharding: ShardingConfig = ShardingConfig()
    min_frames: int = DEFAULT_MIN_FRAMES

    def __post_init__(self) -> None:
        if self.min_frames < 1:
            raise ValueError(f"--min-frames must be >= 1, got {self.min_frames}")


def read_crops(path: str) -> dict[str, tuple[int, int, int, int]]:
    """``video_id, crop_x, crop_y, crop_w, crop_h`` (source pixels, origin top-left)."""
    fs, inner = fsutil.filesystem(path)
    with fs.open(inner, "rb") as handle:
        reader = csv.DictReader(io.StringIO(handle.read().decode("utf-8-sig")))
        missing = {"video_id", *CROP_FIELDS} - set(reader.fieldnames or ())
        if missing:
            raise ManifestError(f"{path}: crop table lacks column(s) {', '.join(sorted(missing))}; "
                                "expected video_id,crop_x,crop_y,crop_w,crop_h")
        crops = {}
        for line, row in enumerate(reader, start=2):
            try:
                box = tuple(int(float(row[k])) for k in CROP_FIELDS)
            except (TypeError, ValueError):
                raise ManifestError(f"{path}:{line}: crop values must be integers, got {row}") from None
            if box[2] <= 0 or box[3] <= 0 or box[0] < 0 or box[1] < 0:
                raise ManifestError(f"{path}:{line}: crop box {box} must have x, y >= 0 and w, h > 0")
            crops[row["video_id"].strip()] = box  # type: ignore[assignment]
    return crops


def build_rows(videos: Sequence[DiscoveredVideo], probes: Mapping[str, Mapping[str, Any]],
               config: ManifestConfig = ManifestConfig(),
               crops: Optional[Mapping[str, tuple[int, int, int, int]]] = None) -> list[dict]:
    """Join discovery, probe records and crops; mark too-short videos; assign shards."""
    crops = dict(crops or {})
    unknown = sorted(set(crops) - {v.video_id for v in videos})
    if unknown:
        raise ManifestError(f"crop table names videos that were not found: {', '.join(unknown[:5])}"
                            + (" ..." if len(unknown) > 5 else ""))
    base_rows: list[dict] = []
    for video in videos:
        probe = dict(probes[video.uri])
        row = {"video_id": video.video_id, "session_id": video.session_id, "view": video.view,
               "user_id": video.user_id, "uri": video.uri, **{k: probe.get(k) for k in PROBE_FIELDS}}
        if row["status"] == OK and (row["num_frames"] or 0) < config.min_frames:
            row.update(status=TOO_SHORT, error=f"{video.uri} has {row['num_frames']} frames, fewer than "
                       f"--min-frames {config.min_frames} (one window needs that many)")
        box = crops.get(video.video_id)
        if box and row["status"] == OK:
            x, y, w, h = box
            if x + w > (row["width"] or 0) or y + h > (row["height"] or 0):
                raise ManifestError(f"crop box {box} of {video.video_id} lies outside its "
                                    f"{row['width']}x{row['height']} frame ({video.uri}); fix the crop table")
        row.update(zip(CROP_FIELDS, box or (None,) * 4))
        base_rows.append(row)
    by_id = {row["video_id"]: row for row in base_rows}
    units = [whole_video_unit(r["video_id"], r["view"], int(r["num_frames"])) for r in base_rows if r["status"] == OK]
    rows: list[dict] = []
    for shard_id, unit in assign_shards(units, config.sharding):
        rows.append({**by_id[unit.video_id], **_piece_columns(unit), "shard_id": shard_id})
    for row in base_rows:
        if row["status"] != OK:
            rows.append({**row, "shard_id": None, "piece_index": 0, "num_pieces": 1,
                         "piece_start_frame": 0, "piece_end_frame": int(row["num_frames"] or 0)})
    return sorted(rows, key=lambda r: (r["view"], r["video_id"], r["piece_index"]))


def _piece_columns(unit: WorkUnit) -> dict:
    return {"piece_index": unit.piece_index, "num_pieces": unit.num_pieces,
            "piece_start_frame": unit.piece_start_frame, "piece_end_frame": unit.piece_end_frame}


def content_fingerprint(rows: Iterable[Mapping[str, Any]]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps({k: row.get(k) for k in SCHEMA.names}, sort_keys=True, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:20]


def write_manifest(rows: Sequence[Mapping[str, Any]], path: str, meta: Optional[Mapping[str, Any]] = None) -> str:
    """Write atomically; returns the content fingerprint (also stored in the file's metadata)."""
    fingerprint = content_fingerprint(rows)
    table = pa.Table.from_pylist([dict(r) for r in rows], schema=SCHEMA)
    body = {"fingerprint": fingerprint, **dict(meta or {})}
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(body, sort_keys=True).encode()})
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    fs, inner = fsutil.filesystem(path)
    fsutil.write_bytes_atomic(fs, inner, sink.getvalue())
    return fingerprint


def read_manifest(path: str) -> pa.Table:
    fs, inner = fsutil.filesystem(path)
    if not fs.exists(inner):
        raise FileNotFoundError(f"manifest {path} does not exist; build it with `videofeat manifest ROOT -o {path}`")
    table = fsutil.read_parquet(path)
    if METADATA_KEY not in (table.schema.metadata or {}):
        raise ManifestError(f"{path} is not a videofeat manifest (no '{METADATA_KEY.decode()}' metadata); "
                            "build one with `videofeat manifest`")
    return table


def manifest_metadata(table_or_path: pa.Table | str) -> dict:
    table = read_manifest(table_or_path) if isinstance(table_or_path, str) else table_or_path
    return json.loads(table.schema.metadata[METADATA_KEY])


def manifest_fingerprint(table_or_path: pa.Table | str) -> str:
    return manifest_metadata(table_or_path)["fingerprint"]


def shard_ids_for_views(table: pa.Table, views: Optional[Sequence[str]] = None) -> list[int]:
    """Every shard of the given views (all views when None), ascending."""
    rows = table.select(["view", "shard_id"]).to_pylist()
    return sorted({r["shard_id"] for r in rows if r["shard_id"] is not None and (not views or r["view"] in views)})


def windows_for(num_frames: int, span: int, hop: int) -> int:
    """T = max(0, floor((N - span) / hop) + 1): the window count of a video of N frames."""
    return max(0, (num_frames - span) // hop + 1)


# Window geometry of the named presets, for estimates made before any preset is chosen.
PRESET_WINDOWS = {"aicity-vitl": (32, 16), "aicity-vith": (32, 16), "videomae-16x4": (64, 16)}


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict:
    """Counts by status and view, hours of video, VFR count, windows per preset, shard loads."""
    videos = {}
    for row in rows:
        videos.setdefault(row["video_id"], row)
    by_status: dict[str, int] = {}
    by_view: dict[str, dict[str, int]] = {}
    seconds = 0.0
    vfr = 0
    windows = {name: 0 for name in PRESET_WINDOWS}
    for row in videos.values():
        by_status[row["status"]] = by_status.get(row["status"], 0) + 1
        view_counts = by_view.setdefault(row["view"], {})
        view_counts[row["status"]] = view_counts.get(row["status"], 0) + 1
        if row["status"] == OK:
            seconds += float(row["duration_s"] or 0.0)
            vfr += bool(row["vfr"])
            for name, (span, hop) in PRESET_WINDOWS.items():
                windows[name] += windows_for(int(row["num_frames"]), span, hop)
    loads: dict[int, int] = {}
    for row in rows:
        if row["shard_id"] is not None:
            loads[row["shard_id"]] = loads.get(row["shard_id"], 0) + int(row["piece_end_frame"] - row["piece_start_frame"])
    return {"videos": len(videos), "by_status": by_status, "by_view": by_view, "hours": seconds / 3600,
            "vfr": vfr, "windows_per_preset": windows, "shards": len(loads),
            "max_shard_frames": max(loads.values(), default=0),
            "mean_shard_frames": (sum(loads.values()) / len(loads)) if loads else 0.0,
            "not_ok": [(r["video_id"], r["status"], r["error"]) for r in videos.values() if r["status"] != OK]}
