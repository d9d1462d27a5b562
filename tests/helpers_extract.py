"""Helpers for extraction tests: small real videos, a manifest, a tiny checkpoint, a finished run.

Other test modules may import ``make_completed_run`` to get a small run directory produced by
the real extraction worker.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from videofeat.manifests.manifest import SCHEMA, write_manifest
from videofeat.workers.decode.synthetic import write_action_video, write_index_video

# 8-frame clips on `videomae_test`: span 16, hop 8, 8 frames at step 2, 64x64.
TINY_ARGS = ("--preset", "aicity-vith", "--span", "16", "--hop", "8", "--num-frames", "8", "--frame-step", "2",
             "--size", "64", "--decode-procs", "2", "--batch-size", "8", "--device", "cpu", "--no-progress")


def manifest_row(video_id: str, uri: str, num_frames: int, shard_id: Optional[int], view: str = "rear",
                 fps: int = 30, session_id: Optional[str] = None, width: int = 64, height: int = 64,
                 status: str = "ok", vfr: bool = False, piece: tuple[int, int, int, int] | None = None) -> dict:
    """One manifest row; ``piece`` = (index, count, start_frame, end_frame)."""
    index, count, start, end = piece or (0, 1, 0, num_frames)
    row = {name: None for name in SCHEMA.names}
    row.update(video_id=video_id, session_id=session_id or video_id.split("_", 2)[-1], view=view, user_id=None,
               uri=uri, num_frames=num_frames, fps_num=fps, fps_den=1, fps=float(fps), start_time_s=0.0,
               duration_s=num_frames / fps, vfr=vfr, width=width, height=height, codec="h264",
               size_bytes=os.path.getsize(uri) if os.path.exists(uri) else 0, status=status,
               shard_id=shard_id, piece_index=index, num_pieces=count, piece_start_frame=start,
               piece_end_frame=end)
    return row


def make_dataset(root: Path, specs: Sequence[tuple[str, int, int]], view: str = "rear",
                 action: bool = True) -> list[dict]:
    """Write one H.264 video per (name, frames, shard) and return their manifest rows."""
    rows = []
    for i, (name, frames, shard) in enumerate(specs):
        path = str(root / f"{name}.mp4")
        if action:
            write_action_video(path, frames, [(i % 16, frames // 4, frames // 2)], 64, 64, gop=16, seed=i)
        else:
            write_index_video(path, frames, 64, 64, gop=16)
        rows.append(manifest_row(name, path, frames, shard, view=view))
    return rows


def tiny_checkpoint(path: Path, num_classes: int = 10, seed: int = 0) -> str:
    """``videomae_test`` with random weights, saved in videofeat's checkpoint layout."""
    import torch

    from videofeat.models import create_model
    from videofeat.models.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    model = create_model("videomae_test", num_classes=num_classes)
    save_checkpoint(str(path), model)
    return str(path)


def run_extract(manifest: str, output: str, *extra: str, checkpoint: Optional[str] = None,
                torchrun: int = 0, check: bool = True, env: Optional[dict] = None,
                timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real entry point: ``videofeat extract`` or ``torchrun --nproc_per_node=N launcher/extract.py``."""
    args = [manifest, "-o", output, *TINY_ARGS, *extra]
    if checkpoint:
        args += ["--checkpoint", checkpoint]
    if torchrun:
        script = str(Path(__file__).resolve().parents[1] / "launcher" / "extract.py")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               script, *args]
    else:
        cmd = [sys.executable, "-m", "videofeat.launcher.cli", "extract", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}\nstdout:\n{result.stdout}\n"
                             f"stderr:\n{result.stderr[-6000:]}")
    return result


def make_completed_run(tmp: Path, specs: Sequence[tuple[str, int, int]] = (("Rear_view_user_id_1_NoAudio_1", 64, 0),
                                                                           ("Rear_view_user_id_2_NoAudio_1", 40, 0),
                                                                           ("Rear_view_user_id_3_NoAudio_1", 48, 1))
                       ) -> tuple[str, str]:
    """A manifest and a finished run directory (tiny model, two shards); returns (manifest, run_dir)."""
    tmp.mkdir(parents=True, exist_ok=True)
    rows = make_dataset(tmp, specs)
    manifest = str(tmp / "manifest.parquet")
    write_manifest(rows, manifest)
    ckpt = tiny_checkpoint(tmp / "tiny.pt")
    run_dir = str(tmp / "run")
    run_extract(manifest, run_dir, checkpoint=ckpt)
    return manifest, run_dir


# Per-set overrides giving TINY_ARGS' windows: span 16, hop 8, 8 frames at step 2, 64x64.
TINY_SAMPLING = {"span": 16, "hop": 8, "num_frames": 8, "frame_step": 2, "size": 64}


def sets_toml(ckpts: Sequence[str], sampling: Optional[dict] = None) -> str:
    """Three feature sets: ``a`` (aicity-vith), ``b`` and ``c`` (aicity-vitl, so they share windows),
    one checkpoint each (``b``'s given per view)."""
    lines = "".join(f"{k} = {v}\n" for k, v in (sampling or TINY_SAMPLING).items())
    return (f'[[set]]\nname = "a"\npreset = "aicity-vith"\ncheckpoint = "{ckpts[0]}"\n{lines}'
            f'[[set]]\nname = "b"\npreset = "aicity-vitl"\n'
            f'checkpoint = {{ rear = "{ckpts[1]}", dashboard = "{ckpts[1]}" }}\n{lines}'
            f'[[set]]\nname = "c"\npreset = "aicity-vitl"\nmodel = "auto"\ncheckpoint = "{ckpts[2]}"\n{lines}')


@contextlib.contextmanager
def hanging_video(manifest: str, victim: str, tmp: Path) -> Iterator[str]:
    """Replace ``victim`` with a FIFO nobody writes, so the rank that decodes it hangs inside its
    shard; yields a manifest that records no size or mtime for it (as for a store that reports
    none), since the pre-decode check would otherwise rightly call the FIFO ``changed``."""
    import pyarrow.parquet as pq

    rows = pq.read_table(manifest).to_pylist()
    for row in rows:
        if row["uri"] == victim:
            row["size_bytes"] = row["mtime_ns"] = None
    copy = str(tmp / "manifest-hanging.parquet")
    write_manifest(rows, copy)
    saved = str(tmp / "saved-victim.mp4")
    shutil.move(victim, saved)
    os.mkfifo(victim)
    try:
        yield copy
    finally:
        os.remove(victim)
        shutil.move(saved, victim)


def kill_rank_inside_shard(proc: subprocess.Popen, log: Path, ready: Callable[[], bool], timeout: float = 150) -> None:
    """Wait until the shard's attempt log exists and ``ready()``, then SIGKILL the rank it names."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not (log.exists() and ready()):
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else "the launch ended early"
            time.sleep(0.2)
        pid = int(re.search(r"pid=(\d+)", log.read_text()).group(1))
        os.kill(pid, signal.SIGKILL)  # the rank dies in the middle of the shard
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
