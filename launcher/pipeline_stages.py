"""The small runner that runs and resumes the fixed stages of ``videofeat pipeline`` (planned in ``pipeline_plan.py``).

Stages, in order (every id is also what ``--redo`` and ``--only`` take; a prefix such as
``finetune`` names every fine-tune):

    manifest.<dataset>      videofeat manifest ROOT            WORK/manifests/<dataset>.parquet
    manifest                videofeat manifest --merge ...     WORK/manifest.parquet (every dataset)
    labels                  videofeat labels CSV_DIR           WORK/labels.parquet
    finetune.<set>.<view>   videofeat finetune                 WORK/finetune/<set>/<view>/
    extract                 videofeat extract --sets           WORK/features/<set>/ (one decode for all)
    reduce.<set>            videofeat reduce                   WORK/features/<set>/dataset/
    export.<name>           videofeat export, once per set     <output>/<set>/
    plot.<set>              videofeat plot, one per view       WORK/plots/<set>/<view>.png

Each stage records in ``WORK/stages/<id>.json``, when it starts, what it is computed from: the
job-file values that change its output and the fingerprints of the stages it reads. Whether it
is complete is read from its outputs (a manifest file, a fine-tune's COMPLETED marker, every
shard's done marker, a complete dataset summary, an export's done marker), so work done by
SLURM jobs counts the same as work done here. Run again, the pipeline skips complete stages and
resumes incomplete ones (fine-tuning from its checkpoint, extraction from its done shards); a
job file that changes what a started stage computes is refused naming the keys, unless
``--redo`` names the stage (it and every stage that depends on it are recomputed).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Optional, Sequence

from videofeat.launcher.pipeline_job import JobFile
from videofeat.manifests import fsutil
from videofeat.manifests.fingerprint import describe_difference

from videofeat.launcher.pipeline_plan import (JOB_RECORD, Stage, UNLABELLED_SUBSET, Work, check_views_in_data,
                                              dependents, extract_argv, finetune_argv, fingerprints, labels_argv,
                                              manifest_argv, plan_stages, select, validation_videos, write_sets_file)
log = logging.getLogger("videofeat.pipeline")


class StageRefused(ValueError):
    """The job file changed what a started stage computes; the message names the keys and the fix."""


class StageIncomplete(RuntimeError):
    """A stage ran but did not finish (a signal, a failure); the same command again continues it."""


class StopRequested(BaseException):
    """SIGTERM / SIGUSR2 outside a loop that handles them: unwinds, so children are cleaned up."""


def _raise_stop(signum: int, _frame: Any) -> None:
    raise StopRequested(signal.Signals(signum).name)


class Pipeline:
    """The stages of one job in one WORK folder."""

    def __init__(self, job: JobFile, work: str, nproc_per_node: Optional[int] = None,
                 out: Callable[[str], None] = print) -> None:
        self.job, self.work, self.nproc, self.say = job, Work(os.path.abspath(work)), nproc_per_node, out
        self.stages = plan_stages(job)
        self.by_id = {s.id: s for s in self.stages}
        self.fp = fingerprints(self.stages)

    # ----- records --------------------------------------------------------------------------
    def record(self, stage_id: str) -> Optional[dict]:
        path = self.work.record(stage_id)
        if not os.path.exists(path):
            return None
        with open(path) as handle:
            return json.load(handle)

    def write_record(self, stage: Stage, **extra: Any) -> None:
        body = {"stage": stage.id, "fingerprint": self.fp[stage.id], "inputs": dict(stage.inputs),
                "upstream": {u: self.fp[u] for u in stage.upstream}, "started": time.time(), **extra}
        os.makedirs(os.path.dirname(self.work.record(stage.id)), exist_ok=True)
        fs, inner = fsutil.filesystem(self.work.record(stage.id))
        fsutil.write_json_atomic(fs, inner, body)

    def save_job(self) -> None:
        """The job file beside the work, and where it came from (``slurm rerun`` and ``status`` read it)."""
        os.makedirs(self.work.root, exist_ok=True)
        fs, inner = fsutil.filesystem(self.work.p(JOB_RECORD))
        fsutil.write_json_atomic(fs, inner, {"source": self.job.path, "base_dir": os.path.dirname(self.job.path)})
        shutil.copyfile(self.job.path, self.work.p("job.toml"))

    def changed(self) -> dict[str, list[str]]:
        """Started stages whose fingerprint differs now: stage id -> what differs."""
        out: dict[str, list[str]] = {}
        for stage in self.stages:
            rec = self.record(stage.id)
            if rec is None or rec.get("fingerprint") == self.fp[stage.id]:
                continue
            own = [line.replace("run directory has", "recorded").replace("this launch has", "job file now")
                   for line in describe_difference(rec.get("inputs", {}), dict(stage.inputs))]
            ups = [u for u in stage.upstream if rec.get("upstream", {}).get(u) != self.fp[u]]
            if ups:
                own.append(f"computed from {', '.join(ups)}, which change{'s' if len(ups) == 1 else ''}")
            out[stage.id] = own
        return out

    def refuse_changes(self, redo: set[str]) -> None:
        changed = {k: v for k, v in self.changed().items() if k not in redo}
        if not changed:
            return
        roots = [sid for sid, why in changed.items() if not all(w.startswith("computed from") for w in why)]
        lines = [f"{self.work.root}: the job file {self.job.path} changes what these stages compute:"]
        for sid, why in changed.items():
            lines.append(f"  {sid}: " + "; ".join(why))
        lines.append(f"recompute with --redo {','.join(roots or list(changed))} (each and every stage that depends "
                     "on it), undo the change, or use another -o")
        raise StageRefused("\n".join(lines))

    # ----- completion -----------------------------------------------------------------------
    def shard_ids(self) -> list[int]:
        from videofeat.launcher.slurm.arrays import shard_frames

        return sorted(shard_frames(self.work.manifest, list(self.job.views)))

    def extraction_progress(self) -> dict[str, tuple[int, int]]:
        """(done shards, shards) per set."""
        from videofeat.manifests.ledger import RunDir

        if not os.path.exists(self.work.manifest):
            return {}
        shards = self.shard_ids()
        out = {}
        for fset in self.job.sets:
            run = RunDir(self.work.run_dir(fset.name))
            done = 0 if run.load_run() is None else sum(run.is_done(s) for s in shards)
            out[fset.name] = (done, len(shards))
        return out

    def complete(self, stage: Stage) -> bool:
        w = self.work
        if stage.kind == "manifest-dataset":
            return os.path.exists(w.dataset_manifest(stage.subject))
        if stage.kind == "manifest":
            return os.path.exists(w.manifest)
        if stage.kind == "labels":
            return os.path.exists(w.labels)
        if stage.kind == "finetune":
            return os.path.exists(os.path.join(w.finetune(stage.subject, stage.view), "COMPLETED"))
        if stage.kind == "extract":
            progress = self.extraction_progress()
            return bool(progress) and all(done == total for done, total in progress.values())
        if stage.kind == "reduce":
            path = os.path.join(w.run_dir(stage.subject), "dataset", "summary.json")
            if not os.path.exists(path):
                return False
            with open(path) as handle:
                return bool(json.load(handle).get("complete"))
        return os.path.exists(w.done_marker(stage.id))

    # ----- removing outputs for --redo ------------------------------------------------------
    def clear(self, stage: Stage) -> None:
        w = self.work
        paths = {"manifest-dataset": [w.dataset_manifest(stage.subject)], "manifest": [w.manifest],
                 "labels": [w.labels], "finetune": [w.finetune(stage.subject, stage.view)],
                 "extract": [w.features, w.sets_file],
                 "reduce": [os.path.join(w.run_dir(stage.subject), "dataset")],
                 "plot": [w.p("plots", stage.subject)]}.get(stage.kind, [])
        # An export writes into the user's folder: its files are replaced, never deleted.
        for path in [*paths, w.done_marker(stage.id), w.record(stage.id)]:
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)

    # ----- running --------------------------------------------------------------------------
    def prepare(self, redo: Sequence[str] = (), only: Sequence[str] = ()) -> tuple[set[str], Optional[set[str]]]:
        """Check everything that can be checked before work starts; returns (redo ids, only ids)."""
        redo_ids = dependents(self.stages, select(self.stages, redo, "--redo")) if redo else set()
        only_ids = select(self.stages, only, "--only") if only else None
        check_views_in_data(self.job)
        self.refuse_changes(redo_ids)
        return redo_ids, only_ids

    def run(self, redo: Sequence[str] = (), only: Sequence[str] = ()) -> int:
        redo_ids, only_ids = self.prepare(redo, only)
        self.save_job()
        for stage in self.stages:
            if stage.id in redo_ids:
                self.clear(stage)
        # Between and inside stages a stop signal unwinds (probe processes are joined, temporary files
        # left unnamed); fine-tuning and extraction install their own handlers and stop at a step.
        previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGUSR2)}
        try:
            return self._run_stages(only_ids)
        except StopRequested as stop:
            raise StageIncomplete(f"stopped by {stop} in stage {self.current}; run the same command again to "
                                  "continue (completed work is kept)") from None
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _run_stages(self, only_ids: Optional[set[str]]) -> int:
        began = time.monotonic()
        self.current = "(between stages)"
        for stage in self.stages:
            if only_ids is not None and stage.id not in only_ids:
                continue
            if self.complete(stage) and self.record(stage.id) is not None:
                self.say(f"== {stage.id}: complete, skipped")
                continue
            waiting = [u for u in stage.upstream if not self.complete(self.by_id[u])]
            if waiting:
                raise StageIncomplete(f"{stage.id} needs {', '.join(waiting)}, which is not complete; run "
                                      f"`videofeat pipeline {self.job.path} -o {self.work.root}` without --only")
            self.say(f"== {stage.id}")
            self.current = stage.id
            self.write_record(stage)
            started = time.monotonic()
            code = self.execute(stage)
            if not self.complete(stage):
                raise StageIncomplete(
                    f"stage {stage.id} stopped before it was complete (exit status {code}); run the same command "
                    f"again to continue it (completed work is kept), or see `videofeat status {self.work.root}`")
            self.say(f"   {stage.id} done in {time.monotonic() - started:.1f} s")
        if only_ids is None:
            self.say(f"pipeline complete in {time.monotonic() - began:.1f} s: {self.work.root}")
        return 0

    def execute(self, stage: Stage) -> int:
        handler = getattr(self, "_run_" + stage.kind.replace("-", "_"))
        return int(handler(stage) or 0)

    def command(self, name: str, argv: Sequence[str]) -> int:
        """Run one videofeat command in this process, through the one bad-input handler."""
        from videofeat.launcher.cli import parse_command, run_command

        args, module = parse_command(name, list(argv))
        return run_command(name, module, args)

    def torchrun(self, module: str, argv: Sequence[str]) -> int:
        """``module`` under torchrun with --nproc-per-node ranks; a signal to this process reaches the ranks."""
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={self.nproc}",
               "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2", "-m", module, *argv]
        proc = subprocess.Popen(cmd)
        forwarded = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)
        previous = {s: signal.signal(s, lambda signum, _frame: proc.send_signal(signum)) for s in forwarded}
        try:
            return proc.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _run_manifest_dataset(self, stage: Stage) -> int:
        ds = next(d for d in self.job.datasets if d.name == stage.subject)
        return self.command("manifest", manifest_argv(self.job, ds, self.work.dataset_manifest(ds.name)))

    def _run_manifest(self, stage: Stage) -> int:
        m = dict(self.job.manifest)
        argv = ["--merge", *(self.work.dataset_manifest(d.name) for d in self.job.datasets), "-o", self.work.manifest]
        if m.get("num_shards"):
            argv += ["--num-shards", str(m["num_shards"])]
        elif m.get("shard_frames"):
            argv += ["--shard-frames", str(m["shard_frames"])]
        if m.get("split_long_videos"):
            argv.append("--split-long-videos")
        return self.command("manifest", argv)

    def _run_labels(self, stage: Stage) -> int:
        return self.command("labels", labels_argv(self.job, self.work))

    def _run_finetune(self, stage: Stage) -> int:
        argv = finetune_argv(self.job, self.job.set(stage.subject), stage.view, self.work)
        if self.nproc:
            return self.torchrun("videofeat.launcher.finetune", argv)
        return self.command("finetune", argv)

    def _run_extract(self, stage: Stage) -> int:
        write_sets_file(self.job, self.work)
        argv = extract_argv(self.job, self.work)
        if self.nproc:
            return self.torchrun("videofeat.launcher.extract", argv)
        return self.command("extract", argv)

    def _run_reduce(self, stage: Stage) -> int:
        return self.command("reduce", [self.work.run_dir(stage.subject)])

    def _run_export(self, stage: Stage) -> int:
        export = next(e for e in self.job.exports if e.name == stage.subject)
        for set_name in export.sets:
            argv = [self.work.run_dir(set_name), "--format", export.format, "-o", os.path.join(export.output, set_name)]
            if export.format != "multiview":
                argv += ["--labels", self.work.labels, "--unlabeled-subset", UNLABELLED_SUBSET]
            if export.prob_key:
                argv += ["--prob-key", export.prob_key]
            if export.split_views:
                argv.append("--split-views")
            code = self.command("export", argv)
            if code:
                return code
        _touch(self.work.done_marker(stage.id))
        return 0

    def _run_plot(self, stage: Stage) -> int:
        """One timeline per (set, view): a validation video's per-window probabilities over its labels."""
        for view, video_id in validation_videos(self.work.labels, self.job.views).items():
            target = self.work.plot(stage.subject, view)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            code = self.command("plot", [self.work.run_dir(stage.subject), "--video", video_id, "--view", view,
                                         "--labels", self.work.labels, "-o", target])
            if code:
                return code
        _touch(self.work.done_marker(stage.id))
        return 0


def _touch(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fs, inner = fsutil.filesystem(path)
    fsutil.write_bytes_atomic(fs, inner, b"")
