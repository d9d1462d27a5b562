"""AdamW with layer-wise lr decay and the seed's per-step cosine schedule.

Layer ids follow the seed (BEiT / VideoMAE ``optim_factory``): ``patch_embed``, ``pos_embed``
and ``cls_token`` are layer 0, ``blocks.j`` is layer j+1, everything else (``fc_norm``,
``head``, a token-pooling ``norm``) is layer L+1 with scale 1; a layer's lr is scaled by
``layer_decay ** (L+1-id)``. No weight decay on 1-D parameters (norms, biases,
``q_bias``/``v_bias``) and position embeddings. The groups are timm's
``param_groups_layer_decay`` with the seed's layout as the ``group_matcher``
(``videofeat.models.videomae.LAYER_GROUPS``, also ``VideoMAEViT.group_matcher``).

The schedule is a pure function of the optimizer step, so resuming needs only the step.
"""

from __future__ import annotations

import math
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


class _SeedLayout:
    """``model`` as ``param_groups_layer_decay`` reads it (its parameters and its
    ``group_matcher``), with the seed's layout as the matcher."""

    def __init__(self, model) -> None:
        self.model = model

    def named_parameters(self):
        return self.model.named_parameters()

    def group_matcher(self, coarse: bool = False) -> dict:
        from videofeat.models.videomae import LAYER_GROUPS

        return dict(LAYER_GROUPS)


def param_groups(model, weight_decay: float, layer_decay: float,
                 no_weight_decay: tuple[str, ...] = NO_WEIGHT_DECAY) -> list[dict]:
    """Parameter groups with ``lr_scale`` and ``weight_decay``, one per (layer, decay or not).

    Any ViT with timm's parameter names gets the seed's layout, whatever its own
    ``group_matcher`` says (timm's ViT merges ``norm`` into the last block). Layer ids are
    ordinals of the groups present, so they are the seed's as long as the model has an
    embedding and something after the blocks (``fc_norm`` or ``norm``: every VideoMAE ViT).
    """
    from timm.optim import param_groups_layer_decay

    # fnmatch patterns: a listed name at any depth, and every bias (timm's exclusion is 1-D only)
    patterns = [*no_weight_decay, *(f"*.{key}" for key in no_weight_decay), "*.bias"]
    groups = param_groups_layer_decay(_SeedLayout(model), weight_decay, no_weight_decay_list=patterns,
                                      layer_decay=layer_decay)
    names = {id(param): name for name, param in model.named_parameters()}
    for group in groups:
        group["param_names"] = [names[id(param)] for param in group["params"]]
    return groups


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
