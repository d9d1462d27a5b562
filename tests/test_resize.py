"""Resize kernels against the seed's own arithmetic, on textured frames at real sizes.

``bounded`` (each preset's default) must stay within the preset's bound of the seed: at most
1/255 per pixel from PIL ``resize(BILINEAR)`` for the PIL presets, float rounding from
``F.interpolate`` for ``aicity-vith``; ``exact`` must be PIL bit for bit. The device-side path
(``--resize-on device``) runs here on the CPU and must agree with the decode-process path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from videofeat.workers.decode.device_resize import DeviceResize
from videofeat.workers.decode.resize import BOUNDS, FrameResize, antialias_uint8, short_side_size


def textured(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Noise, fine stripes, gradients and hard edges: every kind of content a resize can get wrong."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    frame = np.stack([(xx * 7 + yy * 3) % 256, 127.5 + 127.5 * np.sin(xx / 2.3) * np.cos(yy / 3.1),
                      rng.integers(0, 256, (height, width))], axis=-1)
    frame[height // 3: height // 2, width // 4: width // 2] = (255, 0, 255)  # a saturated block
    return frame.astype(np.uint8)


def pil(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.asarray(Image.fromarray(np.ascontiguousarray(frame)).resize((width, height), Image.BILINEAR))


def seed_interpolate(frame: np.ndarray, size: int) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float()
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()


FULL_HD = textured(1080, 1920)
# (name, frame): 1080p, 720p, odd sizes both ways, an upscale, and a crop box (a strided view).
FRAMES = [("1080p", FULL_HD), ("720p", textured(720, 1280, 1)), ("odd", textured(333, 517, 2)),
          ("odd-tall", textured(601, 97, 3)), ("upscale", textured(120, 200, 4)),
          ("crop", FULL_HD[101:901, 333:1501])]


def _diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.float64) - b.astype(np.float64))


@pytest.mark.parametrize("name,frame", FRAMES, ids=[n for n, _ in FRAMES])
def test_bounded_kernel_is_within_one_level_of_pil(name, frame):
    for height, width in ((224, 224), (57, 101)):
        got = antialias_uint8(frame, height, width)
        assert got.shape == (height, width, 3) and got.dtype == np.uint8
        diff = _diff(got, pil(frame, height, width))
        assert diff.max() <= BOUNDS["pil_bilinear"], (name, height, width, diff.max())
        # Off-by-one pixels are rounding ties (more of them where a side is upscaled), not a
        # shifted filter, which would be off by one nearly everywhere.
        assert diff.mean() < 0.25, (name, diff.mean())
    resize = FrameResize("pil_bilinear", 224, "bounded")
    assert np.array_equal(resize(frame), antialias_uint8(frame, 224, 224))


def with_alpha(frame: np.ndarray) -> np.ndarray:
    """The frame as PyAV's RGBA gives it: the same RGB bytes and an opaque alpha."""
    return np.concatenate([frame, np.full(frame.shape[:2] + (1,), 255, np.uint8)], -1)


# The crop box stays a strided view, now of a 4-channel frame.
RGBA_FRAMES = {name: with_alpha(frame) for name, frame in FRAMES[:-1]}
RGBA_FRAMES["crop"] = with_alpha(FULL_HD)[101:901, 333:1501]


@pytest.mark.parametrize("method", ["pil_bilinear", "interpolate_bilinear", "short_side_crop"])
@pytest.mark.parametrize("kernel", ["exact", "bounded"])
@pytest.mark.parametrize("name,frame", FRAMES, ids=[n for n, _ in FRAMES])
def test_rgba_frames_and_ring_slots_give_the_same_numbers(method, kernel, name, frame):
    # The decode process hands RGBA frames (a strided view for a crop box) and a ring slot to
    # write into: neither may change a number.
    resize = FrameResize(method, 64, kernel)
    expected = resize(frame)
    assert expected.shape == resize.out_shape and expected.dtype == resize.out_dtype
    slot = np.full(resize.out_shape, 7, resize.out_dtype)
    assert resize(RGBA_FRAMES[name], slot) is slot
    assert np.array_equal(slot, expected), (name, method, kernel)


@pytest.mark.parametrize("name,frame", FRAMES, ids=[n for n, _ in FRAMES])
def test_exact_kernel_is_pil_bit_for_bit(name, frame):
    assert np.array_equal(FrameResize("pil_bilinear", 224, "exact")(frame), pil(frame, 224, 224))
    h, w = short_side_size(frame.shape[0], frame.shape[1], 64)
    top, left = int(round((h - 64) / 2.0)), int(round((w - 64) / 2.0))
    expected = pil(frame, h, w)[top:top + 64, left:left + 64]
    assert np.array_equal(FrameResize("short_side_crop", 64, "exact")(frame), expected)
    assert _diff(FrameResize("short_side_crop", 64, "bounded")(frame), expected).max() <= BOUNDS["short_side_crop"]


@pytest.mark.parametrize("name,frame", FRAMES, ids=[n for n, _ in FRAMES])
def test_interpolate_gather_is_the_seed_interpolate(name, frame):
    ref = seed_interpolate(frame, 224)
    for kernel in ("exact", "bounded"):
        got = FrameResize("interpolate_bilinear", 224, kernel)(frame)
        assert got.shape == (224, 224, 3) and got.dtype == np.float32
        assert _diff(got, ref).max() <= BOUNDS["interpolate_bilinear"], (name, kernel)


@pytest.mark.parametrize("method", ["pil_bilinear", "interpolate_bilinear", "short_side_crop"])
@pytest.mark.parametrize("name,frame", [FRAMES[0], FRAMES[2], FRAMES[4], FRAMES[5]],
                         ids=["1080p", "odd", "upscale", "crop"])
def test_device_resize_on_cpu_equals_the_decode_process_path(method, name, frame):
    resize = FrameResize(method, 224, "bounded")
    in_decoder = resize(frame)
    on_device = DeviceResize(resize, torch.device("cpu"))(frame)
    assert on_device.shape == in_decoder.shape == resize.out_shape
    assert on_device.dtype == in_decoder.dtype == resize.out_dtype
    assert _diff(on_device, in_decoder).max() <= BOUNDS[method], (method, name)
    if method != "interpolate_bilinear":  # and within the same bound of the seed's PIL
        exact = FrameResize(method, 224, "exact")(frame)
        assert _diff(on_device, exact).max() <= BOUNDS[method]


def test_kernels_that_change_numbers_are_told_apart():
    assert FrameResize("pil_bilinear", 224, "bounded").numbers == "torch_antialias_uint8"
    assert FrameResize("pil_bilinear", 224, "exact").numbers == "exact"
    # The lerp blend rounds differently from the numpy one in torch's association.
    assert FrameResize("interpolate_bilinear", 224, "bounded").numbers == "torch_lerp"
    assert FrameResize("interpolate_bilinear", 224, "exact").numbers == "exact"
    with pytest.raises(ValueError, match="--resize"):
        FrameResize("pil_bilinear", 224, "slow")
    with pytest.raises(ValueError, match="--resize exact is PIL"):
        DeviceResize(FrameResize("pil_bilinear", 224, "exact"), torch.device("cpu"))
    with pytest.raises(ValueError, match="--resize fast"):
        DeviceResize(FrameResize("pil_bilinear", 224, "fast"), torch.device("cpu"))
