"""Three feature sets as one SLURM array on the real local cluster: a reducer per set, a fault, a rerun.

Shard 1 of set ``b`` fails for real (a non-empty directory sits where its stats file must go);
sets ``a`` and ``c`` commit shard 1 from the same decode. The array's failed task keeps every
``afterok`` reducer from running; ``videofeat slurm rerun OUT`` resubmits only that task, which
computes only the missing (set, shard) pair, and the three reducers then write the datasets.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import run_cli
from helpers_extract import make_dataset, sets_toml, tiny_checkpoint
from slurm_helpers import active, cancel_all, job_ids, require_cluster, wait_for
from videofeat.launcher.slurm import records as slurm_info
from videofeat.manifests.ledger import DONE, FAILED, RunDir
from videofeat.manifests.manifest import write_manifest
from videofeat.workers.extract.config import ExtractConfig
from videofeat.workers.extract.loop import run_extraction

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SPECS = [("Rear_view_user_id_1_NoAudio_1", 48, 0), ("Rear_view_user_id_2_NoAudio_1", 40, 1),
         ("Rear_view_user_id_3_NoAudio_1", 56, 2)]
FAILING_SET, FAILING_SHARD = "b", 1
WORKER = ("--decode-procs", "1", "--device", "cpu", "--batch-size", "8", "--no-progress")


def _snapshot(run_dir: str) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(Path(run_dir, "shards").iterdir())
            if not p.name.endswith(".claim")}  # claims are leases, not output


def test_one_array_for_three_sets_a_reducer_each_and_a_rerun_of_the_missing_pair(tmp_path):
    require_cluster()
    rows = make_dataset(tmp_path, SPECS, action=False)
    manifest = str(tmp_path / "manifest.parquet")
    write_manifest(rows, manifest)
    ckpts = [tiny_checkpoint(tmp_path / f"tiny{i}.pt", seed=i) for i in range(3)]
    sets = tmp_path / "sets.toml"
    sets.write_text(sets_toml(ckpts))
    out = str(tmp_path / "out")
    runs = {name: RunDir(os.path.join(out, name)) for name in "abc"}
    obstruction = Path(runs[FAILING_SET].stats_path(FAILING_SHARD))
    obstruction.mkdir(parents=True)
    (obstruction / "keep").write_text("in the way\n")

    submitted: list[str] = []
    try:
        result = run_cli("slurm", "extract", manifest, "-o", out, "--sets", str(sets), *WORKER, "--time", "10",
                         env={"OMP_NUM_THREADS": "1"}, cwd=str(tmp_path))
        arrays, reducers = job_ids(result.stdout, "arrays"), job_ids(result.stdout, "reducers")
        submitted += arrays + reducers
        assert len(arrays) == 1 and len(reducers) == 3 and "3 of 3 shards in 3 array tasks" in result.stdout
        plan_id = slurm_info.latest_submission(RunDir(out))["plan_id"]
        for name, job in zip("abc", reducers):
            script = Path(out, "slurm", f"{plan_id}.reduce-{name}.sbatch").read_text()
            assert f"--dependency=afterok:{arrays[0]}" in script and f"{out}/{name}" in script

        wait_for(lambda: not active(arrays + reducers), 150, "the array and its reducers to leave the queue", 0.5)
        for name, run in runs.items():
            states = {r.shard_id: r.state for r in run.records(range(3))}
            assert states == ({0: DONE, 1: FAILED, 2: DONE} if name == FAILING_SET else {0: DONE, 1: DONE, 2: DONE})
            assert not os.path.exists(os.path.join(out, name, "dataset"))  # afterok: the array did not succeed
        shared = json.loads(Path(runs["a"].stats_path(FAILING_SHARD)).read_text())
        assert shared["decode"]["sets"] == ["a", "c"] and shared["slurm"]["slurm_array_task_id"] == "1"

        status = run_cli("status", out).stdout
        assert "== set b ==" in status and f"{FAILING_SHARD:05d} failed" in status, status
        assert f"array task {arrays[0]}_{FAILING_SHARD}" in status and "videofeat slurm rerun" in status

        untouched = {name: _snapshot(runs[name].url) for name in ("a", "c")}
        shutil.rmtree(obstruction)
        rerun = run_cli("slurm", "rerun", out, env={"OMP_NUM_THREADS": "1"})
        new_arrays, new_reducers = job_ids(rerun.stdout, "arrays"), job_ids(rerun.stdout, "reducers")
        submitted += new_arrays + new_reducers
        assert "1 of 3 shards in 1 array tasks" in rerun.stdout and len(new_reducers) == 3
        assert RunDir(out).read_plan(slurm_info.latest_submission(RunDir(out))["plan_id"])["tasks"] == [[FAILING_SHARD]]
        wait_for(lambda: not active(new_arrays + new_reducers), 150, "the rerun and its reducers", 0.5)

        assert {name: _snapshot(runs[name].url) for name in ("a", "c")} == untouched
        redone = json.loads(Path(runs[FAILING_SET].stats_path(FAILING_SHARD)).read_text())
        assert redone["decode"]["sets"] == [FAILING_SET] and redone["attempt"] == 2
        for name in "abc":
            assert Path(out, name, "dataset", "summary.json").exists(), name
        # Set b equals its single-set run.
        single = str(tmp_path / "single_b")
        assert run_extraction(ExtractConfig(manifest=manifest, output=single, preset="aicity-vitl",
                                            checkpoints=(("dashboard", ckpts[1]), ("rear", ckpts[1])),
                                            span=16, hop=8, num_frames=8, frame_step=2, size=64, decode_procs=1,
                                            device="cpu", batch_size=8, progress=False)) == 0
        assert RunDir(single).fingerprint() == runs["b"].fingerprint()
        table = pq.read_table(os.path.join(out, "b", "dataset", "rear.parquet"))
        ref = [pq.read_table(RunDir(single).shard_path(s)) for s in range(3)]
        ref_keys = [k for t in ref for k in zip(t.column("video_id").to_pylist(), t.column("window_index").to_pylist())]
        keys = list(zip(table.column("video_id").to_pylist(), table.column("window_index").to_pylist()))
        assert keys == sorted(ref_keys)
        feats = dict(zip(keys, np.asarray(table.column("feature").to_pylist())))
        ref_feats = dict(zip(ref_keys, np.asarray([f for t in ref for f in t.column("feature").to_pylist()])))
        assert max(np.abs(feats[k] - ref_feats[k]).max() for k in keys) <= 1e-6
    finally:
        cancel_all(submitted)
