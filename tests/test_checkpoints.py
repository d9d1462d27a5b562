"""Checkpoint layouts load back to the source model's outputs; bad files fail by name."""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
from pathlib import Path

import pytest
import torch
from ckpt_fixtures import (TINY, clip, hf_classifier, tiny_model, to_fp16_weights, write_deepspeed_dir,
                           write_deepspeed_file, write_hf, write_module_only, write_pretrain, write_videomae)

from videofeat.models import (CheckpointError, create_model, inspect_checkpoint, save_checkpoint,
                              sha256_of)


def _same_outputs(loaded: torch.nn.Module, source: torch.nn.Module, x: torch.Tensor) -> None:
    assert not loaded.training  # extraction loads come back in eval mode
    with torch.no_grad():
        f_src, l_src = source.forward_features_and_logits(x)
        f_new, l_new = loaded.forward_features_and_logits(x)
    torch.testing.assert_close(f_new, f_src, rtol=0, atol=1e-6)
    if l_src is None:
        assert l_new is None
    else:
        torch.testing.assert_close(l_new, l_src, rtol=0, atol=1e-6)


def test_videomae_checkpoint_n(tmp_path: Path) -> None:
    source = tiny_model(num_classes=16)
    path = write_videomae(tmp_path / "checkpoint-9.pth", source)
    _same_outputs(create_model("videomae_test", checkpoint=path), source, clip())
    _same_outputs(create_model("auto", checkpoint=path, num_heads=2, **TINY), source, clip())
    info = inspect_checkpoint(path)
    assert info["layout"] == "videomae/videomae" and info["num_classes"] == 16 and info["epoch"] == 9
    assert info["extra_keys"] == ["args", "epoch", "optimizer", "scaler"]
    assert info["num_params"] == sum(p.numel() for p in source.parameters())


@pytest.mark.parametrize("name", ["k400_vith_rearview.pt", "K400_vith_dashboard.pt", "hybrid_k700_vitl_rearview.pt",
                                  "hybrid_k700_vitl_dashboard.pt", "ego_verb_vitl_rearview.pt",
                                  "ego_verb_vitl_dashboard.pt"])
def test_seed_finetuned_deepspeed_files(tmp_path: Path, name: str) -> None:
    source = to_fp16_weights(tiny_model(num_classes=16, seed=len(name)))
    path = write_deepspeed_file(tmp_path / name, source)
    model = create_model("videomae_test", checkpoint=path)
    assert model.num_classes == 16 and model.load_report["layout"] == "deepspeed/videomae"
    _same_outputs(model, source, clip())


def test_deepspeed_folder_with_latest(tmp_path: Path) -> None:
    source = to_fp16_weights(tiny_model(num_classes=16))
    save_dir = write_deepspeed_dir(tmp_path / "out", source, epoch=24)
    for path in (save_dir, save_dir / "checkpoint-24"):
        _same_outputs(create_model("videomae_test", checkpoint=path), source, clip())
    file = save_dir / "checkpoint-24" / "mp_rank_00_model_states.pt"
    assert inspect_checkpoint(save_dir)["path"] == str(file)
    assert sha256_of(save_dir) == hashlib.sha256(file.read_bytes()).hexdigest()
    (save_dir / "latest").write_text("checkpoint-99")
    with pytest.raises(CheckpointError, match="checkpoint-99"):
        create_model("videomae_test", checkpoint=save_dir)


@pytest.mark.parametrize("family,classes,writer", [("k400_vith", 400, write_module_only),
                                                   ("hybrid_k700_vitl", 700, write_videomae),
                                                   ("ego4d_verb_vitl", 118, write_module_only)])
def test_pretrained_families_keep_their_head(tmp_path: Path, family: str, classes: int, writer) -> None:
    source = tiny_model(num_classes=classes)
    path = writer(tmp_path / f"{family}.pth", source)
    model = create_model("auto", checkpoint=path, num_heads=2, **TINY)
    assert model.num_classes == classes
    _same_outputs(model, source, clip())


def test_finetune_replaces_a_mismatched_head_and_says_so(tmp_path: Path, caplog) -> None:
    source = tiny_model(num_classes=118)
    path = write_module_only(tmp_path / "ego4d_verb_pretrain_vitl_k700.pt", source)
    with pytest.raises(CheckpointError, match="118-class head"):
        create_model("videomae_test", checkpoint=path, num_classes=16)
    with caplog.at_level(logging.INFO, logger="videofeat.models"):
        model = create_model("videomae_test", checkpoint=path, num_classes=16, for_finetune=True)
    assert "dropped the 118-class head" in caplog.text
    assert model.num_classes == 16 and model.head.weight.shape == (16, 64)
    torch.testing.assert_close(model.fc_norm.weight, source.fc_norm.weight)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(clip()), source.forward_features(clip()))


def test_pretraining_checkpoint(tmp_path: Path) -> None:
    source = tiny_model()
    path = write_pretrain(tmp_path / "checkpoint-799.pth", source)
    with pytest.raises(CheckpointError, match="pre-training checkpoint"):
        create_model("videomae_test", checkpoint=path)
    model = create_model("videomae_test", checkpoint=path, num_classes=16, for_finetune=True)
    assert model.training and model.num_classes == 16
    for key, value in source.state_dict().items():
        if key.startswith("blocks.") or key.startswith("patch_embed."):
            assert torch.equal(model.state_dict()[key], value), key
    info = inspect_checkpoint(path)
    assert info["pretraining"] and info["num_classes"] == 0 and "mask_token" in info["dropped_keys"]


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_transformers_checkpoints_match_transformers(tmp_path: Path, fmt: str) -> None:
    hf = hf_classifier(num_labels=5)  # transformers' default eps: 1e-12 in layers, 1e-5 in fc_norm
    path = write_hf(tmp_path / "hf", hf, fmt=fmt)
    x = clip()
    with torch.no_grad():
        expected = hf(pixel_values=x.transpose(1, 2)).logits
        for model in (create_model("auto", checkpoint=path), create_model("auto", checkpoint=path.parent)):
            assert model.arch["norm_eps"] == 1e-12 and model.arch["fc_norm_eps"] == 1e-5
            torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)
    assert inspect_checkpoint(path)["layout"].endswith("/hf-transformers")


def test_transformers_without_config_and_pretraining(tmp_path: Path) -> None:
    from transformers import VideoMAEForPreTraining

    hf = hf_classifier(num_labels=3)
    path = write_hf(tmp_path / "bare", hf, fmt="bin", with_config=False)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: cannot tell the number of attention heads.*"
                                              r"--model videomae_test"):
        create_model("auto", checkpoint=path, **TINY)
    with torch.no_grad():
        model = create_model("videomae_test", checkpoint=path)
        torch.testing.assert_close(model(clip()), hf(pixel_values=clip().transpose(1, 2)).logits,
                                   rtol=0, atol=1e-5)
    pre = write_hf(tmp_path / "pre", VideoMAEForPreTraining(hf.config), fmt="safetensors")
    assert inspect_checkpoint(pre)["weights"] == "hf-transformers-pretrain"
    with pytest.raises(CheckpointError, match="pre-training"):
        create_model("auto", checkpoint=pre)


def test_named_model_that_does_not_fit(tmp_path: Path) -> None:
    path = write_videomae(tmp_path / "checkpoint-1.pth", tiny_model())
    with pytest.raises(CheckpointError, match=r"does not fit model 'videomae_vit_base_patch16_224'.*embed_dim 64"):
        create_model("videomae_vit_base_patch16_224", checkpoint=path)
    # the head count is in no shape, but a recorded one is checked
    save_checkpoint(tmp_path / "eight_heads.pth", tiny_model(num_heads=8))
    with pytest.raises(CheckpointError, match="num_heads 8 in the checkpoint, 2 in the model"):
        create_model("videomae_test", checkpoint=tmp_path / "eight_heads.pth")


def test_missing_head_count_asks_for_it(tmp_path: Path) -> None:
    path = write_module_only(tmp_path / "odd.pt", tiny_model())
    with pytest.raises(CheckpointError, match=r"odd\.pt.*--model videomae_test") as refused:
        create_model("auto", checkpoint=path, **TINY)
    assert "--num-heads" not in str(refused.value)  # no command has that flag
    # Both ways out the message gives work: the named model, and re-saving with the record.
    assert create_model("videomae_test", checkpoint=path).arch["num_heads"] == 2
    save_checkpoint(tmp_path / "recorded.pth", create_model("auto", checkpoint=path, num_heads=2, **TINY))
    assert create_model("auto", checkpoint=tmp_path / "recorded.pth").arch["num_heads"] == 2


def test_strict_load_names_missing_and_unexpected_keys(tmp_path: Path) -> None:
    state = tiny_model().state_dict()
    state["head2.weight"] = torch.zeros(3, 64)  # an Ego4D noun head we do not build
    del state["blocks.1.norm1.weight"]
    torch.save({"module": state}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=r"missing keys \[blocks\.1\.norm1\.weight\].*head2\.weight"):
        create_model("videomae_test", checkpoint=tmp_path / "odd.pt")


def test_headless_checkpoint_gives_features_only(tmp_path: Path) -> None:
    source = tiny_model(num_classes=0)
    path = write_module_only(tmp_path / "features.pt", source)
    model = create_model("videomae_test", checkpoint=path)
    assert model.num_classes == 0
    _same_outputs(model, source, clip())


class NotAllowed:
    """Any class outside the allow-list stands in for arbitrary pickled code."""


def test_unreadable_files_are_named(tmp_path: Path) -> None:
    good = write_videomae(tmp_path / "good.pth", tiny_model())
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    evil = tmp_path / "evil.pth"
    torch.save({"model": tiny_model().state_dict(), "extra": NotAllowed()}, evil)
    st = tmp_path / "cut.safetensors"
    write_hf(tmp_path / "hf", hf_classifier(), with_config=False)
    st.write_bytes((tmp_path / "hf" / "model.safetensors").read_bytes()[:1000])
    for path in (truncated, text, st):
        with pytest.raises(CheckpointError, match=f"{path.name}: not a readable"):
            create_model("videomae_test", checkpoint=path)
    with pytest.raises(CheckpointError, match=r"evil\.pth: holds the Python object .*NotAllowed"):
        inspect_checkpoint(evil)
    torch.save({"model": {"conv1.weight": torch.zeros(2, 3, 3, 3)}}, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="not a VideoMAE-family checkpoint"):
        create_model("auto", checkpoint=tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        create_model("auto", checkpoint=tmp_path / "absent.pth")


def test_integer_weights_are_refused_not_cast(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    # Quantised-looking weights: every tensor int8, as a mis-converted export would hold.
    source = tiny_model().state_dict()
    ints = tmp_path / "model_int8.safetensors"
    save_file({k: torch.round(v * 127).to(torch.int8).contiguous() for k, v in source.items()}, str(ints))
    for name in ("videomae_test", "auto"):
        with pytest.raises(CheckpointError, match=r"model_int8\.safetensors: \d+ tensor\(s\) hold int8 values") as err:
            create_model(name, checkpoint=ints, num_heads=2, **TINY) if name == "auto" else \
                create_model(name, checkpoint=ints)
        assert "blocks.0.attn.qkv.weight" in str(err.value)
    assert inspect_checkpoint(ints)["dtypes"] == {"int8": len(source)}  # still inspectable

    # One integer tensor among floats, in a plain state-dict file: only that key is named.
    mixed = dict(source, **{"head.weight": source["head.weight"].round().long()})
    torch.save(mixed, tmp_path / "one_int.pth")
    with pytest.raises(CheckpointError, match=r"one_int\.pth: 1 tensor\(s\) hold int64 values.*\[head\.weight\]"):
        create_model("videomae_test", checkpoint=tmp_path / "one_int.pth")
    # Narrower floats are the mixed-precision norm and still load.
    torch.save({k: v.half() for k, v in source.items()}, tmp_path / "fp16.pth")
    assert create_model("videomae_test", checkpoint=tmp_path / "fp16.pth").head.weight.dtype == torch.float32


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_plain_pickle_refusal_never_suggests_disabling_weights_only(tmp_path: Path, capsys, protocol: int) -> None:
    from videofeat.launcher.cli import main

    path = tmp_path / "weights.pkl"
    with path.open("wb") as handle:
        pickle.dump(tiny_model().state_dict(), handle, protocol=protocol)
    with pytest.raises(CheckpointError) as err:
        create_model("videomae_test", checkpoint=path)
    message = str(err.value)
    assert message.startswith(f"{path}: a plain Python pickle") and "torch.save(model.state_dict()" in message
    assert main(["inspect", str(path)]) == 1
    printed = capsys.readouterr().err
    assert "weights.pkl: a plain Python pickle" in printed
    # Neither the plain pickle nor a torch.save file holding a foreign object relays torch's hint.
    legacy_evil = tmp_path / "legacy_evil.pth"
    torch.save({"model": {}, "extra": NotAllowed()}, legacy_evil, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"legacy_evil\.pth: holds the Python object .*NotAllowed") as evil:
        inspect_checkpoint(legacy_evil)
    for text in (message, printed, str(evil.value)):
        assert "weights_only" not in text and "will likely succeed" not in text


@pytest.mark.parametrize("overrides", [{}, {"learned_pos_embed": True, "init_values": 0.1}])
def test_save_checkpoint_round_trip(tmp_path: Path, overrides: dict) -> None:
    source = tiny_model(num_classes=16, **overrides)
    path = tmp_path / "run" / "checkpoint-3.pth"
    config = json.dumps({"lr": 1e-3, "epochs": 35})
    save_checkpoint(path, source, epoch=3, config=config, rng={"torch": torch.get_rng_state()})
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint-3.pth"]  # no temporary left
    raw = torch.load(path, weights_only=True)  # no allow-list needed for our own files
    assert json.loads(raw["arch"]) == source.arch and raw["config"] == config and raw["epoch"] == 3
    model = create_model("auto", checkpoint=path)  # heads, frames, size from the arch record
    assert model.arch == source.arch
    _same_outputs(model, source, clip())
    assert inspect_checkpoint(path)["layout"] == "videofeat/videomae"


def test_learned_positions_are_resampled_on_load(tmp_path: Path) -> None:
    source = tiny_model(learned_pos_embed=True)
    save_checkpoint(tmp_path / "pos.pth", source)
    bigger = create_model("auto", checkpoint=tmp_path / "pos.pth", img_size=96, num_frames=16)
    assert bigger.pos_embed.shape == (1, 8 * 6 * 6, 64)
    with torch.no_grad():
        assert bigger(clip(frames=16, size=96)).shape == (2, 10)


def test_save_checkpoint_fsspec_and_refusals(tmp_path: Path) -> None:
    source = tiny_model()
    save_checkpoint("memory://videofeat-test/ckpt.pth", source, epoch=1)
    _same_outputs(create_model("auto", checkpoint="memory://videofeat-test/ckpt.pth"), source, clip())
    with pytest.raises(TypeError, match="'args' is a Namespace"):
        import argparse

        save_checkpoint(tmp_path / "x.pth", source, args=argparse.Namespace(lr=1))
    assert not list(tmp_path.iterdir())


def test_sha256_of_streams(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 5000
    path.write_bytes(data)
    assert sha256_of(path, chunk_size=4096) == hashlib.sha256(data).hexdigest()


def test_inspect_command(tmp_path: Path, capsys) -> None:
    from videofeat.launcher.cli import main

    path = write_deepspeed_file(tmp_path / "k400_vith_rearview.pt", to_fp16_weights(tiny_model(num_classes=16)))
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "deepspeed/videomae" in out and "16 classes" in out and "embed 64, depth 2" in out
    assert main(["inspect", str(path), "--json", "--sha256"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "bad.pt").write_text("nope")
    assert main(["inspect", str(tmp_path / "bad.pt")]) == 1
    assert "bad.pt" in capsys.readouterr().err
