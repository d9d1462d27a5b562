"""Forward throughput of videofeat's ViTs: clips/s and model FLOPs utilisation (MFU).

On CPU it times the tiny test model (a smoke check that the loop and counters work). On a GPU
it times ViT-L/16 and ViT-H/16 at 16x224 in bf16 and reports

    MFU = (2 x paper GMACs per clip) x clips/s / the card's dense bf16 peak

next to a measured large-matmul bf16 rate, which is what the card reaches in practice.

    python benchmarks/model_throughput.py                      # CPU: tiny model
    python benchmarks/model_throughput.py --batch-size 16      # GPU: ViT-L and ViT-H
"""

from __future__ import annotations

import argparse
import time
from typing import Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from videofeat.models import create_model, model_arch

# VideoMAE paper, 16x224 clips: GMACs per clip (forward).
PAPER_GMACS = {"videomae_vit_base_patch16_224": 180.0, "videomae_vit_large_patch16_224": 597.0,
               "videomae_vit_huge_patch16_224": 1192.0}

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from the vendors' data sheets.
# Checked in order, so the PCIe/NVL variants come before the plain names.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
                    ("GH200", 989.0), ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0))

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def card_peak_tflops(name: str) -> Optional[float]:
    for key, peak in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return peak
    return None


def counted_gmacs(name: str, frames: int, size: int) -> float:
    """Forward MACs per clip, counted on the meta device (no memory, no compute)."""
    with torch.device("meta"):
        model = create_model(name, num_frames=frames, img_size=size).eval()
        x = torch.empty(1, 3, frames, size, size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 2e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_model(name: str, device: torch.device, dtype: torch.dtype, batch: int, frames: int, size: int,
               warmup: int, iters: int, compile_model: bool) -> float:
    """Clips per second of ``model(x)`` under inference mode."""
    model = create_model(name, num_frames=frames, img_size=size).eval().to(device=device, dtype=dtype)
    forward = torch.compile(model) if compile_model else model
    x = torch.randn(batch, 3, frames, size, size, device=device, dtype=dtype)
    with torch.inference_mode():
        for _ in range(warmup):
            forward(x)
        _sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            forward(x)
        _sync(device)
        elapsed = time.perf_counter() - start
    del model, forward, x
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return batch * iters / elapsed


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, iters: int) -> float:
    """Measured rate of an n x n x n matmul: the practical ceiling for the model's GEMMs."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2 * n ** 3 * iters / (time.perf_counter() - start) / 1e12


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=None,
                        help="registered names (default: ViT-L and ViT-H on GPU, videomae_test on CPU)")
    parser.add_argument("--precision", choices=sorted(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--batch-size", type=int, default=None, help="clips per forward (default: 8 GPU, 4 CPU)")
    parser.add_argument("--frames", type=int, default=None, help="default: the model's (16; 8 for the tiny one)")
    parser.add_argument("--img-size", type=int, default=None, help="default: the model's (224; 64 for the tiny one)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="time torch.compile(model)")
    parser.add_argument("--matmul-size", type=int, default=8192, help="0 skips the matmul peak measurement")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    names = args.models or (["videomae_vit_large_patch16_224", "videomae_vit_huge_patch16_224"] if gpu
                            else ["videomae_test"])
    dtype = DTYPES[args.precision or ("bf16" if gpu else "fp32")]
    batch = args.batch_size or (8 if gpu else 4)
    card = torch.cuda.get_device_name(device) if gpu else "cpu"
    peak = card_peak_tflops(card) if gpu and dtype == torch.bfloat16 else None
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True

    print(f"device: {card}  precision: {str(dtype).removeprefix('torch.')}  batch: {batch}  "
          f"torch {torch.__version__}")
    if args.matmul_size and gpu:
        measured = matmul_tflops(device, dtype, args.matmul_size, iters=50)
        print(f"measured {args.matmul_size}^3 matmul: {measured:.0f} TFLOP/s"
              + (f"  (data-sheet dense peak {peak:.0f}: {measured / peak:.0%})" if peak else ""))
    header = f"{'model':<34} {'clip':>8} {'clips/s':>9} {'ms/clip':>8} {'GMACs':>7} {'TFLOP/s':>8} {'MFU':>6}"
    print(header)
    print("-" * len(header))
    for name in names:
        frames = args.frames or model_arch(name).num_frames
        size = args.img_size or model_arch(name).img_size
        counted = counted_gmacs(name, frames, size)
        # the paper's figure where it applies (16x224), our count otherwise
        gmacs = PAPER_GMACS.get(name, counted) if (frames, size) == (16, 224) else counted
        rate = time_model(name, device, dtype, batch, frames, size, args.warmup, args.iters, args.compile)
        achieved = 2 * gmacs * 1e9 * rate / 1e12
        mfu = f"{achieved / peak:.1%}" if peak else "-"
        print(f"{name:<34} {f'{frames}x{size}':>8} {rate:>9.2f} {1000 / rate:>8.2f} {gmacs:>7.4g} "
              f"{achieved:>8.2f} {mfu:>6}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
