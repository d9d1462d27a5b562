"""`videofeat status` on real runs with real faults: what failed, why, where its log is, how to rerun."""

from __future__ import annotations

import os

from conftest import run_cli
from helpers_extract import make_dataset, run_extract, tiny_checkpoint

from videofeat.manifests.manifest import write_manifest


def test_status_names_failed_shards_videos_without_windows_and_the_rerun(tmp_path):
    rows = make_dataset(tmp_path, [("Rear_view_user_id_1_NoAudio_1", 48, 0), ("Rear_view_user_id_2_NoAudio_1", 40, 1),
                                   ("Rear_view_user_id_3_NoAudio_1", 48, 2)])
    rows[-1]["status"], rows[-1]["shard_id"], rows[-1]["error"] = "too_short", None, "has 10 frames"
    manifest = str(tmp_path / "manifest.parquet")
    write_manifest(rows, manifest)
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    run_dir = tmp_path / "run"
    # Real faults: a directory where shard 1's output must go (its commit fails), and a video that
    # vanished after the manifest was built (its shard completes, the video gets a status).
    os.makedirs(run_dir / "shards" / "00001.parquet" / "blocker")
    os.remove(rows[0]["uri"])
    result = run_extract(manifest, str(run_dir), checkpoint=ckpt, check=False)
    assert result.returncode != 0
    status = run_cli("status", str(run_dir)).stdout
    assert "3 shards" not in status and "2 shards" in status
    assert "00001 failed" in status and "log: " in status and "00001.1.log" in status
    assert "Rear_view_user_id_1_NoAudio_1" in status and "shard 0" in status
    assert "too_short" in status and "Rear_view_user_id_3_NoAudio_1" in status and "permanent" in status
    assert "videofeat extract" in status and f"-o {run_dir}" in status
    # The printed command is the real one: after removing the blocker it completes the run.
    os.rmdir(run_dir / "shards" / "00001.parquet" / "blocker")
    os.rmdir(run_dir / "shards" / "00001.parquet")
    rerun = [line.strip() for line in status.splitlines() if line.strip().startswith("videofeat extract")][0]
    assert "--checkpoint" in rerun and "--preset" in rerun
    run_extract(manifest, str(run_dir), checkpoint=ckpt)
    after = run_cli("status", str(run_dir)).stdout
    assert "2 done" in after and "00001" not in after.split("videos without windows")[0].split("\n", 1)[1]
