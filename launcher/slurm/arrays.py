"""Extraction on SLURM: freeze a plan, render array + reducer scripts, submit, rerun failures.

One launch = one frozen plan in ``RUN_DIR/plans/<plan_id>.json`` (array index -> shard ids of
incomplete shards, ``shards_per_task`` per entry), one or more arrays (a plan longer than the
cluster's MaxArraySize is cut into several; task i of an array runs plan index offset + i), and
one reducer ``afterok`` on all of them. The exact sbatch text of every job and a submission
record (job ids, options, the worker's arguments) go to ``RUN_DIR/slurm/``; ``rerun`` reads
that record, so a rerun needs only the run directory. Imports neither torch nor timm.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

from videofeat.manifests import fsutil
from videofeat.manifests.ledger import RerunPolicy, RunDir

from videofeat.launcher.slurm import records as slurm_info

from videofeat.launcher.slurm import submit as slurm_submit
from videofeat.launcher.slurm.submit import ArrayChunk, SbatchOptions, quote

log = logging.getLogger("videofeat.slurm")

# A task whose estimated time passes this share of --time risks running into the limit.
TIME_MARGIN = 0.8
DEFAULT_GRACE_S = 120


@dataclass(frozen=True)
class ArrayLaunch:
    """How one extraction launch is cut into SLURM work; none of it enters the fingerprint."""

    run_dir: str
    manifest: str
    worker_args: tuple[str, ...]
    options: SbatchOptions = SbatchOptions()
    throttle: Optional[int] = None
    shards_per_task: int = 1
    ranks_per_task: int = 1
    max_requeues: int = 3
    grace_s: int = DEFAULT_GRACE_S
    log_dir: Optional[str] = None
    job_name: str = "videofeat"
    reduce_time: Optional[str] = None
    python: str = field(default_factory=lambda: sys.executable)
    chdir: str = field(default_factory=os.getcwd)
    sets: tuple[str, ...] = ()  # a multi-set launch: run_dir/<name> per set, one reducer each

    def __post_init__(self) -> None:
        object.__setattr__(self, "sets", tuple(self.sets))
        for name in ("shards_per_task", "ranks_per_task"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.throttle is not None and self.throttle < 1:
            raise ValueError(f"--throttle must be >= 1, got {self.throttle}")
        if self.max_requeues < 0:
            raise ValueError(f"--max-requeues must be >= 0, got {self.max_requeues}")
        if self.grace_s < 1:
            raise ValueError(f"--grace must be >= 1 second, got {self.grace_s}")
        if self.reduce_time is not None:
            slurm_submit.parse_time_limit(self.reduce_time, "--reduce-time")
        if self.log_dir is None:
            # Decided from the URL alone: building a remote filesystem here would need its credentials.
            local = self.run_dir[len("file://"):] if self.run_dir.startswith("file://") else self.run_dir
            if "://" in local:
                raise ValueError(f"--log-dir is required when the run directory ({self.run_dir}) is not a local "
                                 "path: SLURM writes task output to a filesystem the nodes share")
            object.__setattr__(self, "log_dir", os.path.join(os.path.abspath(local), "slurm", "logs"))

    def to_dict(self) -> dict:
        return {"run_dir": self.run_dir, "manifest": self.manifest, "worker_args": list(self.worker_args),
                "options": self.options.to_dict(), "throttle": self.throttle,
                "shards_per_task": self.shards_per_task, "ranks_per_task": self.ranks_per_task,
                "max_requeues": self.max_requeues, "grace_s": self.grace_s, "log_dir": self.log_dir,
                "job_name": self.job_name, "reduce_time": self.reduce_time, "python": self.python,
                "chdir": self.chdir, "sets": list(self.sets)}

    @classmethod
    def from_dict(cls, data: Mapping) -> "ArrayLaunch":
        body = dict(data)
        body["worker_args"] = tuple(body["worker_args"])
        body["options"] = SbatchOptions.from_dict(body["options"])
        body["sets"] = tuple(body.get("sets") or ())
        return cls(**body)

    def run_dirs(self) -> list[RunDir]:
        """The run directories this launch computes: the run's, or each set's."""
        return [RunDir(fsutil.join(self.run_dir, name)) for name in self.sets] or [RunDir(self.run_dir)]


# ----- planning -----------------------------------------------------------------------------
def shard_frames(manifest: str, views: Optional[Sequence[str]] = None) -> dict[int, int]:
    """Frames each shard decodes (the sum of its pieces), from the manifest."""
    from videofeat.manifests.manifest import read_manifest_rows

    frames: dict[int, int] = {}
    for row in read_manifest_rows(manifest):
        if row.shard_id is None or (views and row.view not in views):
            continue
        frames[row.shard_id] = frames.get(row.shard_id, 0) + row.piece_frames
    if not frames:
        raise ValueError(f"{manifest} has no ok videos" + (f" for --views {','.join(views)}" if views else ""))
    return frames


def pack_tasks(shards: Sequence[int], shards_per_task: int) -> list[list[int]]:
    """Consecutive shard ids, ``shards_per_task`` per array task (shard ids never depend on it)."""
    ordered = sorted(shards)
    return [ordered[i:i + shards_per_task] for i in range(0, len(ordered), shards_per_task)]


def new_plan_id(kind: str = "slurm") -> str:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"{kind}-{stamp}-{uuid.uuid4().hex[:6]}"


def measured_rate(run_dir: RunDir) -> Optional[float]:
    """Frames per second per rank over the run's completed shards, if any completed."""
    frames = seconds = 0.0
    for shard in run_dir.done_shards():
        stats = fsutil.optional_read_json(run_dir.fs, run_dir.stats_path(shard)) or {}
        frames += stats.get("frames_decoded") or 0
        seconds += stats.get("seconds") or 0
    return frames / seconds if frames and seconds else None


@dataclass(frozen=True)
class TimeCheck:
    """Estimated seconds of each plan entry against the time limit."""

    rate: Optional[float]
    rate_source: str
    limit_s: Optional[int]
    estimates: tuple[float, ...]

    @property
    def too_long(self) -> list[int]:
        if self.limit_s is None or self.rate is None:
            return []
        return [i for i, s in enumerate(self.estimates) if s > TIME_MARGIN * self.limit_s]

    def message(self, tasks: Sequence[Sequence[int]]) -> str:
        worst = max(range(len(self.estimates)), key=lambda i: self.estimates[i])
        return (f"{len(self.too_long)} of {len(tasks)} array tasks are estimated to need more than "
                f"{TIME_MARGIN:.0%} of --time {self.limit_s} s (at {self.rate:.1f} frames/s per rank, "
                f"{self.rate_source}); the longest, index {worst} (shards {tasks[worst]}), needs "
                f"~{self.estimates[worst]:.0f} s. Raise --time, lower --shards-per-task, or build the manifest "
                "with smaller shards; tasks that hit the limit are interrupted and requeued, and a shard "
                "that never fits never finishes.")


def check_time(tasks: Sequence[Sequence[int]], frames: Mapping[int, int], launch: ArrayLaunch,
               rate: Optional[float], rate_source: str) -> TimeCheck:
    estimates = tuple((sum(frames.get(s, 0) for s in task) / (rate * launch.ranks_per_task)) if rate else 0.0
                      for task in tasks)
    return TimeCheck(rate, rate_source, launch.options.time_seconds, estimates)


# ----- scripts ------------------------------------------------------------------------------
def worker_command(launch: ArrayLaunch) -> str:
    """The extraction command one array task runs (before ``--plan --task-index``)."""
    args = " ".join(quote(a) for a in launch.worker_args)
    if launch.ranks_per_task == 1:
        return f"{quote(launch.python)} -m videofeat.launcher.cli extract {args}"
    # N local ranks share the task's shards; torchrun forwards USR2 to them.
    return (f"{quote(launch.python)} -m torch.distributed.run --standalone --nproc-per-node={launch.ranks_per_task} "
            "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2 "
            f"--shutdown-timeout={launch.grace_s} -m videofeat.launcher.extract {args}")


def render_array(launch: ArrayLaunch, run_dir: RunDir, plan_id: str, chunk: ArrayChunk, number: int,
                 total: int, after: Sequence[str] = ()) -> str:
    """One array's script; ``after``: jobs that must succeed first (a pipeline's fine-tunes)."""
    options = launch.options
    srun = f"--cpus-per-task={options.cpus_per_task} " if options.cpus_per_task else ""
    waits = [f"--dependency=afterok:{':'.join(after)}", "--kill-on-invalid-dep=yes"] if after else []
    return slurm_submit.render("extract_array.sbatch", {
        "array_number": number + 1, "array_count": total, "plan_id": plan_id,
        "plan_path": run_dir.plan_path(plan_id), "index_offset": chunk.offset,
        "job_name": launch.job_name, "array": slurm_submit.array_spec(chunk.count, launch.throttle),
        "log_dir": launch.log_dir, "grace": launch.grace_s,
        "directives": slurm_submit.directive_block([f"--chdir={launch.chdir}", *waits, *options.directives()]),
        "srun_options": srun, "launch": worker_command(launch), "max_requeues": launch.max_requeues,
        "python": quote(launch.python), "run_dir": quote(launch.run_dir)})


def render_reducer(launch: ArrayLaunch, plan_id: str, array_job_ids: Sequence[str],
                   set_name: Optional[str] = None) -> str:
    """The reducer of the run, or of one set (``set_name``) of a multi-set launch."""
    lines = [f"--chdir={launch.chdir}", *launch.options.directives(resources=False)]
    if launch.reduce_time:
        lines.append(f"--time={launch.reduce_time}")
    run_dir = fsutil.join(launch.run_dir, set_name) if set_name else launch.run_dir
    return slurm_submit.render("reduce.sbatch", {
        "plan_id": plan_id, "job_name": f"{launch.job_name}-reduce" + (f"-{set_name}" if set_name else ""),
        "log_dir": launch.log_dir, "dependency": ":".join(array_job_ids),
        "directives": slurm_submit.directive_block(lines), "python": quote(launch.python),
        "run_dir": quote(run_dir)})


# ----- submission ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Submitted:
    plan_id: str
    array_job_ids: tuple[str, ...]
    reducer_job_id: Optional[str]
    tasks: int
    set_reducer_job_ids: tuple[str, ...] = ()  # a multi-set launch: one reducer per set


def submit_plan(launch: ArrayLaunch, tasks: Sequence[Sequence[int]], kind: str, dry_run: bool = False,
                max_array: Optional[int] = None, previous: Optional[str] = None,
                out=None, after: Sequence[str] = ()) -> Optional[Submitted]:
    """Freeze ``tasks`` as a plan, submit its arrays and the reducer; ``dry_run`` prints the scripts."""
    out = out or sys.stdout
    run_dir = RunDir(launch.run_dir)
    plan_id = new_plan_id(kind)
    if max_array is None:
        try:
            max_array = slurm_submit.max_array_size()
        except slurm_submit.SlurmError as error:
            if not dry_run:
                raise
            log.info("%s; a dry run assumes MaxArraySize=%d", error, slurm_submit.DEFAULT_MAX_ARRAY_SIZE)
            max_array = slurm_submit.DEFAULT_MAX_ARRAY_SIZE
    chunks = slurm_submit.split_arrays(len(tasks), max_array)
    if dry_run:
        for number, chunk in enumerate(chunks):
            print(f"# ---- array {number + 1} of {len(chunks)} (plan indices {chunk.offset}.."
                  f"{chunk.offset + chunk.count - 1}) ----", file=out)
            print(render_array(launch, run_dir, plan_id, chunk, number, len(chunks), after), file=out)
        for name in launch.sets or (None,):
            print("# ---- reducer" + (f" of set {name}" if name else "") + " ----", file=out)
            print(render_reducer(launch, plan_id, [f"<array {i + 1} job id>" for i in range(len(chunks))], name),
                  file=out)
        return None
    run_dir.fs.makedirs(run_dir.path(slurm_info.SUBMISSIONS), exist_ok=True)
    os.makedirs(launch.log_dir, exist_ok=True)  # SLURM does not create output folders
    run_dir.write_plan(plan_id, tasks, {"kind": kind, "shards_per_task": launch.shards_per_task,
                                        "manifest": launch.manifest, "previous": previous})
    record = {"plan_id": plan_id, "kind": kind, "created": slurm_info_now(), "created_ns": time.time_ns(),
              "previous": previous,
              "launch": launch.to_dict(), "log_dir": launch.log_dir, "arrays": [], "reducer": None}
    array_ids = []
    try:
        for number, chunk in enumerate(chunks):
            text = render_array(launch, run_dir, plan_id, chunk, number, len(chunks), after)
            name = f"array{number}"
            fsutil.write_bytes_atomic(run_dir.fs, slurm_info.script_path(run_dir, plan_id, name), text.encode())
            job_id = slurm_submit.submit(text)
            array_ids.append(job_id)
            record["arrays"].append({"job_id": job_id, "offset": chunk.offset, "count": chunk.count,
                                     "script": slurm_info.script_path(run_dir, plan_id, name)})
        reducers = []
        for name in launch.sets or (None,):
            text = render_reducer(launch, plan_id, array_ids, name)
            script = slurm_info.script_path(run_dir, plan_id, f"reduce-{name}" if name else "reduce")
            fsutil.write_bytes_atomic(run_dir.fs, script, text.encode())
            reducers.append({"job_id": slurm_submit.submit(text), "script": script, "set": name})
            if name:
                record.setdefault("set_reducers", []).append(reducers[-1])
        record["reducer"] = reducers[0]
        reducer = reducers[0]["job_id"]
    finally:
        # Written even when a later sbatch failed, so status and rerun see what did get submitted.
        slurm_info.write_submission(run_dir, record)
    return Submitted(plan_id, tuple(array_ids), reducer, len(tasks),
                     tuple(r["job_id"] for r in record.get("set_reducers", [])))


def slurm_info_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def active_jobs(submissions: Sequence[Mapping]) -> tuple[list[str], list[str]]:
    """(array task ids still queued or running, reducer job ids still pending) of earlier submissions."""
    arrays = {str(a["job_id"]) for s in submissions for a in s.get("arrays", [])}
    reducers = {str(s["reducer"]["job_id"]) for s in submissions if s.get("reducer")}
    reducers |= {str(r["job_id"]) for s in submissions for r in s.get("set_reducers", [])}
    if not arrays and not reducers:
        return [], []
    queued = [j for j in slurm_submit.queue(sorted(arrays | reducers)) if j.active]
    busy = sorted({f"{j.array_job_id}_{j.array_task}" if j.array_job_id in arrays else j.job_id
                   for j in queued if j.array_job_id in arrays or (j.job_id in reducers and j.state != "PENDING")})
    stale = sorted({j.job_id for j in queued if j.job_id in reducers and j.state == "PENDING"})
    return busy, stale


def rerun_tasks(launch: ArrayLaunch, run_dir: RunDir, shards: Sequence[int], rerun_failed: bool,
                max_attempts: int) -> list[list[int]]:
    """Plan entries for the shards a rerun recomputes: failed, interrupted or missing ones (of any set)."""
    policy = RerunPolicy(rerun_failed=rerun_failed, overwrite=False, max_attempts=max_attempts)
    return pack_tasks(incomplete_shards(launch, run_dir, shards, policy), launch.shards_per_task)


def incomplete_shards(launch: ArrayLaunch, run_dir: RunDir, shards: Sequence[int], policy: RerunPolicy) -> list[int]:
    """Shards ``run_dir`` (or, for a multi-set launch, any of its sets) must compute; a task
    computes each for the sets that miss it."""
    runs = launch.run_dirs() if launch.sets else [run_dir]
    return sorted(set().union(*(run.plan_incomplete(shards, policy) for run in runs)))
