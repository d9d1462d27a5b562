"""``videofeat slurm pipeline`` on the local SLURM cluster: the whole DAG with a fault in one fine-tune.

The fault is real: a file where one fine-tune's output folder must go, so that job fails. Its
dependants (the extraction array, the reducers, the exports) must not run, ``videofeat status``
must say which job failed and why, and after the file is gone ``videofeat slurm rerun WORK``
must submit only what is missing and finish with exports equal to an uninterrupted run.
"""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from helpers_pipeline import SETS, VIEWS, assert_same_exports, copy_data, exported, write_job
from slurm_helpers import active, cancel_all, require_cluster, wait_for

pytestmark = pytest.mark.slurm
ENV = {"OMP_NUM_THREADS": "1"}
BROKEN = "finetune.tiny_vitl.dashboard"


def _ids(work) -> list[str]:
    record = json.loads((work / "slurm" / "pipeline.json").read_text())["submissions"][-1]["jobs"]
    return [str(j) for v in record.values() for j in (v if isinstance(v, list) else [v])]


def test_dag_with_a_failing_finetune_then_rerun(pipeline_reference, tmp_path):
    require_cluster()
    root = copy_data(pipeline_reference, tmp_path)
    job, work = write_job(root), root / "work"
    blocker = work / "finetune" / "tiny_vitl" / "dashboard"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a file where the fine-tune's output folder goes\n")
    submitted: list[str] = []
    try:
        out = run_cli("slurm", "pipeline", str(job), "-o", str(work), "--time", "00:10:00", env=ENV, cwd=str(root))
        submitted += _ids(work)
        for stage in [f"finetune.{s}.{v}" for s in SETS for v in VIEWS] + ["extract", "finish"]:
            assert stage in out.stdout, out.stdout
        # Every job's sbatch text is saved in WORK.
        scripts = sorted(p.name for p in (work / "slurm").glob("*.sbatch"))
        assert len([s for s in scripts if "finetune." in s]) == 6 and any("finish" in s for s in scripts)
        assert len(list((work / "features" / "slurm").glob("*.sbatch"))) == 1 + len(SETS)  # array + reducers
        wait_for(lambda: not active(submitted), 400, "the DAG to finish or be cancelled")

        for name in SETS:
            for view in VIEWS:
                done = (work / "finetune" / name / view / "COMPLETED").exists()
                assert done == (f"finetune.{name}.{view}" != BROKEN), (name, view)
        assert not list((work / "features").glob("*/shards/*.done"))  # the array never ran
        assert not list((work / "features").glob("*/dataset")) and not (root / "features").exists()
        status = run_cli("status", str(work), env=ENV).stdout
        lines = {line.split()[0]: line for line in status.splitlines() if line.startswith("  ") and line.split()}
        assert "failed (job" in lines[BROKEN], status
        assert "File exists" in status or "exists" in status.split(BROKEN, 1)[1], status
        assert f"did not run: needs {BROKEN}" in lines["extract"], status
        assert "did not run" in lines["reduce.tiny_vith"] and "did not run" in lines["export.ma_actionformer"]
        assert lines["finetune.tiny_vith.rear"].split()[1] == "complete"
        assert f"continue with: videofeat slurm rerun {work}" in status

        blocker.unlink()
        completed = {p: p.stat().st_mtime_ns for p in (work / "finetune").glob("*/*/COMPLETED")}
        rerun = run_cli("slurm", "rerun", str(work), env=ENV, cwd=str(root))
        submitted += _ids(work)
        resubmitted = [line.split()[0] for line in rerun.stdout.splitlines() if line.startswith("  ")]
        assert [s for s in resubmitted if s.startswith("finetune.")] == [BROKEN], rerun.stdout
        assert "extract" in resubmitted and "finish" in resubmitted
        wait_for(lambda: not active(submitted), 400, "the rerun to finish")
    finally:
        cancel_all(submitted)
    status = run_cli("status", str(work), env=ENV).stdout
    assert "stages complete" in status and "the job is complete" in status, status
    assert {p: p.stat().st_mtime_ns for p in completed} == completed  # the five fine-tunes were not rerun
    assert_same_exports(exported(root / "features"), exported(pipeline_reference / "features"))
