"""Exports of a reduced run: what temporal action localizers read.

- ``actionformer``: one flat folder of ``<video_id>.npz`` for every view (video ids carry the
  view, so names never collide): ``feats`` ``[T, D]`` float32 and the class probabilities under
  ``a_prob`` and ``pred`` (MA-Actionformer picks the key by whether its folder path contains
  "videomae"), or one of them with ``prob_key``; no probability key when the model had no head.
- ``npy``: ``<video_id>.npy`` holding ``[T, D]`` float32 (VideoMAE V2 / ActionFormer THUMOS).
- with labels: an ActionFormer-style annotation JSON and a config snippet whose ``feat_stride``,
  ``num_frames``, ``default_fps`` and ``input_dim`` match the run's preset.
- ``multiview``: see :mod:`videofeat.workers.reduce.multiview`.

Every export reads the dataset one video (one row group) at a time.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from videofeat import __version__
from videofeat.manifests import fsutil
from videofeat.manifests.manifest import read_manifest_rows
from videofeat.manifests.views import canonical_view
from videofeat.workers.reduce.dataset import Dataset

log = logging.getLogger(__name__)

FORMATS = ("actionformer", "npy", "multiview")
PROB_KEYS = ("a_prob", "pred")
ANNOTATIONS_NAME = "annotations.json"
CONFIG_NAME = "config_snippet.yaml"


@dataclass(frozen=True)
class ExportConfig:
    """Options of ``videofeat export``."""

    run_dir: str
    output: str
    format: str = "actionformer"
    prob_key: Optional[str] = None          # None: both a_prob and pred
    split_views: bool = False
    labels: Optional[str] = None
    unlabeled_subset: str = "validation"
    dataset: Optional[str] = None           # default RUN_DIR/dataset
    views: Optional[tuple[str, ...]] = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.prob_key is not None and self.prob_key not in PROB_KEYS:
            raise ValueError(f"--prob-key must be one of {', '.join(PROB_KEYS)}, got {self.prob_key!r}")
        if not self.output:
            raise ValueError("-o/--output is required: the folder the exported files go to")
        if not self.unlabeled_subset.strip():
            raise ValueError("--unlabeled-subset must not be empty (ActionFormer uses training/validation)")


def fixed_list_to_numpy(column: pa.ChunkedArray | pa.Array, dtype: Any = np.float32) -> np.ndarray:
    """A fixed-size list column -> ``[rows, width]`` array, without going through Python lists."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = array.type.list_size
    return array.flatten().to_numpy(zero_copy_only=False).reshape(-1, width).astype(dtype, copy=False)


def export_run(config: ExportConfig) -> dict:
    """Write the chosen export; returns what was written, for the terminal and the tests."""
    dataset = Dataset(config.run_dir, config.dataset)
    views = _select_views(dataset, config.views)
    out_fs, out_root = fsutil.filesystem(config.output)
    out_fs.makedirs(out_root, exist_ok=True)
    if config.format == "multiview":
        from videofeat.workers.reduce.multiview import write_multiview

        return write_multiview(dataset, views, out_fs, out_root)
    report = write_features(dataset, views, config, out_fs, out_root)
    report["config"] = write_config_snippet(dataset, config, out_fs, out_root, report)
    if config.labels:
        report.update(write_annotations(dataset, views, config, out_fs, out_root))
    return report


def _select_views(dataset: Dataset, wanted: Optional[tuple[str, ...]]) -> list[str]:
    if not wanted:
        return dataset.views
    views = [canonical_view(v) for v in wanted]
    absent = [v for v in views if v not in dataset.files]
    if absent:
        raise ValueError(f"--views {', '.join(absent)}: not in the dataset (it has {', '.join(dataset.views)})")
    return views


def write_features(dataset: Dataset, views: list[str], config: ExportConfig, fs: Any, root: str) -> dict:
    """One ``.npz`` (or ``.npy``) per video, flat or one subfolder per view."""
    ext = ".npz" if config.format == "actionformer" else ".npy"
    keys = [config.prob_key] if config.prob_key else list(PROB_KEYS)
    counts: dict[str, int] = {}
    has_head = True
    for view in views:
        folder = fsutil.join(root, view) if config.split_views else root
        counts[view] = 0
        for video_id, rows in dataset.videos(view):
            feats = fixed_list_to_numpy(rows.column("feature"))
            arrays = {"feats": feats}
            if "probs" in rows.schema.names:
                probs = fixed_list_to_numpy(rows.column("probs"))
                arrays.update({key: probs for key in keys})
            elif has_head:
                has_head = False
                log.info("the model of this run had no classification head: files hold feats only")
            buffer = io.BytesIO()
            if ext == ".npz":
                np.savez(buffer, **arrays)
            else:
                np.save(buffer, feats)
            fsutil.write_bytes_atomic(fs, fsutil.join(folder, video_id + ext), buffer.getvalue())
            counts[view] += 1
    return {"format": config.format, "output": root, "files": sum(counts.values()), "views": counts,
            "keys": (["feats"] + (keys if has_head else [])) if ext == ".npz" else ["[T, D] array"],
            "feature_dim": dataset.summary.get("feature_dim"), "split_views": config.split_views}


def video_timing(dataset: Dataset) -> dict[str, dict]:
    """Per video id: exact fps and duration, from the manifest (window ends as a fallback)."""
    manifest = dataset.summary.get("manifest")
    out: dict[str, dict] = {}
    if manifest:
        fs, path = fsutil.filesystem(manifest)
        if fs.exists(path):
            for row in read_manifest_rows(manifest):
                fps = row.fps or None
                duration = row.duration_s
                if duration is None and fps and row.num_frames:
                    duration = row.num_frames / fps
                out.setdefault(row.video_id, {"fps": fps, "duration": duration})
    return out


def write_annotations(dataset: Dataset, views: list[str], config: ExportConfig, fs: Any, root: str) -> dict:
    """ActionFormer-style JSON: every extracted video, labelled or not (``annotations: []``)."""
    from videofeat.manifests.labels import read_labels

    labels = read_labels(config.labels).to_pylist()
    by_video: dict[str, list[dict]] = {}
    wanted = set(views)
    for row in labels:
        # Labels of views this export leaves out (the seed extracts rear and dashboard) are not "missing".
        if row.get("view") is None or row["view"] in wanted:
            by_video.setdefault(row["video_id"], []).append(row)
    timing = video_timing(dataset)
    database, labelled = {}, 0
    for view in views:
        for video_id in sorted(dataset.metadata(view)["row_groups"]):
            rows = sorted(by_video.get(video_id, []), key=lambda r: (r["start_s"], r["end_s"], r["label_id"]))
            entry = timing.get(video_id) or _timing_from_rows(dataset, view, video_id)
            database[video_id] = {
                "subset": rows[0]["split"] if rows else config.unlabeled_subset,
                "duration": entry["duration"], "fps": entry["fps"],
                "annotations": [{"segment": [float(r["start_s"]), float(r["end_s"])], "label": r["label"],
                                 "label_id": int(r["label_id"])} for r in rows],
            }
            labelled += bool(rows)
    not_extracted = sorted(set(by_video) - set(database))
    if not_extracted:
        log.warning("%d labelled video(s) have no features in this export, e.g. %s", len(not_extracted),
                    not_extracted[0])
    body = {"version": f"videofeat {__version__}", "fingerprint": dataset.summary.get("fingerprint"),
            "database": database}
    path = fsutil.join(root, ANNOTATIONS_NAME)
    fsutil.write_bytes_atomic(fs, path, (json.dumps(body, indent=1) + "\n").encode())
    return {"annotations": path, "labelled_videos": labelled, "unlabelled_videos": len(database) - labelled,
            "labelled_not_extracted": not_extracted}


def _timing_from_rows(dataset: Dataset, view: str, video_id: str) -> dict:
    """A video the manifest no longer lists: its last window's end and the run's time axis."""
    groups = dataset.metadata(view)["row_groups"][video_id]
    with dataset.fs.open(dataset.files[view], "rb") as handle:
        rows = pq.ParquetFile(handle).read_row_groups(groups, columns=["end_frame", "end_s"])
    end_frame, end_s = rows.column("end_frame")[-1].as_py(), rows.column("end_s")[-1].as_py()
    fps = end_frame / end_s if end_s else None
    return {"fps": fps, "duration": end_s}


def config_values(dataset: Dataset, views: list[str]) -> dict:
    """The localizer settings that match this run: stride, window, fps and feature width."""
    extracted = {vid for v in views for vid in dataset.metadata(v)["row_groups"]}
    fps_values = {round(t["fps"], 9) for vid, t in video_timing(dataset).items() if t.get("fps") and vid in extracted}
    num_classes = dataset.summary.get("num_classes")
    return {"feat_stride": dataset.preset.get("hop"), "num_frames": dataset.preset.get("span"),
            "default_fps": fps_values.pop() if len(fps_values) == 1 else None,
            "input_dim": dataset.summary.get("feature_dim"), "num_classes": num_classes or None}


def write_config_snippet(dataset: Dataset, config: ExportConfig, fs: Any, root: str, report: dict) -> str:
    values = config_values(dataset, list(report["views"]))
    ext = ".npz" if config.format == "actionformer" else ".npy"
    lines = [f"# dataset settings matching this export (videofeat {__version__}, run "
             f"{dataset.summary.get('fingerprint')}); merge into an ActionFormer / MA-Actionformer config",
             "dataset:",
             f"  feat_folder: {json.dumps(root)}" + ("  # one subfolder per view" if config.split_views else ""),
             "  file_prefix: ~",
             f"  file_ext: {ext}"]
    if config.labels:
        lines.append(f"  json_file: {json.dumps(fsutil.join(root, ANNOTATIONS_NAME))}")
    for key in ("num_classes", "input_dim", "feat_stride", "num_frames", "default_fps"):
        value = values[key]
        note = "  # videos differ: each has its own fps in the annotation JSON" if key == "default_fps" and \
            value is None else ""
        lines.append(f"  {key}: {'~' if value is None else json.dumps(value)}{note}")
    path = fsutil.join(root, CONFIG_NAME)
    fsutil.write_bytes_atomic(fs, path, ("\n".join(lines) + "\n").encode())
    report["config_values"] = values
    return path
