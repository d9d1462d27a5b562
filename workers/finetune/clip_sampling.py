"""Which frames of a labelled segment make a training or validation clip.

Two samplers, both returning absolute frame indices of the untrimmed video (non-decreasing,
inside ``[start, end)``):

- ``uniform``: the seed's TSN sampling for Track3 (its SSv2 loader): ``num_frames`` equal
  segments over the labelled span, one random frame in each when training, the middle frame of
  each when evaluating (the seed drew random frames for validation too; a fixed choice makes
  validation numbers reproducible).
- ``dense``: VideoMAE's Kinetics sampling: ``num_frames`` frames ``sampling_rate`` apart, at a
  random start when training, centred when evaluating; a span shorter than the clip repeats its
  last frame.

All randomness comes from :func:`sample_rng`, a function of (seed, epoch, sample index, copy),
so a resumed run and a run with a different number of loader processes draw the same clips.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

SAMPLING_MODES = ("uniform", "dense")


@dataclass(frozen=True)
class SamplingConfig:
    """How a clip is drawn from a segment (``--sampling``, ``--num-frames``, ``--sampling-rate``)."""

    mode: str = "uniform"
    num_frames: int = 16
    sampling_rate: int = 4  # used by ``dense`` only; the seed passed 4 and Track3 ignored it

    def __post_init__(self) -> None:
        if self.mode not in SAMPLING_MODES:
            raise ValueError(f"--sampling must be one of {', '.join(SAMPLING_MODES)}, got {self.mode!r}")
        if self.num_frames < 1:
            raise ValueError(f"--num-frames must be >= 1, got {self.num_frames}")
        if self.sampling_rate < 1:
            raise ValueError(f"--sampling-rate must be >= 1, got {self.sampling_rate}")


def sample_rng(seed: int, epoch: int, index: int, copy: int = 0, stream: int = 0) -> np.random.Generator:
    """A generator determined by (seed, epoch, sample index, copy, stream) and nothing else.

    ``stream`` separates independent uses (frame choice, augmentation) of the same sample.
    """
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index), int(copy), int(stream)])


def uniform_indices(start: int, end: int, num_segments: int,
                    rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """TSN: one frame per equal segment of ``[start, end)``; random in it with ``rng``, else the middle.

    A span with fewer frames than segments repeats frames evenly (the seed returned frame 0
    ``num_segments`` times there, a quirk not kept).
    """
    length = end - start
    if length < 1:
        raise ValueError(f"empty frame range [{start}, {end})")
    if length < num_segments:
        return start + np.floor(np.arange(num_segments) * length / num_segments).astype(np.int64)
    if rng is None:
        tick = length / num_segments
        return start + (tick / 2.0 + tick * np.arange(num_segments)).astype(np.int64)
    average = length // num_segments
    offsets = np.arange(num_segments) * average + rng.integers(0, average, size=num_segments)
    return (start + offsets).astype(np.int64)


def dense_indices(start: int, end: int, num_frames: int, sampling_rate: int,
                  rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """``num_frames`` frames ``sampling_rate`` apart inside ``[start, end)``: random start, or centred."""
    length = end - start
    if length < 1:
        raise ValueError(f"empty frame range [{start}, {end})")
    span = (num_frames - 1) * sampling_rate + 1
    slack = length - span
    if slack <= 0:
        first = start
    elif rng is None:
        first = start + slack // 2
    else:
        first = start + int(rng.integers(0, slack + 1))
    indices = first + sampling_rate * np.arange(num_frames, dtype=np.int64)
    return np.minimum(indices, end - 1)


def clip_indices(config: SamplingConfig, start: int, end: int,
                 rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """The frame indices of one clip of segment ``[start, end)``; ``rng=None`` is the evaluation clip."""
    if config.mode == "uniform":
        return uniform_indices(start, end, config.num_frames, rng)
    return dense_indices(start, end, config.num_frames, config.sampling_rate, rng)
