"""SLURM launch logic without a cluster: sbatch text against golden files, plans, estimates, parsing.

Regenerate the golden files after an intended template change with
``VIDEOFEAT_UPDATE_GOLDEN=1 python -m pytest tests/test_slurm_scripts.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_extract import make_dataset
from videofeat.launcher.slurm import command as slurm_cmd
from videofeat.launcher.slurm import arrays as se
from videofeat.launcher.slurm import records as slurm_info
from videofeat.launcher.slurm import submit as ss
from videofeat.launcher.cli import main
from videofeat.manifests.ledger import RunDir
from videofeat.manifests.manifest import write_manifest

GOLDEN = Path(__file__).resolve().parent / "golden"
PLAN = "slurm-20260101T000000-abcdef"
OPTIONS = ss.SbatchOptions(partition="gpu", account="proj42", qos="normal", time="04:00:00", gpus_per_task=1,
                           cpus_per_task=8, mem="64G", constraint="a100", extra=("--exclusive",))


def _launch(**changes) -> se.ArrayLaunch:
    base = dict(run_dir="/runs/vitl", manifest="/data/manifest.parquet",
                worker_args=("/data/manifest.parquet", "--output", "/runs/vitl", "--preset", "aicity-vitl",
                             "--checkpoint", "rear=/ckpt/rear view.pt"),
                options=OPTIONS, throttle=50, shards_per_task=2, ranks_per_task=1, max_requeues=3, grace_s=180,
                log_dir="/runs/vitl/slurm/logs", job_name="vf-vitl", reduce_time="00:30:00",
                python="/opt/venv/bin/python", chdir="/home/user/project")
    return se.ArrayLaunch(**{**base, **changes})


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("VIDEOFEAT_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} is missing; create it with VIDEOFEAT_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"sbatch text differs from {path}; if intended, regenerate it"


def test_extract_array_script_matches_golden_and_is_valid_bash():
    text = se.render_array(_launch(), RunDir("/runs/vitl"), PLAN, ss.ArrayChunk(1001, 7), number=1, total=2)
    _check_golden("extract_array.sbatch", text)
    assert "#SBATCH --array=0-6%50" in text and "INDEX=$(( 1001 + SLURM_ARRAY_TASK_ID ))" in text
    assert "#SBATCH --signal=USR2@180" in text and "#SBATCH --output=/runs/vitl/slurm/logs/%A_%a.out" in text
    assert "'rear=/ckpt/rear view.pt'" in text  # quoted for the shell
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)


def test_reducer_and_finetune_scripts_match_golden():
    reducer = se.render_reducer(_launch(), PLAN, ["101", "102"])
    _check_golden("reduce.sbatch", reducer)
    assert "#SBATCH --dependency=afterok:101:102" in reducer
    assert "--gpus-per-task" not in reducer and "#SBATCH --time=00:30:00" in reducer
    finetune = slurm_cmd.FinetuneLaunch(
        output="/runs/ft", finetune_args=("--recipe", "aicity-vitl", "--output", "/runs/ft"), options=OPTIONS,
        nodes=2, tasks_per_node=1, procs_per_task=4, shutdown_timeout=90, grace_s=240, max_requeues=5,
        python="/opt/venv/bin/python", chdir="/home/user/project").render()
    _check_golden("finetune.sbatch", finetune)
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2 --shutdown-timeout=90" in finetune
    assert '--rdzv-id="$SLURM_JOB_ID"' in finetune and "--nproc-per-node=4" in finetune
    for text in (reducer, finetune):
        subprocess.run(["bash", "-n"], input=text, text=True, check=True)


def test_ranks_per_task_runs_torchrun_inside_the_task():
    text = se.render_array(_launch(ranks_per_task=4), RunDir("/runs/vitl"), PLAN, ss.ArrayChunk(0, 3), 0, 1)
    assert "-m torch.distributed.run --standalone --nproc-per-node=4" in text
    assert "-m videofeat.launcher.extract /data/manifest.parquet" in text


def test_render_refuses_missing_and_unknown_fields():
    with pytest.raises(ValueError, match="fields without a value"):
        ss.render("reduce.sbatch", {"plan_id": "x"})


def test_split_arrays_respects_max_array_size():
    assert ss.split_arrays(5, 1001) == [ss.ArrayChunk(0, 5)]
    chunks = ss.split_arrays(2500, 1001)
    assert chunks == [ss.ArrayChunk(0, 1001), ss.ArrayChunk(1001, 1001), ss.ArrayChunk(2002, 498)]
    assert sum(c.count for c in chunks) == 2500 and all(c.count <= 1001 for c in chunks)
    assert ss.split_arrays(0, 10) == []
    assert ss.array_spec(5, 2) == "0-4%2" and ss.array_spec(1) == "0" and ss.array_spec(3) == "0-2"


@pytest.mark.parametrize("text,seconds", [("30", 1800), ("5:30", 330), ("04:00:00", 14400), ("2-0", 172800),
                                          ("1-12:00", 129600), ("1-00:00:10", 86410)])
def test_time_limits(text, seconds):
    assert ss.parse_time_limit(text) == seconds


def test_options_are_validated_naming_the_flag():
    with pytest.raises(ValueError, match="--time"):
        ss.SbatchOptions(time="4h")
    with pytest.raises(ValueError, match="--cpus-per-task"):
        ss.SbatchOptions(cpus_per_task=0)
    with pytest.raises(ValueError, match="--sbatch-arg"):
        ss.SbatchOptions(extra=("exclusive",))
    with pytest.raises(ValueError, match="--shards-per-task"):
        _launch(shards_per_task=0)
    with pytest.raises(ValueError, match="--log-dir is required"):
        _launch(run_dir="s3://bucket/run", log_dir=None)


def test_parsing_of_cluster_answers():
    assert ss.parse_job_id("1234\n") == "1234" and ss.parse_job_id("77;cluster\n") == "77"
    with pytest.raises(ss.SlurmError):
        ss.parse_job_id("Submitted batch job 5")
    config = ss.parse_config("Configuration data as of 2026\nMaxArraySize            = 4\nMinJobAge = 2 sec\n")
    assert ss.max_array_size(config) == 4 and ss.max_array_size({}) == 1001
    jobs = ss.parse_squeue("12|12|N/A|PENDING|Dependency\n15|11|3|RUNNING|None\n11|11|[4-9%2]|PENDING|JobArrayTaskLimit\n")
    assert [(j.job_id, j.array_job_id, j.array_task, j.active) for j in jobs] == [
        ("12", "12", "N/A", True), ("15", "11", "3", True), ("11", "11", "[4-9%2]", True)]


def test_worker_flags_pass_through_as_typed_and_are_checked_once(tmp_path, capsys):
    """`videofeat slurm extract` defines only its own flags; the rest is the worker's command line,
    passed through in order and checked by the worker's own parser before anything is submitted."""
    manifest, out = _manifest(tmp_path), str(tmp_path / "run")
    worker = [manifest, "-o", out, "--checkpoint", "rear=a.pt", "--checkpoint", "dashboard=b.pt", "--span", "16",
              "--overwrite", "--no-progress", "--batch-size", "4", "--model", "videomae_test"]
    assert main(["slurm", "extract", *worker, "--time", "01:00:00", "--throttle", "2", "--dry-run"]) == 0
    srun = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("srun "))
    assert " ".join(worker) in srun and "--throttle" not in srun and "--time" not in srun
    # A wrong worker flag is refused here, naming it, before a plan or a script exists.
    with pytest.raises(SystemExit) as refused:
        main(["slurm", "extract", manifest, "-o", out, "--spann", "16", "--dry-run"])
    assert refused.value.code == 2 and "--spann" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_finetune_flags_pass_through_to_torchrun(tmp_path, capsys):
    pytest.importorskip("videofeat.launcher.finetune")
    worker = ["--recipe", "cpu-test", "-o", str(tmp_path / "ft"), "--no-progress", "--compile", "--lr", "0.001",
              "--epochs", "3"]
    assert main(["slurm", "finetune", *worker, "--nodes", "2", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert " ".join(worker) in text and "#SBATCH --nodes=2" in text


def _manifest(tmp_path: Path, frames=(40, 48, 56, 64, 72)) -> str:
    rows = make_dataset(tmp_path, [(f"Rear_view_user_id_{i}_NoAudio_1", n, i) for i, n in enumerate(frames)],
                        action=False)
    path = str(tmp_path / "manifest.parquet")
    write_manifest(rows, path)
    return path


def test_plan_packing_and_time_estimate(tmp_path):
    manifest = _manifest(tmp_path)
    frames = se.shard_frames(manifest)
    assert frames == {0: 40, 1: 48, 2: 56, 3: 64, 4: 72}
    tasks = se.pack_tasks([4, 0, 2, 3], 3)
    assert tasks == [[0, 2, 3], [4]]
    launch = _launch(options=ss.SbatchOptions(time="2"), shards_per_task=3)  # 120 s
    check = se.check_time(tasks, frames, launch, rate=1.0, rate_source="--decode-rate")
    assert check.estimates == (160.0, 72.0) and check.too_long == [0]  # 160 > 96 = 80% of 120
    assert "index 0 (shards [0, 2, 3])" in check.message(tasks)
    assert se.check_time(tasks, frames, launch, rate=None, rate_source="").too_long == []


def test_dry_run_warns_and_strict_refuses_without_a_cluster(tmp_path):
    manifest = _manifest(tmp_path)
    base = [sys.executable, "-m", "videofeat.launcher.cli", "slurm", "extract", manifest, "-o", str(tmp_path / "run"),
            "--model", "videomae_test", "--time", "1", "--decode-rate", "1", "--shards-per-task", "2", "--dry-run"]
    done = subprocess.run(base, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "estimated to need more than 80% of --time 60 s" in done.stderr
    assert "#SBATCH --array=0-2" in done.stdout and "3 array tasks" in done.stdout
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
    strict = subprocess.run(base + ["--strict"], capture_output=True, text=True, timeout=60)
    assert strict.returncode == 2 and "refusing to submit (--strict)" in strict.stderr
    light = subprocess.run([sys.executable, "-c", "import sys; from videofeat.launcher.cli import main; "
                            f"main(['slurm', 'extract', {manifest!r}, '-o', 'x', '--model', 'm', '--dry-run']); "
                            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm')))"],
                           capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert light.stdout.strip().endswith("[]"), light.stdout + light.stderr


def test_interrupted_shards_and_task_lookup_from_the_run_directory(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    run.initialize({"x": 1}, {})
    run.write_plan(PLAN, [[0, 1], [2]])
    # shard 0 done by array task 7_0; shard 1 interrupted by a signal; shard 2 killed without a record.
    run.commit_shard(0, _temp(run, 0), {"slurm": {"slurm_array_job_id": "7", "slurm_array_task_id": "0"}})
    run.record_failure(1, 1, "interrupted", "SIGUSR2: stopped")
    run.fs.pipe_file(run.log_path(2, 1), b"started\n")
    assert slurm_info.interrupted_shards(run, PLAN, 0) == [1]
    assert slurm_info.interrupted_shards(run, PLAN, 1) == []
    with pytest.raises(IndexError, match="--task-index 2"):
        slurm_info.interrupted_shards(run, PLAN, 2)
    cli = [sys.executable, "-m", "videofeat.launcher.slurm.records", "interrupted", run.url, "--plan", PLAN, "--task-index"]
    assert subprocess.run(cli + ["0"], capture_output=True).returncode == 0
    assert subprocess.run(cli + ["1"], capture_output=True).returncode == 1
    slurm_info.write_submission(run, {"plan_id": PLAN, "log_dir": "/logs", "arrays": [{"job_id": "7", "offset": 0,
                                                                                      "count": 2}]})
    tasks = slurm_info.shard_tasks(run, run.records([0, 1, 2]))
    assert tasks[0].ran and tasks[0].name == "7_0" and tasks[0].log_path == "/logs/7_0.out"
    assert not tasks[2].ran and tasks[2].name == "7_1" and "planned for array task 7_1" in tasks[2].describe()
    # A rerun plans exactly the interrupted and the killed shard.
    assert se.rerun_tasks(_launch(shards_per_task=1), run, [0, 1, 2], False, 3) == [[1], [2]]


def _temp(run: RunDir, shard: int) -> str:
    path = run.temp_shard_path(shard)
    run.fs.pipe_file(path, b"parquet bytes")
    return path


def test_submission_records_round_trip(tmp_path):
    launch = _launch()
    assert se.ArrayLaunch.from_dict(json.loads(json.dumps(launch.to_dict()))) == launch
