"""Exports of a reduced run: npz/npy files, annotation JSON, config values, the multi-view table."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from test_reduce import Video, basic_videos, features_for, make_run, write_shard

from videofeat.manifests.labels import write_labels
from videofeat.workers.reduce.dataset import DatasetNotReady
from videofeat.workers.reduce.export import ExportConfig, export_run
from videofeat.workers.reduce.merge import ReduceConfig, reduce_run


def reduced_run(root, videos=None, classes=4):
    run = make_run(root, videos or basic_videos(), classes=classes)
    reduce_run(ReduceConfig(run.url, marker_wait_s=0))
    return run


def test_actionformer_npz_has_exact_keys_shapes_and_dtypes(tmp_path):
    run = reduced_run(tmp_path)
    out = tmp_path / "feats"
    report = export_run(ExportConfig(run.url, str(out)))
    names = sorted(os.listdir(out))
    assert [n for n in names if n.endswith(".npz")] == [
        "Dashboard_user_id_1_NoAudio_1.npz", "Dashboard_user_id_2_NoAudio_1.npz",
        "Rear_view_user_id_1_NoAudio_1.npz", "Rear_view_user_id_2_NoAudio_1.npz"]
    assert report["files"] == 4 and report["views"] == {"rear": 2, "dashboard": 2}
    with np.load(out / "Rear_view_user_id_1_NoAudio_1.npz") as data:
        assert sorted(data.files) == ["a_prob", "feats", "pred"]
        assert data["feats"].shape == (11, 8) and data["feats"].dtype == np.float32
        assert data["a_prob"].shape == (11, 4) and data["a_prob"].dtype == np.float32
        np.testing.assert_array_equal(data["feats"], features_for("Rear_view_user_id_1_NoAudio_1", np.arange(11), 8))
        np.testing.assert_array_equal(data["a_prob"], data["pred"])
    with np.load(out / "Dashboard_user_id_2_NoAudio_1.npz") as data:
        assert data["feats"].shape == (7, 8)

    export_run(ExportConfig(run.url, str(tmp_path / "pred"), prob_key="pred", split_views=True))
    with np.load(tmp_path / "pred" / "rear" / "Rear_view_user_id_2_NoAudio_1.npz") as data:
        assert sorted(data.files) == ["feats", "pred"]
    assert sorted(os.listdir(tmp_path / "pred" / "dashboard"))[0] == "Dashboard_user_id_1_NoAudio_1.npz"

    export_run(ExportConfig(run.url, str(tmp_path / "npy"), format="npy", views=("Rear",)))
    array = np.load(tmp_path / "npy" / "Rear_view_user_id_1_NoAudio_1.npy")
    assert array.shape == (11, 8) and array.dtype == np.float32
    assert not any(n.startswith("Dashboard") for n in os.listdir(tmp_path / "npy"))


def test_no_head_means_no_probability_key(tmp_path):
    run = reduced_run(tmp_path, classes=0)
    report = export_run(ExportConfig(run.url, str(tmp_path / "out")))
    assert report["keys"] == ["feats"]
    with np.load(tmp_path / "out" / "Rear_view_user_id_1_NoAudio_1.npz") as data:
        assert data.files == ["feats"]


def test_export_refuses_missing_or_stale_dataset(tmp_path):
    videos = basic_videos() + [Video("user_id_9_NoAudio_1", "rear", 100, shard=5)]
    run = make_run(tmp_path, videos, skip=(5,))
    with pytest.raises(DatasetNotReady, match="videofeat reduce"):
        export_run(ExportConfig(run.url, str(tmp_path / "out")))
    reduce_run(ReduceConfig(run.url, allow_partial=True, marker_wait_s=0))
    export_run(ExportConfig(run.url, str(tmp_path / "out")))
    write_shard(run, 5, videos, 8, 4)  # the missing shard lands after the reduce
    later = os.stat(os.path.join(run.dataset_dir, "summary.json")).st_mtime + 2  # coarse-mtime filesystems too
    os.utime(run.marker_path(5), (later, later))
    with pytest.raises(DatasetNotReady, match=r"older than the marker of shard 00005.*videofeat reduce"):
        export_run(ExportConfig(run.url, str(tmp_path / "out")))


def label_rows():
    rows = []
    for vid, session, view, split, segs in (
            ("Rear_view_user_id_1_NoAudio_1", "user_id_1_NoAudio_1", "rear", "training", [(3, 1.0, 2.5), (0, 0.0, 1.0)]),
            ("Dashboard_user_id_1_NoAudio_1", "user_id_1_NoAudio_1", "dashboard", "training", [(3, 1.0, 2.5)]),
            ("Rear_view_user_id_2_NoAudio_1", "user_id_2_NoAudio_1", "rear", "validation", [(5, 2.0, 4.0)]),
            ("Rear_view_user_id_8_NoAudio_1", "user_id_8_NoAudio_1", "rear", "training", [(1, 0.0, 2.0)])):
        for label_id, start, end in segs:
            rows.append({"video_id": vid, "session_id": session, "view": view, "user_id": session.split("_")[2],
                         "label_id": label_id, "label": f"Class {label_id}", "start_s": start, "end_s": end,
                         "split": split, "source": "user_id_1.csv:2"})
    return rows


def test_annotation_json_and_config_snippet(tmp_path):
    run = reduced_run(tmp_path)
    labels = str(tmp_path / "labels.parquet")
    write_labels(label_rows(), labels)
    out = tmp_path / "af"
    report = export_run(ExportConfig(run.url, str(out), labels=labels, unlabeled_subset="test"))
    body = json.load(open(out / "annotations.json"))
    database = body["database"]
    assert sorted(database) == sorted(n[:-4] for n in os.listdir(out) if n.endswith(".npz"))
    rear = database["Rear_view_user_id_1_NoAudio_1"]
    assert rear["subset"] == "training" and rear["fps"] == 30.0 and rear["duration"] == pytest.approx(200 / 30)
    assert rear["annotations"] == [{"segment": [0.0, 1.0], "label": "Class 0", "label_id": 0},
                                   {"segment": [1.0, 2.5], "label": "Class 3", "label_id": 3}]
    assert database["Rear_view_user_id_2_NoAudio_1"]["subset"] == "validation"
    unlabeled = database["Dashboard_user_id_2_NoAudio_1"]
    assert unlabeled == {"subset": "test", "duration": pytest.approx(129 / 30), "fps": 30.0, "annotations": []}
    for entry in database.values():  # what MA-Actionformer's aicity loader reads
        assert {"subset", "duration", "fps", "annotations"} <= set(entry)
    assert report["labelled_not_extracted"] == ["Rear_view_user_id_8_NoAudio_1"]
    assert report["config_values"] == {"feat_stride": 16, "num_frames": 32, "default_fps": 30.0, "input_dim": 8,
                                       "num_classes": 4}
    snippet = (out / "config_snippet.yaml").read_text()
    assert "  feat_stride: 16\n" in snippet and "  num_frames: 32\n" in snippet and "  input_dim: 8\n" in snippet
    assert "  default_fps: 30.0\n" in snippet and "  file_ext: .npz\n" in snippet and "json_file" in snippet

    # videos at different frame rates: no default fps, each video carries its own
    manifest = run.load_run()["manifest"]
    table = pq.read_table(manifest)
    dash = pc.equal(table["video_id"], "Dashboard_user_id_2_NoAudio_1")
    table = table.set_column(table.schema.get_field_index("fps_num"), "fps_num",
                             pc.if_else(dash, 30000, table["fps_num"]))
    table = table.set_column(table.schema.get_field_index("fps_den"), "fps_den",
                             pc.if_else(dash, 1001, table["fps_den"]))
    pq.write_table(table, manifest)
    report = export_run(ExportConfig(run.url, str(tmp_path / "af2"), labels=labels))
    assert report["config_values"]["default_fps"] is None
    body = json.load(open(tmp_path / "af2" / "annotations.json"))
    assert body["database"]["Dashboard_user_id_2_NoAudio_1"]["fps"] == 30000 / 1001
    assert "  default_fps: ~" in (tmp_path / "af2" / "config_snippet.yaml").read_text()


def test_multiview_table_aligns_windows_of_a_session(tmp_path):
    videos = basic_videos() + [
        Video("user_id_5_NoAudio_1", "rear", 200, shard=0),
        Video("user_id_5_NoAudio_1", "dashboard", 100, shard=1),   # 5 windows against 11
        Video("user_id_6_NoAudio_1", "rear", 120, shard=0),        # no dashboard video at all
    ]
    run = reduced_run(tmp_path, videos)
    report = export_run(ExportConfig(run.url, str(tmp_path / "mv"), format="multiview"))
    table = pq.read_table(tmp_path / "mv" / "multiview.parquet")
    assert table.column_names == ["session_id", "window_index", "start_s", "center_s", "end_s",
                                  "dashboard_video_id", "dashboard_feature", "dashboard_probs",
                                  "rear_video_id", "rear_feature", "rear_probs"]
    rows = {(r["session_id"], r["window_index"]): r for r in table.to_pylist()}
    assert len(rows) == table.num_rows == 11 + 7 + 11 + 6
    row = rows[("user_id_1_NoAudio_1", 4)]
    assert row["rear_feature"][:2] == [4.0, features_for("Rear_view_user_id_1_NoAudio_1", np.arange(1), 8)[0, 1]]
    assert row["dashboard_feature"][0] == 4.0 and row["dashboard_video_id"] == "Dashboard_user_id_1_NoAudio_1"
    assert row["center_s"] == pytest.approx((4 * 16 + 16) / 30)
    short = rows[("user_id_5_NoAudio_1", 8)]
    assert short["rear_feature"][0] == 8.0 and short["dashboard_feature"] is None and short["dashboard_probs"] is None
    assert rows[("user_id_5_NoAudio_1", 4)]["dashboard_feature"][0] == 4.0
    alone = rows[("user_id_6_NoAudio_1", 0)]
    assert alone["dashboard_video_id"] is None and alone["rear_video_id"] == "Rear_view_user_id_6_NoAudio_1"
    assert report["sessions_view_mismatch"] == [
        {"session_id": "user_id_5_NoAudio_1", "windows": {"rear": 11, "dashboard": 5}},
        {"session_id": "user_id_6_NoAudio_1", "windows": {"rear": 6, "dashboard": 0}}]
    summary = json.load(open(tmp_path / "mv" / "multiview_summary.json"))
    assert summary["sessions"] == 4


def test_dataset_opens_in_duckdb_pandas_and_pyarrow(tmp_path):
    import duckdb
    import pandas as pd

    run = reduced_run(tmp_path)
    path = os.path.join(run.dataset_dir, "rear.parquet")
    counts = duckdb.sql(f"SELECT video_id, count(*) AS n, max(window_index) AS last FROM '{path}' "
                        "GROUP BY video_id ORDER BY video_id").fetchall()
    assert counts == [("Rear_view_user_id_1_NoAudio_1", 11, 10), ("Rear_view_user_id_2_NoAudio_1", 7, 6)]
    first = duckdb.sql(f"SELECT feature FROM '{path}' WHERE window_index = 3 ORDER BY video_id LIMIT 1").fetchall()[0]
    assert len(first[0]) == 8 and first[0][0] == 3.0
    assert pq.read_table(path, columns=["video_id"]).num_rows == 18
    frame = pd.read_parquet(path)
    assert len(frame) == 18 and list(frame["window_index"][:3]) == [0, 1, 2] and len(frame["feature"][0]) == 8


def test_export_command_exit_codes_and_no_torch(tmp_path):
    run = make_run(tmp_path, basic_videos())
    code = ("import sys; from videofeat.launcher.cli import main; rc = main(['export'] + sys.argv[1:]);"
            "assert 'torch' not in sys.modules and 'timm' not in sys.modules, 'export imported torch';"
            "sys.exit(rc)")
    refused = subprocess.run([sys.executable, "-c", code, run.url, "-o", str(tmp_path / "o")],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "videofeat reduce" in refused.stderr, refused.stderr
    reduce_run(ReduceConfig(run.url, marker_wait_s=0))
    done = subprocess.run([sys.executable, "-c", code, run.url, "-o", str(tmp_path / "o"), "--prob-key", "a_prob"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "4 actionformer files" in done.stdout and "keys feats, a_prob" in done.stdout
    bad = subprocess.run([sys.executable, "-c", code, run.url, "-o", str(tmp_path / "o"), "--views", "right"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--views right" in bad.stderr
