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
  normalizing afterwards gives the same numbers up to float rounding. ``exact`` blends in numpy
  in the association of torch's kernel; ``bounded`` blends with two ``torch.lerp`` passes (the
  same numbers to float rounding, about half the time).
- ``short_side_crop`` (``videomae-16x4``): PIL bilinear to short side ``size``, centre crop;
  ``bounded`` resizes with torch's kernel, as for ``pil_bilinear``.

``fast`` resizing happens inside the decoder instead (see ``decoders.stream(output_size=...)``).

Every kernel takes HxWx3 RGB or HxWx4 RGBA frames (RGBA gathers a pixel as one ``uint32``, see
``decoders.py``) and writes HxWx3 straight into the ring slot it is given (``out``), so a resized
frame is copied once, not built and then copied. This module imports numpy and PIL; torch only
when a ``bounded`` kernel first runs (importing it costs a decode process ~1.5 s and ~250 MB of
private memory, measured by ``benchmarks/frame_cost.py``, mostly shared through the fork server).
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


def _interleave(channels: list[np.ndarray], height: int, width: int,
                out: Optional[np.ndarray] = None) -> np.ndarray:
    """An HxWx3 frame from three flat channels (strided views are fine): one strided copy each.

    Assigning a 3-of-4 or a transposed view instead walks a 3-long inner axis: ~5x slower (a
    224x224 frame: ~0.3 ms against ~0.05).
    """
    out = np.empty((height, width, 3), channels[0].dtype) if out is None else out
    flat = out.reshape(-1)
    for index, channel in enumerate(channels):
        flat[index::3] = channel
    return out


def _into(pixels: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """HxWx3 from HxWx(3 or 4): into ``out`` when given (a ring slot), else as they are or a new array."""
    height, width, channels = pixels.shape
    if channels == 3:
        if out is None:
            return pixels
        out[...] = pixels
        return out
    source = pixels.reshape(-1)
    return _interleave([source[c::channels] for c in range(3)], height, width, out)


def pil_bilinear(frame: np.ndarray, height: int, width: int, out: Optional[np.ndarray] = None) -> np.ndarray:
    from PIL import Image

    if frame.shape[2] == 4:
        # PIL keeps an RGB image in 4 bytes a pixel: an RGBA frame loads as RGBX without the
        # 3 -> 4 byte unpacking that costs Image.fromarray ~2 ms a 1080p frame (same numbers).
        frame = np.ascontiguousarray(frame)
        image = Image.frombuffer("RGBX", (frame.shape[1], frame.shape[0]), frame, "raw", "RGBX", 0, 1)
    else:
        image = Image.fromarray(frame)
    return _into(np.asarray(image.resize((width, height), Image.BILINEAR)), out)


_TORCH = None


def _torch():
    """torch with one intra-op thread, imported on first use (a decode process owns one core)."""
    global _TORCH
    if _TORCH is None:
        import torch

        torch.set_num_threads(1)
        _TORCH = torch
    return _TORCH


def antialias_uint8(frame: np.ndarray, height: int, width: int, out: Optional[np.ndarray] = None) -> np.ndarray:
    """PIL BILINEAR's numbers (within 1/255) from torch's antialiased uint8 kernel.

    The HxWxC array (C = 3, or 4 for RGBA) is handed to torch as a channels-last 1xCxHxW view
    (no copy), which is the layout the vectorised uint8 kernel reads; a crop box (a strided view)
    is fine too. The kernel returns planes (NCHW), interleaved straight into ``out``.
    """
    torch = _torch()
    x = torch.from_numpy(frame).permute(2, 0, 1).unsqueeze(0)
    y = torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear", align_corners=False,
                                        antialias=True)
    planes = y[0].numpy()
    return _interleave([plane.reshape(-1) for plane in planes[:3]], height, width, out)


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


@dataclass(frozen=True)
class _Taps:
    """Where one size's 2x2 taps are and how they blend, computed once per (size, frame layout)."""

    flat: np.ndarray  # pixel index of every tap, rows y0 then y1, columns x0 then x1
    lam_x: np.ndarray  # (width,) weight of column x1
    lam_y: np.ndarray  # (height,) weight of row y1


_TAPS: dict = {}


def _taps(height: int, width: int, in_h: int, in_w: int, row_pixels: int) -> _Taps:
    key = (height, width, in_h, in_w, row_pixels)
    if key not in _TAPS:
        y0, y1, lam_y = _source_index(height, in_h)
        x0, x1, lam_x = _source_index(width, in_w)
        rows, cols = np.concatenate([y0, y1]), np.concatenate([x0, x1])
        _TAPS[key] = _Taps((rows[:, None] * row_pixels + cols[None, :]).ravel(), lam_x, lam_y)
    return _TAPS[key]


def _gather(frame: np.ndarray, height: int, width: int) -> tuple[np.ndarray, _Taps]:
    """The ``(2 * height, 2 * width, C)`` source pixels a bilinear resize reads, and their weights.

    4 * 224 * 224 pixels instead of a 1080p frame. Pixels move as single items (``uint32`` for
    RGBA, a 3-byte void for RGB: no copy, and numpy gathers whole items far faster than (w, C)
    slices), indexed in a 1-D view that starts at the frame's first pixel and steps a pixel at
    a time, so a crop box (a strided view of a bigger frame) gathers as a whole frame does.
    """
    in_h, in_w, channels = frame.shape
    pixel_bytes, row_bytes = frame.strides[1], frame.strides[0]
    if frame.strides[2] != 1 or pixel_bytes != channels or row_bytes % pixel_bytes:
        frame = np.ascontiguousarray(frame)
        pixel_bytes, row_bytes = channels, frame.strides[0]
    row_pixels = row_bytes // pixel_bytes
    taps = _taps(height, width, in_h, in_w, row_pixels)
    item = np.dtype(np.uint32) if channels == 4 else np.dtype((np.void, channels))
    pixels = np.lib.stride_tricks.as_strided(frame.view(item),
                                             shape=((in_h - 1) * row_pixels + in_w,), strides=(pixel_bytes,))
    block = np.take(pixels, taps.flat)
    return block.view(np.uint8).reshape(2 * height, 2 * width, channels), taps


def interpolate_bilinear(frame: np.ndarray, height: int, width: int, out: Optional[np.ndarray] = None) -> np.ndarray:
    """``F.interpolate(bilinear, align_corners=False, antialias=False)`` of an HxWxC frame, float32.

    numpy, in the association of torch's CPU kernel: h0 * (w0 * x00 + w1 * x01) + h1 * (w0 * x10 +
    w1 * x11) (the ``exact`` kernel; ``lerp_bilinear`` is the faster ``bounded`` one).
    """
    block, taps = _gather(frame, height, width)
    split = width * 3
    block = _into(block).astype(np.float32).reshape(2 * height, 2 * split)
    # Weights per (column, channel): blends run over contiguous rows of width * 3 floats
    # (broadcasting a weight over a trailing axis of 3 is several times slower in numpy).
    wx1 = np.repeat(taps.lam_x, 3)[None, :]
    wx0, wy1 = 1 - wx1, taps.lam_y[:, None]
    wy0 = 1 - wy1
    row0 = block[:height, :split] * wx0
    row0 += block[:height, split:] * wx1
    row1 = block[height:, :split] * wx0
    row1 += block[height:, split:] * wx1
    row0 *= wy0
    row1 *= wy1
    if out is None:
        out = np.empty((height, width, 3), np.float32)
    np.add(row0, row1, out=out.reshape(height, split))
    return out


_LERP: dict = {}


def lerp_bilinear(frame: np.ndarray, height: int, width: int, out: Optional[np.ndarray] = None) -> np.ndarray:
    """The same resize as :func:`interpolate_bilinear` to float rounding (3e-5 of 255 measured), faster.

    Two fused ``torch.lerp`` passes (columns, then rows) replace numpy's nine multiply and add
    passes, into buffers kept per size: ~0.4 ms less a 1080p frame. ``a + w * (b - a)`` rounds
    differently from torch's ``(1 - w) * a + w * b``, so the fingerprint tells the two apart.
    """
    torch = _torch()
    block, taps = _gather(frame, height, width)
    channels = block.shape[2]
    key = (height, width, channels, frame.shape[0], frame.shape[1])
    if key not in _LERP:
        _LERP[key] = (torch.empty((2 * height, 2 * width, channels)), torch.empty((2 * height, width, channels)),
                      torch.empty((height, width, channels)),
                      torch.from_numpy(np.repeat(taps.lam_x[:, None], channels, axis=1)),
                      torch.from_numpy(taps.lam_y.copy()).view(height, 1, 1))
    floats, columns, rows, lam_x, lam_y = _LERP[key]
    # All four channels of an RGBA block, alpha included: torch runs 3-of-4 strided views ~7x
    # slower than contiguous ones, so alpha is dropped once, from the small result.
    floats.copy_(torch.from_numpy(block))
    torch.lerp(floats[:, :width], floats[:, width:], lam_x, out=columns)
    if out is None:
        out = np.empty((height, width, 3), np.float32)
    if channels == 3:
        torch.lerp(columns[:height], columns[height:], lam_y, out=torch.from_numpy(out))
        return out
    torch.lerp(columns[:height], columns[height:], lam_y, out=rows)
    return _into(rows.numpy(), out)


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
        return self.kernel == "bounded"

    @property
    def takes_rgba(self) -> bool:
        """Whether full-size RGBA frames (``decoders.stream(rgba=True)``) may come in: every kernel
        but the decoder's own scaler, whose frames are already small."""
        return not self.fast

    @property
    def numbers(self) -> str:
        """What the output's numbers are, for the fingerprint: two kernels with equal numbers share it.

        Both ``bounded`` kernels differ from the seed's arithmetic (by at most 1/255 for PIL's,
        by float rounding for the interpolate), so each is told apart from ``exact``.
        """
        if self.kernel == "bounded":
            return "torch_lerp" if self.method == "interpolate_bilinear" else "torch_antialias_uint8"
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

    def out_shape_for(self, frame_shape: tuple) -> tuple[int, int, int]:
        return self.out_shape

    def __call__(self, frame: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
        """The resized HxWx3 frame, written into ``out`` (a ring slot) when given."""
        if self.fast:
            # The decoder already scaled; only the centre crop is left to do.
            return _into(center_crop(frame, self.size) if self.method == "short_side_crop" else frame, out)
        if self.method == "interpolate_bilinear":
            kernel = lerp_bilinear if self.kernel == "bounded" else interpolate_bilinear
            return kernel(frame, self.size, self.size, out)
        uint8_resize = antialias_uint8 if self.kernel == "bounded" else pil_bilinear
        if self.method == "pil_bilinear":
            return uint8_resize(frame, self.size, self.size, out)
        return _into(short_side_crop(frame, self.size, uint8_resize), out)


@dataclass(frozen=True)
class FullFrame:
    """The decode process's transform under ``--resize-on device``: frames leave it as decoded.

    Frames (after the crop box) are at most ``max_height`` x ``max_width``; the ring slots are
    sized for that, and the resize runs where the batch is assembled (``device_resize.py``).
    """

    max_height: int
    max_width: int
    uses_torch = False
    takes_rgba = False  # the device-side resize reads 3-channel frames

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

    def out_shape_for(self, frame_shape: tuple) -> tuple[int, int, int]:
        return frame_shape[0], frame_shape[1], 3

    def __call__(self, frame: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
        return _into(frame, out)
