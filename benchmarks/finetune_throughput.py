"""Fine-tuning throughput: training clips/s per process, and MFU on a GPU.

Two measurements:

- ``step``: the optimizer step alone on random clips already in memory: forward, backward and
  AdamW with layer-decay groups, under the run's autocast (bf16 on CUDA), optionally with
  activation checkpointing. MFU = 3 x forward FLOPs per clip (forward + backward ~ 3 forwards)
  x clips/s / the card's dense bf16 peak; forward FLOPs are counted on the meta device.
- ``pipeline`` (CPU default): the real loop (``workers.train_loop.Trainer``, one process) over
  generated H.264 clips given as the seed's ``<path> <label>`` list: decode, sampling,
  augmentation, forward, backward, step. Clips/s counts the repeated-augmentation copies.

    python benchmarks/finetune_throughput.py                        # CPU: tiny model, both
    python benchmarks/finetune_throughput.py --device cuda          # GPU: ViT-L/16 16x224 bf16 step
    python benchmarks/finetune_throughput.py --device cuda --models videomae_vit_huge_patch16_224 \\
        --img-size 448 --activation-checkpointing --batch-size 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_throughput import DTYPES, card_peak_tflops, counted_gmacs  # noqa: E402

from videofeat.models import create_model, model_arch  # noqa: E402
from videofeat.workers.finetune.optim import OptimConfig, apply_lr, build_optimizer  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(name: str, device: torch.device, dtype: torch.dtype, batch: int, frames: int, size: int,
               warmup: int, iters: int, checkpointing: bool, compile_model: bool) -> tuple[float, float]:
    """(clips/s, peak GiB) of full training steps on random clips (fp32 weights, autocast)."""
    model = create_model(name, num_frames=frames, img_size=size, num_classes=16, drop_path_rate=0.1,
                         use_checkpoint=checkpointing).to(device).train()
    optimizer = build_optimizer(model, OptimConfig())
    apply_lr(optimizer, 1e-4)
    forward = torch.compile(model) if compile_model else model
    x = torch.randn(batch, 3, frames, size, size, device=device)
    y = torch.randint(0, 16, (batch,), device=device)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        with autocast:
            loss = torch.nn.functional.cross_entropy(forward(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    rate = batch * iters / (time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    del model, optimizer, forward, x
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rate, peak


def time_pipeline(workdir: str, num_clips: int, epochs: int, batch: int, num_workers: int) -> dict:
    """Clips/s per process of the real loop over generated pre-cut clips (cpu-test recipe)."""
    from videofeat.launcher.cli import parse_command
    from videofeat.launcher.finetune import build_config
    from videofeat.workers.decode.synthetic import write_action_video
    from videofeat.workers.distributed import Distributed
    from videofeat.workers.finetune.loop import Trainer

    root = Path(workdir)
    lines = []
    for i in range(num_clips):
        path = root / "clips" / f"clip_{i:03d}.mp4"
        if not path.exists():
            write_action_video(str(path), 48, [(i % 4, 0, 48)], fps=30, gop=30, seed=i)
        lines.append(f"{path} {i % 4}")
    listing = root / "train.txt"
    listing.write_text("\n".join(lines) + "\n")
    out = root / f"run-{time.time_ns()}"
    args, _ = parse_command("finetune", ["--recipe", "cpu-test", "--train-list", str(listing), "-o", str(out),
                                         "--epochs", str(epochs), "--batch-size", str(batch), "--num-workers",
                                         str(num_workers), "--no-progress", "--log-every", "1000"])
    trainer = Trainer(build_config(args), Distributed())
    trainer.run()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["clips_per_s"] for r in records if r["event"] == "train"]
    # The first epoch pays for warm-up (first decodes, allocator); report the last one.
    return {"clips_per_s": rates[-1], "epochs": epochs, "clips": num_clips, "batch": batch,
            "copies": trainer.cfg.num_sample, "num_workers": num_workers}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=None,
                        help="registered names (default: ViT-L/16 on GPU, videomae_test on CPU)")
    parser.add_argument("--precision", choices=sorted(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--batch-size", type=int, default=None, help="clips per step (default: 8 GPU, 4 CPU)")
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--pipeline", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the real loop on generated clips (default: on for CPU)")
    parser.add_argument("--pipeline-clips", type=int, default=32)
    parser.add_argument("--pipeline-workers", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where generated clips go (default: a temp dir)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    names = args.models or (["videomae_vit_large_patch16_224"] if gpu else ["videomae_test"])
    dtype = DTYPES[args.precision or ("bf16" if gpu else "fp32")]
    batch = args.batch_size or (8 if gpu else 4)
    card = torch.cuda.get_device_name(device) if gpu else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    peak = card_peak_tflops(card) if gpu and dtype == torch.bfloat16 else None
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
    print(f"device: {card}  precision: {str(dtype).removeprefix('torch.')}  batch: {batch}  torch {torch.__version__}")
    header = f"{'model':<34} {'clip':>8} {'clips/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8}"
    print(header)
    print("-" * len(header))
    for name in names:
        frames = args.frames or model_arch(name).num_frames
        size = args.img_size or model_arch(name).img_size
        forward_flops = 2e9 * counted_gmacs(name, frames, size)
        rate, mem = time_steps(name, device, dtype, batch, frames, size, args.warmup, args.iters,
                               args.activation_checkpointing, args.compile)
        achieved = 3 * forward_flops * rate / 1e12
        mfu = f"{achieved / peak:.1%}" if peak else "-"
        print(f"{name:<34} {f'{frames}x{size}':>8} {rate:>9.2f} {achieved:>8.2f} {mfu:>6} {mem:>8.1f}")
    if args.pipeline if args.pipeline is not None else not gpu:
        with tempfile.TemporaryDirectory() as tmp:
            result = time_pipeline(args.workdir or tmp, args.pipeline_clips, 2, 2, args.pipeline_workers)
        print(f"pipeline (decode + augment + train, cpu-test, 1 process): {result['clips_per_s']:.1f} clips/s "
              f"({result['clips']} clips x {result['copies']} copies, batch {result['batch']}, "
              f"{result['num_workers']} loader workers)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
