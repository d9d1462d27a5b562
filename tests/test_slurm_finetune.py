"""Fine-tuning through ``slurm/finetune.sbatch`` on the real single-node cluster.

Two torchrun agents (two SLURM tasks on the one node) meet at the c10d rendezvous on the first
node and train with gloo; ``scancel --signal=USR2`` mid-run makes every rank stop at the same
step, checkpoint and write ``PREEMPTED``; the script requeues the job, which resumes from the
checkpoint, runs only the remaining steps and finishes; the checkpoint then extracts.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import run_cli
from helpers_extract import make_dataset
from slurm_helpers import active, cancel_all, job_ids, require_cluster, wait_for
from test_finetune_fixtures import cpu_test_args, make_finetune_data
from videofeat.manifests.ledger import RunDir
from videofeat.manifests.manifest import write_manifest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
EPOCHS = 4


def _events(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_finetune_two_tasks_preempted_requeued_resumed_and_extracts(tmp_path):
    require_cluster()
    data = make_finetune_data(tmp_path / "data")
    out = tmp_path / "ft"
    submitted: list[str] = []
    try:
        result = run_cli("slurm", "finetune", *cpu_test_args(data, out, "--epochs", str(EPOCHS)),
                         "--nodes", "1", "--tasks-per-node", "2", "--procs-per-task", "1", "--shutdown-timeout", "30",
                         "--grace", "60", "--time", "15", "--max-requeues", "2", env={"OMP_NUM_THREADS": "1"},
                         cwd=str(tmp_path))
        job = job_ids(result.stdout, "fine-tuning job")[0]
        submitted.append(job)
        script = (out / "slurm" / f"finetune_{job}.sbatch").read_text()
        assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2 --shutdown-timeout=30" in script
        assert "#SBATCH --ntasks-per-node=2" in script and '--rdzv-id="$SLURM_JOB_ID"' in script

        # Signal once the ranks have taken an optimizer step, well before the last one.
        def trained_a_step():
            if any(e["event"] == "train" for e in _events(out)):
                return True
            log = out / "slurm" / f"finetune_{job}.out"
            assert active([job]), f"job {job} ended before training:\n{log.read_text()[-3000:] if log.exists() else ''}"
            return False

        wait_for(trained_a_step, 150, "the first training step")
        subprocess.run(["scancel", "--signal=USR2", job], check=True)
        wait_for(lambda: not active([job]), 240, "the fine-tuning job to finish after its requeue", 0.5)

        events = _events(out)
        starts = [e for e in events if e["event"] == "start"]
        preempted = [e for e in events if e["event"] == "preempted"]
        assert len(preempted) == 1 and len(starts) == 2, events
        assert starts[0]["world_size"] == 2 and starts[1]["world_size"] == 2 and starts[1]["resumed"]
        # The resumed job continued from the checkpoint's step: no step ran twice, none was skipped.
        steps = [e["step"] for e in events if e["event"] == "train"]
        assert steps == sorted(set(steps)) and steps[-1] == starts[0]["steps_per_epoch"] * EPOCHS
        assert starts[1]["step"] == preempted[0]["step"] < steps[-1]
        assert (out / "COMPLETED").exists() and not (out / "PREEMPTED").exists()
        log = (out / "slurm" / f"finetune_{job}.out").read_text()
        assert "preempted after a checkpoint; requeueing job" in log and "restart 1: 2 agent(s)" in log

        # The fine-tuned checkpoint extracts.
        rows = make_dataset(tmp_path / "extract", [("Rear_view_user_id_5_NoAudio_1", 48, 0)], action=True)
        manifest = str(tmp_path / "extract" / "manifest.parquet")
        write_manifest(rows, manifest)
        run_dir = str(tmp_path / "extract" / "run")
        run_cli("extract", manifest, "-o", run_dir, "--checkpoint", str(out / "checkpoint-last.pt"), "--preset",
                "aicity-vith", "--span", "16", "--hop", "8", "--num-frames", "8", "--frame-step", "2", "--size",
                "64", "--decode-procs", "1", "--device", "cpu", "--no-progress")
        assert RunDir(run_dir).done_shards() == [0]
    finally:
        cancel_all(submitted)
