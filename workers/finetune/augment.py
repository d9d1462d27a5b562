"""Clip augmentations as in the seed's Track3 recipe, built from timm's pieces.

Training (per clip): RandAugment (timm ``rand_augment_transform``) on each frame with the same
chosen ops and magnitudes for every frame, ImageNet normalisation, one random resized crop for
the whole clip (scale 0.08-1, ratio 3/4-4/3), no horizontal flip (driving actions are
left/right-specific), then timm ``RandomErasing`` with one rectangle for every frame.
Batch level: timm ``Mixup`` (mixup / cutmix, label smoothing) on (B, C*T, H, W), so cutmix cuts
the same box out of every frame. Validation: short side resize + centre crop.

timm's transforms draw from the global ``random`` / ``numpy`` / ``torch`` generators. We run
them inside :func:`seeded`, which seeds those generators from (seed, epoch, index, copy) and
restores them afterwards: augmentation is a function of the sample, not of the loader process.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class AugmentConfig:
    """Spatial pipeline and batch mixing; every field is the flag of the same name."""

    input_size: int = 224
    short_side_size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    rand_augment: Optional[str] = "rand-m7-n4-mstd0.5-inc1"
    reprob: float = 0.25
    mixup: float = 0.8
    cutmix: float = 1.0
    smoothing: float = 0.1
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.input_size < 16:
            raise ValueError(f"--input-size must be >= 16, got {self.input_size}")
        if self.short_side_size < self.input_size:
            raise ValueError(f"--short-side-size ({self.short_side_size}) must be >= --input-size "
                             f"({self.input_size}): validation centre-crops the resized frame")
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise ValueError(f"--crop-scale must be 0 < low <= high <= 1, got {self.scale}")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"--crop-ratio must be 0 < low <= high, got {self.ratio}")
        if self.rand_augment is not None and not self.rand_augment.startswith("rand-"):
            raise ValueError(f"--rand-augment must be a timm RandAugment string like "
                             f"'rand-m7-n4-mstd0.5-inc1' (or 'none'), got {self.rand_augment!r}")
        for flag, value in (("--reprob", self.reprob), ("--smoothing", self.smoothing)):
            if not 0 <= value < 1:
                raise ValueError(f"{flag} must be in [0, 1), got {value}")
        for flag, value in (("--mixup", self.mixup), ("--cutmix", self.cutmix)):
            if value < 0:
                raise ValueError(f"{flag} must be >= 0 (0 turns it off), got {value}")

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


def _seed32(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's global CPU generators; restore them on exit."""
    import torch

    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def resize_short_side(frames: np.ndarray, size: int) -> np.ndarray:
    """(T, H, W, 3) uint8 -> the same with the short side ``size`` (bilinear, antialiased)."""
    import torch
    import torch.nn.functional as F

    height, width = frames.shape[1:3]
    if min(height, width) == size:
        return frames
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


class ClipTransform:
    """uint8 frames (T, H, W, 3), already short-side resized -> float clip (C, T, S, S)."""

    def __init__(self, config: AugmentConfig, train: bool):
        self.config = config
        self.train = train
        self._rand_augment = None
        self._erase = None
        if train and config.rand_augment:
            from PIL import Image
            from timm.data.auto_augment import rand_augment_transform

            hparams = {"translate_const": int(config.input_size * 0.45), "interpolation": Image.BICUBIC}
            self._rand_augment = rand_augment_transform(config.rand_augment, hparams)
        if train and config.reprob > 0:
            from timm.data.random_erasing import RandomErasing

            self._erase = RandomErasing(config.reprob, mode="pixel", max_count=1, device="cpu")

    def __call__(self, frames: np.ndarray, seed: int = 0):
        if not self.train:
            return self._normalize(self._center_crop(frames))
        with seeded(seed):
            return self._train(frames, seed)

    def _train(self, frames: np.ndarray, seed: int):
        import torch.nn.functional as F
        from torchvision.transforms import RandomResizedCrop

        cfg = self.config
        if self._rand_augment is not None:
            from PIL import Image

            frame_seed = _seed32(seed, 1)
            out = []
            for frame in frames:
                # The same draws for every frame: the same ops and magnitudes over the clip.
                random.seed(frame_seed)
                np.random.seed(frame_seed)
                out.append(np.asarray(self._rand_augment(Image.fromarray(frame))))
            frames = np.stack(out)
        clip = self._normalize(frames)  # (C, T, H, W)
        top, left, height, width = RandomResizedCrop.get_params(clip, list(cfg.scale), list(cfg.ratio))
        clip = clip[:, :, top:top + height, left:left + width]
        clip = F.interpolate(clip, size=(cfg.input_size, cfg.input_size), mode="bilinear",
                             align_corners=False).contiguous()
        if self._erase is not None:
            channels, time = clip.shape[:2]
            # Frames stacked as channels: one rectangle for the whole clip.
            self._erase(clip.view(channels * time, cfg.input_size, cfg.input_size))
        return clip

    def _center_crop(self, frames: np.ndarray) -> np.ndarray:
        size = self.config.input_size
        height, width = frames.shape[1:3]
        top, left = (height - size) // 2, (width - size) // 2
        return frames[:, top:top + size, left:left + size]

    def _normalize(self, frames: np.ndarray):
        import torch

        x = torch.from_numpy(np.ascontiguousarray(frames)).float().div_(255.0)
        mean = torch.tensor(self.config.mean).view(1, 1, 1, 3)
        std = torch.tensor(self.config.std).view(1, 1, 1, 3)
        return ((x - mean) / std).permute(3, 0, 1, 2).contiguous()


def build_mixup(config: AugmentConfig, num_classes: int):
    """timm ``Mixup`` as the seed configured it, or None when mixup and cutmix are off."""
    if not config.mixes:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, prob=1.0, switch_prob=0.5,
                 mode="batch", label_smoothing=config.smoothing, num_classes=num_classes)


def apply_mixup(mixup, clips, labels, seed: int):
    """Mix a batch (B, C, T, H, W); the draw is a function of ``seed`` (derived from the step)."""
    batch, channels, time, height, width = clips.shape
    if batch % 2:
        raise ValueError(f"mixup needs an even batch; got {batch} clips (use an even --batch-size "
                         "or --num-sample 2)")
    with seeded(seed):
        mixed, targets = mixup(clips.reshape(batch, channels * time, height, width), labels)
    return mixed.reshape(batch, channels, time, height, width), targets


def build_criterion(config: AugmentConfig):
    """The seed's loss choice: soft-target CE with mixing, else label smoothing, else plain CE."""
    import torch
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if config.mixes:
        return SoftTargetCrossEntropy()
    if config.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=config.smoothing)
    return torch.nn.CrossEntropyLoss()
