"""What a frame costs: the decode-only floor, each seed preset end to end, and every hop between.

    python benchmarks/frame_cost.py --workdir /tmp/vf-frame-cost [--seconds 40] [--frames 800] \
        [--rounds 2] [--resize bounded exact]

On one generated 1080p30 H.264 video (~14 Mbit/s: a panning texture plus a little noise, a
dashboard camera's bitrate), in one run:

- the floor: PyAV decoding to RGB on one thread, frames/s;
- ms per frame of each stage of the decode process (decode; to RGB and to RGBA on one swscale
  thread, and to RGB on swscale's default thread count beside them; each preset's resize kernel writing into a ring slot) and of the parent (window copy, the batch assembled,
  converted and normalised), measured in this process on one thread;
- what importing torch costs a fresh process (start-up, RSS, private memory): the price of
  running torch's resize kernel inside a decode process;
- ``videofeat extract`` of each seed preset and each ``--resize`` kernel given (side by side,
  the first ``--frames`` frames, as a piece of the video) with ``--decode-procs 1`` and the tiny
  ``videomae_test`` model (patch 32, so the parent is not model-bound on a CPU): frames/s and its
  fraction of the floor, and peak memory of the process tree (RSS and PSS; RSS counts shared
  pages, the frame ring among them, once per process that maps them);
- one more run with two decode processes, its peak memory split per process.

Each end-to-end run also reports the decode process's CPU per frame from its own clock
(``decode_cpu_s`` in the shard's stats: from its first frame to its last, start-up excluded)
against the floor's. ``--rounds`` interleaves the runs and the summary keeps each one's best:
on a shared machine the ratios measured side by side are what count.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from extract_throughput import bench_checkpoint, children_by_parent  # noqa: E402

WIDTH, HEIGHT, FPS = 1920, 1080, 30
PRESETS = ("aicity-vitl", "aicity-vith")


def make_video(path: Path, seconds: int) -> str:
    """1080p30 with a panning full-frame texture, a moving block and mild noise: ~11 Mbit/s."""
    if path.exists():
        return str(path)
    import av

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    base = np.stack([xx * 255 // WIDTH, yy * 255 // HEIGHT, (xx + yy) * 255 // (WIDTH + HEIGHT)], -1).astype(np.int16)
    texture = rng.integers(-24, 25, (HEIGHT + 64, WIDTH + 64, 3)).astype(np.int16)
    tmp = str(path) + ".part"
    with av.open(tmp, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"crf": "20", "g": str(FPS), "keyint_min": str(FPS), "sc_threshold": "0",
                          "preset": "veryfast"}
        for i in range(seconds * FPS):
            dx, dy = (2 * i) % 64, i % 64
            frame = base + texture[dy:dy + HEIGHT, dx:dx + WIDTH] + rng.integers(-2, 3, (HEIGHT, WIDTH, 1),
                                                                                 dtype=np.int16)
            x, y = (37 * i) % (WIDTH - 200), (23 * i) % (HEIGHT - 200)
            frame[y:y + 200, x:x + 200] = (255 - (i % 255), i % 255, 128)
            rgb = np.clip(frame, 0, 255).astype(np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    os.replace(tmp, path)
    return str(path)


# ----- memory of a process tree ------------------------------------------------------------------
def _role(pid: int, root: int, parent_role: str) -> str:
    if pid == root:
        return "parent"
    if parent_role == "forkserver":
        return "decode"  # forked from the server: same command line, another role
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            cmd = handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "other"
    if "resource_tracker" in cmd:
        return "resource_tracker"
    if "forkserver" in cmd:
        return "forkserver"
    return "decode" if "spawn_main" in cmd else "other"


def _smaps(pid: int) -> dict[str, int]:
    """kB fields of /proc/PID/smaps_rollup (Rss, Pss, Anonymous, Pss_Shmem, ...)."""
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                parts = line.split()
                if len(parts) == 3 and parts[2] == "kB":
                    out[parts[0].rstrip(":")] = int(parts[1])
    except OSError:
        pass
    return out


def _cpu_seconds(pid: int) -> float:
    """user + system CPU time of ``pid`` so far."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def tree_memory(root: int, cpu: dict | None = None) -> dict[str, dict[str, int]]:
    """Per role (parent, decode, forkserver, ...): summed Rss, Pss, Anonymous and Pss_Shmem in MB.

    Anonymous counts pages a fork still shares with its server; Pss splits them among sharers.
    """
    children, stack, out = children_by_parent(), [(root, "")], {}
    while stack:
        pid, parent_role = stack.pop()
        name = _role(pid, root, parent_role)
        stack += [(child, name) for child in children.get(pid, [])]
        if cpu is not None:
            # A process that is exiting reads as 0 s (or loses its parent): keep what it had.
            role, seconds = cpu.get(pid, (name, 0.0))
            cpu[pid] = (role if role != "other" else name, max(seconds, _cpu_seconds(pid)))
        fields = _smaps(pid)
        if not fields:
            continue
        role = out.setdefault(name, {"procs": 0, "rss": 0, "pss": 0, "anon": 0, "pss_shmem": 0})
        role["procs"] += 1
        for key, name in (("rss", "Rss"), ("pss", "Pss"), ("anon", "Anonymous"), ("pss_shmem", "Pss_Shmem")):
            role[key] += fields.get(name, 0) // 1024
    return out


def run_sampled(cmd: list[str]) -> tuple[str, dict, float]:
    """Run ``cmd``; returns (stdout, the tree's memory at its peak summed PSS, wall seconds)."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    peak: dict = {"total_pss": 0, "total_rss": 0, "roles": {}}
    cpu: dict[int, tuple[str, float]] = {}  # pid -> (role, CPU seconds at its last sample)

    def sample() -> None:
        while proc.poll() is None:
            roles = tree_memory(proc.pid, cpu)
            pss, rss = sum(r["pss"] for r in roles.values()), sum(r["rss"] for r in roles.values())
            peak["total_rss"] = max(peak["total_rss"], rss)
            if pss > peak["total_pss"]:
                peak.update(total_pss=pss, roles=roles)
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-4000:]}")
    peak["cpu_s"] = {}
    for role, seconds in cpu.values():
        peak["cpu_s"][role] = peak["cpu_s"].get(role, 0.0) + seconds
    return out, peak, time.monotonic() - start


# ----- the floor and the stages, in this process ------------------------------------------------
def floor_fps(video: str, frames: int | None = None) -> tuple[float, float]:
    """PyAV decoding to RGB on one thread over the first ``frames`` frames (None: all):
    (frames/s, CPU ms per frame). CPU time is what a shared machine's load changes least."""
    from videofeat.workers.decode.decoders import open_video

    with open_video(video, "pyav", threads=1) as source:
        start, cpu, count = time.perf_counter(), time.process_time(), 0
        for _ in source.stream(0, frames):
            count += 1
    return count / (time.perf_counter() - start), 1000 * (time.process_time() - cpu) / count


def _ms(fn, inputs: list) -> float:
    fn(inputs[0])
    start = time.perf_counter()
    for item in inputs:
        fn(item)
    return (time.perf_counter() - start) / len(inputs) * 1000


def stage_costs(video: str, frames: int, kernels: list[str]) -> dict[str, float]:
    """ms per frame of each hop, on the first ``frames`` frames of ``video``, one thread."""
    import av
    import torch
    from videofeat.workers.decode.pool import frame_spec
    from videofeat.workers.extract.presets import resolve_preset

    torch.set_num_threads(1)
    out: dict[str, float] = {}
    with av.open(video) as container:
        stream = container.streams.video[0]
        stream.thread_count, stream.thread_type = 1, "SLICE"
        start = time.perf_counter()
        decoded = []
        for frame in container.decode(stream):
            decoded.append(frame)
            if len(decoded) == frames:
                break
        out["decode (PyAV, frame object)"] = (time.perf_counter() - start) / len(decoded) * 1000
    # One swscale thread, as the decoders convert (see workers/decode/decoders.py), beside
    # swscale's default thread count. PyAV keeps a converter per frame object, so each setting
    # converts fresh copies of the frames, as decoding gives them; best of three interleaved rounds.
    yuv = [f.to_ndarray() for f in decoded[:60]]
    conversions = {"rgb24 (the floor's)": ("rgb24", 1), "rgba (the decode processes')": ("rgba", 1),
                   "rgb24, swscale's default threads": ("rgb24", None)}
    best: dict[str, float] = {}
    for _ in range(3):
        for name, (pixels, threads) in conversions.items():
            fresh = [av.VideoFrame.from_ndarray(a, format="yuv420p") for a in yuv]
            ms = _ms(lambda f: f.to_ndarray(format=pixels, threads=threads), fresh)
            best[name] = min(best.get(name, ms), ms)
    for name, ms in best.items():
        out[f"decoder frame -> {name}"] = ms
    rgba = [f.to_ndarray(format="rgba", threads=1) for f in decoded[:60]]
    del decoded
    for name in PRESETS:
        for method in dict.fromkeys(("exact", *kernels)):
            preset = _preset(resolve_preset, name, method)
            transform = preset.frame_resize
            shape, dtype = frame_spec(transform)
            ring = np.empty((48, *shape), dtype=dtype)
            # What a decode process does: resize the RGBA frame straight into its ring slot.
            out[f"{name} resize --resize {method} (into the ring slot)"] = _ms(lambda f: transform(f, ring[3]), rgba)
        out[f"{name} ring slot -> window copy"] = _ms(lambda f: np.array(f, copy=True), [ring[3]] * 30)
        s = preset.sampling
        # A window is the list of its kept frames; the batch of 8 windows is assembled once, per
        # frame turned, converted and normalised (each frame is in span / hop windows).
        windows = [[ring[i % 48] for i in range(s.num_frames)]] * 8
        out[f"{name} batch assembly + float + normalise (per frame)"] = (
            _ms(_normalise(preset), [windows] * 3) / (8 * s.hop))
    return out


def _normalise(preset):
    """The model input of a batch, as ``BatchRunner`` makes it on the CPU (or as it did before it had one)."""
    import torch

    try:
        from videofeat.workers.extract.inference import BatchRunner

        return BatchRunner(torch.nn.Identity(), torch.device("cpu"), "fp32", preset.mean, preset.std)._to_device
    except (ImportError, AttributeError):
        scale, shift = torch.full((1, 3, 1, 1, 1), 1 / 58.0), torch.full((1, 3, 1, 1, 1), -2.0)
        return lambda windows: (torch.from_numpy(np.stack([np.stack(w) for w in windows])).permute(0, 4, 1, 2, 3)
                                .float() * scale + shift)


def _preset(resolve, name: str, method: str):
    """The preset with ``--resize method`` applied, however this checkout spells that."""
    from videofeat.workers.extract.config import ExtractConfig

    config = ExtractConfig(manifest="m", output="o", preset=name, model="videomae_test", resize=method)
    return config.resolved_preset()


def torch_import_cost() -> dict[str, float]:
    """A fresh process: start-up and memory with the decode process's imports, then with torch too."""
    code = ("import sys, time; t = time.perf_counter(); import numpy, PIL.Image, av{extra}\n"
            "dt = time.perf_counter() - t\n"
            "f = {{l.split()[0]: int(l.split()[1]) for l in open('/proc/self/smaps_rollup') if l.endswith('kB\\n')}}\n"
            "print(dt, f['Rss:'] // 1024, f['Anonymous:'] // 1024)")
    out = {}
    for label, extra in (("without torch", ""), ("with torch", ", torch")):
        result = subprocess.run([sys.executable, "-c", code.format(extra=extra)], capture_output=True, text=True,
                                check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        seconds, rss, anon = result.stdout.split()
        out[label] = {"import_s": float(seconds), "rss_mb": int(rss), "private_anon_mb": int(anon)}
    return out


# ----- end to end ---------------------------------------------------------------------------------
def end_to_end(video: str, work: Path, preset: str, resize: str, args: argparse.Namespace, procs: int) -> dict:
    from videofeat.manifests.manifest import SCHEMA, write_manifest

    n = args.seconds * FPS
    row = {k: None for k in SCHEMA.names}
    # The first piece of a video split at --frames: its windows, and only the frames they need.
    row.update(video_id="cost", session_id="cost", view="rear", uri=video, num_frames=n, fps_num=FPS, fps_den=1,
               fps=float(FPS), vfr=False, width=WIDTH, height=HEIGHT, status="ok", shard_id=0, piece_index=0,
               num_pieces=1 if args.frames >= n else 2, piece_start_frame=0, piece_end_frame=min(n, args.frames))
    manifest = str(work / "cost.manifest.parquet")
    write_manifest([row], manifest)
    out = work / f"run-{preset}-{time.time_ns()}"
    checkpoint = bench_checkpoint(work, 32) if preset == "aicity-vitl" else _vith_checkpoint(work)
    cmd = [sys.executable, "-m", "videofeat.launcher.cli", "extract", manifest, "-o", str(out), "--preset", preset,
           "--model", "auto", "--checkpoint", checkpoint, "--device", "cpu", "--batch-size", "8",
           "--decode-procs", str(procs), "--resize", resize, "--no-progress", *args.extra]
    _, memory, wall = run_sampled(cmd)
    stats = json.loads((out / "shards" / "00000.stats.json").read_text())
    # Steady state: from the first frame on (a decode process that imports torch starts later).
    seconds = stats["seconds"] - (stats.get("first_frame_s") or 0.0)
    return {"frames": stats["frames_decoded"], "seconds": seconds, "first_frame_s": stats.get("first_frame_s"),
            "wall_s": wall, "frames_per_s": stats["frames_decoded"] / seconds, "memory": memory,
            # The decode process's own clock, from its first frame of the video to its last.
            "decode_cpu_ms_per_frame": 1000 * stats["decode_cpu_s"] / stats["frames_decoded"]
            if stats.get("decode_cpu_s") else None}


def _vith_checkpoint(work: Path) -> str:
    """``videomae_test`` at 16x224x224, patch 32 (the ViT-H preset feeds 16 frames)."""
    path = work / "videomae_test_16x224_p32.pt"
    if not path.exists():
        import torch

        from videofeat.models import create_model
        from videofeat.models.checkpoint import save_checkpoint

        torch.manual_seed(0)
        save_checkpoint(str(path), create_model("videomae_test", num_frames=16, img_size=224, patch_size=32))
    return str(path)


def _memory_line(memory: dict) -> str:
    parts = [f"{role} x{r['procs']}: RSS {r['rss']} PSS {r['pss']} (anon {r['anon']}, shm {r['pss_shmem']})"
             for role, r in sorted(memory["roles"].items())]
    return f"peak tree PSS {memory['total_pss']} MB, RSS {memory['total_rss']} MB; " + "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/vf-frame-cost")
    parser.add_argument("--seconds", type=int, default=40, help="length of the generated video")
    parser.add_argument("--frames", type=int, default=800, help="frames of the video each end-to-end run extracts")
    parser.add_argument("--rounds", type=int, default=2, help="end-to-end runs of each preset and kernel, interleaved")
    parser.add_argument("--resize", nargs="+", default=["bounded", "exact"],
                        help="--resize kernels of the end-to-end runs (the first one also for the memory run)")
    parser.add_argument("--stage-frames", type=int, default=120, help="frames timed per stage")
    parser.add_argument("--memory-procs", type=int, default=2, help="decode processes of the memory run (0: none)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `videofeat extract` flags")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    video = make_video(work / f"cost_1080p_{args.seconds}s.mp4", args.seconds)
    mbit = os.path.getsize(video) * 8 / args.seconds / 1e6
    print(f"video: {video}, {WIDTH}x{HEIGHT} {FPS} fps, {args.seconds * FPS} frames, {mbit:.1f} Mbit/s", flush=True)
    results: dict = dict(zip(("floor_fps", "floor_cpu_ms"), floor_fps(video)))
    print(f"floor: PyAV to RGB on one thread: {results['floor_fps']:.1f} frames/s "
          f"({1000 / results['floor_fps']:.2f} ms/frame, {results['floor_cpu_ms']:.2f} ms of CPU)", flush=True)
    results["stages_ms"] = stage_costs(video, args.stage_frames, args.resize)
    for stage, ms in results["stages_ms"].items():
        print(f"  {stage:<60} {ms:7.3f} ms/frame")
    results["torch_import"] = torch_import_cost()
    for label, cost in results["torch_import"].items():
        print(f"fresh process {label}: import {cost['import_s']:.2f} s, RSS {cost['rss_mb']} MB, "
              f"private {cost['private_anon_mb']} MB", flush=True)
    for round_ in range(args.rounds):
        for preset in PRESETS:
            for resize in args.resize:
                # The floor again right before each run, on the same frames: on a shared machine the
                # load drifts, and the fraction is only meaningful against a floor measured beside it.
                floor, floor_cpu = floor_fps(video, args.frames)
                e2e = end_to_end(video, work, preset, resize, args, 1)
                e2e["floor_fps"], e2e["fraction_of_floor"] = floor, e2e["frames_per_s"] / floor
                e2e["floor_cpu_ms"] = floor_cpu
                results.setdefault(f"{preset} --resize {resize}", []).append(e2e)
                decode_ms = e2e["decode_cpu_ms_per_frame"]
                print(f"round {round_ + 1}: {preset} --resize {resize} --decode-procs 1: {e2e['frames_per_s']:.1f} "
                      f"frames/s = {e2e['fraction_of_floor']:.2f} of the floor beside it ({floor:.1f} frames/s; "
                      f"{e2e['frames']} frames in {e2e['seconds']:.1f} s after the first at {e2e['first_frame_s']} s)"
                      f"; decode process {decode_ms:.1f} ms of CPU a frame where the floor takes {floor_cpu:.1f} "
                      f"(= {floor_cpu / decode_ms:.2f}); {_memory_line(e2e['memory'])}", flush=True)
    print("best of the rounds (a shared machine only ever slows a run down):")
    for key in [f"{p} --resize {r}" for p in PRESETS for r in args.resize]:
        best = max(results[key], key=lambda e: e["fraction_of_floor"])
        print(f"  {key}: {best['fraction_of_floor']:.2f} of the floor ({best['frames_per_s']:.1f} frames/s), decode "
              f"process {min(e['decode_cpu_ms_per_frame'] for e in results[key]):.1f} ms CPU a frame", flush=True)
    if args.memory_procs:
        e2e = end_to_end(video, work, PRESETS[0], args.resize[0], args, args.memory_procs)
        results["memory_run"] = e2e
        print(f"{PRESETS[0]} --resize {args.resize[0]} --decode-procs {args.memory_procs}: "
              f"{e2e['frames_per_s']:.1f} frames/s; "
              f"{_memory_line(e2e['memory'])}", flush=True)
    print(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
