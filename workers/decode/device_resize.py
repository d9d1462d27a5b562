"""A preset's resize as torch ops on the model's device (``--resize-on device``).

The decode process then only decodes: it ships each full-size (cropped) uint8 frame through its
ring (:class:`~videofeat.workers.decode.resize.FullFrame`) and the parent resizes it here, on
the GPU of a GPU run. The numbers are the decode-process kernels' within the preset's bound:

- ``pil_bilinear`` / ``short_side_crop``: antialiased bilinear in float32, width pass then
  height pass, each rounded to uint8 as PIL (and torch's uint8 kernel) round their
  intermediate: at most 1/255 from PIL per pixel. CUDA has no uint8 antialiased kernel, so the
  float one runs everywhere, and the CPU tests check the very code a GPU runs.
- ``interpolate_bilinear``: ``F.interpolate`` itself, the seed's operation, on the uint8 values
  as float32 (to float rounding of the decode-process gather).

The resized frame (150 KB at 224x224 uint8) comes back to host memory, where the window
assembler keeps it; the batch goes up again in ``BatchRunner``, as it does without this module.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from videofeat.workers.decode.resize import FrameResize, short_side_size


def _antialias_pass(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if tuple(x.shape[-2:]) == (height, width):
        return x
    y = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    # floor(y + 0.5), not round(): PIL rounds halves up, and ties are common where a side is upscaled.
    return y.add_(0.5).floor_().clamp_(0, 255)


def antialias_float(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """PIL BILINEAR (within 1/255) of a float 1xCxHxW tensor holding uint8 values."""
    return _antialias_pass(_antialias_pass(x, x.shape[-2], width), height, width)


class DeviceResize:
    """``resize`` of one full-size HxWx3 uint8 frame, computed on ``device``; returns a host array."""

    def __init__(self, resize: FrameResize, device: torch.device):
        if resize.fast:
            raise ValueError("--resize fast scales inside the decoder; it cannot run with --resize-on device")
        if resize.kernel == "exact" and resize.method != "interpolate_bilinear":
            raise ValueError("--resize exact is PIL's own arithmetic, which runs in the decode process: use "
                             "--resize-on decode, or --resize bounded (within 1/255 of PIL) on the device")
        self.resize = resize
        self.device = torch.device(device)

    @property
    def out_dtype(self) -> np.dtype:
        return self.resize.out_dtype

    @torch.inference_mode()
    def __call__(self, frame: np.ndarray) -> np.ndarray:
        size = self.resize.size
        x = torch.from_numpy(frame).to(self.device).permute(2, 0, 1).unsqueeze(0).float()
        if self.resize.method == "interpolate_bilinear":
            y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
        elif self.resize.method == "pil_bilinear":
            y = antialias_float(x, size, size).to(torch.uint8)
        else:
            h, w = short_side_size(frame.shape[0], frame.shape[1], size)
            y = antialias_float(x, h, w).to(torch.uint8)
            top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
            y = y[..., top:top + size, left:left + size]
        # HWC made contiguous where the frame is (on the GPU), then one small copy to the host.
        return y[0].permute(1, 2, 0).contiguous().cpu().numpy()
