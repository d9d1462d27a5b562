"""Batched inference: windows in, pooled features and softmax probabilities out.

Windows from one or more videos are assembled into a batch (``--batch-size``) straight from
their frames, moved with pinned memory on CUDA, normalized on the device (so uint8 crosses the
bus, not float32), and run once through the backbone in ``torch.inference_mode()`` with the
model in eval mode: the pooled feature and, when the checkpoint has a head, its softmax come
from the same pass (the seed's ``feats`` and ``a_prob``/``pred``). bf16 autocast on CUDA by
default, fp32 on CPU; ``--dtype`` overrides either. On CUDA out-of-memory the batch is halved
and retried, and the size used is logged.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

DTYPES = ("auto", "bf16", "fp16", "fp32")
_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """The compute dtype name: bf16 on CUDA and fp32 elsewhere unless asked otherwise."""
    if dtype != "auto":
        return dtype
    return "bf16" if device.type == "cuda" else "fp32"


class BatchRunner:
    """Runs one model on batches of windows ``(B, T, H, W, C)`` (uint8 or float32 in [0, 255])."""

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: str,
                 mean: Sequence[float], std: Sequence[float]):
        self.device = device
        self.dtype = dtype
        self.model = model.to(device).eval()
        shape = (1, 3, 1, 1, 1)
        # Fold /255 into the normalization: x * scale + shift == (x / 255 - mean) / std.
        mean_t = torch.tensor(mean, dtype=torch.float32).view(shape)
        std_t = torch.tensor(std, dtype=torch.float32).view(shape)
        self._scale = (1.0 / (255.0 * std_t)).to(device)
        self._shift = (-mean_t / std_t).to(device)
        self.max_batch: Optional[int] = None  # lowered after a CUDA out-of-memory error
        self.num_classes = int(getattr(model, "num_classes", 0) or 0)

    def _autocast(self) -> Any:
        if self.dtype == "fp32":
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=_TORCH_DTYPES[self.dtype])

    def _to_device(self, windows: Sequence[Sequence[np.ndarray]]) -> torch.Tensor:
        """The normalized ``(B, C, T, H, W)`` float32 batch on the device, from each window's frames.

        A window is the list of its frames (HxWxC, uint8 or float32; an array of them works too),
        so the batch is assembled once, where it is needed, instead of stacking each window and
        then the windows (two copies of every frame). On CUDA the frames are stacked as they are
        (uint8 crosses the bus, a quarter of float32's bytes) and turned and normalized there. On
        the CPU each frame is turned and converted to float straight into its place in the batch:
        one pass, where the old path made a stacked window, a stacked batch, a contiguous
        transposed copy and the float copy (~4.7 copies of a ViT-L batch, 154 MB of floats each).
        """
        count, frames = len(windows), len(windows[0])
        height, width, channels = windows[0][0].shape
        if self.device.type == "cuda":
            host = np.empty((count, frames, height, width, channels), np.asarray(windows[0][0]).dtype)
            for b, window in enumerate(windows):
                np.stack(window, out=host[b])
            tensor = torch.from_numpy(host).pin_memory().to(self.device, non_blocking=True)
            tensor = tensor.permute(0, 4, 1, 2, 3).contiguous().to(torch.float32)
        else:
            tensor = torch.empty((count, channels, frames, height, width), dtype=torch.float32)
            for b, window in enumerate(windows):
                for t, frame in enumerate(window):
                    tensor[b, :, t].copy_(torch.from_numpy(np.asarray(frame)).permute(2, 0, 1))
        return tensor.mul_(self._scale).add_(self._shift)

    @torch.inference_mode()
    def _forward(self, windows: Sequence) -> tuple[np.ndarray, Optional[np.ndarray]]:
        x = self._to_device(windows)
        with self._autocast():
            features, logits = self.model.forward_features_and_logits(x)
        feats = features.float().cpu().numpy()
        probs = None if logits is None else torch.softmax(logits.float(), dim=-1).cpu().numpy()
        return feats, probs

    def __call__(self, clips: Sequence) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """Features ``(B, D)`` float32 and probabilities ``(B, K)`` float32 (None without a head).

        ``clips``: B windows, each a list of its T frames (HxWxC) or a ``(T, H, W, C)`` array.
        """
        step = min(len(clips), self.max_batch or len(clips))
        feats, probs, start = [], [], 0
        while start < len(clips):
            chunk = clips[start:start + step]
            try:
                f, p = self._forward(chunk)
            except torch.cuda.OutOfMemoryError:
                if step == 1:
                    raise
                torch.cuda.empty_cache()
                step = max(1, step // 2)
                self.max_batch = step
                log.warning("CUDA out of memory: batch size lowered to %d", step)
                continue
            feats.append(f)
            if p is not None:
                probs.append(p)
            start += len(chunk)
        return np.concatenate(feats), (np.concatenate(probs) if probs else None)
