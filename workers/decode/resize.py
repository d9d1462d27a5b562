"""Per-frame resizing, run in the decode process right after each frame is decoded.

Full-size frames never leave the decode process: a 1080p RGB frame is 6 MB, its 224x224
version 150 KB. Each method reproduces one seed script exactly:

- ``pil_bilinear`` (``aicity-vitl``): PIL ``resize((w, h), BILINEAR)`` on the uint8 frame, i.e.
  bilinear with antialiasing, as the ViT-L script's ``video_transforms.Resize`` did.
- ``interpolate_bilinear`` (``aicity-vith``): ``F.interpolate(mode="bilinear",
  align_corners=False, antialias=False)``. Only 2x2 source pixels feed each output pixel, so we
  gather those rows and columns and blend them in float32 instead of converting a whole 1080p
  frame to float (which costs more than decoding it). The result stays float32 in [0, 255]:
  the seed interpolated after normalizing, and normalization is per-channel affine, so
  normalizing afterwards gives the same numbers up to float rounding.
- ``short_side_crop`` (``videomae-16x4``): PIL bilinear to short side ``size``, centre crop.

``fast`` resizing happens inside the decoder instead (see ``decoders.stream(output_size=...)``).
This module imports numpy and PIL only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

METHODS = ("pil_bilinear", "interpolate_bilinear", "short_side_crop")


def pil_bilinear(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(frame).resize((width, height), Image.BILINEAR))


def _source_index(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch's ``area_pixel_compute_source_index`` for align_corners=False, and the two taps."""
    scale = np.float32(in_size / out_size)
    src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = src.astype(np.int64)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, lam


def interpolate_bilinear(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """``F.interpolate(bilinear, align_corners=False, antialias=False)`` of an HxWxC frame, float32."""
    in_h, in_w = frame.shape[:2]
    y0, y1, ly = _source_index(height, in_h)
    x0, x1, lx = _source_index(width, in_w)
    # Gather the 2 rows and 2 columns each output pixel reads: 4 * 224 * 224 pixels, not 1080p.
    top = frame[y0][:, x0].astype(np.float32), frame[y0][:, x1].astype(np.float32)
    bottom = frame[y1][:, x0].astype(np.float32), frame[y1][:, x1].astype(np.float32)
    lx = lx[None, :, None]
    ly = ly[:, None, None]
    row0 = top[0] * (1 - lx) + top[1] * lx
    row1 = bottom[0] * (1 - lx) + bottom[1] * lx
    return np.ascontiguousarray(row0 * (1 - ly) + row1 * ly, dtype=np.float32)


def short_side_size(in_h: int, in_w: int, size: int) -> tuple[int, int]:
    """(height, width) with the short side at ``size``, as VideoMAE's ``resize_clip`` computes it."""
    if in_w < in_h:
        return int(size * in_h / in_w), size
    return size, int(size * in_w / in_h)


def center_crop(frame: np.ndarray, size: int) -> np.ndarray:
    h, w = frame.shape[:2]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return np.ascontiguousarray(frame[top:top + size, left:left + size])


def short_side_crop(frame: np.ndarray, size: int) -> np.ndarray:
    h, w = short_side_size(frame.shape[0], frame.shape[1], size)
    return center_crop(pil_bilinear(frame, h, w), size)


@dataclass(frozen=True)
class FrameResize:
    """A picklable per-frame transform (it travels to the spawned decode processes)."""

    method: str
    size: int
    fast: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"resize method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.size < 1:
            raise ValueError(f"--size must be >= 1, got {self.size}")

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
        if self.method == "pil_bilinear":
            return pil_bilinear(frame, self.size, self.size)
        if self.method == "interpolate_bilinear":
            return interpolate_bilinear(frame, self.size, self.size)
        return short_side_crop(frame, self.size)
