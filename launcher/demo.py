"""Run the whole pipeline on a small generated AI City-style dataset, as a first look.

``videofeat demo [-o DIR]`` needs nothing but the install. It writes short real H.264 videos
(users x sessions x the three camera views, 64x64 at 30 fps) whose actions are visually
distinguishable, with per-user annotation CSVs in the AI City format; then runs the real stages
in this process: ``manifest``, ``labels``, ``finetune`` (the tiny model, briefly), ``extract``
(rear and dashboard, the seed's window arithmetic: span 32, hop 16), ``reduce`` and ``export``
(MA-Actionformer npz files, annotation JSON, config values, the multi-view table); and prints
where everything is, what it holds and how long each stage took.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional
from videofeat.launcher.logs import init_logger

log = logging.getLogger("videofeat.demo")

MARKER = ".videofeat-demo"
FPS = 30
NUM_CLASSES = 4          # the tiny model's head; class ids 0..3 of the AI City taxonomy
CAMERA = {"Dashboard": "Dashboard", "Rear_view": "Rear View", "Right_side_window": "Right Side Window"}
# The seed's window arithmetic (span 32, hop 16) with 8 frames at stride 4 on the tiny 64 px model.
EXTRACT_ARGS = ("--preset", "aicity-vith", "--num-frames", "8", "--frame-step", "4", "--size", "64",
                "--views", "rear,dashboard", "--decode-procs", "1", "--batch-size", "16", "--device", "cpu",
                "--no-progress")


@dataclass(frozen=True)
class DemoConfig:
    """Size of the generated dataset and of the fine-tuning."""

    output: str = "videofeat-demo"
    users: int = 3
    sessions: int = 2
    seconds: int = 10
    epochs: int = 8  # enough for the tiny model to clearly beat chance on the generated clips
    finetune: bool = True

    def __post_init__(self) -> None:
        if self.users < 2:
            raise ValueError(f"--users must be >= 2 (one user is held out for validation), got {self.users}")
        if self.sessions < 1:
            raise ValueError(f"--sessions must be >= 1, got {self.sessions}")
        if not 4 <= self.seconds <= 600:
            raise ValueError(f"--seconds must be between 4 and 600, got {self.seconds}")
        if self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {self.epochs}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", default="videofeat-demo", help="demo folder (default ./videofeat-demo)")
    parser.add_argument("--users", type=int, default=3, help="drivers (the last one is the validation split)")
    parser.add_argument("--sessions", type=int, default=2, help="recordings per driver, each in three views")
    parser.add_argument("--seconds", type=int, default=10, help="length of each video")
    parser.add_argument("--epochs", type=int, default=8, help="fine-tuning epochs of the tiny model")
    parser.add_argument("--small", action="store_true", help="2 users x 1 session x 6 s, 1 epoch (a quick check)")
    parser.add_argument("--no-finetune", action="store_true", help="extract with a random-init tiny model")


def segments_of(user: int, session: int, seconds: int) -> list[tuple[int, int, int]]:
    """(class, start s, end s): three 2-second actions per recording, every class over the dataset."""
    starts = [1, seconds // 2 - 1, seconds - 3]
    return [(((user + session) * 3 + k) % NUM_CLASSES, s, s + 2) for k, s in enumerate(starts)]


def _hms(seconds: int) -> str:
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def generate_dataset(root: str, config: DemoConfig) -> dict:
    """AI City layout: ``root/user_id_<u>/<View>_user_id_<u>_NoAudio_<n>.MP4`` plus one CSV per user."""
    import csv

    from videofeat.workers.decode.synthetic import write_action_video

    frames = config.seconds * FPS
    users = [10001 + 1111 * i for i in range(config.users)]
    videos = segments = 0
    for ui, user in enumerate(users):
        folder = os.path.join(root, f"user_id_{user}")
        os.makedirs(folder, exist_ok=True)
        rows = []
        for session in range(1, config.sessions + 1):
            segs = segments_of(ui, session, config.seconds)
            for vi, prefix in enumerate(CAMERA):
                name = f"{prefix}_user_id_{user}_NoAudio_{session}"
                write_action_video(os.path.join(folder, name + ".MP4"), frames,
                                   [(label, s * FPS, e * FPS) for label, s, e in segs], 64, 64, fps=FPS, gop=30,
                                   seed=ui * 100 + session * 10 + vi)
                videos += 1
                # The AI City CSVs name the file on the first row of its group only.
                for k, (label, start, end) in enumerate(segs):
                    rows.append([name if k == 0 else "", CAMERA[prefix], "Distracted", _hms(start), _hms(end),
                                 f"Class {label}", "None"])
                    segments += 1
        with open(os.path.join(folder, f"user_id_{user}.csv"), "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["Filename", "Camera View", "Activity Type", "Start Time", "End Time",
                             "Label (Primary)", "Appearance Block"])
            writer.writerows(rows)
    return {"users": users, "videos": videos, "segments": segments, "frames": frames}


class Stages:
    """Runs the real subcommands in this process, timing each and failing loudly."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, argv: list[str]) -> None:
        from videofeat.launcher.cli import main

        self.timed(name, lambda: main(argv))

    def timed(self, name: str, fn: Callable[[], Optional[int]]) -> None:
        print(f"\n== {name}", flush=True)
        began = time.monotonic()
        code = fn()
        self.seconds[name] = time.monotonic() - began
        if code:
            raise RuntimeError(f"demo stage {name!r} exited {code}; see its messages above")


def prepare_output(path: str) -> None:
    """A fresh demo folder; a previous demo's folder is replaced, anything else is left alone."""
    if os.path.isdir(path) and os.listdir(path):
        if not os.path.exists(os.path.join(path, MARKER)):
            raise ValueError(f"{path} exists and is not a videofeat demo folder: choose another -o")
        shutil.rmtree(path)
    os.makedirs(path)
    open(os.path.join(path, MARKER), "w").close()


def finetune_or_random(stages: Stages, out: str, config: DemoConfig, manifest: str, labels: str) -> tuple[str, str]:
    """(checkpoint, how it was made): fine-tuned when the finetune stage exists, else random init."""
    target = os.path.join(out, "finetune")
    if config.finetune and importlib.util.find_spec("videofeat.launcher.finetune") is not None:
        try:
            stages.run("finetune", ["finetune", "--recipe", "cpu-test", "--labels", labels, "--manifest", manifest,
                                    "--view", "rear", "--num-classes", str(NUM_CLASSES), "--epochs",
                                    str(config.epochs), "-o", target])
            checkpoint = os.path.join(target, "checkpoint-last.pt")
            if os.path.exists(checkpoint):
                return checkpoint, f"fine-tuned {config.epochs} epoch(s) on the rear view (cpu-test recipe)"
            log.warning("finetune wrote no %s; using a random-init model", checkpoint)
        except Exception as exc:  # the demo still shows the data flow without fine-tuning
            log.warning("fine-tuning failed (%s); using a random-init model", exc)
    os.makedirs(target, exist_ok=True)
    checkpoint = os.path.join(target, "random-init.pt")

    def save() -> int:
        import torch

        from videofeat.models import create_model
        from videofeat.models.checkpoint import save_checkpoint

        torch.manual_seed(0)
        save_checkpoint(checkpoint, create_model("videomae_test", num_classes=NUM_CLASSES))
        return 0

    stages.timed("random-init model", save)
    return checkpoint, "random weights (fine-tuning skipped)"


def run_demo(config: DemoConfig) -> dict:
    began = time.monotonic()
    out = os.path.abspath(config.output)
    prepare_output(out)
    data, manifest, labels = (os.path.join(out, "data", "A1"), os.path.join(out, "manifest.parquet"),
                              os.path.join(out, "labels.parquet"))
    run_dir, feats, multiview = (os.path.join(out, "runs", "tiny"), os.path.join(out, "features", "tiny"),
                                 os.path.join(out, "features", "multiview"))
    stages = Stages()
    info: dict = {}
    stages.timed("generate videos", lambda: info.update(generate_dataset(data, config)))
    stages.run("manifest", ["manifest", data, "-o", manifest, "--probe-procs", "2"])
    stages.run("labels", ["labels", data, "--manifest", manifest, "-o", labels,
                          "--val-users", str(info["users"][-1])])
    checkpoint, how = finetune_or_random(stages, out, config, manifest, labels)
    stages.run("extract", ["extract", manifest, "-o", run_dir, "--checkpoint", checkpoint, *EXTRACT_ARGS])
    stages.run("reduce", ["reduce", run_dir])
    stages.run("export", ["export", run_dir, "--format", "actionformer", "-o", feats, "--labels", labels])
    stages.run("export multiview", ["export", run_dir, "--format", "multiview", "-o", multiview])
    result = {"output": out, "data": data, "manifest": manifest, "labels": labels, "checkpoint": checkpoint,
              "checkpoint_kind": how, "run_dir": run_dir, "dataset": os.path.join(run_dir, "dataset"),
              "features": feats, "multiview": os.path.join(multiview, "multiview.parquet"),
              "stage_seconds": {k: round(v, 2) for k, v in stages.seconds.items()},
              "wall_seconds": round(time.monotonic() - began, 2), **info}
    with open(os.path.join(out, "demo.json"), "w") as handle:
        json.dump(result, handle, indent=2)
    return result


def describe(result: dict) -> str:
    """Where everything is and what it holds."""
    with open(os.path.join(result["dataset"], "summary.json")) as handle:
        summary = json.load(handle)
    with open(os.path.join(result["features"], "annotations.json")) as handle:
        database = json.load(handle)["database"]
    npz = sorted(n for n in os.listdir(result["features"]) if n.endswith(".npz"))
    views = ", ".join(f"{v} {row['videos']} videos / {row['windows']} windows" for v, row in summary["views"].items())
    rel = lambda p: os.path.relpath(p, result["output"])  # noqa: E731 - local shorthand for printing
    how = result["checkpoint_kind"] + _validation_note(os.path.dirname(result["checkpoint"]))
    lines = [
        "", f"videofeat demo finished in {result['wall_seconds']:.0f} s: {result['output']}",
        f"  {rel(result['data']):<38} {result['videos']} H.264 videos ({len(result['users'])} users, 3 views, "
        f"{result['frames']} frames each) + per-user annotation CSVs ({result['segments']} segments)",
        f"  {rel(result['manifest']):<38} one row per video: frames, fps, status, shard",
        f"  {rel(result['labels']):<38} labelled segments with a training / validation split",
        f"  {rel(result['checkpoint']):<38} {how}",
        f"  {rel(result['run_dir']):<38} shards, stats, markers, logs of the extraction run",
        f"  {rel(result['dataset']):<38} {views}; feature dim {summary['feature_dim']}, "
        f"{summary['num_classes']} classes",
        f"  {rel(result['features']):<38} {len(npz)} npz files (feats [T, D], a_prob, pred) for MA-Actionformer, "
        f"annotations.json ({len(database)} videos), config_snippet.yaml",
        f"  {rel(result['multiview']):<38} rear and dashboard side by side per (session_id, window_index)",
        "  stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result["stage_seconds"].items()),
        "", f"Read the dataset (from {result['output']}):",
        "  import pyarrow.parquet as pq; pq.read_table(\"" + rel(result["dataset"]) + "/rear.parquet\")",
        "  import duckdb; duckdb.sql(\"SELECT video_id, count(*) FROM '" + rel(result["dataset"]) +
        "/rear.parquet' GROUP BY 1\")",
        "  import numpy as np; np.load(\"" + rel(os.path.join(result["features"], npz[0])) + "\")[\"feats\"].shape",
    ]
    return "\n".join(lines)


def _validation_note(finetune_dir: str) -> str:
    """The last validation top-1 of the fine-tuning, if it ran (a handful of clips: a rough signal)."""
    path = os.path.join(finetune_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return ""
    with open(path) as handle:
        events = [json.loads(line) for line in handle if line.strip()]
    val = [e for e in events if e.get("event") == "val" and "top1" in e]
    if not val:
        return ""
    return (f"; validation top-1 {val[-1]['top1']:.2f} on {val[-1].get('count', '?')} clips "
            f"(chance {1 / NUM_CLASSES:.2f})")


def run(args: argparse.Namespace) -> int:
    init_logger()
    try:
        if args.small:
            config = DemoConfig(args.output, users=2, sessions=1, seconds=6, epochs=1, finetune=not args.no_finetune)
        else:
            config = DemoConfig(args.output, args.users, args.sessions, args.seconds, args.epochs,
                                finetune=not args.no_finetune)
        result = run_demo(config)
    except (ValueError, RuntimeError) as exc:
        print(f"videofeat demo: {exc}", file=sys.stderr)
        return 1
    print(describe(result))
    return 0
