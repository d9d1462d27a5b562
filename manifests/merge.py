"""One manifest from several: the videos of a training set and its test sets in one run.

Each input manifest is one dataset's probe results; merging re-cuts the videos into shards
(largest first, per view, as ``videofeat manifest`` does), so one extraction covers them all and
every view's windows keep one layout. Video ids must be unique across the inputs: a duplicate is
refused naming both files.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from videofeat.manifests.manifest import (SCHEMA, ManifestError, manifest_metadata, read_manifest, shard_rows,
                                          write_manifest)
from videofeat.manifests.shards import ShardingConfig

_SHARD_COLUMNS = ("shard_id", "piece_index", "num_pieces", "piece_start_frame", "piece_end_frame")


def merge_manifests(paths: Sequence[str], output: str, sharding: ShardingConfig = ShardingConfig(),
                    meta: Optional[Mapping[str, Any]] = None) -> str:
    """Write ``output`` holding every video of ``paths``, re-sharded; returns its fingerprint."""
    if not paths:
        raise ManifestError("merging manifests needs at least one input manifest")
    base_rows: list[dict] = []
    source: dict[str, str] = {}
    for path in paths:
        for row in read_manifest(path).to_pylist():
            if int(row.get("piece_index") or 0) != 0:
                continue  # a split video's later pieces: the first carries the whole video's row
            if row["video_id"] in source:
                raise ManifestError(f"video {row['video_id']} is in both {source[row['video_id']]} and {path}; "
                                    "video ids must be unique across the merged manifests")
            source[row["video_id"]] = path
            base_rows.append({k: v for k, v in row.items() if k in SCHEMA.names and k not in _SHARD_COLUMNS})
    rows = shard_rows(base_rows, sharding)
    body = {"merged_from": [{"path": p, "fingerprint": manifest_metadata(p)["fingerprint"]} for p in paths],
            "num_shards": sharding.num_shards, "shard_frames": sharding.shard_frames,
            "split_long_videos": sharding.split_long_videos, **dict(meta or {})}
    return write_manifest(rows, output, body)
