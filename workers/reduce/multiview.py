"""The multi-view table: the views of each session side by side, one row per window.

An outer join on ``(session_id, window_index)`` over the views of one run: columns
``session_id, window_index, start_s, center_s, end_s`` then, per view, ``<view>_video_id``,
``<view>_feature`` and ``<view>_probs``. A view with fewer windows (or none) has nulls there.
It is built one session at a time (one row group per session), so memory stays at about one
session's rows. Sessions whose views differ by more than one window (one hop) are listed in
``multiview_summary.json``: AI City cameras of one recording should have near-equal lengths.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from videofeat.manifests import fsutil
from videofeat.workers.reduce.dataset import Dataset
from videofeat.workers.shard_io import METADATA_KEY


TABLE_NAME = "multiview.parquet"
SUMMARY_NAME = "multiview_summary.json"
TIME_COLUMNS = ("start_s", "center_s", "end_s")


def session_index(dataset: "Dataset", views: list[str]) -> dict[str, dict[str, tuple[str, int]]]:
    """session -> view -> (video_id, row group), from row-group statistics (no data read)."""
    sessions: dict[str, dict[str, tuple[str, int]]] = defaultdict(dict)
    for view in views:
        groups = dataset.metadata(view)["row_groups"]
        with dataset.fs.open(dataset.files[view], "rb") as handle:
            meta = pq.ParquetFile(handle).metadata
            position = meta.schema.to_arrow_schema().get_field_index("session_id")
            for video_id, (group, *_) in groups.items():
                stats = meta.row_group(group).column(position).statistics
                if stats is not None and stats.has_min_max and stats.min == stats.max:
                    session = stats.min
                else:  # a writer without statistics: read the one value we need
                    session = pq.ParquetFile(handle).read_row_group(group, columns=["session_id"])[0][0].as_py()
                sessions[session][view] = (video_id, group)
    return dict(sorted(sessions.items()))


def multiview_schema(dataset: "Dataset", views: list[str]) -> pa.Schema:
    fields = [pa.field("session_id", pa.string()), pa.field("window_index", pa.int32())]
    fields += [pa.field(name, pa.float64()) for name in TIME_COLUMNS]
    for view in views:
        with dataset.fs.open(dataset.files[view], "rb") as handle:
            schema = pq.ParquetFile(handle).schema_arrow
        fields.append(pa.field(f"{view}_video_id", pa.string()))
        fields.append(pa.field(f"{view}_feature", schema.field("feature").type))
        if "probs" in schema.names:
            fields.append(pa.field(f"{view}_probs", schema.field("probs").type))
    return pa.schema(fields)


def write_multiview(dataset: "Dataset", views: list[str], fs: Any, root: str) -> dict:
    """Write ``multiview.parquet`` and its summary under ``root``; returns the summary."""
    if len(views) < 2:
        raise ValueError(f"the multi-view table needs at least two views; the dataset has {', '.join(views)}")
    schema = multiview_schema(dataset, views)
    sessions = session_index(dataset, views)
    handles = {view: dataset.fs.open(dataset.files[view], "rb") for view in views}
    files = {view: pq.ParquetFile(handle) for view, handle in handles.items()}
    path = fsutil.join(root, TABLE_NAME)
    tmp = f"{path}.tmp-{fsutil.unique_suffix()}"
    mismatched, rows = [], 0
    hop = dataset.preset.get("hop")
    ids = ["session_id"] + [f"{view}_video_id" for view in views]
    writer = pq.ParquetWriter(tmp, schema, filesystem=fs, compression="zstd", use_dictionary=ids,
                              write_statistics=ids + ["window_index"])
    try:
        for session, members in sessions.items():
            tables = {view: files[view].read_row_group(group) for view, (_, group) in members.items()}
            counts = {view: tables[view].num_rows if view in tables else 0 for view in views}
            if max(counts.values()) - min(counts.values()) > 1:
                mismatched.append({"session_id": session, "windows": counts})
            table = _join_session(session, tables, views, schema)
            writer.write_table(table, row_group_size=max(table.num_rows, 1))
            rows += table.num_rows
        writer.add_key_value_metadata({METADATA_KEY: json.dumps(
            {"fingerprint": dataset.summary.get("fingerprint"), "views": views, "hop": hop}).encode()})
    finally:
        writer.close()
        for handle in handles.values():
            handle.close()
    fs.mv(tmp, path)
    summary = {"format": "multiview", "output": root, "table": path, "views": views, "sessions": len(sessions),
               "rows": rows, "sessions_view_mismatch": mismatched,
               "note": f"listed sessions have views whose window counts differ by more than one hop ({hop} frames)"}
    fsutil.write_json_atomic(fs, fsutil.join(root, SUMMARY_NAME), summary)
    return summary


def _join_session(session: str, tables: dict[str, pa.Table], views: list[str], schema: pa.Schema) -> pa.Table:
    """Outer join of one session's views on window_index; missing windows become nulls."""
    length = max(int(t.column("window_index").to_numpy().max()) + 1 for t in tables.values() if t.num_rows) \
        if any(t.num_rows for t in tables.values()) else 0
    columns: dict[str, pa.Array] = {"session_id": pa.array([session] * length, pa.string()),
                                    "window_index": pa.array(np.arange(length, dtype=np.int32))}
    positions = {}
    for view, table in tables.items():
        where = np.full(length, -1, dtype=np.int64)
        where[table.column("window_index").to_numpy()] = np.arange(table.num_rows)
        positions[view] = pa.array(where, mask=where < 0)
    for name in TIME_COLUMNS:
        # Every view of a session shares the time axis: take each window's times from any view that has it.
        merged = pa.nulls(length, pa.float64())
        for view, table in tables.items():
            merged = pc.coalesce(merged, table.column(name).take(positions[view]))
        columns[name] = merged
    for view in views:
        for suffix, source in (("video_id", "video_id"), ("feature", "feature"), ("probs", "probs")):
            name = f"{view}_{suffix}"
            if name not in schema.names:
                continue
            if view in tables:
                columns[name] = tables[view].column(source).take(positions[view]).combine_chunks()
            else:
                columns[name] = pa.nulls(length, schema.field(name).type)
    return pa.Table.from_pydict(columns, schema=schema)
