"""Real H.264 test material, generated with PyAV: for the demo, the tests and the benchmarks.

Two kinds of frame content matter:
- frames that encode their own index (a bar code of large blocks that survives compression),
  so a test can check which frames a reader really returned;
- frames whose content depends on an action class (a coloured block at a class-specific place),
  so a tiny model can learn to tell classes apart in seconds on a CPU.
"""

from __future__ import annotations

import os
from fractions import Fraction
from typing import Callable, Iterable, Optional

import numpy as np

INDEX_BITS = 16


def index_frame(index: int, width: int = 64, height: int = 64) -> np.ndarray:
    """An RGB frame whose top band is a 16-bit bar code of ``index`` (black/white blocks)."""
    frame = np.full((height, width, 3), 128, dtype=np.uint8)
    band = max(8, height // 4)
    block = width // INDEX_BITS
    if block < 2:
        raise ValueError(f"index frames need width >= {2 * INDEX_BITS}, got {width}")
    for bit in range(INDEX_BITS):
        value = 255 if (index >> bit) & 1 else 0
        frame[:band, bit * block : (bit + 1) * block] = value
    # A slow gradient below keeps the encoder honest (not a flat, trivially coded frame).
    frame[band:, :, 0] = (np.arange(width)[None, :] + index) % 256
    return frame


def read_index(frame: np.ndarray) -> int:
    """Invert :func:`index_frame` on a decoded (lossy) frame of any size."""
    height, width = frame.shape[:2]
    band = max(8, height // 4)
    block = width / INDEX_BITS
    gray = frame[: band, :, :].mean(axis=2)
    index = 0
    for bit in range(INDEX_BITS):
        lo, hi = int(bit * block + block / 4), int((bit + 1) * block - block / 4)
        if gray[band // 4 : 3 * band // 4, lo:max(hi, lo + 1)].mean() > 128:
            index |= 1 << bit
    return index


# Sixteen visually distinct patterns, one per AI City class id.
_CLASS_COLORS = np.array(
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
     [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128],
     [220, 190, 255], [170, 110, 40], [255, 250, 200], [128, 0, 0], [170, 255, 195]],
    dtype=np.uint8,
)


def action_frame(label: Optional[int], index: int, width: int = 64, height: int = 64,
                 seed: int = 0) -> np.ndarray:
    """A frame showing action ``label`` (None: background driving) at time step ``index``.

    The class sets the colour and the quadrant of a block that moves slowly, on a noisy
    background, so the classes differ visually but no single pixel gives them away.
    """
    rng = np.random.default_rng(seed * 1_000_003 + index)
    frame = rng.integers(40, 90, size=(height, width, 3), dtype=np.uint8)
    if label is None:
        return frame
    color = _CLASS_COLORS[label % len(_CLASS_COLORS)]
    size = max(4, min(width, height) // 3)
    quadrant = label % 4
    x0 = (quadrant % 2) * (width // 2) + (index % 8)
    y0 = (quadrant // 2) * (height // 2) + (index // 8) % 4
    frame[y0 : y0 + size, x0 : x0 + size] = color
    return frame


def write_video(
    path: str,
    frames: Iterable[np.ndarray],
    fps: float | Fraction = 30,
    gop: int = 30,
    crf: int = 18,
    codec: str = "libx264",
) -> str:
    """Encode RGB frames into an H.264 MP4 at ``path`` with a fixed GOP; returns the path."""
    import av

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    rate = Fraction(fps).limit_denominator(1001)
    tmp = path + ".part"
    with av.open(tmp, mode="w", format="mp4") as container:
        stream = None
        for frame_array in frames:
            if stream is None:
                height, width = frame_array.shape[:2]
                stream = container.add_stream(codec, rate=rate)
                stream.width, stream.height = width, height
                stream.pix_fmt = "yuv420p"
                stream.options = {"crf": str(crf), "g": str(gop), "keyint_min": str(gop),
                                  "sc_threshold": "0", "bf": "0"}
                stream.thread_count = 1
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame_array), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        if stream is None:
            raise ValueError(f"no frames given for {path}")
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)
    return path


def write_index_video(path: str, num_frames: int, width: int = 64, height: int = 64,
                      fps: float = 30, gop: int = 30) -> str:
    """A video whose frame ``i`` shows the bar code of ``i``."""
    return write_video(path, (index_frame(i, width, height) for i in range(num_frames)), fps, gop)


def write_action_video(
    path: str,
    num_frames: int,
    segments: Iterable[tuple[int, int, int]] = (),
    width: int = 64,
    height: int = 64,
    fps: float = 30,
    gop: int = 30,
    seed: int = 0,
) -> str:
    """A video with action ``label`` on frames ``[start, end)`` for each ``(label, start, end)``."""
    spans = list(segments)

    def label_at(i: int) -> Optional[int]:
        for label, start, end in spans:
            if start <= i < end:
                return label
        return None

    frames = (action_frame(label_at(i), i, width, height, seed) for i in range(num_frames))
    return write_video(path, frames, fps, gop)


def frames_of(fn: Callable[[int], np.ndarray], count: int) -> Iterable[np.ndarray]:
    return (fn(i) for i in range(count))
