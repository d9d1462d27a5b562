"""Fine-tuning pieces without a process group: sampling, augmentation, optimiser, schedule,
checkpoints, data loading from untrimmed videos, configuration."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from videofeat.workers.finetune.augment import AugmentConfig, ClipTransform, apply_mixup, build_mixup
from videofeat.workers.finetune.clip_sampling import SamplingConfig, clip_indices, dense_indices, sample_rng, uniform_indices
from videofeat.workers.finetune.data import (ClipDataset, ResumableDistributedSampler, Segment, read_clip_list,
                                             read_frames)
from videofeat.workers.finetune.optim import CosineSchedule, OptimConfig, param_groups, scaled_lr
from videofeat.workers.finetune import state as ts
from videofeat.workers.decode.synthetic import read_index, write_index_video

EVAL_AUG = AugmentConfig(input_size=64, short_side_size=64, rand_augment=None, reprob=0, mixup=0, cutmix=0,
                         smoothing=0)


# ----------------------------------------------------------------------------- sampling


def test_uniform_sampling_one_frame_per_segment_and_deterministic():
    rng = sample_rng(3, 1, 7)
    idx = uniform_indices(100, 260, 16, rng)
    assert len(idx) == 16 and np.all(np.diff(idx) > 0)
    assert all(100 + k * 10 <= i < 100 + (k + 1) * 10 for k, i in enumerate(idx))  # one per segment
    assert np.array_equal(idx, uniform_indices(100, 260, 16, sample_rng(3, 1, 7)))
    assert not np.array_equal(idx, uniform_indices(100, 260, 16, sample_rng(3, 2, 7)))  # other epoch
    assert list(uniform_indices(0, 160, 16)) == [5 + 10 * k for k in range(16)]  # eval: middles
    assert list(uniform_indices(10, 14, 8)) == [10, 10, 11, 11, 12, 12, 13, 13]  # shorter than the clip


def test_dense_sampling_stride_and_short_spans():
    idx = dense_indices(50, 200, 16, 4, sample_rng(0, 0, 0))
    assert np.all(np.diff(idx) == 4) and idx[0] >= 50 and idx[-1] < 200
    assert list(dense_indices(0, 10, 4, 4)) == [0, 4, 8, 9]  # clamped to the last frame
    centred = dense_indices(0, 100, 4, 2)
    assert centred[0] == (100 - 7) // 2
    with pytest.raises(ValueError, match="--sampling-rate"):
        SamplingConfig(mode="dense", sampling_rate=0)
    with pytest.raises(ValueError, match="--sampling"):
        SamplingConfig(mode="random")


def test_frames_read_are_the_frames_sampled_mid_gop(tmp_path):
    """A 250-frame GOP and segments starting mid-GOP: decoded frame content == chosen indices."""
    path = str(tmp_path / "index.mp4")
    write_index_video(path, 600, 64, 64, gop=250)
    segments = [Segment(path, 0, 263, 420, "v"), Segment(path, 1, 251, 259, "v"), Segment(path, 0, 499, 600, "v")]
    for mode in ("uniform", "dense"):
        dataset = ClipDataset(segments, SamplingConfig(mode=mode, num_frames=8, sampling_rate=3),
                              ClipTransform(EVAL_AUG, train=False), train=True, seed=5)
        for epoch in (0, 1):
            dataset.set_epoch(epoch)
            for i, segment in enumerate(segments):
                chosen = dataset.sample_indices(i)
                assert np.all((chosen >= segment.start_frame) & (chosen < segment.end_frame))
                frames = read_frames(segment, chosen)
                assert [read_index(f) for f in frames] == [int(c) for c in chosen]


# ----------------------------------------------------------------------------- augmentation


def _still_clip(t=4, size=72):
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
    return np.stack([frame] * t)


def test_train_augmentation_same_parameters_for_every_frame_and_seeded():
    config = AugmentConfig(input_size=64, short_side_size=72, reprob=1.0 - 1e-9)
    transform = ClipTransform(config, train=True)
    frames = _still_clip()
    out = transform(frames, seed=11)
    assert out.shape == (3, 4, 64, 64)
    erased = (out[:, 0] - out[:, 1]).abs().amax(dim=0) > 0  # only the erasing noise differs...
    for t in range(1, 4):
        differs = (out[:, 0] - out[:, t]).abs().amax(dim=0) > 0
        assert torch.equal(differs, erased)  # ...and in the same rectangle in every frame
    outside = ~erased
    assert outside.sum() > 0
    for t in range(1, 4):  # RandAugment + crop identical for all frames outside the erased box
        assert torch.equal(out[:, 0][:, outside], out[:, t][:, outside])
    assert torch.equal(out, transform(frames, seed=11))
    assert not torch.equal(out, transform(frames, seed=12))
    state = torch.get_rng_state()
    transform(frames, seed=13)
    assert torch.equal(state, torch.get_rng_state())  # global generators left as they were


def test_eval_transform_centre_crop_and_normalisation():
    config = AugmentConfig(input_size=64, short_side_size=80)
    frames = np.zeros((2, 80, 96, 3), dtype=np.uint8)
    frames[:, 8:72, 16:80] = 255  # exactly the centre crop
    out = ClipTransform(config, train=False)(frames)
    expected = (1.0 - torch.tensor(config.mean)) / torch.tensor(config.std)
    assert out.shape == (3, 2, 64, 64)
    assert torch.allclose(out.amin(dim=(1, 2, 3)), expected) and torch.allclose(out.amax(dim=(1, 2, 3)), expected)


def test_cutmix_cuts_the_same_box_from_every_frame():
    config = AugmentConfig(input_size=32, short_side_size=32, mixup=0.0, cutmix=1.0, smoothing=0.1)
    mixup = build_mixup(config, num_classes=4)
    clips = torch.stack([torch.full((3, 1, 32, 32), float(i)).expand(3, 4, 32, 32) for i in range(4)]).contiguous()
    mixed, targets = apply_mixup(mixup, clips.clone(), torch.tensor([0, 1, 2, 3]), seed=1)
    assert targets.shape == (4, 4) and torch.allclose(targets.sum(1), torch.ones(4))
    for t in range(1, 4):
        assert torch.equal(mixed[:, :, 0], mixed[:, :, t])
    again, _ = apply_mixup(mixup, clips.clone(), torch.tensor([0, 1, 2, 3]), seed=1)
    assert torch.equal(mixed, again)
    with pytest.raises(ValueError, match="--mixup"):
        AugmentConfig(mixup=-1)


# ----------------------------------------------------------------------------- optimiser


def test_layer_decay_groups_match_timm():
    import timm
    from timm.optim import param_groups_layer_decay

    model = timm.create_model("vit_tiny_patch16_224", depth=3, pretrained=False, img_size=32)
    ours = {name: (g["lr_scale"], g["weight_decay"]) for g in param_groups(model, 0.05, 0.75)
            for name in g["param_names"]}
    theirs = {}
    for group in param_groups_layer_decay(model, 0.05, no_weight_decay_list=("pos_embed", "cls_token"),
                                          layer_decay=0.75):
        for param in group["params"]:
            name = next(n for n, p in model.named_parameters() if p is param)
            theirs[name] = (group["lr_scale"], group["weight_decay"])
    assert ours.keys() == theirs.keys()
    # The one convention that differs: timm puts a final `norm` in the last block's layer, the
    # seed (BEiT's get_num_layer_for_vit) at L+1; VideoMAE's mean-pooling models have no `norm`.
    assert ours["norm.weight"][0] == 1.0 and theirs["norm.weight"][0] == 0.75
    for name in (n for n in ours if not n.startswith("norm.")):
        assert ours[name][1] == theirs[name][1], name
        assert math.isclose(ours[name][0], theirs[name][0]), name
    assert ours["patch_embed.proj.weight"][0] == pytest.approx(0.75 ** 4)
    assert ours["head.weight"] == (1.0, 0.05) and ours["blocks.0.attn.qkv.bias"][1] == 0.0


def test_videomae_group_matcher_gives_the_seeds_layers():
    from timm.optim import param_groups_layer_decay

    from videofeat.models import create_model

    # Token pooling: the one layout with a final `norm`, which the seed keeps at full lr.
    model = create_model("videomae_test", num_classes=3, global_pool="token", learned_pos_embed=True,
                         init_values=0.1)
    ours = {name: (g["lr_scale"], g["weight_decay"]) for g in param_groups(model, 0.05, 0.75)
            for name in g["param_names"]}
    # timm reading the model's own group_matcher gives the same groups.
    names = {id(p): n for n, p in model.named_parameters()}
    theirs = {names[id(p)]: (g["lr_scale"], g["weight_decay"])
              for g in param_groups_layer_decay(model, 0.05, no_weight_decay_list=("pos_embed",), layer_decay=0.75)
              for p in g["params"]}
    assert ours == theirs
    depth = 2  # videomae_test: layers 0 (embedding), 1-2 (blocks), 3 (norm, head)
    assert ours["patch_embed.proj.weight"] == (0.75 ** (depth + 1), 0.05)
    assert ours["pos_embed"] == (0.75 ** (depth + 1), 0.0)
    assert ours["blocks.0.attn.qkv.weight"] == (0.75 ** depth, 0.05)
    assert ours["blocks.1.gamma_1"] == (0.75, 0.0) and ours["blocks.1.attn.q_bias"] == (0.75, 0.0)
    assert ours["norm.weight"] == (1.0, 0.0) and ours["head.weight"] == (1.0, 0.05)


def test_cosine_schedule_is_the_seeds():
    base, final, epochs, per_epoch, warmup_epochs = 1e-3, 1e-6, 4, 10, 1
    warmup = np.linspace(0, base, warmup_epochs * per_epoch)  # the seed's cosine_scheduler
    iters = np.arange(epochs * per_epoch - warmup_epochs * per_epoch)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    seed = np.concatenate((warmup, cosine))
    schedule = CosineSchedule(base, final, epochs * per_epoch, warmup_epochs * per_epoch)
    assert np.allclose([schedule(s) for s in range(epochs * per_epoch)], seed, rtol=0, atol=1e-15)
    assert scaled_lr(2e-3, 2 * 1 * 4) == pytest.approx(6.25e-5)  # the seed's ViT-L value
    with pytest.raises(ValueError, match="--layer-decay"):
        OptimConfig(layer_decay=0)


# ----------------------------------------------------------------------------- checkpoints


def _tiny_model():
    from videofeat.models import create_model

    return create_model("videomae_test", num_classes=3)


def test_checkpoints_atomic_newest_complete_wins(tmp_path, caplog):
    model = _tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    rng = ts.gather_rng_states(lambda t: [t])
    ts.save_training_checkpoint(str(tmp_path / "checkpoint-e0001.pt"), model, step=5, epoch=1, epoch_step=0,
                                optimizer=optimizer.state_dict(), rng=rng, config="{}")
    ts.save_training_checkpoint(str(tmp_path / "checkpoint-last.pt"), model, step=5, epoch=1, epoch_step=0,
                                optimizer=optimizer.state_dict(), rng=rng, config="{}")
    # A newer file that was cut off while being written (its record written by a buggy copy)...
    (tmp_path / "checkpoint-best.pt").write_bytes(b"PK\x03\x04 truncated")
    (tmp_path / "checkpoint-best.pt.json").write_text(json.dumps({"step": 9, "epoch": 2, "epoch_step": 0}))
    # ...and one with no completion record at all.
    (tmp_path / "checkpoint-e0002.pt").write_bytes(b"garbage")
    info, ckpt = ts.load_latest(str(tmp_path))
    assert info.path.endswith("checkpoint-last.pt") and info.step == 5
    assert "checkpoint-e0002.pt has no valid completion record" in caplog.text
    assert "cannot load" in caplog.text and "checkpoint-best.pt" in caplog.text
    loaded = torch.load(info.path, map_location="cpu", weights_only=True)
    assert set(loaded) >= {"model", "arch", "optimizer", "rng", "config", "step", "epoch", "epoch_step"}
    assert torch.equal(loaded["model"]["head.weight"], model.state_dict()["head.weight"])


def test_rng_states_round_trip():
    import random

    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    saved = ts.gather_rng_states(lambda t: [t, t])  # as if two ranks
    expected = (torch.rand(3), np.random.rand(2), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    assert ts.restore_rng_states(saved, rank=1, world_size=2)
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(2), expected[1])
    assert random.random() == expected[2]
    assert not ts.restore_rng_states(saved, rank=0, world_size=3)


def test_resumable_sampler_skips_what_was_trained():
    data = list(range(13))
    full = ResumableDistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=4)
    full.set_epoch(3)
    order = list(full)
    full.set_epoch(3, skip=4)
    assert list(full) == order[4:] and len(full) == len(order) - 4


# ----------------------------------------------------------------------------- data


def test_broken_video_is_replaced_in_training_and_masked_in_evaluation(tmp_path, caplog):
    good = str(tmp_path / "good.mp4")
    write_index_video(good, 40, 64, 64, gop=10)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 100)
    segments = [Segment(str(bad), 1, 0, 30, "bad"), Segment(good, 0, 0, 40, "good")]
    sampling = SamplingConfig(num_frames=8)
    train = ClipDataset(segments, sampling, ClipTransform(EVAL_AUG, train=True), train=True, num_sample=2)
    item = train[0]
    assert item["valid"] and item["clips"].shape == (2, 3, 8, 64, 64) and item["label"] == 0
    assert "cannot read clip 0" in caplog.text
    val = ClipDataset(segments, sampling, ClipTransform(EVAL_AUG, train=False), train=False)
    assert not val[0]["valid"] and val[1]["valid"]


def test_clip_list_parsing(tmp_path):
    listing = tmp_path / "train.csv"
    listing.write_text("clips/a.mp4 3\n/abs/b c.mp4 0\n\n")
    segments = read_clip_list(str(listing), num_classes=16)
    assert segments[0].uri == str(tmp_path / "clips" / "a.mp4") and segments[0].label == 3
    assert segments[1].uri == "/abs/b c.mp4" and segments[1].end_frame is None
    listing.write_text("a.mp4 3\nb.mp4,2\n")
    with pytest.raises(ValueError, match=r"train.csv:2"):
        read_clip_list(str(listing), num_classes=16)
    listing.write_text("a.mp4 16\n")
    with pytest.raises(ValueError, match="--num-classes"):
        read_clip_list(str(listing), num_classes=16)


# ----------------------------------------------------------------------------- configuration


def test_recipes_and_flags(tmp_path):
    from videofeat.launcher.cli import parse_command
    from videofeat.launcher.finetune_recipes import RECIPES, resolve

    vith = resolve("aicity-vith-k400", {})
    assert (vith["input_size"], vith["batch_size"], vith["epochs"], vith["drop_path"]) == (448, 1, 40, 0.2)
    assert resolve("aicity-vitl-ego4d", {})["epochs"] == 25 and resolve("aicity-vitl-hybrid", {})["epochs"] == 35
    assert RECIPES["cpu-test"]["mixup"] == 0 and RECIPES["cpu-test"]["scale_lr"] is False
    config = tmp_path / "run.toml"
    config.write_text('recipe = "cpu-test"\nepochs = 7\nbatch-size = 4\n')
    args, _ = parse_command("finetune", ["--config", str(config), "--epochs", "3"])
    values = resolve(args.recipe, {k: v for k, v in vars(args).items() if k not in ("recipe", "config")})
    assert (values["epochs"], values["batch_size"], values["input_size"]) == (3, 4, 64)


def test_help_does_not_import_torch():
    code = ("import sys; from videofeat.launcher.cli import main\n"
            "try:\n    main(['finetune', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules and 'timm' not in sys.modules, 'heavy import'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--stop-after-epoch" in result.stdout
