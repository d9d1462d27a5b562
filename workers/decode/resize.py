"""Per-frame resizing, run in the decode process right after each frame is decoded.

Full-size frames never leave the decode process (unless ``--resize-on device`` asks for it,
see :class:`FullFrame`): a 1080p RGB frame is 6 MB, its 224x224 version 150 KB. Each method
reproduces one seed script, and ``--resize`` picks the kernel that computes it:

- ``pil_bilinear`` (``aicity-vitl``): PIL ``resize((w, h), BILINEAR)`` on the uint8 frame, i.e.
  bilinear with antialiasing, as the ViT-L script's ``video_transforms.Resize`` did. ``exact``
  is PIL itself (bit-exact, ~10 ms a 1080p frame); ``bounded`` is torch's antialiased uint8
  kernel (the same separable filter with PIL's uint8 intermediate, ~1 ms, at most 1/255 from
  PIL per pixel).
- ``interpolate_bilinear`` (``aicity-vith``): ``F.interpolate(mode="bilinear",
  align_corners=False, antialias=False)``. Only 2x2 source pixels feed each output pixel, so we
  gather those rows and columns and blend them in float32 instead of converting a whole 1080p
  frame to float (which costs more than decoding it). The result stays float32 in [0, 255]:
  the seed interpolated after normalizing, and normalization is per-channel affine, so
  normalizing afterwards gives the same numbers up to float rounding. Both kernels use it.
- ``short_side_crop`` (``videomae-16x4``): PIL bilinear to short side ``size``, centre crop;
  ``bounded`` resizes with torch's kernel, as for ``pil_bilinear``.

``fast`` resizing happens inside the decoder instead (see ``decoders.stream(output_size=...)``).
This module imports numpy and PIL; torch only when the ``bounded`` uint8 kernel first runs
(importing it costs a decode process ~1.5 s and ~250 MB of private memory, measured by
``benchmarks/frame_cost.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

METHODS = ("pil_bilinear", "interpolate_bilinear", "short_side_crop")
# exact: the seed's own arithmetic; bounded: a faster kernel within the preset's bound of it;
# fast: the decoder's scaler (swscale), far outside that bound on sharp edges.
KERNELS = ("exact", "bounded", "fast")
# Per pixel, how far ``bounded`` may be from ``exact`` (uint8 levels; float rounding for interpolate).
BOUNDS = {"pil_bilinear": 1, "short_side_crop": 1, "interpolate_bilinear": 1e-3}


def pil_bilinear(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(frame).resize((width, height), Image.BILINEAR))


_TORCH = None


def _torch():
    """torch with one intra-op thread, imported on first use (a decode process owns one core)."""
    global _TORCH
    if _TORCH is None:
        import torch

        torch.set_num_threads(1)
        _TORCH = torch
    return _TORCH


def antialias_uint8(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """PIL BILINEAR's numbers (within 1/255) from torch's antialiased uint8 kernel.

    The HxWxC array is handed to torch as a channels-last 1xCxHxW view (no copy), which is the
    layout the vectorised uint8 kernel reads; a crop box (a strided view) is fine too.
    """
    torch = _torch()
    x = torch.from_numpy(frame).permute(2, 0, 1).unsqueeze(0)
    y = torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear", align_corners=False,
                                        antialias=True)
    return y[0].permute(1, 2, 0).numpy()


def _source_index(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch's ``area_pixel_compute_source_index`` for align_corners=False, and the two taps."""
    scale = np.float32(in_size / out_size)
    # torch computes scale * (i + 0.5) - 0.5 as one fused multiply-add (one rounding): the
    # float32 product is exact in float64, so rounding once from there gives the same index
    # weights. Two roundings put the weights an ulp off, up to 0.014 (of 255) at 1080p.
    dst = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)).astype(np.float64)
    src = (np.float64(scale) * dst - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = src.astype(np.int64)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, lam


_TAPS: dict = {}


def _taps(height: int, width: int, in_h: int, in_w: int, channels: int) -> tuple:
    """Source rows, columns and flat indices, and blend weights for one size, computed once per size.

    Weights are laid out per (column, channel), so blends run over contiguous rows of
    ``width * channels`` floats: broadcasting a weight over a trailing axis of 3 is several times
    slower in numpy.
    """
    key = (height, width, in_h, in_w, channels)
    if key not in _TAPS:
        y0, y1, ly = _source_index(height, in_h)
        x0, x1, lx = _source_index(width, in_w)
        rows, cols = np.concatenate([y0, y1]), np.concatenate([x0, x1])
        lx = np.repeat(lx, channels)[None, :]
        _TAPS[key] = (rows, cols, (rows[:, None] * in_w + cols[None, :]).ravel(),
                      (1 - lx, lx, (1 - ly)[:, None], ly[:, None]))
    return _TAPS[key]


def interpolate_bilinear(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """``F.interpolate(bilinear, align_corners=False, antialias=False)`` of an HxWxC frame, float32."""
    in_h, in_w, channels = frame.shape
    rows, cols, flat, (wx0, wx1, wy0, wy1) = _taps(height, width, in_h, in_w, channels)
    # One gather of the (2 * height, 2 * width) source pixels the output reads (rows y0 then y1,
    # columns x0 then x1): 4 * 224 * 224 pixels instead of a 1080p frame. Pixels move as C-byte
    # items (a void view, no copy), which numpy gathers far faster than (w, C) slices; a whole
    # frame takes flat indices, a crop box (a strided view) row and column indices.
    pixel = np.dtype((np.void, channels * frame.itemsize))
    if frame.flags.c_contiguous:
        block = np.take(frame.reshape(-1).view(pixel), flat)
    else:
        block = frame.reshape(in_h, -1).view(pixel)[rows[:, None], cols[None, :]]
    block = block.view(frame.dtype).reshape(2 * height, 2 * width * channels).astype(np.float32)
    split = width * channels
    top0, top1 = block[:height, :split], block[:height, split:]
    bottom0, bottom1 = block[height:, :split], block[height:, split:]
    # Same association as torch's CPU kernel: h0 * (w0 * x00 + w1 * x01) + h1 * (w0 * x10 + w1 * x11).
    row0 = top0 * wx0
    row0 += top1 * wx1
    row1 = bottom0 * wx0
    row1 += bottom1 * wx1
    row0 *= wy0
    row1 *= wy1
    row0 += row1
    return row0.reshape(height, width, channels)


def short_side_size(in_h: int, in_w: int, size: int) -> tuple[int, int]:
    """(height, width) with the short side at ``size``, as VideoMAE's ``resize_clip`` computes it."""
    if in_w < in_h:
        return int(size * in_h / in_w), size
    return size, int(size * in_w / in_h)


def center_crop(frame: np.ndarray, size: int) -> np.ndarray:
    h, w = frame.shape[:2]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return np.ascontiguousarray(frame[top:top + size, left:left + size])


def short_side_crop(frame: np.ndarray, size: int, resize=pil_bilinear) -> np.ndarray:
    h, w = short_side_size(frame.shape[0], frame.shape[1], size)
    return center_crop(resize(frame, h, w), size)


@dataclass(frozen=True)
class FrameResize:
    """A picklable per-frame transform (it travels to the spawned decode processes).

    ``method`` is what the preset computes, ``kernel`` how (see the module docstring). The
    output is always ``(size, size, 3)``, float32 for ``interpolate_bilinear`` (unless the
    decoder scaled it), uint8 otherwise: :attr:`out_shape` and :attr:`out_dtype`.
    """

    method: str
    size: int
    kernel: str = "exact"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"resize method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.kernel not in KERNELS:
            raise ValueError(f"--resize must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
        if self.size < 1:
            raise ValueError(f"--size must be >= 1, got {self.size}")

    @property
    def fast(self) -> bool:
        return self.kernel == "fast"

    @property
    def out_shape(self) -> tuple[int, int, int]:
        return self.size, self.size, 3

    @property
    def out_dtype(self) -> np.dtype:
        return np.dtype(np.float32 if (self.method == "interpolate_bilinear" and not self.fast) else np.uint8)

    @property
    def uses_torch(self) -> bool:
        return self.kernel == "bounded" and self.method != "interpolate_bilinear"

    @property
    def numbers(self) -> str:
        """What the output's numbers are, for the fingerprint: two kernels with equal numbers share it.

        The interpolate gather is the same arithmetic under both kernels; PIL's numbers and
        torch's antialiased kernel's differ by at most 1/255, so they are told apart.
        """
        if self.kernel == "bounded" and self.uses_torch:
            return "torch_antialias_uint8"
        return "fast" if self.fast else "exact"

    def prepare(self) -> None:
        """Load what the kernel needs (torch) before the first frame, not during it."""
        if self.uses_torch:
            _torch()

    def decoder_size(self, in_h: int, in_w: int) -> Optional[tuple[int, int]]:
        """(width, height) the decoder's own scaler should produce, for ``--resize fast``."""
        if not self.fast:
            return None
        if self.method == "short_side_crop":
            h, w = short_side_size(in_h, in_w, self.size)
            return w, h
        return self.size, self.size

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        if self.fast:
            # The decoder already scaled; only the centre crop is left to do.
            return center_crop(frame, self.size) if self.method == "short_side_crop" else frame
        if self.method == "interpolate_bilinear":
            return interpolate_bilinear(frame, self.size, self.size)
        uint8_resize = antialias_uint8 if self.kernel == "bounded" else pil_bilinear
        if self.method == "pil_bilinear":
            return uint8_resize(frame, self.size, self.size)
        return short_side_crop(frame, self.size, uint8_resize)


@dataclass(frozen=True)
class FullFrame:
    """The decode process's transform under ``--resize-on device``: frames leave it as decoded.

    Frames (after the crop box) are at most ``max_height`` x ``max_width``; the ring slots are
    sized for that, and the resize runs where the batch is assembled (``device_resize.py``).
    """

    max_height: int
    max_width: int
    uses_torch = False

    @property
    def out_shape(self) -> tuple[int, int, int]:
        return self.max_height, self.max_width, 3

    @property
    def out_dtype(self) -> np.dtype:
        return np.dtype(np.uint8)

    def prepare(self) -> None:
        pass

    def decoder_size(self, in_h: int, in_w: int) -> None:
        return None

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        return frame
