"""Run the whole pipeline on a small generated AI City-style dataset, as a first look.

``videofeat demo [-o DIR]`` needs nothing but the install. It writes short real H.264 videos
(users x sessions x the three camera views, 64x64 at 30 fps) whose actions are visually
distinguishable: a labelled training set with per-user annotation CSVs in the AI City format
and an unlabelled test set; writes a job file with three tiny feature sets (two presets) and
two views; and runs it with ``videofeat pipeline`` in this process: a manifest per dataset,
labels, six short fine-tunes of the tiny model, one extraction of the three sets from one
decode (the seed's window arithmetic: span 32, hop 16), a reduce per set and the
MA-Actionformer exports (one folder per set). It prints where everything is and what it holds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass

MARKER = ".videofeat-demo"
FPS = 30
NUM_CLASSES = 4          # the tiny model's head; class ids 0..3 of the AI City taxonomy
CAMERA = {"Dashboard": "Dashboard", "Rear_view": "Rear View", "Right_side_window": "Right Side Window"}
VIEWS = ("rear", "dashboard")
# Three tiny sets: two presets, each set fine-tuned from its own random start (seed).
SETS = (("tiny_vith", "aicity-vith", 0), ("tiny_vitl", "aicity-vitl", 1), ("tiny_vitl_b", "aicity-vitl", 2))
# The seed's window arithmetic (span 32, hop 16) with 8 frames at stride 4 on the tiny 64 px model.
SET_OVERRIDES = {"num_frames": 8, "frame_step": 4, "size": 64}


@dataclass(frozen=True)
class DemoConfig:
    """Size of the generated dataset and of the fine-tuning."""

    output: str = "videofeat-demo"
    users: int = 3
    sessions: int = 1  # six fine-tunes and three sets keep the demo well under 2 minutes on 2 cores
    seconds: int = 10
    epochs: int = 2  # the demo shows the job, not accuracy: six short fine-tunes
    finetune: bool = True
    test_users: int = 1

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
    parser.add_argument("--sessions", type=int, default=1, help="recordings per driver, each in three views")
    parser.add_argument("--seconds", type=int, default=10, help="length of each video")
    parser.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs of each tiny model")
    parser.add_argument("--small", action="store_true", help="2 users x 1 session x 6 s, 1 epoch (a quick check)")
    parser.add_argument("--no-finetune", action="store_true", help="extract with random-init tiny models")


def segments_of(user: int, session: int, seconds: int) -> list[tuple[int, int, int]]:
    """(class, start s, end s): three 2-second actions per recording, every class over the dataset."""
    starts = [1, seconds // 2 - 1, seconds - 3]
    return [(((user + session) * 3 + k) % NUM_CLASSES, s, s + 2) for k, s in enumerate(starts)]


def _hms(seconds: int) -> str:
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def generate_dataset(root: str, config: DemoConfig, first_user: int = 0, users_n: int | None = None,
                     with_csv: bool = True) -> dict:
    """AI City layout: ``root/user_id_<u>/<View>_user_id_<u>_NoAudio_<n>.MP4`` plus one CSV per user
    (``with_csv=False``: an unlabelled test set)."""
    import csv

    from videofeat.workers.decode.synthetic import write_action_video

    frames = config.seconds * FPS
    count = config.users if users_n is None else users_n
    users = [10001 + 1111 * i for i in range(first_user, first_user + count)]
    videos = segments = 0
    for ui, user in enumerate(users, start=first_user):
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
        if not with_csv:
            continue
        with open(os.path.join(folder, f"user_id_{user}.csv"), "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["Filename", "Camera View", "Activity Type", "Start Time", "End Time",
                             "Label (Primary)", "Appearance Block"])
            writer.writerows(rows)
    return {"users": users, "videos": videos, "segments": segments if with_csv else 0, "frames": frames}




def prepare_output(path: str) -> None:
    """A fresh demo folder; a previous demo's folder is replaced, anything else is left alone."""
    if os.path.isdir(path) and os.listdir(path):
        if not os.path.exists(os.path.join(path, MARKER)):
            raise ValueError(f"{path} exists and is not a videofeat demo folder: choose another -o")
        shutil.rmtree(path)
    os.makedirs(path)
    open(os.path.join(path, MARKER), "w").close()


def random_checkpoints(folder: str) -> dict[str, str]:
    """One random-init tiny model per set (``--no-finetune``), each from its own seed."""
    import torch

    from videofeat.models import create_model
    from videofeat.models.checkpoint import save_checkpoint

    os.makedirs(folder, exist_ok=True)
    out = {}
    for name, _, seed in SETS:
        torch.manual_seed(seed)
        out[name] = os.path.join(folder, f"{name}.pt")
        save_checkpoint(out[name], create_model("videomae_test", num_classes=NUM_CLASSES))
    return out


def job_text(val_user: int, epochs: int, ready: dict[str, str] | None = None, decode_procs: int = 1,
             num_shards: int | None = None) -> str:
    """The demo's job file: ``data/A1`` (labelled), ``data/A2`` (test), three tiny sets, two views."""
    lines = [
        "# videofeat demo job: the pipeline's whole job at toy size (see videofeat pipeline --example)",
        f"views = {json.dumps(list(VIEWS))}", "plots = true", "",
        "[train]", 'root = "data/A1"', 'annotations = "data/A1"', f'val_users = ["{val_user}"]', "",
        "[[test]]", 'name = "A2"', 'root = "data/A2"', "",
        "[manifest]", "probe_procs = 2", *([f"num_shards = {num_shards}"] if num_shards else []), "",
        "[finetune]", f"num_classes = {NUM_CLASSES}", f"epochs = {epochs}", "progress = false", "",
        "[extract]", "batch_size = 16", f"decode_procs = {decode_procs}", 'device = "cpu"', "",
    ]
    for name, preset, seed in SETS:
        lines += ["[[set]]", f'name = "{name}"', f'preset = "{preset}"']
        lines += [f"{k} = {v}" for k, v in SET_OVERRIDES.items()]
        if ready:
            lines += [f"checkpoint = {{ {', '.join(f'{v} = {json.dumps(ready[name])}' for v in VIEWS)} }}"]
        else:
            lines += ['recipe = "cpu-test"', "[set.finetune]", f"seed = {seed}"]
        lines.append("")
    lines += ["[[export]]", 'name = "ma_actionformer"', 'format = "actionformer"', 'output = "features"', "",
              "[[export]]", 'name = "multiview"', 'format = "multiview"', 'output = "features/multiview"', ""]
    return "\n".join(lines)


def run_demo(config: DemoConfig) -> dict:
    from videofeat.launcher.pipeline_job import load_job
    from videofeat.launcher.pipeline_stages import Pipeline

    began = time.monotonic()
    out = os.path.abspath(config.output)
    prepare_output(out)
    train = generate_dataset(os.path.join(out, "data", "A1"), config)
    test = generate_dataset(os.path.join(out, "data", "A2"), config, first_user=config.users,
                            users_n=config.test_users, with_csv=False)
    generated = time.monotonic() - began
    ready = None if config.finetune else random_checkpoints(os.path.join(out, "random-init"))
    job_path = os.path.join(out, "job.toml")
    with open(job_path, "w") as handle:
        handle.write(job_text(train["users"][-1], config.epochs, ready))
    work = os.path.join(out, "work")
    seconds: dict[str, float] = {}
    last = [time.monotonic()]

    def say(line: str) -> None:
        print(line, flush=True)
        if line.startswith("   ") and " done in " in line:
            stage = line.split()[0]
            seconds[stage] = round(time.monotonic() - last[0], 2)
        last[0] = time.monotonic() if line.startswith("== ") else last[0]

    Pipeline(load_job(job_path), work, out=say).run()
    result = {"output": out, "job": job_path, "work": work, "train": train, "test": test,
              "videos": train["videos"] + test["videos"], "features": os.path.join(out, "features"),
              "sets": [name for name, _, _ in SETS], "finetuned": config.finetune,
              "generate_seconds": round(generated, 2), "stage_seconds": seconds,
              "wall_seconds": round(time.monotonic() - began, 2)}
    with open(os.path.join(out, "demo.json"), "w") as handle:
        json.dump(result, handle, indent=2)
    return result


def validation_top1(finetune_dir: str) -> tuple[float, int] | None:
    """The last validation top-1 of a fine-tune and its clip count (a handful of clips: a rough signal)."""
    path = os.path.join(finetune_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        val = [e for e in map(json.loads, filter(str.strip, handle)) if e.get("event") == "val" and "top1" in e]
    return (val[-1]["top1"], val[-1].get("count", 0)) if val else None


def describe(result: dict) -> str:
    """Where everything is and what it holds."""
    out, work = result["output"], result["work"]
    rel = lambda p: os.path.relpath(p, out)  # noqa: E731 - local shorthand for printing
    lines = ["", f"videofeat demo finished in {result['wall_seconds']:.0f} s: {out}",
             f"  {'data/A1':<34} {result['train']['videos']} H.264 videos ({len(result['train']['users'])} users, "
             f"3 views, {result['train']['frames']} frames each) + annotation CSVs "
             f"({result['train']['segments']} segments)",
             f"  {'data/A2':<34} {result['test']['videos']} videos of {len(result['test']['users'])} test user(s), "
             "no labels",
             f"  {rel(result['job']):<34} the job file: 2 views, 3 sets ({', '.join(result['sets'])})"]
    if result["finetuned"]:
        tops = []
        for name in result["sets"]:
            for view in VIEWS:
                top = validation_top1(os.path.join(work, "finetune", name, view))
                tops.append(f"{name}/{view} {top[0]:.2f}" if top else f"{name}/{view} -")
        lines.append(f"  {'work/finetune/<set>/<view>':<34} six fine-tunes; validation top-1 (chance "
                     f"{1 / NUM_CLASSES:.2f}): " + ", ".join(tops))
    for name in result["sets"]:
        with open(os.path.join(work, "features", name, "dataset", "summary.json")) as handle:
            summary = json.load(handle)
        views = ", ".join(f"{v} {r['videos']} videos / {r['windows']} windows" for v, r in summary["views"].items())
        lines.append(f"  {'work/features/' + name:<34} {views}; dim {summary['feature_dim']}")
    first = os.path.join(result["features"], result["sets"][0])
    npz = sorted(n for n in os.listdir(first) if n.endswith(".npz"))
    lines += [f"  {'features/<set>/':<34} {len(npz)} npz files per set (feats, a_prob, pred), annotations.json, "
              "config_snippet.yaml: MA-Actionformer's feat_folder per backbone",
              f"  {'features/multiview/<set>/':<34} rear and dashboard side by side per (session_id, window_index)",
              *([f"  {'work/plots/<set>/<view>.png':<34} a validation video's class probabilities over its labels"]
                if os.path.isdir(os.path.join(work, "plots")) else []),
              "  stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result["stage_seconds"].items()),
              "", f"Continue or inspect (from {out}):",
              "  videofeat status work",
              "  videofeat pipeline job.toml -o work        # again: every stage is complete, nothing recomputed",
              "  import numpy as np; np.load(\"" + rel(os.path.join(first, npz[0])) + "\")[\"feats\"].shape"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from videofeat.launcher.logs import init_logger

    init_logger()
    try:
        if args.small:
            config = DemoConfig(args.output, users=2, sessions=1, seconds=6, epochs=1, finetune=not args.no_finetune)
        else:
            config = DemoConfig(args.output, args.users, args.sessions, args.seconds, args.epochs,
                                finetune=not args.no_finetune)
        result = run_demo(config)
    except RuntimeError as exc:
        print(f"videofeat demo: {exc}", file=sys.stderr)
        return 1
    print(describe(result))
    return 0
