"""What the stages of ``videofeat pipeline`` are: their ids, inputs, paths and command lines.

Pure planning from the job file, no running: ``launcher/pipeline_stages.py`` runs the plan
locally and ``launcher/slurm/pipeline_dag.py`` turns it into SLURM jobs. See the runner's
docstring for the stage list.
"""


from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

from videofeat.launcher.pipeline_job import EXTRACT_NOT_OUTPUT, FINETUNE_NOT_OUTPUT, JobFile, JobFileError, SetSpec
from videofeat.manifests import fsutil
from videofeat.manifests.fingerprint import compute_fingerprint

log = logging.getLogger("videofeat.pipeline")

JOB_RECORD = "job.json"
UNLABELLED_SUBSET = "test"  # annotations.json subset of videos without labels (the test sets)


@dataclass(frozen=True)
class Stage:
    id: str
    kind: str
    inputs: tuple[tuple[str, Any], ...]   # job-file values (JSON-able) that change the output
    upstream: tuple[str, ...]
    subject: str = ""                     # dataset, set or export name
    view: str = ""


@dataclass(frozen=True)
class Work:
    """Paths inside WORK."""

    root: str

    def p(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def dataset_manifest(self, name: str) -> str:
        return self.p("manifests", f"{name}.parquet")

    @property
    def manifest(self) -> str:
        return self.p("manifest.parquet")

    @property
    def labels(self) -> str:
        return self.p("labels.parquet")

    def finetune(self, set_name: str, view: str) -> str:
        return self.p("finetune", set_name, view)

    @property
    def features(self) -> str:
        return self.p("features")

    def run_dir(self, set_name: str) -> str:
        return self.p("features", set_name)

    @property
    def sets_file(self) -> str:
        return self.p("sets.toml")

    def record(self, stage_id: str) -> str:
        return self.p("stages", f"{stage_id}.json")

    def done_marker(self, stage_id: str) -> str:
        return self.p("stages", f"{stage_id}.done")

    def plot(self, set_name: str, view: str) -> str:
        return self.p("plots", set_name, f"{view}.png")


def _file_id(path: Optional[str]) -> Any:
    """A checkpoint named by path and size: hashing gigabytes on every run would cost minutes."""
    if path is None:
        return None
    return {"path": path, "size": os.path.getsize(path) if os.path.exists(path) else None}


def _csv_digest(folder: str) -> str:
    """The annotation CSVs' content: an edited CSV changes the labels."""
    digest = hashlib.sha256()
    for base, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            if name.lower().endswith(".csv"):
                path = os.path.join(base, name)
                digest.update(os.path.relpath(path, folder).encode() + b"\0")
                with open(path, "rb") as handle:
                    digest.update(hashlib.sha256(handle.read()).digest())
    return digest.hexdigest()[:20]


def finetune_values(job: JobFile, fset: SetSpec) -> dict[str, Any]:
    """The set's fine-tuning flags over the job's [finetune] defaults (the recipe is under both)."""
    return {**dict(job.finetune), **dict(fset.finetune)}


def plot_available() -> bool:
    """Whether ``videofeat plot`` is installed with its optional matplotlib: the plot stages exist only then."""
    import importlib.util

    from videofeat.launcher.cli import _available_commands

    return "plot" in _available_commands() and importlib.util.find_spec("matplotlib") is not None


def plan_stages(job: JobFile) -> list[Stage]:
    """Every stage of ``job`` in the order they run."""
    stages: list[Stage] = []
    for ds in job.datasets:
        manifest = dict(job.manifest)
        stages.append(Stage(f"manifest.{ds.name}", "manifest-dataset", tuple(sorted({
            "root": ds.root, "layout": ds.layout, "pattern": ds.pattern, "regex": ds.regex, "views": list(job.views),
            "min_frames": manifest.get("min_frames")}.items())), (), subject=ds.name))
    manifest = dict(job.manifest)
    stages.append(Stage("manifest", "manifest", tuple(sorted(
        {k: manifest.get(k) for k in ("num_shards", "shard_frames", "split_long_videos")}.items())),
        tuple(f"manifest.{d.name}" for d in job.datasets)))
    stages.append(Stage("labels", "labels", tuple(sorted({
        "annotations": job.train.annotations, "csv_digest": _csv_digest(job.train.annotations),
        "val_users": list(job.split.val_users), "val_fraction": job.split.val_fraction,
        "split_seed": job.split.seed}.items())), ("manifest.train",)))
    tuned: dict[str, list[str]] = {}
    for fset in job.sets:
        if not fset.fine_tuned_here:
            continue
        flags = {k: v for k, v in finetune_values(job, fset).items() if k not in FINETUNE_NOT_OUTPUT}
        for view in job.views:
            sid = f"finetune.{fset.name}.{view}"
            tuned.setdefault(fset.name, []).append(sid)
            stages.append(Stage(sid, "finetune", tuple(sorted({
                "recipe": fset.recipe, "pretrained": _file_id(fset.pretrained), "view": view,
                "finetune": flags}.items())), ("labels", "manifest.train"), subject=fset.name, view=view))
    sets_inputs = []
    for fset in job.sets:
        sets_inputs.append({"name": fset.name, "preset": fset.preset, "model": fset.model,
                            "overrides": dict(fset.overrides),
                            "checkpoints": {v: _file_id(p) for v, p in fset.checkpoints} or "fine-tuned here"})
    extract = {k: v for k, v in job.extract if k not in EXTRACT_NOT_OUTPUT}
    stages.append(Stage("extract", "extract", tuple(sorted({"views": list(job.views), "sets": sets_inputs,
                                                            "options": extract}.items())),
                        ("manifest", *(sid for ids in tuned.values() for sid in ids))))
    for fset in job.sets:
        stages.append(Stage(f"reduce.{fset.name}", "reduce", (("set", fset.name),), ("extract",), subject=fset.name))
    for export in job.exports:
        stages.append(Stage(f"export.{export.name}", "export", tuple(sorted({
            "format": export.format, "sets": list(export.sets), "output": export.output, "prob_key": export.prob_key,
            "split_views": export.split_views, "unlabelled_subset": UNLABELLED_SUBSET}.items())),
            ("labels", *(f"reduce.{s}" for s in export.sets)), subject=export.name))
    if job.plots and plot_available():
        for fset in job.sets:
            stages.append(Stage(f"plot.{fset.name}", "plot", (("views", list(job.views)),),
                                ("labels", f"reduce.{fset.name}"), subject=fset.name))
    return stages


def fingerprints(stages: Sequence[Stage]) -> dict[str, str]:
    """Each stage's fingerprint: its inputs and its upstream stages' fingerprints (a chain)."""
    out: dict[str, str] = {}
    for stage in stages:
        out[stage.id] = compute_fingerprint({"inputs": dict(stage.inputs),
                                             "upstream": {u: out[u] for u in stage.upstream}})
    return out


def select(stages: Sequence[Stage], patterns: Iterable[str], flag: str) -> set[str]:
    """Stage ids named by ``patterns`` (an id, or a prefix ending at a dot: ``finetune``, ``finetune.vith``)."""
    chosen: set[str] = set()
    for pattern in patterns:
        hits = {s.id for s in stages if s.id == pattern or s.id.startswith(pattern + ".")}
        if not hits:
            raise ValueError(f"{flag} {pattern}: no such stage; stages are {', '.join(s.id for s in stages)}")
        chosen |= hits
    return chosen


def dependents(stages: Sequence[Stage], roots: set[str]) -> set[str]:
    """``roots`` and every stage that reads one of them, directly or not."""
    out = set(roots)
    for stage in stages:  # stages are in order: upstream before downstream
        if any(u in out for u in stage.upstream):
            out.add(stage.id)
    return out


def check_views_in_data(job: JobFile) -> None:
    """Every view of the job has videos in the training set (before any probing starts)."""
    from videofeat.manifests.discover import discover

    found = discover(job.train.root, job.train.layout, job.train.pattern, job.train.regex)
    present = sorted({v.view for v in found.videos})
    missing = [v for v in job.views if v not in present]
    if missing:
        raise JobFileError(f"{job.path}: views: {', '.join(missing)} has no videos in the training set "
                           f"{job.train.root} (it holds {', '.join(present) or 'no videos'}); remove the view "
                           "or fix train.root / train.layout")


def validation_videos(labels: str, views: Sequence[str]) -> dict[str, str]:
    """The first labelled validation video of each view (the training split when none validates)."""
    from videofeat.manifests.labels import read_labels

    rows = read_labels(labels).select(["video_id", "view", "split"]).to_pylist()
    out = {}
    for view in views:
        for split in ("validation", "training"):
            ids = sorted({r["video_id"] for r in rows if r["view"] == view and r["split"] == split})
            if ids:
                out[view] = ids[0]
                break
    return out


# ----- the command lines each stage runs (also what the SLURM jobs run) ------------------------
def manifest_argv(job: JobFile, ds, output: str) -> list[str]:
    m = dict(job.manifest)
    argv = [ds.root, "-o", output, "--layout", ds.layout, "--views", ",".join(job.views)]
    if ds.pattern:
        argv += ["--pattern", ds.pattern]
    if ds.regex:
        argv += ["--regex", ds.regex]
    if m.get("min_frames"):
        argv += ["--min-frames", str(m["min_frames"])]
    if m.get("probe_procs"):
        argv += ["--probe-procs", str(m["probe_procs"])]
    return argv


def labels_argv(job: JobFile, work: Work) -> list[str]:
    argv = [job.train.annotations, "--manifest", work.dataset_manifest("train"), "-o", work.labels]
    if job.split.val_users:
        argv += ["--val-users", ",".join(job.split.val_users)]
    else:
        argv += ["--val-fraction", str(job.split.val_fraction), "--seed", str(job.split.seed)]
    return argv


def _flag_words(values: Mapping[str, Any]) -> list[str]:
    words: list[str] = []
    for key, value in sorted(values.items()):
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            words += [flag, str(value)]
    return words


def finetune_argv(job: JobFile, fset: SetSpec, view: str, work: Work) -> list[str]:
    argv = ["--recipe", str(fset.recipe), "--labels", work.labels, "--manifest", work.dataset_manifest("train"),
            "--view", view, "-o", work.finetune(fset.name, view)]
    if fset.pretrained:
        argv += ["--checkpoint", fset.pretrained]
    return argv + _flag_words(finetune_values(job, fset))


def set_checkpoints(job: JobFile, fset: SetSpec, work: Work) -> dict[str, str]:
    if fset.checkpoints:
        return dict(fset.checkpoints)
    return {view: os.path.join(work.finetune(fset.name, view), "checkpoint-last.pt") for view in job.views}


def write_sets_file(job: JobFile, work: Work) -> str:
    """``WORK/sets.toml`` for ``videofeat extract --sets``: each set with its per-view checkpoints."""
    lines = ["# written by videofeat pipeline from the job file; one [[set]] per feature set"]
    for fset in job.sets:
        ckpts = ", ".join(f"{view} = {json.dumps(path)}" for view, path in set_checkpoints(job, fset, work).items())
        lines += ["", "[[set]]", f"name = {json.dumps(fset.name)}", f"preset = {json.dumps(fset.preset)}",
                  f"model = {json.dumps(fset.model)}", f"checkpoint = {{ {ckpts} }}"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in fset.overrides]
    os.makedirs(work.root, exist_ok=True)
    fs, inner = fsutil.filesystem(work.sets_file)
    fsutil.write_bytes_atomic(fs, inner, ("\n".join(lines) + "\n").encode())
    return work.sets_file


def extract_argv(job: JobFile, work: Work) -> list[str]:
    return [work.manifest, "-o", work.features, "--sets", work.sets_file, "--views", ",".join(job.views),
            "--no-progress", *_flag_words(dict(job.extract))]
