"""The named presets that reproduce the seed's extraction scripts, window times and assembly.

A preset is a sampling (``manifests/windows.py``: span, hop, frames fed, step) plus the
preprocessing of each frame (size and resize method). Window arithmetic itself lives in
``manifests/windows.py``, shared with the manifest and the reducer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional

import numpy as np

from videofeat.manifests.windows import PRESET_SAMPLING, Sampling
from videofeat.workers.decode.resize import KERNELS, METHODS, FrameResize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preset:
    """A named sampling + preprocessing recipe; every field can be overridden by a flag."""

    name: str
    sampling: Sampling
    size: int
    resize: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    kernel: str = "exact"  # --resize: how the method is computed (see resize.py)

    def __post_init__(self) -> None:
        if self.resize not in METHODS:
            raise ValueError(f"--resize-method must be one of {', '.join(METHODS)}, got {self.resize!r}")
        if self.kernel not in KERNELS:
            raise ValueError(f"--resize must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
        if self.size < 16:
            raise ValueError(f"--size must be >= 16, got {self.size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need three values each, std > 0")

    @property
    def fast_resize(self) -> bool:
        return self.kernel == "fast"

    @property
    def frame_resize(self) -> FrameResize:
        return FrameResize(self.resize, self.size, self.kernel)

    def to_dict(self) -> dict:
        """The preset as run.json and the fingerprint record it.

        ``resize_kernel`` appears only when the kernel's numbers differ from the exact and fast
        ones this record always named (``fast_resize``), so run directories recorded before
        there was a choice of kernel keep their fingerprint.
        """
        out = asdict(self)
        del out["kernel"]
        out["fast_resize"] = self.fast_resize
        out["sampling"] = asdict(self.sampling)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        numbers = self.frame_resize.numbers
        if numbers not in ("exact", "fast"):
            out["resize_kernel"] = numbers
        return out


PRESETS: dict[str, Preset] = {
    # Each preset's default kernel is "bounded" (within the preset's bound of the seed, ~1 ms a
    # 1080p frame); --resize exact is the seed's own arithmetic.
    # The seed's ViT-L script: 32 consecutive frames, PIL bilinear squash to 224.
    "aicity-vitl": Preset("aicity-vitl", PRESET_SAMPLING["aicity-vitl"], 224, "pil_bilinear", kernel="bounded"),
    # The seed's ViT-H script: 16 frames at step 2, F.interpolate squash to 224.
    "aicity-vith": Preset("aicity-vith", PRESET_SAMPLING["aicity-vith"], 224, "interpolate_bilinear",
                          kernel="bounded"),
    # VideoMAE's own fine-tuning sampling: 16 frames at step 4, short side 224 + centre crop.
    "videomae-16x4": Preset("videomae-16x4", PRESET_SAMPLING["videomae-16x4"], 224, "short_side_crop",
                            kernel="bounded"),
}


def resolve_preset(name: str, *, span: Optional[int] = None, hop: Optional[int] = None,
                   num_frames: Optional[int] = None, step: Optional[int] = None, size: Optional[int] = None,
                   resize_method: Optional[str] = None, fast_resize: bool = False,
                   kernel: Optional[str] = None) -> Preset:
    """The preset ``name`` with any overrides applied (None keeps the preset's value).

    ``kernel`` is ``--resize`` (exact, bounded, fast); ``fast_resize=True`` is ``kernel="fast"``.
    """
    if name not in PRESETS:
        raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {name!r}")
    base = PRESETS[name]
    s = base.sampling
    sampling = Sampling(span if span is not None else s.span, hop if hop is not None else s.hop,
                        num_frames if num_frames is not None else s.num_frames,
                        step if step is not None else s.step)
    return replace(base, sampling=sampling, size=size if size is not None else base.size,
                   resize=resize_method or base.resize, kernel=kernel or ("fast" if fast_resize else base.kernel))


def window_times(sampling: Sampling, windows: range, fps: float,
                 pts: Optional[dict[int, float]] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start_s, end_s, center_s) per window.

    CFR: frame index / exact fps, centre ``(start + span/2) / fps``. VFR (``pts`` given: frame
    index -> timestamp): start and centre from the timestamps of those frames, end from the last
    frame's timestamp plus one nominal frame duration.
    """
    starts = np.array([sampling.start(w) for w in windows], dtype=np.int64)
    half = sampling.span / 2.0
    if pts is None:
        return starts / fps, (starts + sampling.span) / fps, (starts + half) / fps
    centre_frames = starts + int(half)
    start_s = np.array([pts[int(s)] for s in starts])
    end_s = np.array([pts[int(s) + sampling.span - 1] + 1.0 / fps for s in starts])
    if half == int(half):
        center_s = np.array([pts[int(c)] for c in centre_frames])
    else:
        center_s = np.array([(pts[int(c)] + pts.get(int(c) + 1, pts[int(c)])) / 2 for c in centre_frames])
    return start_s, end_s, center_s


class WindowAssembler:
    """Turns one video's in-order frames into windows, holding about one span of frames.

    Overlapping windows share decoded frames: each frame is decoded once and kept only until the
    last window that uses it is complete. ``windows`` limits which windows are produced (a piece
    of a video); ``stop=None`` means up to the end of the video, whatever its real length.
    """

    def __init__(self, sampling: Sampling, first_window: int, stop_window: Optional[int] = None):
        self.sampling = sampling
        self.next_window = first_window
        self.stop_window = stop_window
        self._ring: dict[int, np.ndarray] = {}
        self.pts: dict[int, float] = {}
        self.frames = 0
        self.emitted = 0

    def _needed(self, index: int) -> bool:
        s = self.sampling
        w = self.next_window
        # Frames are kept when some not-yet-complete window samples them.
        while s.start(w) <= index:
            if self.stop_window is not None and w >= self.stop_window:
                return False
            offset = index - s.start(w)
            if offset < s.span and offset % s.step == 0 and offset // s.step < s.num_frames:
                return True
            w += 1
        return False

    def add(self, index: int, frame: np.ndarray, pts: float) -> list[tuple[int, list[np.ndarray]]]:
        """Add frame ``index`` (a copy is kept); returns the windows it completes as (w, frames).

        A window is the list of its frames (the kept copies, shared by overlapping windows), not
        a stacked array: the batch is assembled once, in ``BatchRunner``.
        """
        self.frames += 1
        self.pts[index] = pts
        if self._needed(index):
            self._ring[index] = np.array(frame, copy=True)
        s = self.sampling
        done = []
        while ((self.stop_window is None or self.next_window < self.stop_window)
               and s.end(self.next_window) - 1 <= index):
            w = self.next_window
            indices = s.frame_indices(w)
            if all(int(i) in self._ring for i in indices):
                done.append((w, [self._ring[int(i)] for i in indices]))
                self.emitted += 1
            self.next_window += 1
            first_kept = s.start(self.next_window)
            for old in [k for k in self._ring if k < first_kept]:
                del self._ring[old]
        return done
