"""Extraction throughput and memory on generated 1080p H.264: videofeat against a seed-style loop.

    python benchmarks/extract_throughput.py --workdir /tmp/vf-bench [--minutes 1 5] [--decoder-memory]

- videofeat: ``videofeat extract`` (one rank, ``--decode-procs``), preset aicity-vitl, the tiny
  ``videomae_test`` model at 32x224x224 with random weights;
- seed-style: the seed's ViT-L loop: decord ``get_batch`` per window (overlapping frames decoded
  twice), PIL squash per frame, batch 1, fp32, same model.

Prints windows/s of each and their ratio, frames decoded per video frame, and the peak RSS
summed over the process tree (sampled from /proc) for each video length. ``--decoder-memory``
also streams the longest video through PyAV and decord alone and prints each one's peak RSS.
``--device cuda --model videomae_vit_large_patch16_224 --dtype bf16`` gives the GPU figures
(end to end against model-only windows/s, see benchmarks/model_throughput.py for the latter).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

WIDTH, HEIGHT, FPS = 1920, 1080, 30


def make_video(path: Path, seconds: int) -> str:
    """Smooth 1080p content with moving blocks (cheap to encode, real to decode), 1 s GOP."""
    if path.exists():
        return str(path)
    import av

    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    base = np.stack([(xx * 255 // WIDTH), (yy * 255 // HEIGHT), ((xx + yy) * 255 // (WIDTH + HEIGHT))],
                    axis=-1).astype(np.uint8)

    def frames():
        for i in range(seconds * FPS):
            frame = base.copy()
            x, y = (37 * i) % (WIDTH - 200), (23 * i) % (HEIGHT - 200)
            frame[y:y + 200, x:x + 200] = (255 - (i % 255), i % 255, 128)
            frame[:64, : 64 + (i % 512)] = 255
            yield frame

    tmp = str(path) + ".part"
    with av.open(tmp, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        # veryfast keeps CABAC and B-frames (what cameras write) and encodes 1080p in real time.
        stream.options = {"crf": "20", "g": str(FPS), "keyint_min": str(FPS), "sc_threshold": "0",
                          "preset": "veryfast"}
        for frame in frames():
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    os.replace(tmp, path)
    return str(path)


def children_by_parent() -> dict[int, list[int]]:
    """Every live process's children, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return children


def tree_rss_bytes(root_pid: int) -> int:
    """RSS of ``root_pid`` and all its descendants, from /proc."""
    children = children_by_parent()
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        stack += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def run_sampled(cmd: list[str]) -> tuple[subprocess.CompletedProcess, int, float]:
    """Run ``cmd``; returns (result, peak tree RSS in bytes, wall seconds)."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss_bytes(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    sampler.join()
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-4000:]}")
    return result, peak[0], time.monotonic() - start


def bench_checkpoint(work: Path, patch_size: int) -> str:
    """``videomae_test`` at 32x224x224 with random weights; patch 32 keeps a CPU from being model-bound."""
    path = work / f"videomae_test_32x224_p{patch_size}.pt"
    if not path.exists():
        import torch

        from videofeat.models import create_model
        from videofeat.models.checkpoint import save_checkpoint

        torch.manual_seed(0)
        save_checkpoint(str(path), create_model("videomae_test", num_frames=32, img_size=224, patch_size=patch_size))
    return str(path)


def model_args(args: argparse.Namespace) -> list[str]:
    return ["--model", "auto", "--checkpoint", args.checkpoint] if args.checkpoint else ["--model", args.model]


def run_videofeat(video: str, work: Path, args: argparse.Namespace) -> dict:
    from videofeat.manifests.manifest import SCHEMA, write_manifest

    name = Path(video).stem
    n = int(Path(video).stem.split("_")[-1].rstrip("s")) * FPS
    row = {k: None for k in SCHEMA.names}
    row.update(video_id=name, session_id=name, view="rear", uri=video, num_frames=n, fps_num=FPS, fps_den=1,
               fps=float(FPS), vfr=False, width=WIDTH, height=HEIGHT, status="ok", shard_id=0, piece_index=0,
               num_pieces=1, piece_start_frame=0, piece_end_frame=n)
    manifest = str(work / f"{name}.manifest.parquet")
    write_manifest([row], manifest)
    out = work / f"run-{name}-{time.time_ns()}"
    cmd = [sys.executable, "-m", "videofeat.launcher.cli", "extract", manifest, "-o", str(out), "--preset",
           "aicity-vitl", *model_args(args), "--device", args.device, "--dtype", args.dtype, "--batch-size",
           str(args.batch_size), "--decode-procs", str(args.decode_procs), "--decoder", args.decoder, "--no-progress"]
    _, peak, wall = run_sampled(cmd)
    stats = json.loads((out / "shards" / "00000.stats.json").read_text())
    return {"windows": stats["windows"], "seconds": stats["seconds"], "wall_s": wall,
            "windows_per_s": stats["windows"] / stats["seconds"], "frames_per_frame": stats["frames_decoded"] / n,
            "peak_rss_mb": peak / 2**20}


def seed_loop(video: str, model_name: str, checkpoint: str, device: str, max_windows: int) -> None:
    """The seed's ViT-L extraction loop (decord get_batch per window, PIL, batch 1, fp32)."""
    import decord
    import torch
    from PIL import Image

    from videofeat.models import create_model

    torch.manual_seed(0)
    if checkpoint:
        model = create_model("auto", checkpoint=checkpoint).eval().to(device)
    else:
        model = create_model(model_name, num_frames=32, img_size=224).eval().to(device)
    mean = np.array([0.485, 0.456, 0.406], dtype=np.float32)
    std = np.array([0.229, 0.224, 0.225], dtype=np.float32)
    vr = decord.VideoReader(open(video, "rb"), ctx=decord.cpu(0))
    count = min(max_windows, (len(vr) - 32 + 16) // 16)
    start, decoded = time.monotonic(), 0
    for i in range(count):
        frames = vr.get_batch(list(range(16 * i, 16 * i + 32))).asnumpy()
        decoded += len(frames)
        clip = np.stack([np.asarray(Image.fromarray(f).convert("RGB").resize((224, 224), Image.BILINEAR))
                         for f in frames])
        x = torch.from_numpy(((clip / 255.0 - mean) / std).astype(np.float32)).permute(3, 0, 1, 2)[None].to(device)
        with torch.no_grad():
            model.forward_features_and_logits(x)
    seconds = time.monotonic() - start
    print(json.dumps({"windows": count, "seconds": seconds, "frames_requested": decoded, "frames": len(vr)}))


def run_seed(video: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--seed-loop", video, "--model", args.model, "--checkpoint",
           args.checkpoint or "", "--device", args.device,
           "--seed-windows", str(args.seed_windows)]
    result, peak, wall = run_sampled(cmd)
    data = json.loads(result.stdout.strip().splitlines()[-1])
    covered = min(data["frames"], 16 * data["windows"] + 16)
    return {"windows": data["windows"], "seconds": data["seconds"], "wall_s": wall,
            "windows_per_s": data["windows"] / data["seconds"], "frames_per_frame": data["frames_requested"] / covered,
            "peak_rss_mb": peak / 2**20}


def decoder_memory(video: str) -> dict:
    """Stream every frame of ``video`` through each decoder alone; peak RSS of that process."""
    out = {}
    for backend in ("pyav", "decord"):
        code = ("import sys; from videofeat.workers.decode.decoders import open_video\n"
                f"s = open_video({video!r}, {backend!r}); n = sum(1 for _ in s.stream()); print(n)")
        result, peak, wall = run_sampled([sys.executable, "-c", code])
        out[backend] = {"frames": int(result.stdout.split()[-1]), "peak_rss_mb": peak / 2**20,
                        "frames_per_s": int(result.stdout.split()[-1]) / wall}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/videofeat-bench")
    parser.add_argument("--minutes", type=float, nargs="+", default=[1, 5])
    parser.add_argument("--model", default="videomae_test")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--decode-procs", type=int, default=1)
    parser.add_argument("--decoder", default="pyav")
    parser.add_argument("--seed-windows", type=int, default=10**9, help="cap the seed loop's windows (it is slow)")
    parser.add_argument("--decoder-memory", action="store_true")
    parser.add_argument("--patch-size", type=int, default=32,
                        help="patch size of the tiny CPU model (16: the real token count, model-bound on a CPU); "
                             "0: use --model with random weights instead of a tiny checkpoint")
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--seed-loop", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.seed_loop:
        seed_loop(args.seed_loop, args.model, args.checkpoint, args.device, args.seed_windows)
        return
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if args.patch_size and args.model == "videomae_test":
        args.checkpoint = bench_checkpoint(work, args.patch_size)
    results = {}
    for minutes in args.minutes:
        seconds = int(minutes * 60)
        t0 = time.monotonic()
        video = make_video(work / f"bench_1080p_{seconds}s.mp4", seconds)
        print(f"[{minutes:g} min] video ready ({time.monotonic() - t0:.0f} s)", flush=True)
        vf = run_videofeat(video, work, args)
        print(f"[{minutes:g} min] videofeat: {vf['windows']} windows, {vf['windows_per_s']:.2f} windows/s, "
              f"{vf['frames_per_frame']:.3f} frames decoded per frame, peak tree RSS {vf['peak_rss_mb']:.0f} MB "
              f"(wall {vf['wall_s']:.0f} s)", flush=True)
        results[minutes] = {"videofeat": vf}
        if minutes == min(args.minutes):
            seed = run_seed(video, args)
            print(f"[{minutes:g} min] seed-style: {seed['windows']} windows, {seed['windows_per_s']:.2f} windows/s, "
                  f"{seed['frames_per_frame']:.3f} frames decoded per frame, peak tree RSS "
                  f"{seed['peak_rss_mb']:.0f} MB", flush=True)
            print(f"[{minutes:g} min] ratio videofeat / seed-style: {vf['windows_per_s'] / seed['windows_per_s']:.2f}x",
                  flush=True)
            results[minutes]["seed"] = seed
    if len(args.minutes) > 1:
        short, long_ = min(args.minutes), max(args.minutes)
        growth = results[long_]["videofeat"]["peak_rss_mb"] / results[short]["videofeat"]["peak_rss_mb"] - 1
        print(f"videofeat peak RSS growth {short:g} -> {long_:g} min: {100 * growth:+.1f}%")
    if args.decoder_memory:
        longest = str(work / f"bench_1080p_{int(max(args.minutes) * 60)}s.mp4")
        for backend, data in decoder_memory(longest).items():
            print(f"decoder {backend}: {data['frames']} frames, {data['frames_per_s']:.0f} frames/s, "
                  f"peak RSS {data['peak_rss_mb']:.0f} MB")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
