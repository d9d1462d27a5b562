"""``videofeat demo`` as a new user runs it: from an empty folder, nothing but the install."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from videofeat.launcher.demo import MARKER, DemoConfig, prepare_output, segments_of


def demo_command() -> list[str]:
    installed = shutil.which("videofeat")
    return [installed] if installed else [sys.executable, "-m", "videofeat.launcher.cli"]


def test_demo_small_runs_every_stage(tmp_path):
    result = subprocess.run([*demo_command(), "demo", "-o", "demo", "--small"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    out = tmp_path / "demo"
    assert "videofeat demo finished" in result.stdout and str(out) in result.stdout
    record = json.loads((out / "demo.json").read_text())
    # 2 training users + 1 test user, three camera views each; six fine-tunes, three sets.
    assert record["videos"] == 9 and record["sets"] == ["tiny_vith", "tiny_vitl", "tiny_vitl_b"]
    assert {s for s in record["stage_seconds"] if s.startswith("finetune.")} == {
        f"finetune.{name}.{view}" for name in record["sets"] for view in ("rear", "dashboard")}
    assert {"manifest.train", "manifest.A2", "manifest", "labels", "extract", "export.ma_actionformer",
            "export.multiview"} <= set(record["stage_seconds"])
    assert "validation top-1" in result.stdout
    windows = (6 * 30 - 32) // 16 + 1  # 6 s at 30 fps, span 32, hop 16
    for name in record["sets"]:
        run_dir = out / "work" / "features" / name
        summary = json.loads((run_dir / "dataset" / "summary.json").read_text())
        assert summary["complete"] and summary["views"]["rear"] == {
            "file": str(run_dir / "dataset" / "rear.parquet"), "videos": 3, "windows": 3 * windows,
            "expected_absent": 0, "incomplete": 0}
        feats = out / "features" / name
        npz = sorted(p for p in os.listdir(feats) if p.endswith(".npz"))
        assert len(npz) == 6 and npz[0].startswith("Dashboard_user_id_") and npz[-1].startswith("Rear_view_user_id_")
        with np.load(feats / npz[0]) as data:
            assert sorted(data.files) == ["a_prob", "feats", "pred"]
            assert data["feats"].shape == (windows, summary["feature_dim"]) and data["feats"].dtype == np.float32
            np.testing.assert_allclose(data["a_prob"].sum(axis=1), 1.0, rtol=1e-4)
        database = json.loads((feats / "annotations.json").read_text())["database"]
        assert sorted(database) == [n[:-4] for n in npz]
        for user_index, user, subset in ((0, 10001, "training"), (1, 11112, "validation")):  # last user validates
            entry = database[f"Rear_view_user_id_{user}_NoAudio_1"]
            assert entry["subset"] == subset and entry["fps"] == 30.0 and entry["duration"] == 6.0
            assert [(a["label_id"], a["segment"]) for a in entry["annotations"]] == [
                (label, [float(s), float(e)]) for label, s, e in segments_of(user_index, 1, 6)]
        assert database["Rear_view_user_id_12223_NoAudio_1"]["subset"] == "test"  # the unlabelled test user
        assert "  feat_stride: 16\n" in (feats / "config_snippet.yaml").read_text()
        multiview = pq.read_table(out / "features" / "multiview" / name / "multiview.parquet")
        assert multiview.num_rows == 3 * windows and "rear_feature" in multiview.column_names
    # The demo's work folder is an ordinary pipeline WORK: status shows it complete.
    status = subprocess.run([*demo_command(), "status", str(out / "work")], capture_output=True, text=True)
    complete = re.search(r"(\d+) of (\d+) stages complete", status.stdout)
    assert status.returncode == 0 and complete and complete.group(1) == complete.group(2), status.stdout


def test_demo_folder_is_replaced_only_if_it_is_a_demo(tmp_path):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep me")
    with pytest.raises(ValueError, match="not a videofeat demo folder"):
        prepare_output(str(mine))
    assert (mine / "thesis.tex").exists()
    old = tmp_path / "old-demo"
    prepare_output(str(old))
    (old / "stale.txt").write_text("from the previous demo")
    prepare_output(str(old))
    assert sorted(os.listdir(old)) == [MARKER]
    with pytest.raises(ValueError, match="--users"):
        DemoConfig(users=1)
