"""The real entry point under ``torchrun --nproc_per_node=2`` (gloo, ``cpu-test`` recipe) on
generated labelled videos: learning, distributed evaluation, stop / resume, SIGTERM preemption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from test_finetune_fixtures import cpu_test_args, make_finetune_data, torchrun

pytestmark = pytest.mark.slow

EPOCHS = 4
RUN_TIMEOUT = 240


def _run(args, **popen) -> subprocess.CompletedProcess:
    proc = torchrun(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    out, _ = proc.communicate(timeout=RUN_TIMEOUT)
    # A rank's own error comes first, torchrun's summary last: show both ends.
    assert proc.returncode == 0, out[:6000] + "\n...\n" + out[-3000:]
    return subprocess.CompletedProcess(args, proc.returncode, out)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.allclose(wa[key], wb[key], rtol=0, atol=1e-6), key


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_finetune_data(tmp_path_factory.mktemp("finetune-data"))


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> Path:
    """An uninterrupted run: the reference for learning and for every resumed run."""
    out = tmp_path_factory.mktemp("straight")
    _run(cpu_test_args(data, out, "--epochs", str(EPOCHS)))
    return out


def test_loss_falls_and_accuracy_beats_chance(straight):
    records = _metrics(straight)
    train = [r for r in records if r["event"] == "train"]
    steps_per_epoch = records[0]["steps_per_epoch"]
    first = sum(r["loss"] for r in train[:steps_per_epoch]) / steps_per_epoch
    last = sum(r["loss"] for r in train[-steps_per_epoch:]) / steps_per_epoch
    assert last < first - 0.1, (first, last)
    final = [r for r in records if r["event"] == "val"][-1]
    assert final["count"] == 11 and final["failed"] == 0
    assert final["top1"] >= 0.6, final  # chance is 0.25 (4 classes)
    assert (straight / "COMPLETED").exists() and not (straight / "PREEMPTED").exists()


def test_two_rank_evaluation_equals_one_rank(data, straight):
    """The odd-sized (11) validation set, split over 2 ranks inside torchrun, gives exactly the
    metrics of evaluating the same final weights in one process."""
    from videofeat.models import create_model
    from videofeat.workers.finetune.augment import ClipTransform
    from videofeat.workers.finetune.data import ClipDataset, load_segments
    from videofeat.workers.distributed import Distributed
    from videofeat.workers.finetune.evaluate import evaluate
    from videofeat.workers.finetune.loop import TrainConfig
    from videofeat.launcher.cli import parse_command
    from videofeat.launcher.finetune import build_config

    args, _ = parse_command("finetune", cpu_test_args(data, straight))
    cfg: TrainConfig = build_config(args)
    model = create_model("auto", checkpoint=str(straight / "checkpoint-last.pt"))
    segments = load_segments(data["labels"], data["manifest"], "rear", "validation", 4)
    dataset = ClipDataset(segments, cfg.sampling, ClipTransform(cfg.augment, train=False), train=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3)
    import contextlib

    one_rank = evaluate(model, loader, 4, torch.device("cpu"), Distributed(), contextlib.nullcontext)
    two_ranks = [r for r in _metrics(straight) if r["event"] == "val"][-1]
    assert one_rank["count"] == two_ranks["count"] == 11
    assert one_rank["confusion"] == two_ranks["confusion"]
    assert one_rank["top1"] == two_ranks["top1"] and one_rank["per_class"] == two_ranks["per_class"]


def test_stop_resume_and_sigterm_reproduce_the_straight_run(data, straight, tmp_path):
    out = tmp_path / "resumed"
    args = cpu_test_args(data, out, "--epochs", str(EPOCHS))
    steps_per_epoch = _metrics(straight)[0]["steps_per_epoch"]
    total = EPOCHS * steps_per_epoch

    # 1. Stop after epoch 2 of 4: the checkpoint equals the straight run's after epoch 2.
    _run(args + ["--stop-after-epoch", "2"])
    assert not (out / "COMPLETED").exists()
    _assert_same_weights(out / "checkpoint-last.pt", straight / "checkpoint-e0002.pt")

    # 2. Resume, and SIGTERM the whole process group (as scancel / preemption does) mid-epoch 3.
    proc = torchrun(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    target = 2 * steps_per_epoch + 2
    deadline = time.time() + RUN_TIMEOUT
    while time.time() < deadline and proc.poll() is None:
        steps = [r["step"] for r in _metrics(out) if r["event"] == "train"]
        if steps and steps[-1] >= target:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be preempted"
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=RUN_TIMEOUT)
    marker = out / "PREEMPTED"
    assert marker.exists(), output[-4000:]
    stopped = json.loads(marker.read_text())
    assert 2 * steps_per_epoch < stopped["step"] < total and stopped["epoch_step"] > 0, stopped
    assert stopped["signal"] == signal.SIGTERM

    # 3. Resume to the end: exactly the remaining steps, and the straight run's weights.
    _run(args)
    assert (out / "COMPLETED").exists() and not marker.exists()
    records = _metrics(out)
    steps = [r["step"] for r in records if r["event"] == "train"]
    assert steps == list(range(1, total + 1)), steps  # none repeated, none skipped
    starts = [r for r in records if r["event"] == "start"]
    assert [s["step"] for s in starts] == [0, 2 * steps_per_epoch, stopped["step"]]
    _assert_same_weights(out / "checkpoint-last.pt", straight / "checkpoint-last.pt")
    resumed = torch.load(out / "checkpoint-last.pt", map_location="cpu", weights_only=True)
    reference = torch.load(straight / "checkpoint-last.pt", map_location="cpu", weights_only=True)
    for a, b in zip(resumed["optimizer"]["state"].values(), reference["optimizer"]["state"].values()):
        assert torch.allclose(a["exp_avg_sq"], b["exp_avg_sq"], rtol=0, atol=1e-9)


def test_finetuned_checkpoint_extracts_without_conversion(data, straight, tmp_path):
    """`videofeat extract` reads the fine-tuned checkpoint as it is (architecture from its
    `arch` record, the new 4-class head) and writes features and class probabilities."""
    import pyarrow.parquet as pq

    from helpers_extract import run_extract
    from videofeat.manifests.ledger import RunDir
    from videofeat.models import create_model, sha256_of

    best = str(straight / "checkpoint-best.pt")
    model = create_model("auto", checkpoint=best)
    assert not model.training and model.num_classes == 4 and model.arch["num_frames"] == 8
    run_dir = str(tmp_path / "features")
    run_extract(data["manifest"], run_dir, "--shards", "0", checkpoint=best)
    run = RunDir(run_dir)
    assert run.done_shards() == [0]
    record = run.load_run()
    assert record["num_classes"] == 4 and record["checkpoints"]["*"]["sha256"] == sha256_of(best)
    rows = pq.read_table(run.shard_path(0)).to_pylist()
    assert rows and all(len(r["probs"]) == 4 and abs(sum(r["probs"]) - 1) < 1e-5 for r in rows)
    assert all(len(r["feature"]) == 64 for r in rows)


def test_absurd_learning_rate_stops_at_the_step_with_no_nan_checkpoint(data, tmp_path):
    """A real NaN: lr 1e4 under torchrun. Every rank stops at the same step, before updating the
    weights from it; the error names the step and the learning rate; no checkpoint holding
    non-finite weights and no COMPLETED marker is written; the launch fails."""
    out = tmp_path / "diverged"
    proc = torchrun(cpu_test_args(data, out, "--lr", "1e4", "--epochs", "2"), stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT, text=True)
    output, _ = proc.communicate(timeout=RUN_TIMEOUT)
    assert proc.returncode != 0, output[-3000:]
    records = _metrics(out)
    diverged = [r for r in records if r["event"] == "diverged"]
    assert len(diverged) == 1, records
    step = diverged[0]["step"]
    assert f"non-finite loss (nan) at step {step}" in output or f"non-finite loss (inf) at step {step}" in output
    assert "learning rate too high" in output and "--lr 10000" in output
    assert output.count("non-finite loss") == 1, output[-3000:]  # rank 0 says it; rank 1 only exits 1
    assert "Traceback" not in output.split("torch/distributed/elastic")[0]
    assert [r["step"] for r in records if r["event"] == "train"] == list(range(1, step))
    assert not (out / "COMPLETED").exists()
    for checkpoint in out.glob("checkpoint-*.pt"):
        assert all(torch.isfinite(t).all() for t in _weights(checkpoint).values() if t.is_floating_point())


def test_kill_during_checkpoint_write_resumes_to_the_straight_run(data, straight, tmp_path):
    """SIGKILL rank 0 while it writes checkpoint-last.pt at the end of epoch 2 (each write is held
    open for a while, written but not yet renamed). The previous checkpoint and its record are
    intact; a plain rerun removes the killed writer's temporary, resumes from epoch 1, logs each
    step once and ends with the straight run's weights."""
    import re

    from videofeat.models.checkpoint import WRITE_DELAY_ENV

    out = tmp_path / "killed"
    # --save-every beyond --epochs: only checkpoint-last (and -best) exist to resume from.
    args = cpu_test_args(data, out, "--epochs", str(EPOCHS), "--save-every", "100")
    steps_per_epoch = _metrics(straight)[0]["steps_per_epoch"]
    proc = torchrun(args, env_extra={WRITE_DELAY_ENV: "1.5"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    text=True)
    record, temp = out / "checkpoint-last.pt.json", None
    deadline = time.time() + RUN_TIMEOUT
    while time.time() < deadline and proc.poll() is None and temp is None:
        if record.exists() and json.loads(record.read_text())["epoch"] == 1:
            temp = next(out.glob("checkpoint-last.pt.tmp-*"), None)  # epoch 2's write
        time.sleep(0.02)
    assert temp is not None, "no checkpoint write of epoch 2 was seen"
    writer = int(re.search(r"-p(\d+)-[0-9a-f]{8}$", temp.name).group(1))
    os.kill(writer, signal.SIGKILL)
    output, _ = proc.communicate(timeout=RUN_TIMEOUT)
    assert proc.returncode != 0
    assert temp.exists(), "the kill landed after the rename"
    assert json.loads(record.read_text())["step"] == steps_per_epoch  # the epoch-1 checkpoint still vouched for
    assert 2 * steps_per_epoch in [r["step"] for r in _metrics(out) if r["event"] == "train"]

    resumed = _run(args)
    assert "resumed from" in resumed.stdout and f"step {steps_per_epoch} " in resumed.stdout
    assert not temp.exists() and not list(out.glob("*.tmp-*"))
    records = _metrics(out)
    assert [r["step"] for r in records if r["event"] == "train"] == list(range(1, EPOCHS * steps_per_epoch + 1))
    assert [r["epoch"] for r in records if r["event"] == "val"] == list(range(1, EPOCHS + 1))
    assert (out / "COMPLETED").exists()
    _assert_same_weights(out / "checkpoint-last.pt", straight / "checkpoint-last.pt")
