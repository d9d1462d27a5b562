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
from videofeat.manifests.windows import PRESET_SAMPLING

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
class ManifestRow:
    """One manifest row (a whole video or one piece of it), with its derived values resolved once.

    Field names are the column names. ``piece_end_frame`` is always set (the video's frame count
    for a whole video); ``fps`` is exact (``fps_num / fps_den``) where the probe found a rational
    rate; ``crop`` is the box or None.
    """

    video_id: str
    session_id: str
    view: str
    uri: str
    num_frames: int
    status: str
    user_id: Optional[str] = None
    fps_num: Optional[int] = None
    fps_den: Optional[int] = None
    fps_float: Optional[float] = None
    start_time_s: Optional[float] = None
    duration_s: Optional[float] = None
    vfr: bool = False
    width: Optional[int] = None
    height: Optional[int] = None
    codec: Optional[str] = None
    size_bytes: Optional[int] = None
    mtime_ns: Optional[int] = None     # with size_bytes: how extraction tells the file is still the probed one
    rotation: int = 0                  # degrees counter-clockwise the decoders turn each frame
    error: Optional[str] = None
    crop: Optional[tuple[int, int, int, int]] = None
    shard_id: Optional[int] = None
    piece_index: int = 0
    num_pieces: int = 1
    piece_start_frame: int = 0
    piece_end_frame: int = 0

    @classmethod
    def from_mapping(cls, row: Mapping[str, Any]) -> "ManifestRow":
        num_frames = int(row.get("num_frames") or 0)
        box = tuple(row.get(k) for k in CROP_FIELDS)
        end = row.get("piece_end_frame")
        shard = row.get("shard_id")
        return cls(
            video_id=row["video_id"], session_id=row.get("session_id") or row["video_id"], view=row["view"],
            uri=row["uri"], num_frames=num_frames, status=row["status"], user_id=row.get("user_id"),
            fps_num=row.get("fps_num"), fps_den=row.get("fps_den"), fps_float=row.get("fps"),
            start_time_s=row.get("start_time_s"), duration_s=row.get("duration_s"), vfr=bool(row.get("vfr")),
            width=row.get("width"), height=row.get("height"), codec=row.get("codec"),
            size_bytes=row.get("size_bytes"), mtime_ns=row.get("mtime_ns"), rotation=int(row.get("rotation") or 0),
            error=row.get("error"),
            crop=None if any(v is None for v in box) else tuple(int(v) for v in box),  # type: ignore[arg-type]
            shard_id=None if shard is None else int(shard), piece_index=int(row.get("piece_index") or 0),
            num_pieces=int(row.get("num_pieces") or 1), piece_start_frame=int(row.get("piece_start_frame") or 0),
            piece_end_frame=num_frames if end is None else int(end),
        )

    @property
    def fps(self) -> float:
        """The exact frame rate where the probe found one, else its float estimate."""
        if self.fps_num and self.fps_den:
            return self.fps_num / self.fps_den
        return float(self.fps_float or 0.0)

    @property
    def piece_stop(self) -> Optional[int]:
        """The piece's end frame, or None when it runs to the end of the video (whatever its real length)."""
        return None if self.piece_end_frame >= self.num_frames else self.piece_end_frame

    @property
    def piece_frames(self) -> int:
        return self.piece_end_frame - self.piece_start_frame


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
    return shard_rows(base_rows, config.sharding)


def shard_rows(base_rows: Sequence[Mapping[str, Any]], sharding: ShardingConfig) -> list[dict]:
    """Cut probed video rows (no shard columns yet) into shards; rows not ok keep no shard."""
    by_id = {row["video_id"]: row for row in base_rows}
    units = [whole_video_unit(r["video_id"], r["view"], int(r["num_frames"])) for r in base_rows if r["status"] == OK]
    rows: list[dict] = []
    for shard_id, unit in assign_shards(units, sharding):
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


def read_manifest_rows(table_or_path: pa.Table | str) -> list[ManifestRow]:
    table = read_manifest(table_or_path) if isinstance(table_or_path, str) else table_or_path
    return [ManifestRow.from_mapping(row) for row in table.to_pylist()]


def manifest_metadata(table_or_path: pa.Table | str) -> dict:
    table = read_manifest(table_or_path) if isinstance(table_or_path, str) else table_or_path
    return json.loads(table.schema.metadata[METADATA_KEY])


def manifest_fingerprint(table_or_path: pa.Table | str) -> str:
    return manifest_metadata(table_or_path)["fingerprint"]


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict:
    """Counts by status and view, hours of video, VFR count, windows per preset, shard loads."""
    videos = {}
    for row in rows:
        videos.setdefault(row["video_id"], row)
    by_status: dict[str, int] = {}
    by_view: dict[str, dict[str, int]] = {}
    seconds = 0.0
    vfr = 0
    windows = {name: 0 for name in PRESET_SAMPLING}
    for row in videos.values():
        by_status[row["status"]] = by_status.get(row["status"], 0) + 1
        view_counts = by_view.setdefault(row["view"], {})
        view_counts[row["status"]] = view_counts.get(row["status"], 0) + 1
        if row["status"] == OK:
            seconds += float(row["duration_s"] or 0.0)
            vfr += bool(row["vfr"])
            for name, sampling in PRESET_SAMPLING.items():
                windows[name] += sampling.num_windows(int(row["num_frames"]))
    loads: dict[int, int] = {}
    for row in rows:
        if row["shard_id"] is not None:
            loads[row["shard_id"]] = loads.get(row["shard_id"], 0) + int(row["piece_end_frame"] - row["piece_start_frame"])
    return {"videos": len(videos), "by_status": by_status, "by_view": by_view, "hours": seconds / 3600,
            "vfr": vfr, "windows_per_preset": windows, "shards": len(loads),
            "max_shard_frames": max(loads.values(), default=0),
            "mean_shard_frames": (sum(loads.values()) / len(loads)) if loads else 0.0,
            "not_ok": [(r["video_id"], r["status"], r["error"]) for r in videos.values() if r["status"] != OK]}
