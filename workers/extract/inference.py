"""Batched inference: windows in, pooled features and softmax probabilities out.

Windows from one or more videos are stacked into a batch (``--batch-size``), moved with pinned
memory, normalized on the device (so uint8 crosses the bus, not float32), and run once through
the backbone in ``torch.inference_mode()`` with the model in eval mode: the pooled feature and,
when the checkpoint has a head, its softmax come from the same pass (the seed's ``feats`` and
``a_prob``/``pred``). bf16 autocast on CUDA by default, fp32 on CPU; ``--dtype`` overrides
either. On CUDA out-of-memory the batch is halved and retried, and the size used is logged.
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

    def _to_device(self, clips: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(clips))
        if self.device.type == "cuda":
            tensor = tensor.pin_memory().to(self.device, non_blocking=True)
        # (B, T, H, W, C) -> (B, C, T, H, W) made contiguous while still uint8 (a quarter of the
        # bytes), then one float32 copy normalized in place: 8 ViT-L windows are 154 MB as float,
        # and the arithmetic of ``x * scale + shift`` used to hold three such copies, plus the
        # contiguous one the patch embedding made. (A float32 batch is copied by contiguous(), so
        # the caller's array is never normalized in place.)
        tensor = tensor.permute(0, 4, 1, 2, 3).contiguous().to(torch.float32)
        return tensor.mul_(self._scale).add_(self._shift)

    @torch.inference_mode()
    def _forward(self, clips: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
        x = self._to_device(clips)
        with self._autocast():
            features, logits = self.model.forward_features_and_logits(x)
        feats = features.float().cpu().numpy()
        probs = None if logits is None else torch.softmax(logits.float(), dim=-1).cpu().numpy()
        return feats, probs

    def __call__(self, clips: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """Features ``(B, D)`` float32 and probabilities ``(B, K)`` float32 (None without a head)."""
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
