"""Three feature sets from one decode against three single-set runs, on generated 1080p H.264.

    python benchmarks/multiset_throughput.py --workdir /tmp/vf-multiset [--seconds 60] [--decode-procs 1]

Both sides extract the same three sets (``a``: aicity-vith, ``b`` and ``c``: aicity-vitl, each a
tiny ``videomae_test`` with its own random weights, ``size = 64``) from one manifest of
generated 1080p video: once as ``videofeat extract --sets`` and once as three plain runs, in
this one invocation. Shard time is read from the shards' stats (a shard of the multi-set run is
counted once, whatever number of sets it fed), so process start-up and model loading do not
hide the ratio; wall time is printed too. At size 64 the tiny models cost little, so decoding
dominates, as it does on a GPU node where the models run on the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from extract_throughput import make_video  # noqa: E402  (the same generated 1080p content)

SETS = ("a", "b", "c")


def sets_toml(ckpts: list[str]) -> str:
    presets = {"a": "aicity-vith", "b": "aicity-vitl", "c": "aicity-vitl"}
    return "".join(f'[[set]]\nname = "{n}"\npreset = "{presets[n]}"\ncheckpoint = "{c}"\nsize = 64\n'
                   for n, c in zip(SETS, ckpts))


def prepare(work: Path, seconds: int) -> tuple[str, str, list[str]]:
    """The video tree, its manifest, three checkpoints and the sets file."""
    import torch

    from videofeat.models import create_model
    from videofeat.models.checkpoint import save_checkpoint

    tree = work / "videos" / "user_id_1"
    tree.mkdir(parents=True, exist_ok=True)
    make_video(tree / "Rear_view_user_id_1_NoAudio_1.MP4", seconds)
    manifest = work / "manifest.parquet"
    if not manifest.exists():
        subprocess.run([sys.executable, "-m", "videofeat.launcher.cli", "manifest", str(work / "videos"), "-o",
                        str(manifest)], check=True, capture_output=True)
    ckpts = []
    for i, name in enumerate(SETS):
        path = work / f"tiny_{name}.pt"
        if not path.exists():
            torch.manual_seed(i)
            save_checkpoint(str(path), create_model("videomae_test", num_classes=10))
        ckpts.append(str(path))
    sets = work / "sets.toml"
    sets.write_text(sets_toml(ckpts))
    return str(manifest), str(sets), ckpts


def extract(args: list[str]) -> float:
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "videofeat.launcher.cli", "extract", *args], check=True,
                   capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.monotonic() - t0


def shard_stats(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "shards").glob("*.stats.json"))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--workdir", required=True, help="videos, manifest and run directories go here")
    parser.add_argument("--seconds", type=int, default=60, help="length of the generated 1080p video (>= 60)")
    parser.add_argument("--decode-procs", type=int, default=1, help="decode processes of each run")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    manifest, sets, ckpts = prepare(work, args.seconds)
    common = ["--device", "cpu", "--decode-procs", str(args.decode_procs), "--no-progress", "--overwrite"]

    multi_dir = work / "multi"
    multi_wall = extract([manifest, "-o", str(multi_dir), "--sets", sets, *common])
    presets = {"a": "aicity-vith", "b": "aicity-vitl", "c": "aicity-vitl"}
    single_wall = 0.0
    for name, ckpt in zip(SETS, ckpts):
        single_wall += extract([manifest, "-o", str(work / "single" / name), "--preset", presets[name],
                                "--checkpoint", ckpt, "--size", "64", *common])

    # A multi-set shard's stats are the same decode in every set: count each shard once.
    multi = {s["shard_id"]: s for s in shard_stats(multi_dir / "a")}
    multi_s = sum(s["seconds"] for s in multi.values())
    multi_frames = sum(s["decode"]["frames_decoded"] for s in multi.values())
    video_frames = sum(s["decode"]["video_frames"] for s in multi.values())
    singles = [s for name in SETS for s in shard_stats(work / "single" / name)]
    single_s = sum(s["seconds"] for s in singles)
    single_frames = sum(s["frames_decoded"] for s in singles)
    windows = {name: sum(s["windows"] for s in shard_stats(multi_dir / name)) for name in SETS}

    print(f"input: {args.seconds} s of 1080p H.264 ({video_frames} frames); sets a (aicity-vith), b and c "
          f"(aicity-vitl), videomae_test at size 64; --decode-procs {args.decode_procs}; windows {windows}")
    print(f"{'':<22}{'shard s':>10}{'wall s':>10}{'decoded':>10}{'per frame':>11}")
    print(f"{'3-set run':<22}{multi_s:>10.1f}{multi_wall:>10.1f}{multi_frames:>10}{multi_frames / video_frames:>11.2f}")
    print(f"{'3 single-set runs':<22}{single_s:>10.1f}{single_wall:>10.1f}{single_frames:>10}"
          f"{single_frames / video_frames:>11.2f}")
    print(f"speed-up (shard time): {single_s / multi_s:.2f}x   (wall time: {single_wall / multi_wall:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
