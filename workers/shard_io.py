"""The Parquet shard format: one file per shard, one row per window, one row group per video.

Columns: ``video_id, session_id, view, window_index, start_frame, end_frame, start_s, end_s,
center_s, feature`` and, when the model has a head, ``probs``. ``feature`` and ``probs`` are
fixed-size lists. Each video's rows are contiguous, sorted by ``window_index``, in row groups of
their own; the file metadata (key ``videofeat``) maps ``video_id`` to its row groups and carries
the run's lineage (model, checkpoint SHA-256, preset, sampling parameters, fps, version,
fingerprint), so a reader can fetch one video without scanning the file.

Pages carry CRC checksums and every reader here verifies them, so flipped bytes in a shard
end in :class:`CorruptShard` (naming the file and the fix), never in features that merely look
odd. Non-finite features are refused before they are written.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

METADATA_KEY = b"videofeat"
RECOMPUTE_HINT = ("recompute it with a plain rerun of the run's `videofeat extract` command (`videofeat status "
                  "RUN_DIR` prints it; a shard whose file no longer matches its stats is recomputed)")


class CorruptShard(ValueError):
    """A shard file that cannot be read back as written (truncated, bytes flipped, not Parquet)."""

    def __init__(self, path: str, error: BaseException):
        self.path = path
        super().__init__(f"shard {path} is corrupt ({type(error).__name__}: {error}); {RECOMPUTE_HINT}")


class NonFiniteFeatures(ValueError):
    """The model produced NaN or inf: never written, the shard fails with this message."""


def require_finite(video_id: str, window_index: Sequence[int], name: str, values: np.ndarray,
                   stored: np.ndarray) -> None:
    """Refuse NaN/inf in ``values`` (as computed) and in ``stored`` (as cast for the file)."""
    for array, cause in ((values, "the model produced them: most likely a checkpoint with NaN/inf weights "
                                  "(a fine-tune that diverged; `videofeat inspect CHECKPOINT`) or a float16 "
                                  "overflow (try --dtype float32)"),
                         (stored, "they overflow the stored dtype: use --feature-dtype float32")):
        bad = ~np.isfinite(np.asarray(array, dtype=np.float64) if array.dtype == np.float16 else array)
        if bad.any():
            rows = np.flatnonzero(bad.reshape(len(bad), -1).any(axis=1))
            windows = [int(window_index[i]) for i in rows[:5]]
            raise NonFiniteFeatures(
                f"{video_id}: {name} of {rows.size} of {len(bad)} windows are not finite (NaN/inf; first "
                f"window_index {windows}); {cause}. Nothing of this shard was written.")
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


def _stored(values: np.ndarray, value_type: pa.DataType) -> np.ndarray:
    return np.ascontiguousarray(values).astype(value_type.to_pandas_dtype(), copy=False)


def _fixed_list(values: np.ndarray, value_type: pa.DataType) -> pa.FixedSizeListArray:
    flat = pa.array(values.reshape(-1), type=value_type)
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
                                            compression="zstd", write_page_checksum=True)
        return self._writer

    def abort(self) -> None:
        """Close after a failure without adding metadata; the caller removes the file. Until the
        handle is closed a removed file still holds its blocks, which matters on a full disk."""
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # the failure that brought us here is what gets reported
                pass
            self._writer = None

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
        feature_type = self.schema.field("feature").type.value_type
        stored_feature = _stored(feature, feature_type)
        require_finite(video_id, window_index, "features", feature, stored_feature)
        stored_probs = None
        if "probs" in self.schema.names and probs is not None:
            stored_probs = _stored(probs, pa.float32())
            require_finite(video_id, window_index, "probs", probs, stored_probs)
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
            "feature": _fixed_list(stored_feature, feature_type),
        }
        if "probs" in self.schema.names:
            if stored_probs is None:
                raise ValueError("this shard has a probs column: pass probs for every video")
            columns["probs"] = _fixed_list(stored_probs, pa.float32())
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
        self._writer = None


def read_shard_metadata(path: str, filesystem: Any = None) -> dict:
    try:
        meta = pq.read_metadata(path, filesystem=filesystem).metadata or {}
    except (pa.ArrowException, OSError) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise CorruptShard(path, error) from error
    if METADATA_KEY not in meta:
        raise ValueError(f"{path} is not a videofeat shard (no '{METADATA_KEY.decode()}' metadata)")
    return json.loads(meta[METADATA_KEY])


def open_shard(path: str, filesystem: Any) -> tuple[Any, pq.ParquetFile]:
    """(handle, ParquetFile) that verifies page checksums; close both when done."""
    handle = filesystem.open(path, "rb")
    try:
        return handle, pq.ParquetFile(handle, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as error:
        handle.close()
        raise CorruptShard(path, error) from error


def read_row_groups(parquet_file: pq.ParquetFile, path: str, row_groups: Sequence[int],
                    columns: Optional[Sequence[str]] = None) -> pa.Table:
    """Only the given row groups (one video's), checksums verified; a bad page names the shard."""
    try:
        return parquet_file.read_row_groups(list(row_groups), columns=None if columns is None else list(columns))
    except (pa.ArrowException, OSError) as error:
        raise CorruptShard(path, error) from error
