"""The Parquet shard format: one file per shard, one row per window, one row group per video.

Columns: ``video_id, session_id, view, window_index, start_frame, end_frame, start_s, end_s,
center_s, feature`` and, when the model has a head, ``probs``. ``feature`` and ``probs`` are
fixed-size lists. Each video's rows are contiguous, sorted by ``window_index``, in row groups of
their own; the file metadata (key ``videofeat``) maps ``video_id`` to its row groups and carries
the run's lineage (model, checkpoint SHA-256, preset, sampling parameters, fps, version,
fingerprint), so a reader can fetch one video without scanning the file.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

METADATA_KEY = b"videofeat"
FEATURE_DTYPES = {"float32": pa.float32(), "float16": pa.float16()}


def shard_schema(feature_dim: int, num_classes: int, feature_dtype: str = "float32") -> pa.Schema:
    if feature_dtype not in FEATURE_DTYPES:
        raise ValueError(f"--feature-dtype must be one of {sorted(FEATURE_DTYPES)}, got {feature_dtype!r}")
    fields = [
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("session_id", pa.string()),
        pa.field("view", pa.string()),
        pa.field("window_index", pa.int32(), nullable=False),
        pa.field("start_frame", pa.int64()),
        pa.field("end_frame", pa.int64()),
        pa.field("start_s", pa.float64()),
        pa.field("end_s", pa.float64()),
        pa.field("center_s", pa.float64()),
        pa.field("feature", pa.list_(FEATURE_DTYPES[feature_dtype], feature_dim)),
    ]
    if num_classes > 0:
        fields.append(pa.field("probs", pa.list_(pa.float32(), num_classes)))
    return pa.schema(fields)


def _fixed_list(values: np.ndarray, value_type: pa.DataType) -> pa.FixedSizeListArray:
    values = np.ascontiguousarray(values)
    flat = pa.array(values.reshape(-1).astype(value_type.to_pandas_dtype(), copy=False), type=value_type)
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])


class ShardWriter:
    """Writes one shard: call :meth:`write_video` per video, then :meth:`close`."""

    def __init__(self, path: str, filesystem: Any, schema: pa.Schema, lineage: Mapping[str, Any]):
        self.path = path
        self.schema = schema
        self._lineage = dict(lineage)
        self._row_groups: dict[str, list[int]] = {}
        self._num_row_groups = 0
        self._writer: Optional[pq.ParquetWriter] = None
        self._filesystem = filesystem

    def _open(self) -> pq.ParquetWriter:
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, self.schema, filesystem=self._filesystem,
                                            compression="zstd")
        return self._writer

    def write_video(self, *, video_id: str, session_id: str, view: str, window_index: Sequence[int],
                    start_frame: Sequence[int], end_frame: Sequence[int], start_s: Sequence[float],
                    end_s: Sequence[float], center_s: Sequence[float], feature: np.ndarray,
                    probs: Optional[np.ndarray] = None) -> None:
        """Append one video's (or one piece's) windows, already sorted by ``window_index``."""
        n = len(window_index)
        if n == 0:
            return
        if np.any(np.diff(np.asarray(window_index)) <= 0):
            raise ValueError(f"windows of {video_id} must be strictly increasing")
        columns = {
            "video_id": pa.array([video_id] * n, pa.string()),
            "session_id": pa.array([session_id] * n, pa.string()),
            "view": pa.array([view] * n, pa.string()),
            "window_index": pa.array(np.asarray(window_index, dtype=np.int32)),
            "start_frame": pa.array(np.asarray(start_frame, dtype=np.int64)),
            "end_frame": pa.array(np.asarray(end_frame, dtype=np.int64)),
            "start_s": pa.array(np.asarray(start_s, dtype=np.float64)),
            "end_s": pa.array(np.asarray(end_s, dtype=np.float64)),
            "center_s": pa.array(np.asarray(center_s, dtype=np.float64)),
            "feature": _fixed_list(feature, self.schema.field("feature").type.value_type),
        }
        if "probs" in self.schema.names:
            if probs is None:
                raise ValueError("this shard has a probs column: pass probs for every video")
            columns["probs"] = _fixed_list(probs, pa.float32())
        table = pa.Table.from_pydict(columns, schema=self.schema)
        self._open().write_table(table, row_group_size=max(n, 1))
        self._row_groups.setdefault(video_id, []).append(self._num_row_groups)
        self._num_row_groups += 1

    def close(self) -> None:
        """Close the file with the row-group map in its metadata (an empty shard is valid)."""
        writer = self._open()
        metadata = dict(self._lineage, row_groups=self._row_groups)
        writer.add_key_value_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})
        writer.close()


def read_shard_metadata(path: str, filesystem: Any = None) -> dict:
    meta = pq.read_metadata(path, filesystem=filesystem).metadata or {}
    if METADATA_KEY not in meta:
        raise ValueError(f"{path} is not a videofeat shard (no '{METADATA_KEY.decode()}' metadata)")
    return json.loads(meta[METADATA_KEY])
