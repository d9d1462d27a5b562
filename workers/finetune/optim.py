"""AdamW with layer-wise lr decay and the seed's per-step cosine schedule.

Layer ids follow the seed (BEiT / VideoMAE ``optim_factory``): ``patch_embed``, ``pos_embed``
and ``cls_token`` are layer 0, ``blocks.j`` is layer j+1, everything else (``fc_norm``,
``head``) is layer L+1 with scale 1; a layer's lr is scaled by ``layer_decay ** (L+1-id)``.
No weight decay on 1-D parameters (norms, biases, ``q_bias``/``v_bias``) and position
embeddings. This gives the same groups as timm's ``param_groups_layer_decay`` on a timm ViT
(tested), but does not depend on the model defining timm's ``group_matcher``.

The schedule is a pure function of the optimizer step, so resuming needs only the step.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

NO_WEIGHT_DECAY = ("pos_embed", "cls_token")


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and schedule (flags of the same names; lrs are per 256 clips when scaled)."""

    lr: float = 2e-3
    min_lr: float = 1e-6
    warmup_lr: float = 0.0
    warmup_epochs: float = 5.0
    weight_decay: float = 0.05
    layer_decay: float = 0.75
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: Optional[float] = None
    scale_lr: bool = True  # lr * total batch / 256, as the seed

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"--min-lr must be in [0, --lr], got {self.min_lr}")
        if self.warmup_epochs < 0:
            raise ValueError(f"--warmup-epochs must be >= 0, got {self.warmup_epochs}")
        if self.weight_decay < 0:
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"--layer-decay must be in (0, 1] (1 turns it off), got {self.layer_decay}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"--clip-grad must be > 0 (leave it unset for no clipping), got {self.clip_grad}")


def scaled_lr(lr: float, total_batch: int, scale: bool = True) -> float:
    """The seed's linear scaling: ``lr * total_batch / 256`` (repeated-aug copies not counted)."""
    return lr * total_batch / 256.0 if scale else lr


def layer_id(name: str, num_blocks: int) -> int:
    """The seed's layer id of a ViT parameter (``get_num_layer_for_vit``)."""
    if name.startswith(("patch_embed", "pos_embed", "cls_token")):
        return 0
    match = re.match(r"blocks\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    return num_blocks + 1


def param_groups(model, weight_decay: float, layer_decay: float,
                 no_weight_decay: tuple[str, ...] = NO_WEIGHT_DECAY) -> list[dict]:
    """Parameter groups with ``lr_scale`` and ``weight_decay``, one per (layer, decay or not)."""
    names = [name for name, _ in model.named_parameters()]
    num_blocks = 1 + max((int(m.group(1)) for m in (re.match(r"blocks\.(\d+)\.", n) for n in names) if m),
                         default=-1)
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim <= 1 or name.endswith(".bias") or any(
            name == key or name.endswith("." + key) for key in no_weight_decay)
        layer = layer_id(name, num_blocks)
        key = f"layer_{layer}_{'no_decay' if skip else 'decay'}"
        if key not in groups:
            groups[key] = {"params": [], "param_names": [], "weight_decay": 0.0 if skip else weight_decay,
                           "lr_scale": layer_decay ** (num_blocks + 1 - layer)}
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    return list(groups.values())


def build_optimizer(model, config: OptimConfig):
    """AdamW over :func:`param_groups`; the lr is set each step by :func:`apply_lr`."""
    import torch

    groups = param_groups(model, config.weight_decay, config.layer_decay)
    for group in groups:
        group.pop("param_names")
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)


@dataclass(frozen=True)
class CosineSchedule:
    """The seed's ``cosine_scheduler`` as a function of the step.

    Linear warmup from ``warmup_value`` over ``warmup_steps`` (reaching ``base`` on the last
    warmup step, like ``np.linspace``), then a half cosine from ``base`` to ``final`` over the
    remaining steps.
    """

    base: float
    final: float
    total_steps: int
    warmup_steps: int = 0
    warmup_value: float = 0.0

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"the schedule needs at least one step, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup ({self.warmup_steps} steps) is longer than the run "
                             f"({self.total_steps} steps); lower --warmup-epochs")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            if self.warmup_steps == 1:
                return self.base
            return self.warmup_value + (self.base - self.warmup_value) * step / (self.warmup_steps - 1)
        remaining = self.total_steps - self.warmup_steps
        t = min(step - self.warmup_steps, remaining)
        return self.final + 0.5 * (self.base - self.final) * (1 + math.cos(math.pi * t / remaining))


def apply_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
