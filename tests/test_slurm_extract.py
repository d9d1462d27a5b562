"""Extraction arrays on a real single-node SLURM cluster: a real fault, status, rerun, preemption.

One scenario, because every step waits on the scheduler: 4 shards as an array with throttle 2;
task 1 fails for real (a non-empty directory sits where its shard's stats file must go), task 2
receives ``scancel --signal=USR2`` in the middle of its shard and is requeued; ``videofeat
status`` names the failed shard's array task; ``videofeat slurm rerun`` resubmits only that
shard with a new reducer; the dataset equals a local single-process run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import run_cli
from helpers_extract import TINY_ARGS, make_dataset, run_extract, tiny_checkpoint
from slurm_helpers import active, cancel_all, job_ids, require_cluster, wait_for
from videofeat.launcher.slurm import records as slurm_info
from videofeat.manifests.ledger import DONE, FAILED, RunDir
from videofeat.manifests.manifest import write_manifest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# Shard 2 is long enough (~3 s of work) for a signal to land in the middle of it.
SPECS = [("Rear_view_user_id_1_NoAudio_1", 48, 0), ("Rear_view_user_id_2_NoAudio_1", 40, 1),
         ("Rear_view_user_id_3_NoAudio_1", 1000, 2), ("Rear_view_user_id_4_NoAudio_1", 56, 3)]
FAILING, PREEMPTED = 1, 2


def _dataset_rows(run_dir: str):
    table = pq.read_table(os.path.join(run_dir, "dataset", "rear.parquet"))
    keys = list(zip(table.column("video_id").to_pylist(), table.column("window_index").to_pylist()))
    return keys, np.asarray(table.column("feature").to_pylist(), dtype=np.float64)


def test_array_fault_status_rerun_and_preemption(tmp_path):
    require_cluster()
    rows = make_dataset(tmp_path, SPECS, action=False)
    manifest = str(tmp_path / "manifest.parquet")
    write_manifest(rows, manifest)
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    out = str(tmp_path / "run")
    run = RunDir(out)
    # The real fault: a directory (not empty, so it cannot be removed in passing) where shard 1's
    # stats file must be: the worker cannot clear or commit the shard, and records an error.
    obstruction = Path(run.stats_path(FAILING))
    obstruction.mkdir(parents=True)
    (obstruction / "keep").write_text("in the way\n")

    submitted: list[str] = []
    local = None
    try:
        result = run_cli("slurm", "extract", manifest, "-o", out, *TINY_ARGS, "--checkpoint", ckpt,
                         "--decode-procs", "1", "--throttle", "2", "--time", "10", "--grace", "30",
                         "--max-requeues", "2", env={"OMP_NUM_THREADS": "1"}, cwd=str(tmp_path))
        arrays, reducer = job_ids(result.stdout, "arrays"), job_ids(result.stdout, "reducer")
        submitted += arrays + reducer
        assert len(arrays) == 1 and "4 of 4 shards in 4 array tasks (throttle 2)" in result.stdout
        plan_id = slurm_info.latest_submission(run)["plan_id"]
        assert run.read_plan(plan_id)["tasks"] == [[0], [1], [2], [3]]
        script = Path(run.path("slurm", f"{plan_id}.array0.sbatch")).read_text()
        assert "#SBATCH --array=0-3%2" in script and "#SBATCH --signal=USR2@30" in script

        # Throttle 2: never more than two tasks of the array run at once.
        def running_then_check():
            running = [j for j in active(arrays) if j.state == "RUNNING"]
            assert len(running) <= 2, running
            return Path(run.log_path(PREEMPTED, 1)).exists()

        wait_for(running_then_check, 120, "shard 2 to start")
        subprocess.run(["scancel", "--signal=USR2", f"{arrays[0]}_{PREEMPTED}"], check=True)
        record_path = Path(run.failure_path(PREEMPTED, 1))
        wait_for(record_path.exists, 60, "the interrupted record of shard 2")
        record = json.loads(record_path.read_text())
        assert record["kind"] == "interrupted" and "SIGUSR2" in record["message"]
        assert not Path(run.marker_path(PREEMPTED)).exists()
        assert record["slurm"]["slurm_array_task_id"] == str(PREEMPTED)

        # The requeued task finishes shard 2; task 1 fails; the afterok reducer is cancelled.
        wait_for(lambda: not active(arrays + reducer), 150, "the array and its reducer to leave the queue", 0.5)
        states = {r.shard_id: r for r in run.records(range(4))}
        assert {s: r.state for s, r in states.items()} == {0: DONE, 1: FAILED, 2: DONE, 3: DONE}
        assert states[PREEMPTED].attempts == 2 and states[PREEMPTED].stats["slurm"]["slurm_array_task_id"] == "2"
        task_log = Path(run.path("slurm", "logs", f"{arrays[0]}_{PREEMPTED}.out")).read_text()
        assert "was interrupted; requeueing it (1 of 2)" in task_log and "(restart 1)" in task_log
        assert not os.path.exists(os.path.join(out, "dataset"))

        # Status names the failed shard and the array task that ran it.
        status = run_cli("status", out).stdout
        assert f"{FAILING:05d} failed" in status and f"array task {arrays[0]}_{FAILING}" in status, status
        where = slurm_info.shard_tasks(run, run.records([FAILING]))[FAILING]
        assert where.ran and where.log_path.endswith(f"logs/{arrays[0]}_{FAILING}.out")
        message = states[FAILING].last_failure["message"]
        assert "directory" in message.lower() and message.split(": ", 1)[-1] in Path(where.log_path).read_text()

        # The reference: the same extraction as one local process, computed while the rerun runs.
        local_dir = str(tmp_path / "local")
        local = subprocess.Popen([sys.executable, "-m", "videofeat.launcher.cli", "extract", manifest, "-o",
                                  local_dir, *TINY_ARGS, "--checkpoint", ckpt, "--decode-procs", "1"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})

        shutil.rmtree(obstruction)
        rerun = run_cli("slurm", "rerun", out, env={"OMP_NUM_THREADS": "1"})
        new_arrays, new_reducer = job_ids(rerun.stdout, "arrays"), job_ids(rerun.stdout, "reducer")
        submitted += new_arrays + new_reducer
        assert "1 of 4 shards in 1 array tasks" in rerun.stdout
        latest = slurm_info.latest_submission(run)
        assert latest["kind"] == "rerun" and latest["previous"] == plan_id
        assert run.read_plan(latest["plan_id"])["tasks"] == [[FAILING]]
        assert f"--dependency=afterok:{new_arrays[0]}" in Path(latest["reducer"]["script"]).read_text()
        wait_for(lambda: not active(new_arrays + new_reducer), 120, "the rerun and its reducer", 0.5)
        assert run.done_shards() == [0, 1, 2, 3]
        summary = json.loads(Path(out, "dataset", "summary.json").read_text())
        assert summary is not None

        _, err = local.communicate(timeout=120)
        assert local.returncode == 0, err[-3000:]
        run_cli("reduce", local_dir)
        keys, features = _dataset_rows(out)
        local_keys, local_features = _dataset_rows(local_dir)
        assert keys == local_keys and len(keys) == sum((n - 16) // 8 + 1 for _, n, _ in SPECS)
        np.testing.assert_allclose(features, local_features, rtol=0, atol=1e-5)
    finally:
        if local is not None and local.poll() is None:
            local.kill()
        cancel_all(submitted)


def test_rerun_refuses_while_tasks_run_and_cancels_a_stale_reducer(tmp_path):
    require_cluster()
    from videofeat.launcher.slurm.arrays import ArrayLaunch

    rows = make_dataset(tmp_path, SPECS[:1], action=False)
    manifest = str(tmp_path / "manifest.parquet")
    write_manifest(rows, manifest)
    out = str(tmp_path / "run")
    run = RunDir(out)
    run.initialize({"test": 1}, {})
    sbatch = ["sbatch", "--parsable", "--output=/dev/null"]
    array = subprocess.run(sbatch + ["--array=0", "--wrap", "sleep 60"], capture_output=True, text=True,
                           check=True).stdout.strip()
    reducer = subprocess.run(sbatch + ["--hold", "--wrap", "true"], capture_output=True, text=True,
                             check=True).stdout.strip()
    try:
        run.write_plan("slurm-test", [[0]])
        launch = ArrayLaunch(run_dir=out, manifest=manifest, worker_args=(manifest, "--output", out))
        slurm_info.write_submission(run, {"plan_id": "slurm-test", "created_ns": 1, "launch": launch.to_dict(),
                                          "log_dir": launch.log_dir, "arrays": [{"job_id": array, "offset": 0,
                                                                                 "count": 1}],
                                          "reducer": {"job_id": reducer}})
        wait_for(lambda: any(j.state == "RUNNING" for j in active([array])), 30, "the array task to run")
        busy = run_cli("slurm", "rerun", out, check=False)
        assert busy.returncode == 1 and f"{array}_0" in busy.stderr and "still queued or running" in busy.stderr
        subprocess.run(["scancel", array], check=True)
        wait_for(lambda: not active([array]), 30, "the array task to leave the queue")
        # Shard 0 completed meanwhile: nothing to recompute, but the held reducer is stale.
        temp = run.temp_shard_path(0)
        run.fs.pipe_file(temp, b"x")
        run.commit_shard(0, temp, {})
        done = run_cli("slurm", "rerun", out)
        assert f"cancelled the stale pending reducer {reducer}" in done.stdout and "nothing to submit" in done.stdout
        wait_for(lambda: not active([reducer]), 30, "the stale reducer to be cancelled")
    finally:
        cancel_all([array, reducer])
