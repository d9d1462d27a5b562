"""The run directory: atomic commits, real kills, rerun policy and fingerprint refusal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from videofeat.manifests.ledger import (DONE, FAILED, GAVE_UP, INTERRUPTED, MISSING, FingerprintMismatch,
                                        RerunPolicy, RunDir)
from videofeat.workers.shard_io import read_shard_metadata

PARTS = {"manifest_fingerprint": "m1", "views": ["rear"], "model": "videomae_test",
         "preset": {"name": "aicity-vitl", "span": 32, "hop": 16}, "dtype": "fp32", "feature_dtype": "float32"}

# A worker that writes one shard through the real commit protocol, and kills itself with
# SIGKILL at a chosen point: mid-write, or after the stats but before the marker.
WORKER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np, fsspec
    from videofeat.manifests import fsutil
    from videofeat.manifests.ledger import RunDir
    from videofeat.workers.shard_io import ShardWriter, shard_schema
    run_dir, shard, kill_at = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    rd = RunDir(run_dir)
    attempt = rd.next_attempt(shard)
    rd.fs.makedirs(rd.path("logs"), exist_ok=True)
    rd.fs.pipe(rd.log_path(shard, attempt), b"started\\n")
    tmp = rd.temp_shard_path(shard)
    writer = ShardWriter(tmp, rd.fs, shard_schema(16, 0), {"fingerprint": rd.fingerprint()})
    for v in range(20):
        writer.write_video(video_id=f"v{v}", session_id="s", view="rear", window_index=list(range(50)),
                           start_frame=[16 * i for i in range(50)], end_frame=[16 * i + 32 for i in range(50)],
                           start_s=[0.0] * 50, end_s=[0.0] * 50, center_s=[0.0] * 50,
                           feature=np.random.rand(50, 16))
        if kill_at == "mid-write" and v == 10:
            os.kill(os.getpid(), signal.SIGKILL)
    writer.close()
    if kill_at == "before-marker":
        real = fsutil.write_bytes_atomic
        def dying(fs, path, data):
            if path.endswith(".done"):
                os.kill(os.getpid(), signal.SIGKILL)
            real(fs, path, data)
        fsutil.write_bytes_atomic = dying
    rd.commit_shard(shard, tmp, {"shard_id": shard, "attempt": attempt, "videos": []})
""")


def _run_worker(run_dir, shard, kill_at):
    return subprocess.run([sys.executable, "-c", WORKER, str(run_dir), str(shard), kill_at], capture_output=True)


def test_killed_worker_never_leaves_a_shard_that_looks_done(tmp_path):
    rd = RunDir(str(tmp_path / "run"))
    rd.initialize(PARTS, {"argv": []}, extra={"manifest": "m.parquet"})
    for shard, kill_at in ((0, "mid-write"), (1, "before-marker"), (2, "none")):
        result = _run_worker(rd.root, shard, kill_at)
        assert result.returncode == (-signal.SIGKILL if kill_at != "none" else 0), result.stderr
    records = {r.shard_id: r for r in rd.records([0, 1, 2, 3])}
    assert records[0].state == INTERRUPTED and "killed" in records[0].last_failure["message"]
    assert records[1].state == INTERRUPTED  # Parquet and stats are in place, but no marker
    assert os.path.exists(rd.shard_path(1)) and not rd.is_done(1)
    assert records[2].state == DONE and records[3].state == MISSING
    assert rd.plan_incomplete([0, 1, 2, 3]) == [0, 1, 3]
    assert read_shard_metadata(rd.shard_path(2), rd.fs)["row_groups"]["v7"] == [7]
    # The half-written file of shard 0 is only a temporary; cleaning it leaves no trace.
    assert any(n.startswith(".00000.parquet.tmp-") for n in os.listdir(rd.path("shards")))
    rd.remove_temporaries(0)
    assert not any(n.startswith(".00000") for n in os.listdir(rd.path("shards")))
    assert rd.next_attempt(0) == 2


def test_rerun_policy_and_failure_records(tmp_path):
    rd = RunDir(str(tmp_path / "run"))
    rd.initialize(PARTS, {})
    for attempt in (1, 2, 3):
        rd.record_failure(5, attempt, "error", "storage down", "Traceback ...")
    rd.record_failure(6, 1, "error", "storage down")
    rd.record_failure(7, 1, "interrupted", "SIGUSR2")
    tmp = rd.temp_shard_path(8)
    rd.fs.pipe(tmp, b"x")
    rd.commit_shard(8, tmp, {"videos": [{"video_id": "a", "status": "timeout"}]})
    tmp = rd.temp_shard_path(9)
    rd.fs.pipe(tmp, b"x")
    rd.commit_shard(9, tmp, {"videos": [{"video_id": "b", "status": "ok"}]})
    states = {r.shard_id: r.state for r in rd.records([5, 6, 7, 8, 9])}
    assert states == {5: GAVE_UP, 6: FAILED, 7: INTERRUPTED, 8: DONE, 9: DONE}
    assert rd.plan_incomplete([5, 6, 7, 8, 9]) == [6, 7]
    assert rd.plan_incomplete([5, 6, 7, 8, 9], RerunPolicy(rerun_failed=True)) == [5, 6, 7, 8]
    assert rd.plan_incomplete([5, 6, 7, 8, 9], RerunPolicy(overwrite=True)) == [5, 6, 7, 8, 9]
    assert rd.plan_incomplete([5, 6], RerunPolicy(max_attempts=5)) == [5, 6]
    rd.uncommit(8)
    assert not rd.is_done(8)
    with pytest.raises(ValueError, match="kind"):
        rd.record_failure(1, 1, "oops", "x")


def test_fingerprint_mismatch_is_refused_and_names_the_difference(tmp_path):
    rd = RunDir(str(tmp_path / "run"))
    first = rd.initialize(PARTS, {"batch_size": 4})
    assert rd.initialize(PARTS, {"batch_size": 64})["fingerprint"] == first["fingerprint"]
    changed = {**PARTS, "preset": {**PARTS["preset"], "hop": 8}, "dtype": "bf16"}
    with pytest.raises(FingerprintMismatch) as info:
        rd.initialize(changed, {})
    assert "preset" in str(info.value) and "dtype" in str(info.value) and "views" not in str(info.value)
    with pytest.raises(ValueError, match="batch_size"):
        rd.initialize({**PARTS, "batch_size": 8}, {})


def test_plans_are_frozen_and_work_on_memory_fs():
    rd = RunDir("memory://ledger-test/run")
    rd.initialize(PARTS, {})
    rd.write_plan("p1", [[0, 1], [2]], {"kind": "local"})
    assert rd.read_plan("p1")["tasks"] == [[0, 1], [2]] and rd.list_plans() == ["p1"]
    with pytest.raises(FileExistsError):
        rd.write_plan("p1", [[3]])
    tmp = rd.temp_shard_path(0)
    rd.fs.pipe(tmp, b"x")
    rd.commit_shard(0, tmp, {})
    assert rd.done_shards() == [0]
