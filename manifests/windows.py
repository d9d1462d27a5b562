"""Window arithmetic: the one place every stage (manifest, extraction, reducer, exports) counts windows.

A window spans ``span`` frames and advances by ``hop``; ``num_frames`` frames at ``step`` from
its start feed the model; ``end_frame`` is exclusive. A video of N frames has
``T = max(0, floor((N - span) / hop) + 1)`` windows. For the seed presets (span 32, hop 16)
that is ``floor(N/16) - 1`` windows, window i covers ``[16i, 16i + 32)`` and its centre time is
``(16i + 16) / fps``: what MA-Actionformer and TriDet assume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


def num_windows(total_frames: int, span: int, hop: int) -> int:
    """``T = max(0, floor((N - span) / hop) + 1)``: the window count of a video of N frames."""
    return max(0, (int(total_frames) - int(span)) // int(hop) + 1)


@dataclass(frozen=True)
class Sampling:
    """Which frames feed one window."""

    span: int
    hop: int
    num_frames: int
    step: int

    def __post_init__(self) -> None:
        for flag, value in (("--span", self.span), ("--hop", self.hop), ("--num-frames", self.num_frames),
                            ("--frame-step", self.step)):
            if int(value) < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if (self.num_frames - 1) * self.step >= self.span:
            raise ValueError(f"--num-frames {self.num_frames} at --frame-step {self.step} reaches frame "
                             f"{(self.num_frames - 1) * self.step}, outside a --span of {self.span} frames")

    def num_windows(self, total_frames: int) -> int:
        return num_windows(total_frames, self.span, self.hop)

    def start(self, window: int) -> int:
        return window * self.hop

    def end(self, window: int) -> int:
        return window * self.hop + self.span

    @property
    def offsets(self) -> np.ndarray:
        """Frame offsets inside a window that feed the model."""
        return np.arange(self.num_frames) * self.step

    def frame_indices(self, window: int) -> np.ndarray:
        return self.start(window) + self.offsets

    def windows_starting_in(self, lo: int, hi: Optional[int], total_frames: int) -> range:
        """Windows whose start lies in ``[lo, hi)`` (``hi=None``: open) and that fit in the video."""
        count = self.num_windows(total_frames)
        first = -(-int(lo) // self.hop)
        last = count if hi is None else min(count, -(-int(hi) // self.hop))
        return range(first, max(first, last))

    def frames_needed(self, windows: range) -> tuple[int, int]:
        """The frame range ``[start, end)`` that covers ``windows``."""
        if len(windows) == 0:
            return 0, 0
        return self.start(windows[0]), self.end(windows[-1])


# The sampling of each named preset. Extraction's presets (workers/extract/presets.py) add their
# resize to these; the manifest's per-preset window estimates read them here.
PRESET_SAMPLING: dict[str, Sampling] = {
    # The seed's ViT-L script: 32 consecutive frames.
    "aicity-vitl": Sampling(span=32, hop=16, num_frames=32, step=1),
    # The seed's ViT-H script: 16 frames at step 2.
    "aicity-vith": Sampling(span=32, hop=16, num_frames=16, step=2),
    # VideoMAE's own fine-tuning sampling: 16 frames at step 4.
    "videomae-16x4": Sampling(span=64, hop=16, num_frames=16, step=4),
}
