"""VideoMAE / VideoMAE V2 video ViTs (Tong et al. 2022; Wang et al. 2023), timm style.

One file shape: the model class, ``checkpoint_filter_fn`` (every released key layout to ours),
a cfg table, a private builder, and three-line registered entry points.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Optional

import torch
import torch.utils.checkpoint
from timm.layers import trunc_normal_
from torch import nn

from videofeat.models.layers import Block, PatchEmbed3d, resample_pos_embed, sinusoid_table
from videofeat.models.registry import register_model

__all__ = ["HEADS_BY_DIM", "LAYER_GROUPS", "VideoMAEArch", "VideoMAEViT", "checkpoint_filter_fn", "filter_state_dict",
           "arch_from_state_dict", "model_arch", "registered_name_of"]


@dataclass(frozen=True)
class VideoMAEArch:
    """The resolved architecture record; saved (as JSON) into every checkpoint videofeat writes."""

    name: str = "videomae_vit"
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 16
    tubelet_size: int = 2
    img_size: int = 224
    num_frames: int = 16
    in_chans: int = 3
    qkv_bias: bool = True
    init_values: float = 0.0  # > 0: layer scale (gamma_1 / gamma_2)
    learned_pos_embed: bool = False
    global_pool: str = "avg"  # "avg": mean of tokens + fc_norm; "token": norm, first token
    norm_eps: float = 1e-6
    fc_norm_eps: float = 1e-6
    num_classes: int = 400
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    fc_drop_rate: float = 0.0
    head_init_scale: float = 0.001

    def __post_init__(self) -> None:
        if self.global_pool not in ("avg", "token"):
            raise ValueError(f"global_pool must be 'avg' or 'token', not {self.global_pool!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, not {self.num_classes}")

    @property
    def mlp_hidden(self) -> int:
        # round, not int(): 1408 * 48/11 must give 6144 whatever the float rounding
        return int(round(self.embed_dim * self.mlp_ratio))

    @property
    def grid(self) -> tuple[int, int, int]:
        side = self.img_size // self.patch_size
        return (self.num_frames // self.tubelet_size, side, side)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> "VideoMAEArch":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in known})


#: timm ``group_matcher`` of the seed's layer layout (BEiT / VideoMAE ``get_num_layer_for_vit``):
#: the embedding is layer 0, ``blocks.j`` layer j+1, and what no pattern matches (``norm``,
#: ``fc_norm``, ``head``) the last layer, at full lr. Unlike timm's own ViT matcher, ``norm``
#: is not merged into the last block: the seed fine-tunes it at full lr.
LAYER_GROUPS: dict[str, Any] = dict(stem=r"^(?:patch_embed|pos_embed|cls_token)", blocks=r"^blocks\.(\d+)\.")


class VideoMAEViT(nn.Module):
    """Video ViT on (B, C, T, H, W) clips: tubelet embedding, pre-norm blocks, mean pooling.

    ``forward_features`` gives pooled pre-logit features (B, D); ``forward_head`` the logits (or
    the features unchanged when ``num_classes == 0``).
    """

    def __init__(self, arch: VideoMAEArch, use_checkpoint: bool = False) -> None:
        super().__init__()
        self._arch = arch
        self.grad_checkpointing = use_checkpoint
        dim = arch.embed_dim
        self.patch_embed = PatchEmbed3d(arch.img_size, arch.patch_size, arch.num_frames,
                                        arch.tubelet_size, arch.in_chans, dim)
        num_patches = self.patch_embed.num_patches
        if arch.learned_pos_embed:
            self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, dim))
        else:
            # Fixed table for the actual token grid; never saved, so a checkpoint does not pin
            # the clip shape (as in the original code).
            self.register_buffer("pos_embed", sinusoid_table(num_patches, dim), persistent=False)
        self.pos_drop = nn.Dropout(arch.drop_rate)
        rates = [r.item() for r in torch.linspace(0, arch.drop_path_rate, arch.depth, device="cpu")]
        self.blocks = nn.ModuleList([
            Block(dim, arch.num_heads, arch.mlp_hidden, qkv_bias=arch.qkv_bias, drop=arch.drop_rate,
                  attn_drop=arch.attn_drop_rate, drop_path=rates[i], init_values=arch.init_values,
                  norm_eps=arch.norm_eps)
            for i in range(arch.depth)])
        avg = arch.global_pool == "avg"
        self.norm = nn.Identity() if avg else nn.LayerNorm(dim, eps=arch.norm_eps)
        self.fc_norm = nn.LayerNorm(dim, eps=arch.fc_norm_eps) if avg else None
        self.head_drop = nn.Dropout(arch.fc_drop_rate)
        self.head = nn.Linear(dim, arch.num_classes) if arch.num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        if isinstance(self.pos_embed, nn.Parameter):
            trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if isinstance(self.head, nn.Linear):
            # VideoMAE's init_scale: a near-zero head keeps early fine-tuning steps gentle.
            with torch.no_grad():
                self.head.weight.mul_(self._arch.head_init_scale)
                self.head.bias.mul_(self._arch.head_init_scale)

    @property
    def arch(self) -> dict[str, Any]:
        """The resolved architecture record (a plain dict, JSON-serialisable)."""
        return asdict(self._arch)

    @property
    def num_features(self) -> int:
        return self._arch.embed_dim

    @property
    def num_classes(self) -> int:
        return self._arch.num_classes

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward instead of storing its activations."""
        self.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a freshly initialised one of ``num_classes`` (0: none)."""
        self._arch = replace(self._arch, num_classes=num_classes)
        device = self.patch_embed.proj.weight.device
        if num_classes > 0:
            self.head = nn.Linear(self.num_features, num_classes, device=device)
            trunc_normal_(self.head.weight, std=0.02)
            with torch.no_grad():
                self.head.weight.mul_(self._arch.head_init_scale)
                self.head.bias.zero_()
        else:
            self.head = nn.Identity()

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"} if isinstance(self.pos_embed, nn.Parameter) else set()

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter layers for timm's layer-wise lr decay: :data:`LAYER_GROUPS`.

        A block is the finest and the coarsest unit here, so ``coarse`` changes nothing.
        """
        return dict(LAYER_GROUPS)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Token features of the last block (after ``norm``), shape (B, N, D)."""
        x = self.patch_embed(x)
        x = self.pos_drop(x + self.pos_embed.to(dtype=x.dtype))
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.fc_norm is not None:
            return self.fc_norm(tokens.mean(dim=1))
        return tokens[:, 0]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled pre-logit features (B, D) of clips (B, C, T, H, W)."""
        return self.pool(self.forward_tokens(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(features))

    def forward_features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """One backbone pass -> (features, logits), logits None when the model has no head."""
        features = self.forward_features(x)
        return features, (self.forward_head(features) if self.num_classes > 0 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------
# Checkpoint keys -> ours

@dataclass
class FilterReport:
    weights: str  # "videomae" | "hf-transformers", with "-pretrain" for pre-training files
    pretraining: bool
    dropped: list[str]


_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "backbone.")
_PRETRAIN_KEYS = re.compile(r"^(decoder\.|encoder_to_decoder\.|mask_token$|decoder_)")
_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
# transformers VideoMAELayer names -> VideoMAE Block names (order matters: longest first)
_HF_BLOCK_NAMES = (("attention.output.dense", "attn.proj"), ("layernorm_before", "norm1"),
                   ("layernorm_after", "norm2"), ("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2"))


def _strip(key: str, prefixes: tuple[str, ...]) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def convert_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ``VideoMAE*`` keys -> VideoMAE keys (fused qkv weight, q_bias / v_bias)."""
    out: dict[str, torch.Tensor] = {}
    attn: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        k = _strip(key, ("videomae.",))
        match = _HF_LAYER.match(k)
        if k.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + k.rsplit(".", 1)[1]] = value
        elif k.startswith("layernorm."):
            out["norm." + k[len("layernorm."):]] = value
        elif k.startswith("classifier."):
            out["head." + k[len("classifier."):]] = value
        elif match:
            index, rest = int(match.group(1)), match.group(2)
            if rest.startswith("attention.attention."):
                attn.setdefault(index, {})[rest[len("attention.attention."):]] = value
                continue
            for old, new in _HF_BLOCK_NAMES:
                if rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
            out[f"blocks.{index}.{rest}"] = value
        else:
            out[k] = value  # fc_norm.*, and decoder keys that the pre-training filter drops
    for index, parts in attn.items():
        out[f"blocks.{index}.attn.qkv.weight"] = torch.cat(
            [parts.pop("query.weight"), parts.pop("key.weight"), parts.pop("value.weight")])
        if "query.bias" in parts:
            out[f"blocks.{index}.attn.q_bias"] = parts.pop("query.bias")
            out[f"blocks.{index}.attn.v_bias"] = parts.pop("value.bias")
        out.update({f"blocks.{index}.attn.hf.{name}": v for name, v in parts.items()})  # flagged later
    return out


def filter_state_dict(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], FilterReport]:
    """Any supported key layout -> VideoMAE keys, independent of the target model.

    Strips ``module.``/``backbone.``/``_orig_mod.``, converts transformers keys, drops the
    decoder and mask token of pre-training checkpoints, then strips ``encoder.``.
    """
    sd = {_strip(k, _WRAPPER_PREFIXES): v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    hf = any("patch_embeddings.projection" in k for k in sd)
    if hf:
        sd = convert_hf_state_dict(sd)
    dropped = sorted(k for k in sd if _PRETRAIN_KEYS.match(k))
    sd = {_strip(k, ("encoder.",)): v for k, v in sd.items() if not _PRETRAIN_KEYS.match(k)}
    pretraining = bool(dropped)
    weights = ("hf-transformers" if hf else "videomae") + ("-pretrain" if pretraining else "")
    return sd, FilterReport(weights=weights, pretraining=pretraining, dropped=dropped)


def arch_from_state_dict(sd: dict[str, torch.Tensor], source: str = "checkpoint") -> dict[str, Any]:
    """Everything tensor shapes tell about the architecture (not heads, frames or image size)."""
    if "patch_embed.proj.weight" not in sd:
        raise ValueError(f"{source}: no patch_embed.proj.weight; not a VideoMAE-family checkpoint "
                         f"(first keys: {sorted(sd)[:5]})")
    proj = sd["patch_embed.proj.weight"]
    if proj.dim() != 5:
        raise ValueError(f"{source}: patch_embed.proj.weight has shape {tuple(proj.shape)}, not a Conv3d")
    dim = proj.shape[0]
    depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    if depth == 0:
        raise ValueError(f"{source}: no transformer blocks (blocks.N.*) in the checkpoint")
    pos = sd.get("pos_embed")
    has_head = "head.weight" in sd
    token_pool = "fc_norm.weight" not in sd and "norm.weight" in sd and has_head
    return {
        "embed_dim": dim, "depth": depth, "in_chans": proj.shape[1], "tubelet_size": proj.shape[2],
        "patch_size": proj.shape[3],
        "mlp_ratio": sd["blocks.0.mlp.fc1.weight"].shape[0] / dim,
        "qkv_bias": "blocks.0.attn.q_bias" in sd,
        "init_values": 1.0 if "blocks.0.gamma_1" in sd else 0.0,
        "learned_pos_embed": pos is not None,
        "global_pool": "token" if token_pool else "avg",
        "num_classes": sd["head.weight"].shape[0] if has_head else 0,
        "pos_tokens": None if pos is None else pos.shape[1],
    }


def checkpoint_filter_fn(state_dict: dict[str, Any], model: VideoMAEViT,
                         source_grid: Optional[tuple[int, int, int]] = None) -> dict[str, torch.Tensor]:
    """Filter a checkpoint for ``model``: key conversion, then learned positions resampled.

    A learned table's source grid is ``source_grid`` when known, else assumed to keep the
    model's number of temporal tokens (VideoMAE's assumption), else its spatial size.
    """
    sd = state_dict if "patch_embed.proj.weight" in state_dict else filter_state_dict(state_dict)[0]
    pos = sd.get("pos_embed")
    if pos is not None and isinstance(model.pos_embed, nn.Parameter) and pos.shape != model.pos_embed.shape:
        t, h, w = model.patch_embed.grid_size
        n = pos.shape[1]
        grid = source_grid
        if grid is None:
            side = math.isqrt(n // t) if n % t == 0 else 0
            if side and t * side * side == n:
                grid = (t, side, side)
            elif n % (h * w) == 0:
                grid = (n // (h * w), h, w)
            else:
                raise ValueError(f"cannot tell the token grid of a learned position table of {n} tokens")
        sd = dict(sd, pos_embed=resample_pos_embed(pos, grid, (t, h, w)))
    return sd


# ---------------------------------------------------------------------------------------------
# cfg table, builder, entry points

#: Head counts of the standard VideoMAE / VideoMAE V2 sizes, by embed dim. The head count is in
#: no tensor shape, so checkpoints without videofeat's ``arch`` record fall back to this table.
HEADS_BY_DIM: dict[int, int] = {384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16}

_CFGS: dict[str, dict[str, Any]] = {
    # VideoMAE (NeurIPS 2022), Table: ViT-S/B/L/H, 16x224, tubelet 2x16x16
    "videomae_vit_small_patch16_224": dict(embed_dim=384, depth=12, num_heads=6),
    "videomae_vit_base_patch16_224": dict(embed_dim=768, depth=12, num_heads=12),
    "videomae_vit_large_patch16_224": dict(embed_dim=1024, depth=24, num_heads=16),
    "videomae_vit_huge_patch16_224": dict(embed_dim=1280, depth=32, num_heads=16),
    # VideoMAE V2 (CVPR 2023) ViT-g/14
    "videomae_vit_giant_patch14_224": dict(embed_dim=1408, depth=40, num_heads=16, mlp_ratio=48 / 11,
                                           patch_size=14, num_classes=710),
    # tiny, for CPU tests
    "videomae_test": dict(embed_dim=64, depth=2, num_heads=2, img_size=64, num_frames=8, num_classes=10),
}


def model_arch(name: str, **overrides: Any) -> VideoMAEArch:
    """The architecture of registered model ``name`` with ``overrides`` applied."""
    if name not in _CFGS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(_CFGS))}")
    known = {f.name for f in fields(VideoMAEArch)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"{name}: unknown option(s) {', '.join(unknown)}")
    return VideoMAEArch(**{"name": name, **_CFGS[name], **overrides})


def registered_name_of(arch: VideoMAEArch) -> Optional[str]:
    """The registered model whose structure ``arch`` has (clip shape and head aside), if any."""
    keys = ("embed_dim", "depth", "num_heads", "mlp_hidden", "patch_size", "tubelet_size", "in_chans",
            "qkv_bias", "learned_pos_embed", "global_pool")
    for name in _CFGS:
        candidate = model_arch(name)
        if all(getattr(candidate, k) == getattr(arch, k) for k in keys) and \
                (candidate.init_values > 0) == (arch.init_values > 0):
            return name
    return None


def names_with_embed_dim(dim: int) -> list[str]:
    """Registered models of embed dim ``dim`` (their cfg says the head count shapes do not)."""
    return [name for name in _CFGS if model_arch(name).embed_dim == dim]


def _create_videomae(name: str, use_checkpoint: bool = False, **kwargs: Any) -> VideoMAEViT:
    return VideoMAEViT(model_arch(name, **kwargs), use_checkpoint=use_checkpoint)


@register_model
def videomae_vit_small_patch16_224(**kwargs: Any) -> VideoMAEViT:
    """ViT-S/16 (VideoMAE)."""
    return _create_videomae("videomae_vit_small_patch16_224", **kwargs)


@register_model
def videomae_vit_base_patch16_224(**kwargs: Any) -> VideoMAEViT:
    """ViT-B/16 (VideoMAE)."""
    return _create_videomae("videomae_vit_base_patch16_224", **kwargs)


@register_model
def videomae_vit_large_patch16_224(**kwargs: Any) -> VideoMAEViT:
    """ViT-L/16 (VideoMAE; also InternVideo hybrid and Ego4D-verb backbones)."""
    return _create_videomae("videomae_vit_large_patch16_224", **kwargs)


@register_model
def videomae_vit_huge_patch16_224(**kwargs: Any) -> VideoMAEViT:
    """ViT-H/16 (VideoMAE); ``img_size=448`` for the 448 fine-tuning recipe."""
    return _create_videomae("videomae_vit_huge_patch16_224", **kwargs)


@register_model
def videomae_vit_giant_patch14_224(**kwargs: Any) -> VideoMAEViT:
    """ViT-g/14 (VideoMAE V2)."""
    return _create_videomae("videomae_vit_giant_patch14_224", **kwargs)


@register_model
def videomae_test(**kwargs: Any) -> VideoMAEViT:
    """A tiny model (dim 64, depth 2, 8x64x64 clips) for CPU tests."""
    return _create_videomae("videomae_test", **kwargs)
