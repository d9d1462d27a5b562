"""Generated fine-tuning data for the finetune tests (helpers only; no tests here).

Real H.264 videos in the AI City layout whose labelled segments show class-specific content
(``synthetic.write_action_video``), a real manifest (discovery + probe + ``write_manifest``)
and a real labels table (``write_labels``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from videofeat.manifests.discover import discover_aicity
from videofeat.manifests.labels import write_labels
from videofeat.manifests.manifest import build_rows, write_manifest
from videofeat.manifests.probe import probe_video
from videofeat.workers.decode.synthetic import write_action_video

REPO_ROOT = Path(__file__).resolve().parents[1]
FPS = 30
SEGMENT = 24  # frames per labelled segment
GAP = 8  # background frames between segments


def _video(root: Path, user: int, session: int, labels: Sequence[int], seed: int) -> tuple[str, list]:
    video_id = f"Rear_view_user_id_{user}_NoAudio_{session}"
    segments, frame = [], GAP
    for label in labels:
        segments.append((label, frame, frame + SEGMENT))
        frame += SEGMENT + GAP
    write_action_video(str(root / f"user_id_{user}" / f"{video_id}.MP4"), frame, segments, fps=FPS, gop=30,
                       seed=seed)
    return video_id, segments


def make_finetune_data(root: Path, num_classes: int = 4, train_videos: int = 6,
                       val_layout: Sequence[Sequence[int]] = ((0, 1, 2, 3), (1, 2, 3, 0), (2, 3, 0))) -> dict:
    """Training videos with one segment per class each (rotated order) and validation videos
    (default 11 segments: an odd count); returns paths of videos, manifest and labels."""
    root = Path(root)
    videos = root / "videos"
    rows = []
    plan = [(100 + v, 1, [(v + c) % num_classes for c in range(num_classes)], "training")
            for v in range(train_videos)]
    plan += [(900 + v, 1, list(layout), "validation") for v, layout in enumerate(val_layout)]
    for user, session, labels, split in plan:
        video_id, segments = _video(videos, user, session, labels, seed=user)
        for label, start, end in segments:
            rows.append({"video_id": video_id, "session_id": video_id.replace("Rear_view_", ""), "view": "rear",
                         "user_id": str(user), "label_id": label, "label": f"Class {label}",
                         "start_s": start / FPS, "end_s": end / FPS, "split": split, "source": "generated"})
    found = discover_aicity(str(videos), views=["rear"]).videos
    manifest_rows = build_rows(found, {v.uri: probe_video(v.uri) for v in found})
    manifest = str(root / "manifest.parquet")
    write_manifest(manifest_rows, manifest)
    labels = str(root / "labels.parquet")
    write_labels(rows, labels)
    return {"root": root, "videos": videos, "manifest": manifest, "labels": labels,
            "num_train": sum(len(p[2]) for p in plan if p[3] == "training"),
            "num_val": sum(len(p[2]) for p in plan if p[3] == "validation")}


def torchrun(args: Sequence[str], env_extra: Optional[dict] = None, nproc: int = 2, **popen) -> subprocess.Popen:
    """Start the real entry point under torchrun (standalone: a free port, no fixed rendezvous)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "launcher/finetune.py", *args]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, **popen)


def cpu_test_args(data: dict, output: Path, *extra: str) -> list[str]:
    return ["--recipe", "cpu-test", "--labels", data["labels"], "--manifest", data["manifest"], "--view", "rear",
            "--output", str(output), "--no-progress", *extra]
