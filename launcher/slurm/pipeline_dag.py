"""``videofeat slurm pipeline JOB -o WORK``: the pipeline's stages as SLURM jobs chained by afterok.

The manifests and labels are computed here, at submission (the extraction plan is cut from the
manifest, so it must exist before the array is frozen). Then, for every stage not complete:

    finetune.<set>.<view>   one job each: slurm/finetune.sbatch (srun torchrun, requeued on preemption)
    extract                 one array over the merged manifest (--sets), afterok on every fine-tune
    reduce.<set>            one reducer per set, afterok on the array
    export / plot           one job running ``videofeat pipeline --only ...``, afterok on the reducers

With ``kill_invalid_depend`` a failed job's dependants are cancelled instead of pending
forever. The sbatch text of every job is saved under ``WORK/slurm/`` and each submission is
recorded in ``WORK/slurm/pipeline.json``; ``videofeat slurm rerun WORK`` submits what is still
not complete, with the dependencies it still needs. Stage records are written at submission,
so ``videofeat status WORK`` and a later local run see the same stages.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Optional

from videofeat.launcher.pipeline_job import JobFile
from videofeat.launcher.pipeline_plan import JOB_RECORD, extract_argv, finetune_argv, write_sets_file
from videofeat.launcher.pipeline_stages import Pipeline
from videofeat.manifests import fsutil

DAG_RECORD = "pipeline.json"
FINISH_KINDS = ("reduce", "export", "plot")


def dag_path(work: str) -> str:
    return os.path.join(work, "slurm", DAG_RECORD)


def read_dag(work: str) -> list[dict]:
    path = dag_path(work)
    if not os.path.exists(path):
        return []
    fs, inner = fsutil.filesystem(path)
    return list(fsutil.read_json(fs, inner).get("submissions", []))


def _write_dag(work: str, submissions: list[dict]) -> None:
    fs, inner = fsutil.filesystem(dag_path(work))
    fsutil.write_json_atomic(fs, inner, {"submissions": submissions})


def dag_job_ids(submission: dict) -> list[str]:
    return [str(j) for ids in submission.get("jobs", {}).values() for j in (ids if isinstance(ids, list) else [ids])]


def submit_dag(job: JobFile, work: str, options: Any, gpus_per_node: Optional[int] = None,
               dry_run: bool = False, say: Callable[[str], None] = print) -> dict:
    """Submit every stage of ``job`` that is not complete; returns ``{stage id: job id(s)}``."""
    from videofeat.launcher.slurm import arrays as se
    from videofeat.launcher.slurm import submit as slurm_submit
    from videofeat.launcher.slurm.finetune_launch import FinetuneLaunch
    from videofeat.manifests.ledger import RerunPolicy, RunDir
    from videofeat.manifests.set_root import write_set_root

    pipeline = Pipeline(job, work, out=say)
    w = pipeline.work
    submissions = read_dag(w.root)
    busy = [j.job_id for j in slurm_submit.queue(dag_job_ids(submissions[-1])) if j.active] if submissions else []
    if busy:
        raise slurm_submit.SlurmError(f"jobs of the last submission of {w.root} are still queued or running: "
                                      f"{' '.join(sorted(set(busy)))}; wait for them or scancel them")
    pipeline.prepare()
    # Manifests and labels here: the extraction plan is cut from the manifest at submission.
    pipeline.run(only=["manifest", "labels"])
    scripts = os.path.join(w.root, "slurm")
    logs = os.path.join(scripts, "logs")
    os.makedirs(logs, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    jobs: dict[str, Any] = {}
    texts: dict[str, str] = {}

    def submit(stage_id: str, text: str) -> str:
        if dry_run:
            say(f"# ---- {stage_id} ----\n{text}")
            return f"<{stage_id}>"
        path = os.path.join(scripts, f"{stamp}-{stage_id}.sbatch")
        fsutil.write_bytes_atomic(*_fs(path), text.encode())
        texts[stage_id] = path
        return slurm_submit.submit(text)

    extra = (f"--gpus-per-node={gpus_per_node}",) if gpus_per_node else ()
    ft_options = options.overridden(extra=tuple(options.extra) + extra)
    pending = [s for s in pipeline.stages if not pipeline.complete(s)]
    for stage in (s for s in pending if s.kind == "finetune"):
        if not dry_run:
            pipeline.write_record(stage)
        launch = FinetuneLaunch(
            output=w.finetune(stage.subject, stage.view),
            finetune_args=tuple(finetune_argv(job, job.set(stage.subject), stage.view, w)), options=ft_options,
            procs_per_task=gpus_per_node or 1, log_dir=logs, job_name=f"vf-{stage.id}", chdir=w.root)
        jobs[stage.id] = submit(stage.id, launch.render())
    extract = pipeline.by_id["extract"]
    if extract in pending:
        if not dry_run:
            pipeline.write_record(extract)
        write_sets_file(job, w)
        names = tuple(s.name for s in job.sets)
        launch = se.ArrayLaunch(run_dir=w.features, manifest=w.manifest, worker_args=tuple(extract_argv(job, w)),
                                options=options, log_dir=logs, job_name="vf-extract", sets=names, chdir=w.root)
        run_dir = RunDir(w.features)
        tasks = se.pack_tasks(se.incomplete_shards(launch, run_dir, pipeline.shard_ids(), RerunPolicy()), 1)
        if not dry_run:
            write_set_root(run_dir, names, w.sets_file, w.manifest)
        after = [jobs[s] for s in extract.upstream if s in jobs]
        result = se.submit_plan(launch, tasks, "pipeline", dry_run=dry_run, after=after,
                                out=_Printer(say))
        if result is not None:
            jobs["extract"] = list(result.array_job_ids)
            for name, job_id in zip(names, result.set_reducer_job_ids):
                jobs[f"reduce.{name}"] = job_id
        else:  # a dry run: placeholders, so the finishing job shows its dependencies
            jobs["extract"] = ["<extract>"]
            jobs.update({f"reduce.{name}": f"<reduce.{name}>" for name in names})
    finish = [s.id for s in pending if s.kind in FINISH_KINDS]
    if finish:
        waits = [str(j) for s in finish for u in pipeline.by_id[s].upstream if u in jobs
                 for j in (jobs[u] if isinstance(jobs[u], list) else [jobs[u]])]
        waits = sorted(set(waits), key=waits.index)
        lines = [f"--chdir={w.root}", *options.directives(resources=False)]
        if waits:
            lines += [f"--dependency=afterok:{':'.join(waits)}", "--kill-on-invalid-dep=yes"]
        text = slurm_submit.render("pipeline_finish.sbatch", {
            "work": slurm_submit.quote(w.root), "stages": ",".join(finish), "job_name": "vf-finish",
            "log_dir": logs, "directives": slurm_submit.directive_block(lines),
            "python": slurm_submit.quote(sys.executable), "job": slurm_submit.quote(job.path)})
        jobs["finish"] = submit("finish", text)
    if not dry_run:
        submissions.append({"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "jobs": jobs, "scripts": texts,
                            "finish_stages": finish, "options": options.to_dict(), "gpus_per_node": gpus_per_node,
                            "logs": logs})
        _write_dag(w.root, submissions)
    return jobs


def _fs(path: str):
    return fsutil.filesystem(path)


class _Printer:
    """A file-like ``out`` for submit_plan's dry run, printing through ``say``."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say

    def write(self, text: str) -> None:
        if text.strip():
            self.say(text.rstrip("\n"))

    def flush(self) -> None:
        pass


def load_work_job(work: str) -> JobFile:
    """The job file a WORK folder was run from (``WORK/job.json`` names it)."""
    from videofeat.launcher.pipeline_job import load_job

    fs, inner = fsutil.filesystem(os.path.join(work, JOB_RECORD))
    record = fsutil.read_json(fs, inner)
    return load_job(record["source"], record.get("base_dir"))


def describe_submission(jobs: dict, work: str) -> str:
    if not jobs:
        return f"{work}: every stage is complete; nothing to submit"
    lines = [f"submitted the pipeline {work}:"]
    for stage, ids in jobs.items():
        lines.append(f"  {stage:<34} {' '.join(ids) if isinstance(ids, list) else ids}")
    lines.append(f"sbatch scripts: {os.path.join(work, 'slurm')}; follow with: videofeat status {work}")
    return "\n".join(lines)


def is_pipeline_work(path: str) -> bool:
    return "://" not in path and os.path.exists(os.path.join(path, JOB_RECORD))


def rerun_dag(work: str, options: Any, say: Callable[[str], None] = print, dry_run: bool = False) -> dict:
    """Resubmit what is not complete, with the options of the last submission (overridden by ``options``)."""
    from videofeat.launcher.slurm.submit import SbatchOptions

    submissions = read_dag(work)
    last = submissions[-1] if submissions else {}
    base = SbatchOptions.from_dict(last.get("options") or {})
    merged = base.overridden(**{k: v for k, v in options.to_dict().items() if k != "extra"}, extra=options.extra)
    return submit_dag(load_work_job(work), work, merged, last.get("gpus_per_node"), dry_run=dry_run, say=say)
