"""What a run directory knows about its SLURM submissions: which array task ran each shard.

``videofeat slurm`` keeps one record per submission in ``RUN_DIR/slurm/<plan_id>.json`` (plan,
array job ids and the plan index each array starts at, the reducer's job id, the log folder,
the worker's arguments and the sbatch options), beside the exact sbatch text it submitted
(``RUN_DIR/slurm/<plan_id>.*.sbatch``). Array task logs are ``LOG_DIR/<array job>_<task>.out``.

Also the check the extraction array script runs after its worker exits::

    python -m videofeat.launcher.slurm.records interrupted RUN_DIR --plan PLAN_ID --task-index I

exits 0 when a shard of that task holds an ``interrupted`` failure record written by the worker
on a signal (so requeueing the task is right), 1 otherwise. Imports neither torch nor timm.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

from videofeat.manifests import fsutil
from videofeat.manifests.ledger import DONE, RunDir, ShardRecord

SUBMISSIONS = "slurm"


def submission_path(run_dir: RunDir, plan_id: str) -> str:
    return run_dir.path(SUBMISSIONS, f"{plan_id}.json")


def script_path(run_dir: RunDir, plan_id: str, name: str) -> str:
    """Where the exact sbatch text of one submitted job is kept, e.g. ``<plan>.array0.sbatch``."""
    return run_dir.path(SUBMISSIONS, f"{plan_id}.{name}.sbatch")


def write_submission(run_dir: RunDir, record: Mapping) -> str:
    path = submission_path(run_dir, record["plan_id"])
    fsutil.write_json_atomic(run_dir.fs, path, dict(record))
    return path


def read_submissions(run_dir: RunDir) -> list[dict]:
    """Every submission record, oldest first (by ``created_ns``: plan ids of kinds sort apart)."""
    try:
        names = run_dir.fs.ls(run_dir.path(SUBMISSIONS), detail=False)
    except FileNotFoundError:
        return []
    records = [fsutil.read_json(run_dir.fs, n) for n in names if n.endswith(".json")]
    return sorted(records, key=lambda r: (r.get("created_ns", 0), r.get("plan_id", "")))


def latest_submission(run_dir: RunDir) -> Optional[dict]:
    submissions = read_submissions(run_dir)
    return submissions[-1] if submissions else None


@dataclass(frozen=True)
class SlurmTask:
    """The array task that ran (or is planned to run) a shard, and its output file."""

    plan_id: str
    array_job_id: str
    array_task_id: int
    log_path: Optional[str]
    ran: bool  # True when the shard's own stats or failure record name this task

    @property
    def name(self) -> str:
        return f"{self.array_job_id}_{self.array_task_id}"

    def describe(self) -> str:
        what = "array task" if self.ran else "planned for array task"
        return f"{what} {self.name} (plan {self.plan_id})" + (f", log {self.log_path}" if self.log_path else "")


def _log_path(log_dir: Optional[str], array_job_id: str, task_id: int) -> Optional[str]:
    return f"{log_dir.rstrip('/')}/{array_job_id}_{task_id}.out" if log_dir else None


def planned_tasks(run_dir: RunDir, submissions: Optional[Sequence[dict]] = None) -> dict[int, SlurmTask]:
    """Shard id -> the array task of the newest submission whose plan lists it."""
    out: dict[int, SlurmTask] = {}
    for sub in read_submissions(run_dir) if submissions is None else submissions:
        plan = run_dir.read_plan(sub["plan_id"])
        for array in sub.get("arrays", []):
            for task_id in range(array["count"]):
                for shard in plan["tasks"][array["offset"] + task_id]:
                    out[int(shard)] = SlurmTask(sub["plan_id"], str(array["job_id"]), task_id,
                                                _log_path(sub.get("log_dir"), str(array["job_id"]), task_id), False)
    return out


def shard_tasks(run_dir: RunDir, records: Iterable[ShardRecord]) -> dict[int, SlurmTask]:
    """Shard id -> its array task: the one its stats / failure record name, else the planned one.

    ``videofeat status`` calls this to say which array task ran each shard and where its log is.
    """
    submissions = read_submissions(run_dir)
    planned = planned_tasks(run_dir, submissions)
    arrays = {str(a["job_id"]): (s["plan_id"], s.get("log_dir")) for s in submissions for a in s.get("arrays", [])}
    out = dict(planned)
    for record in records:
        info = record.stats if record.state == DONE else record.last_failure
        slurm = (info or {}).get("slurm") or {}
        array_job = slurm.get("slurm_array_job_id")
        task = slurm.get("slurm_array_task_id")
        if array_job is None or task is None:
            continue
        plan_id, log_dir = arrays.get(str(array_job), ("?", None))
        out[record.shard_id] = SlurmTask(plan_id, str(array_job), int(task),
                                         _log_path(log_dir, str(array_job), int(task)), True)
    return out


def interrupted_shards(run_dir: RunDir, plan_id: str, task_index: int,
                       plan_dir: Optional[RunDir] = None) -> list[int]:
    """Shards of one plan entry whose newest attempt ended in an ``interrupted`` record.

    Only records the worker wrote itself count: a task killed outright (SIGKILL, node lost) left
    none, and is left for ``videofeat slurm rerun`` rather than requeued blindly. ``plan_dir``:
    where the plan is (the root of a multi-set launch), when not in ``run_dir``.
    """
    plan = (plan_dir or run_dir).read_plan(plan_id)
    tasks = plan["tasks"]
    if not 0 <= task_index < len(tasks):
        raise IndexError(f"plan {plan_id} has {len(tasks)} entries; --task-index {task_index} is outside it")
    out = []
    for shard in tasks[task_index]:
        if run_dir.is_done(shard):
            continue
        attempts = run_dir.attempts(shard)
        if not attempts:
            continue
        record = fsutil.optional_read_json(run_dir.fs, run_dir.failure_path(shard, attempts[-1]))
        if record is not None and record.get("kind") == "interrupted":
            out.append(int(shard))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m videofeat.launcher.slurm.records",
                                     description="SLURM facts of a videofeat run directory")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("interrupted", help="exit 0 when a shard of this plan entry was interrupted by a signal")
    check.add_argument("run_dir")
    check.add_argument("--plan", required=True)
    check.add_argument("--task-index", type=int, required=True)
    where = sub.add_parser("tasks", help="print the array task and log of every planned shard")
    where.add_argument("run_dir")
    args = parser.parse_args(argv)
    run_dir = RunDir(args.run_dir)
    if args.command == "interrupted":
        from videofeat.manifests.set_root import set_dirs

        # A multi-set task was interrupted when any of its sets was.
        members = [RunDir(url) for url in set_dirs(run_dir)]
        shards = sorted({s for member in members or [run_dir]
                         for s in interrupted_shards(member, args.plan, args.task_index, run_dir)})
        if shards:
            print(f"interrupted shards: {' '.join(f'{s:05d}' for s in shards)}")
        return 0 if shards else 1
    planned = planned_tasks(run_dir)
    records = run_dir.records(sorted(planned))
    tasks = shard_tasks(run_dir, records)
    for record in records:
        print(f"{record.shard_id:05d} {record.state:<11} {tasks[record.shard_id].describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
