"""Fine-tuning faults in one process through the real ``videofeat finetune`` entry point."""

from __future__ import annotations

import json

import pytest
import torch
from test_finetune_fixtures import cpu_test_args, make_finetune_data

from videofeat.launcher.cli import main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_finetune_data(tmp_path_factory.mktemp("faults-data"), train_videos=2, val_layout=())


def test_update_to_non_finite_weights_writes_no_checkpoint(data, tmp_path, capfd):
    """An infinite learning rate: the first loss is finite, the update it makes is not. The epoch
    (one step) ends and the checkpoint it would write is refused, naming the step and the lr."""
    out = tmp_path / "inf-lr"
    # 8 clips, 8 per step: one step per epoch, so the bad update is followed by a checkpoint.
    code = main(["finetune", *cpu_test_args(data, out, "--lr", "inf", "--batch-size", "8", "--epochs", "2")])
    assert code == 1
    message = capfd.readouterr().err
    assert "the weights hold non-finite values after step 1" in message and "checkpoint-last.pt was not written" in message
    assert "learning rate too high" in message and "--lr inf" in message
    assert not list(out.glob("checkpoint-*")) and not (out / "COMPLETED").exists()
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in train if r["event"] == "train"] == [1]


def test_non_finite_starting_weights_stop_at_step_1(data, tmp_path, capfd):
    """Weights holding a NaN from the start (a corrupt --checkpoint): the first loss is NaN, and
    the error says no update had been made, so the learning rate is not the cause."""
    from videofeat.models import create_model, save_checkpoint

    model = create_model("videomae_test", num_classes=4, img_size=64, num_frames=8)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    start = tmp_path / "corrupt.pt"
    save_checkpoint(start, model)
    out = tmp_path / "nan-start"
    code = main(["finetune", *cpu_test_args(data, out, "--checkpoint", str(start))])
    assert code == 1
    message = capfd.readouterr().err
    assert "non-finite loss (nan) at step 1 (epoch 1, step 1 of" in message
    assert "starting weights (--checkpoint)" in message and "no update had been made" in message
    assert not list(out.glob("checkpoint-*")) and not (out / "COMPLETED").exists()
