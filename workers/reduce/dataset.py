"""A reduced dataset as the exports read it: ``<view>.parquet`` files and ``summary.json``.

Refused when it is missing or older than the newest shard marker (``videofeat reduce`` must run
again). Read one video (one row group) at a time.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from videofeat.manifests import fsutil
from videofeat.manifests.ledger import RunDir
from videofeat.workers.shard_io import read_shard_metadata


class DatasetNotReady(RuntimeError):
    """The dataset is missing or older than the newest shard: ``videofeat reduce`` must run first."""


class Dataset:
    """A reduced dataset: ``<view>.parquet`` files and ``summary.json``, read one video at a time."""

    def __init__(self, run_dir: str, dataset: Optional[str] = None):
        self.run = RunDir(run_dir)
        self.fs, self.root = fsutil.filesystem(dataset) if dataset else (self.run.fs, self.run.dataset_dir)
        summary_path = fsutil.join(self.root, "summary.json")
        hint = f"run `videofeat reduce {run_dir}`" + (f" -o {dataset}" if dataset else "")
        if not self.fs.exists(summary_path):
            raise DatasetNotReady(f"no reduced dataset at {self.root}: {hint} first")
        self.summary = fsutil.read_json(self.fs, summary_path)
        stale = _newer_marker(self.run, _mtime(self.fs, summary_path))
        if stale is not None:
            raise DatasetNotReady(f"the dataset at {self.root} is older than the marker of shard {stale:05d}: "
                                  f"{hint} again")
        self.files = {view: fsutil.join(self.root, f"{view}.parquet")
                      for view, row in self.summary.get("views", {}).items() if row.get("file")}
        self.preset = self.summary.get("preset") or {}

    @property
    def views(self) -> list[str]:
        return list(self.files)

    def metadata(self, view: str) -> dict:
        return read_shard_metadata(self.files[view], self.fs)

    def videos(self, view: str) -> Iterator[tuple[str, pa.Table]]:
        """``(video_id, rows)`` in video-id order, one row group (one video) at a time."""
        groups = self.metadata(view)["row_groups"]
        with self.fs.open(self.files[view], "rb") as handle:
            parquet = pq.ParquetFile(handle)
            for video_id in sorted(groups):
                yield video_id, parquet.read_row_groups(groups[video_id])


def _mtime(fs: Any, path: str) -> Optional[float]:
    try:
        return fs.modified(path).timestamp()
    except (NotImplementedError, AttributeError, OSError):
        return None


def _newer_marker(run: RunDir, dataset_time: Optional[float]) -> Optional[int]:
    """A shard whose marker is newer than the dataset (committed after the last reduce)."""
    if dataset_time is None:
        return None
    for shard_id in run.done_shards():
        stamp = _mtime(run.fs, run.marker_path(shard_id))
        if stamp is not None and stamp > dataset_time:
            return shard_id
    return None
