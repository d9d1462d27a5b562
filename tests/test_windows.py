"""Window arithmetic, presets and the resize methods against their seed definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from videofeat.workers.extract.presets import PRESETS, Sampling, resolve_preset, window_times
from videofeat.workers.decode.resize import FrameResize, interpolate_bilinear, short_side_crop


@pytest.mark.parametrize("name", ["aicity-vitl", "aicity-vith"])
@pytest.mark.parametrize("n", [0, 31, 32, 47, 48, 100, 14_600, 16_701])
def test_seed_presets_window_count_and_ranges(name, n):
    s = PRESETS[name].sampling
    assert s.num_windows(n) == max(0, n // 16 - 1)
    for i in range(min(s.num_windows(n), 5)):
        assert (s.start(i), s.end(i)) == (16 * i, 16 * i + 32)
    start, end, center = window_times(s, range(3), 30.0)
    assert np.allclose(center, [(16 * i + 16) / 30 for i in range(3)])
    assert np.allclose(start, [16 * i / 30 for i in range(3)]) and np.allclose(end, [(16 * i + 32) / 30 for i in range(3)])


def test_preset_frame_offsets():
    assert PRESETS["aicity-vitl"].sampling.offsets.tolist() == list(range(32))
    assert PRESETS["aicity-vith"].sampling.offsets.tolist() == list(range(0, 32, 2))
    assert PRESETS["videomae-16x4"].sampling.offsets.tolist() == list(range(0, 64, 4))
    assert PRESETS["videomae-16x4"].sampling.num_windows(64 + 16 * 3) == 4


def test_windows_starting_in_a_piece():
    s = Sampling(span=32, hop=16, num_frames=16, step=2)
    whole = s.windows_starting_in(0, 1000, 1000)
    pieces = [s.windows_starting_in(a, b, 1000) for a, b in ((0, 320), (320, 640), (640, 1000))]
    assert [w for p in pieces for w in p] == list(whole) and len(whole) == 1000 // 16 - 1
    assert s.frames_needed(pieces[1]) == (320, 624 + 32)
    assert list(s.windows_starting_in(990, None, 1000)) == []


def test_overrides_and_validation_name_the_flag():
    p = resolve_preset("aicity-vitl", num_frames=8, step=4, size=64)
    assert (p.sampling.span, p.sampling.num_frames, p.sampling.step, p.size) == (32, 8, 4, 64)
    with pytest.raises(ValueError, match="--preset"):
        resolve_preset("nope")
    with pytest.raises(ValueError, match="--num-frames"):
        resolve_preset("aicity-vitl", num_frames=32, step=2)
    with pytest.raises(ValueError, match="--hop"):
        Sampling(32, 0, 8, 1)


def test_vfr_times_come_from_timestamps():
    s = Sampling(span=4, hop=2, num_frames=4, step=1)
    pts = {i: 0.1 * i + (0.05 if i >= 5 else 0.0) for i in range(10)}
    start, end, center = window_times(s, range(3), 10.0, pts)
    assert np.allclose(start, [0.0, 0.2, 0.4]) and np.allclose(center, [0.2, 0.4, 0.65])
    assert np.allclose(end, [0.3 + 0.1, 0.55 + 0.1, 0.75 + 0.1])


def test_interpolate_matches_torch_and_pil_method_matches_pil():
    rng = np.random.default_rng(0)
    for shape in ((270, 480, 3), (64, 64, 3), (37, 91, 3)):
        frame = rng.integers(0, 256, shape, dtype=np.uint8)
        ref = F.interpolate(torch.from_numpy(frame).permute(2, 0, 1)[None].float(), size=(56, 56),
                            mode="bilinear", align_corners=False, antialias=False)[0].permute(1, 2, 0).numpy()
        assert np.abs(interpolate_bilinear(frame, 56, 56) - ref).max() < 1e-3
        pil = np.asarray(Image.fromarray(frame).resize((56, 56), Image.BILINEAR))
        assert np.array_equal(FrameResize("pil_bilinear", 56)(frame), pil)


def test_short_side_crop_keeps_aspect():
    frame = np.zeros((90, 160, 3), dtype=np.uint8)
    frame[:, 70:90] = 255  # a centred bar survives the centre crop
    out = short_side_crop(frame, 45)
    assert out.shape == (45, 45, 3) and out[:, 22].min() > 200 and out[:, 0].max() < 50
