"""The typed, frozen configuration of one extraction run: every ``videofeat extract`` flag.

Validated on construction, so an error names the flag; ``launcher/extract.py`` builds it from
the command line and ``feature_sets.py`` builds one per feature set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from videofeat.manifests.ledger import RerunPolicy
from videofeat.workers.decode.pool import PoolConfig
from videofeat.workers.extract.presets import resolve_preset

RESIZE_ON = ("auto", "decode", "device")


@dataclass(frozen=True)
class ExtractConfig:
    """Everything ``videofeat extract`` needs; validated here so errors name the flag."""

    manifest: str
    output: str
    preset: str = "aicity-vitl"
    model: str = "auto"
    checkpoints: tuple[tuple[str, str], ...] = ()
    views: Optional[tuple[str, ...]] = None
    span: Optional[int] = None
    hop: Optional[int] = None
    num_frames: Optional[int] = None
    frame_step: Optional[int] = None
    size: Optional[int] = None
    resize: str = "bounded"
    resize_on: str = "auto"
    decoder: str = "pyav"
    decode_procs: int = 2
    decode_threads: int = 1
    decode_stall_s: float = 120.0
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 16
    feature_dtype: str = "float32"
    max_attempts: int = 3
    rerun_failed: bool = False
    overwrite: bool = False
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        from videofeat.workers.decode.decoders import BACKENDS

        from videofeat.workers.decode.resize import KERNELS

        if self.resize not in KERNELS:
            raise ValueError(f"--resize must be one of {', '.join(KERNELS)}, got {self.resize!r}")
        if self.resize_on not in RESIZE_ON:
            raise ValueError(f"--resize-on must be one of {', '.join(RESIZE_ON)}, got {self.resize_on!r}")
        if self.decoder not in BACKENDS:
            raise ValueError(f"--decoder must be one of {', '.join(BACKENDS)}, got {self.decoder!r}")
        if self.feature_dtype not in ("float32", "float16"):
            raise ValueError(f"--feature-dtype must be float32 or float16, got {self.feature_dtype!r}")
        if self.model == "auto" and not self.checkpoints:
            raise ValueError("--model auto reads the architecture from a checkpoint: pass --checkpoint "
                             "(VIEW=PATH or PATH), or name a model such as videomae_vit_large_patch16_224")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        RerunPolicy(self.rerun_failed, self.overwrite, self.max_attempts)
        PoolConfig(self.decode_procs, self.decode_stall_s, self.decoder, self.decode_threads)
        resize = self.resolved_preset().frame_resize
        if self.resize_on == "device":
            if resize.fast:
                raise ValueError("--resize fast scales inside the decoder: it cannot run with --resize-on device")
            if resize.kernel == "exact" and resize.method != "interpolate_bilinear":
                raise ValueError("--resize exact is PIL's own arithmetic, which runs in the decode process: use "
                                 "--resize-on decode, or --resize bounded (within 1/255 of PIL) on the device")

    def resolved_preset(self):
        return resolve_preset(self.preset, span=self.span, hop=self.hop, num_frames=self.num_frames,
                              step=self.frame_step, size=self.size, kernel=self.resize)

    def resize_on_device(self, device_type: str) -> bool:
        """Where the resize runs: ``auto`` is the device on CUDA, when the kernel can run there."""
        if self.resize_on != "auto":
            return self.resize_on == "device"
        resize = self.resolved_preset().frame_resize
        exact_pil = resize.kernel == "exact" and resize.method != "interpolate_bilinear"
        return device_type == "cuda" and not resize.fast and not exact_pil

    @property
    def policy(self) -> RerunPolicy:
        return RerunPolicy(self.rerun_failed, self.overwrite, self.max_attempts)
