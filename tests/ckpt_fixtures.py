"""Tiny stand-ins for every checkpoint layout videofeat reads, with the real files' top level.

Each writer takes a tiny random-weight model and writes what the original tool would have
written: VideoMAE's ``save_model`` (``model, optimizer, epoch, scaler, args``), DeepSpeed's
``save_checkpoint`` (``module`` plus its bookkeeping keys, fp16 weights), a pre-training
checkpoint (``encoder.*`` + decoder + ``mask_token``), transformers' ``.bin``/``.safetensors``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
from pathlib import Path
from typing import Any

import torch

from videofeat.models import create_model

TINY = dict(img_size=64, num_frames=8)  # videomae_test's clip shape


def tiny_model(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """``videomae_test`` with every parameter random (biases and norms too), in eval mode."""
    torch.manual_seed(seed)
    model = create_model("videomae_test", **overrides)
    with torch.no_grad():
        for name, param in model.named_parameters():
            base = 1.0 if name.endswith("weight") and ("norm" in name) else 0.0
            param.copy_(base + 0.1 * torch.randn_like(param))
    return model.eval()


def clip(batch: int = 2, seed: int = 1, frames: int = 8, size: int = 64) -> torch.Tensor:
    return torch.randn(batch, 3, frames, size, size, generator=torch.Generator().manual_seed(seed))


def _optimizer_state(model: torch.nn.Module) -> dict[str, Any]:
    # Step on copies: the saved weights must stay those of the source model.
    params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p in params:
        p.grad = None
    return opt.state_dict()


def videomae_args(**changes: Any) -> argparse.Namespace:
    """The ``args`` Namespace VideoMAE's run_class_finetuning.py stores in every checkpoint."""
    values = dict(batch_size=2, epochs=35, update_freq=1, save_ckpt_freq=10, model="vit_large_patch16_224",
                  tubelet_size=2, input_size=224, drop=0.0, attn_drop_rate=0.0, drop_path=0.1,
                  opt="adamw", opt_eps=1e-8, opt_betas=[0.9, 0.999], clip_grad=None, weight_decay=0.05,
                  lr=2e-3, layer_decay=0.75, warmup_epochs=5, min_lr=1e-6, nb_classes=16, num_frames=16,
                  sampling_rate=4, data_set="Track3", output_dir="/out", seed=0, resume="",
                  auto_resume=True, enable_deepspeed=False, dist_eval=True, model_key="model|module",
                  finetune="./pretrain/vit_l_hybrid_pt_800e_k700_ft.pth", mixup=0.8, cutmix=1.0)
    values.update(changes)
    return argparse.Namespace(**values)


def write_videomae(path: os.PathLike, model: torch.nn.Module, epoch: int = 9, **args: Any) -> Path:
    """VideoMAE ``utils.save_model`` without DeepSpeed: ``checkpoint-N.pth``."""
    torch.save({
        "model": model.state_dict(),
        "optimizer": _optimizer_state(model),
        "epoch": epoch,
        "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                   "growth_interval": 2000, "_growth_tracker": 17},
        "args": videomae_args(**args),
    }, path)
    return Path(path)


def write_module_only(path: os.PathLike, model: torch.nn.Module, **extra: Any) -> Path:
    """A released file holding ``{"module": state_dict}`` (optionally with a few extras)."""
    torch.save({"module": model.state_dict(), **extra}, path)
    return Path(path)


def to_fp16_weights(model: torch.nn.Module) -> torch.nn.Module:
    """Round parameters to fp16 values: DeepSpeed fp16 runs save fp16 weights."""
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.half().float())
    return model


def write_deepspeed_file(path: os.PathLike, model: torch.nn.Module, epoch: int = 24) -> Path:
    """DeepSpeed ``mp_rank_00_model_states.pt`` of an fp16 run without ZeRO (the seed's setup)."""
    module = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    ds_config = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "steps_per_print": 1000,
                 "optimizer": {"type": "Adam", "adam_w_mode": True,
                               "params": {"lr": 2e-3, "weight_decay": 0.05, "bias_correction": True,
                                          "betas": [0.9, 0.999], "eps": 1e-8}},
                 "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 7,
                          "loss_scale_window": 128, "hysteresis": 2, "min_loss_scale": 1}}
    torch.save({
        "module": module,
        "buffer_names": [],
        "optimizer": {"dynamic_loss_scale": True, "cur_scale": 128.0, "cur_iter": 2500,
                      "last_overflow_iter": 2401, "scale_factor": 2.0, "scale_window": 128,
                      "optimizer_state_dict": _optimizer_state(model), "fp32_groups_flat": [flat],
                      "clip_grad": 0.0},
        "param_shapes": [collections.OrderedDict((n, p.shape) for n, p in zip(names, model.parameters()))],
        "frozen_param_shapes": None,
        "shared_params": {},
        "frozen_param_fragments": None,
        "lr_scheduler": None,
        "data_sampler": None,
        "random_ltd": None,
        "sparse_tensor_module_names": set(),
        "skipped_steps": 3,
        "global_steps": 2500,
        "global_samples": 20000,
        "dp_world_size": 4,
        "mp_world_size": 1,
        "ds_config": ds_config,
        "ds_version": "0.9.5",
        "epoch": epoch,  # VideoMAE's client_state
    }, path)
    return Path(path)


def write_deepspeed_dir(save_dir: os.PathLike, model: torch.nn.Module, epoch: int = 24) -> Path:
    """DeepSpeed ``save_checkpoint(save_dir, tag="checkpoint-N")``: tag folder plus ``latest``."""
    tag = f"checkpoint-{epoch}"
    folder = Path(save_dir) / tag
    folder.mkdir(parents=True, exist_ok=True)
    write_deepspeed_file(folder / "mp_rank_00_model_states.pt", model, epoch=epoch)
    (Path(save_dir) / "latest").write_text(tag)
    return Path(save_dir)


def write_pretrain(path: os.PathLike, model: torch.nn.Module) -> Path:
    """VideoMAE pre-training ``checkpoint-N.pth``: encoder (ending in ``norm``) and decoder."""
    dim = model.num_features
    encoder = {f"encoder.{k}": v for k, v in model.state_dict().items()
               if not k.startswith(("fc_norm.", "head."))}
    encoder["encoder.norm.weight"] = torch.ones(dim) + 0.1 * torch.randn(dim)
    encoder["encoder.norm.bias"] = 0.1 * torch.randn(dim)
    dec = 32
    decoder = {"encoder_to_decoder.weight": torch.randn(dec, dim), "mask_token": torch.zeros(1, 1, dec),
               "decoder.blocks.0.norm1.weight": torch.ones(dec), "decoder.blocks.0.norm1.bias": torch.zeros(dec),
               "decoder.blocks.0.attn.qkv.weight": torch.randn(3 * dec, dec),
               "decoder.blocks.0.attn.q_bias": torch.zeros(dec), "decoder.blocks.0.attn.v_bias": torch.zeros(dec),
               "decoder.norm.weight": torch.ones(dec), "decoder.norm.bias": torch.zeros(dec),
               "decoder.head.weight": torch.randn(1536, dec), "decoder.head.bias": torch.zeros(1536)}
    torch.save({"model": {**encoder, **decoder}, "optimizer": _optimizer_state(model), "epoch": 800,
                "scaler": {"scale": 1024.0}, "args": videomae_args(model="pretrain_videomae_base_patch16_224",
                                                                   mask_ratio=0.9, mask_type="tube")}, path)
    return Path(path)


def hf_classifier(num_labels: int = 5, layer_norm_eps: float = 1e-12, seed: int = 0, **config: Any):
    """transformers ``VideoMAEForVideoClassification`` with random weights, eval mode."""
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    torch.manual_seed(seed)
    cfg = VideoMAEConfig(**{**dict(image_size=64, patch_size=16, num_channels=3, num_frames=8, tubelet_size=2,
                                   hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=256, qkv_bias=True, use_mean_pooling=True,
                                   num_labels=num_labels, layer_norm_eps=layer_norm_eps), **config})
    model = VideoMAEForVideoClassification(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            param.copy_(base + 0.1 * torch.randn_like(param))
    return model.eval()


def write_hf(folder: os.PathLike, hf_model: Any, fmt: str = "safetensors", with_config: bool = True) -> Path:
    """transformers weights as ``model.safetensors`` or ``pytorch_model.bin`` (+ ``config.json``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = folder / "model.safetensors"
        save_file(state, str(path), metadata={"format": "pt"})
    else:
        path = folder / "pytorch_model.bin"
        torch.save(state, path)
    if with_config:
        (folder / "config.json").write_text(json.dumps(hf_model.config.to_dict()))
    return path
