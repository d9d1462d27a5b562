"""Building blocks of VideoMAE-family video ViTs, on timm's ``Mlp`` and ``DropPath``.

Parameter names follow the original VideoMAE code (``patch_embed.proj``, ``attn.qkv``,
``attn.q_bias``/``attn.v_bias``, ``gamma_1``/``gamma_2``) so released checkpoints load without
renaming.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import nn


def sinusoid_table(num_positions: int, dim: int) -> torch.Tensor:
    """The fixed 1-D sin/cos table of VideoMAE, shape (1, num_positions, dim), float32.

    Computed in float64 and rounded once, as the original (numpy float64 -> FloatTensor) does,
    so the table is bit-identical to the one the released models were trained with.
    """
    position = torch.arange(num_positions, dtype=torch.float64).unsqueeze(1)
    exponent = (2 * (torch.arange(dim) // 2)).to(torch.float64) / dim
    angles = position / torch.pow(torch.tensor(10000.0, dtype=torch.float64), exponent)
    table = torch.empty_like(angles)
    table[:, 0::2] = torch.sin(angles[:, 0::2])
    table[:, 1::2] = torch.cos(angles[:, 1::2])
    return table.to(torch.float32).unsqueeze(0)


def resample_pos_embed(pos_embed: torch.Tensor, old_grid: tuple[int, int, int],
                       new_grid: tuple[int, int, int]) -> torch.Tensor:
    """Resample a learned (1, T*H*W, D) position table from ``old_grid`` to ``new_grid``.

    Spatially bicubic per frame (what VideoMAE's fine-tuning script does), then linear in time
    when the number of temporal tokens changes. Tokens are T-major, as the patch embedding
    flattens them.
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    t0, h0, w0 = old_grid
    t1, h1, w1 = new_grid
    dim = pos_embed.shape[-1]
    if pos_embed.shape[1] != t0 * h0 * w0:
        raise ValueError(f"position table has {pos_embed.shape[1]} tokens, not {t0}x{h0}x{w0}")
    dtype = pos_embed.dtype
    grid = pos_embed.float().reshape(t0, h0, w0, dim).permute(0, 3, 1, 2)  # T, D, H, W
    if (h0, w0) != (h1, w1):
        grid = F.interpolate(grid, size=(h1, w1), mode="bicubic", align_corners=False)
    if t0 != t1:
        # (H*W, D, T) -> linear along T
        flat = grid.permute(2, 3, 1, 0).reshape(h1 * w1, dim, t0)
        flat = F.interpolate(flat, size=t1, mode="linear", align_corners=False)
        grid = flat.reshape(h1, w1, dim, t1).permute(3, 2, 0, 1)
    return grid.permute(0, 2, 3, 1).reshape(1, t1 * h1 * w1, dim).to(dtype)


class PatchEmbed3d(nn.Module):
    """Tubelet embedding: a Conv3d with kernel = stride = (tubelet, patch, patch), T-major tokens."""

    def __init__(self, img_size: int, patch_size: int, num_frames: int, tubelet_size: int,
                 in_chans: int, embed_dim: int) -> None:
        super().__init__()
        if img_size % patch_size or num_frames % tubelet_size:
            raise ValueError(f"img_size {img_size} / num_frames {num_frames} must be multiples of "
                             f"patch_size {patch_size} / tubelet_size {tubelet_size}")
        self.img_size = img_size
        self.num_frames = num_frames
        self.grid_size = (num_frames // tubelet_size, img_size // patch_size, img_size // patch_size)
        self.num_patches = math.prod(self.grid_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=(tubelet_size, patch_size, patch_size),
                              stride=(tubelet_size, patch_size, patch_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, t, h, w = x.shape
        if (t, h, w) != (self.num_frames, self.img_size, self.img_size):
            # The position table is built for one grid: a different clip shape would silently
            # reinterpret positions, so refuse it.
            raise ValueError(f"input clip is {t}x{h}x{w} (frames x H x W) but the model is built for "
                             f"{self.num_frames}x{self.img_size}x{self.img_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with separate q/v biases and no k bias (VideoMAE's layout)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = None
            self.v_bias = None
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def qkv_bias(self) -> Optional[torch.Tensor]:
        if self.q_bias is None:
            return None
        return torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = F.linear(x, self.qkv.weight, self.qkv_bias())
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """Pre-norm transformer block with optional layer scale (``gamma_1``/``gamma_2``)."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 init_values: float = 0.0, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, hidden_features=mlp_hidden, act_layer=nn.GELU, drop=drop)
        if init_values > 0:
            self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
            self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))
        else:
            self.gamma_1 = None
            self.gamma_2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gamma_1 is None:
            x = x + self.drop_path(self.attn(self.norm1(x)))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x)))
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))
