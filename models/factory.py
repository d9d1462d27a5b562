"""``create_model``: build a registered model, or one whose architecture a checkpoint's weights
give (``"auto"``), and load any supported checkpoint layout into it (timm's ``_factory.py``).

On top of the leaf registry, the model file and the checkpoint reader; nothing imports it but
the package, so there is no circle.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Any, Callable, Optional, Union

import torch

from videofeat.models.checkpoint import CheckpointError, LoadedCheckpoint, read_filtered
from videofeat.models.registry import is_model, list_models, model_entrypoint
from videofeat.models.videomae import (HEADS_BY_DIM, VideoMAEArch, VideoMAEViT, checkpoint_filter_fn, model_arch,
                                       names_with_embed_dim, registered_name_of)

__all__ = ["create_model", "arch_mismatches", "pos_grid_of"]

_log = logging.getLogger(__name__)


def _entry(name: str) -> Callable[..., VideoMAEViT]:
    if not is_model(name):
        raise ValueError(f"unknown model {name!r}; choose 'auto' (with a checkpoint) or one of "
                         f"{', '.join(list_models())}")
    return model_entrypoint(name)


def create_model(name: str, *, checkpoint: Union[str, os.PathLike, None] = None,
                 num_classes: Optional[int] = None, for_finetune: bool = False,
                 **overrides: Any) -> VideoMAEViT:
    """Build a registered model, optionally loading a checkpoint of any supported layout.

    ``name`` is a registered name or ``"auto"`` (architecture read from ``checkpoint``).
    ``overrides`` are architecture fields (``embed_dim, depth, num_heads, mlp_ratio,
    num_frames, img_size, tubelet_size, drop_path_rate, ...``) and ``use_checkpoint``.

    With a checkpoint and ``for_finetune=False`` (extraction) the model keeps the checkpoint's
    head (``num_classes`` must agree if given), loads strictly, and is returned in eval mode.
    With ``for_finetune=True`` a head of a different size (or a missing head / ``fc_norm``, as
    in pre-training checkpoints) is re-initialised, and this is logged.
    """
    use_checkpoint = bool(overrides.pop("use_checkpoint", False))
    if checkpoint is None:
        if name == "auto":
            raise ValueError("model 'auto' reads its architecture from a checkpoint; pass checkpoint=")
        if num_classes is not None:
            overrides["num_classes"] = num_classes
        return _entry(name)(use_checkpoint=use_checkpoint, **overrides)

    ckpt, state_dict, report, shape = read_filtered(checkpoint)
    if report.pretraining and not for_finetune:
        raise CheckpointError(
            f"{ckpt.path} is a VideoMAE pre-training checkpoint (encoder + decoder, no fc_norm and no "
            "classification head): it has no fine-tuned pooling, so it cannot be used for extraction; "
            "fine-tune it first (create_model(..., for_finetune=True))")
    record = ckpt.arch_record or {}
    eps = _eps_fields(record, report.weights, ckpt.hf_config)

    ckpt_classes = shape["num_classes"]
    if for_finetune:
        final_classes = ckpt_classes if num_classes is None else num_classes
    else:
        if num_classes is not None and num_classes != ckpt_classes:
            raise CheckpointError(
                f"{ckpt.path} has a {ckpt_classes}-class head but num_classes={num_classes} was asked; "
                "extraction keeps the checkpoint's head (replacing it is for fine-tuning: for_finetune=True)")
        final_classes = ckpt_classes

    fields = {**eps, **overrides, "num_classes": final_classes}
    if name == "auto":
        arch = _auto_arch(shape, record, ckpt, fields)
    else:
        arch = model_arch(name, **fields)
        problems = arch_mismatches(arch, shape)
        known_heads = record.get("num_heads") or (ckpt.hf_config or {}).get("num_attention_heads")
        if known_heads and int(known_heads) != arch.num_heads:
            problems.append(f"num_heads {known_heads} in the checkpoint, {arch.num_heads} in the model")
        if problems:
            raise CheckpointError(f"{ckpt.path} does not fit model {name!r}: " + "; ".join(problems)
                                  + " (use --model auto to read the architecture from the checkpoint)")
    if report.pretraining and arch.global_pool == "avg":
        # The pre-training encoder ends in `norm`; the classifier pools and uses a new fc_norm.
        dropped = [k for k in state_dict if k.startswith("norm.")]
        for key in dropped:
            del state_dict[key]
        _log.info("%s: pre-training checkpoint; dropped %s, fc_norm and head start fresh", ckpt.path, dropped)
    if ckpt_classes and final_classes != ckpt_classes:
        for key in ("head.weight", "head.bias"):
            state_dict.pop(key, None)
        _log.info("%s: dropped the %d-class head for a new %d-class head (fine-tuning)",
                  ckpt.path, ckpt_classes, final_classes)

    model = VideoMAEViT(arch, use_checkpoint=use_checkpoint)
    state_dict = checkpoint_filter_fn(state_dict, model, source_grid=pos_grid_of(record))
    _refuse_non_float(ckpt.path, state_dict, model)
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # size mismatches are raised even when not strict
        raise CheckpointError(f"{ckpt.path} does not fit the model: {err}") from None
    allowed_missing = {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"} if for_finetune else set()
    missing = [k for k in missing if k not in allowed_missing]
    if missing or unexpected:
        raise CheckpointError(f"{ckpt.path} does not fit the model: missing keys {_short(missing)}, "
                              f"unexpected keys {_short(unexpected)}")
    model.load_report = {"path": ckpt.path, "layout": f"{ckpt.container}/{report.weights}",
                         "dropped": report.dropped, "checkpoint_classes": ckpt_classes}
    if not for_finetune:
        model.eval()
    return model


def _refuse_non_float(path: str, state_dict: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Integer (or bool) tensors where the model holds floats are refused, not cast.

    ``load_state_dict`` would copy them into the float parameters without a word, giving a
    model that runs and produces wrong features; floats of another width (fp16, bf16) are the
    normal case of mixed-precision checkpoints and load as before.
    """
    expected = model.state_dict()
    wrong = sorted(k for k, v in state_dict.items()
                   if k in expected and expected[k].is_floating_point() and not v.is_floating_point())
    if wrong:
        found = sorted({str(state_dict[k].dtype).removeprefix("torch.") for k in wrong})
        raise CheckpointError(
            f"{path}: {len(wrong)} tensor(s) hold {'/'.join(found)} values where the model has float weights: "
            f"{_short(wrong)}; the file does not hold trained float weights (quantised or mis-converted?). "
            "Use the float checkpoint it was made from")


def arch_mismatches(arch: VideoMAEArch, shape: dict[str, Any]) -> list[str]:
    """Differences between a model's architecture and what a checkpoint's shapes say."""
    problems = []
    for key in ("embed_dim", "depth", "patch_size", "tubelet_size", "in_chans", "qkv_bias",
                "learned_pos_embed", "global_pool"):
        if getattr(arch, key) != shape[key]:
            problems.append(f"{key} {shape[key]} in the checkpoint, {getattr(arch, key)} in the model")
    hidden = int(round(shape["mlp_ratio"] * shape["embed_dim"]))
    if arch.mlp_hidden != hidden:
        problems.append(f"MLP hidden size {hidden} in the checkpoint, {arch.mlp_hidden} in the model")
    if (arch.init_values > 0) != (shape["init_values"] > 0):
        problems.append(f"layer scale {'on' if shape['init_values'] else 'off'} in the checkpoint")
    return problems


def pos_grid_of(record: dict[str, Any]) -> Optional[tuple[int, int, int]]:
    """Token grid recorded in a videofeat arch record, if any."""
    if not record or not {"num_frames", "img_size", "patch_size", "tubelet_size"} <= set(record):
        return None
    return VideoMAEArch.from_dict({**record, "num_heads": 1, "embed_dim": 1}).grid


def _short(keys: list[str], limit: int = 8) -> str:
    if not keys:
        return "[]"
    more = f" ... (+{len(keys) - limit})" if len(keys) > limit else ""
    return "[" + ", ".join(keys[:limit]) + more + "]"


def _eps_fields(record: dict[str, Any], weights: str, hf_config: Optional[dict[str, Any]]) -> dict[str, float]:
    """LayerNorm eps the checkpoint was trained with: outputs only match with the same eps."""
    if "norm_eps" in record:
        return {"norm_eps": float(record["norm_eps"]), "fc_norm_eps": float(record.get("fc_norm_eps",
                                                                                      record["norm_eps"]))}
    if weights.startswith("hf-transformers"):
        # transformers: encoder LayerNorms use config.layer_norm_eps (1e-12 by default), while
        # VideoMAEForVideoClassification's fc_norm is a plain nn.LayerNorm (1e-5).
        return {"norm_eps": float((hf_config or {}).get("layer_norm_eps", 1e-12)), "fc_norm_eps": 1e-5}
    return {}


def _auto_arch(shape: dict[str, Any], record: dict[str, Any], ckpt: LoadedCheckpoint,
               fields: dict[str, Any]) -> VideoMAEArch:
    hf = ckpt.hf_config or {}
    dim = shape["embed_dim"]
    if "num_heads" in fields:
        heads = fields.pop("num_heads")
    elif "num_heads" in record:
        heads = int(record["num_heads"])
    elif "num_attention_heads" in hf:
        heads = int(hf["num_attention_heads"])
    elif dim in HEADS_BY_DIM:
        heads = HEADS_BY_DIM[dim]
    else:
        named = names_with_embed_dim(dim)
        fix = (f"name the model instead of 'auto' (--model {' or --model '.join(named)}) if its "
               "architecture is the checkpoint's, or in Python" if named else "in Python")
        raise CheckpointError(
            f"{ckpt.path}: cannot tell the number of attention heads (embed dim {dim} is not a standard "
            f"size {sorted(HEADS_BY_DIM)}, and the file has no videofeat arch record or transformers "
            f"config.json); {fix} build it with create_model('auto', checkpoint=..., num_heads=N) and "
            "save_checkpoint it, which records the architecture for every later load")
    base = {"num_frames": record.get("num_frames", hf.get("num_frames", 16)),
            "img_size": record.get("img_size", hf.get("image_size", 224))}
    structural = {k: v for k, v in shape.items() if k not in ("num_classes", "pos_tokens")}
    recorded = VideoMAEArch.from_dict(record) if record else None
    if recorded is not None:
        if (recorded.init_values > 0) == (structural["init_values"] > 0):
            del structural["init_values"]  # shapes only say on/off; the record has the value
        arch = replace(recorded, num_heads=heads, **{**base, **structural})
    else:
        arch = VideoMAEArch(name="auto", num_heads=heads, **{**base, **structural})
        arch = replace(arch, name=registered_name_of(arch) or "auto")
    clash = sorted(k for k in fields if k in structural and fields[k] != structural[k])
    if clash:
        raise CheckpointError(f"{ckpt.path}: {', '.join(f'{k}={fields[k]}' for k in clash)} contradicts the "
                              f"checkpoint ({', '.join(f'{k}={structural[k]}' for k in clash)})")
    return replace(arch, **fields)
