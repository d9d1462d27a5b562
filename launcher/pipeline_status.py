"""``videofeat status WORK`` for a pipeline's work folder: every stage on one screen.

For each stage: complete, running, queued, stopped, failed (with the SLURM job and its log's
last lines) or not run because a stage it needs did not complete; for each fine-tune its step,
last validation top-1 and state; the extraction per set; the reducers and exports; and the one
command that continues the job.
"""

from __future__ import annotations

import json
import os
import shlex
from typing import Optional

from videofeat.launcher.pipeline_plan import Stage
from videofeat.launcher.pipeline_stages import Pipeline

LOG_LINES = 3


def _finetune_detail(folder: str) -> str:
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.exists(path):
        return ""
    with open(path) as handle:
        events = [json.loads(line) for line in handle if line.strip()]
    step = max((e.get("step", 0) for e in events), default=0)
    vals = [e for e in events if e.get("event") == "val"]
    top1 = f", validation top-1 {vals[-1]['top1']:.2f}" if vals else ""
    state = ""
    if os.path.exists(os.path.join(folder, "COMPLETED")):
        state = ", completed"
    elif os.path.exists(os.path.join(folder, "PREEMPTED")):
        state = ", preempted (resumes from its checkpoint)"
    return f"step {step}{top1}{state}"


def _tail(path: Optional[str]) -> list[str]:
    if not path or not os.path.exists(path):
        return []
    with open(path, errors="replace") as handle:
        lines = [line.rstrip() for line in handle if line.strip()]
    # The one bad-input handler's message names the cause; torchrun's own report only says a rank failed.
    ours = [line for line in lines if line.startswith("videofeat ") and ": error: " in line]
    return (ours[-2:] + lines[-1:]) if ours else lines[-LOG_LINES:]


def _log_of(stage: Stage, job_id: str, logs: str) -> Optional[str]:
    if stage.kind == "finetune":
        return os.path.join(logs, f"finetune_{job_id}.out")
    if stage.kind == "reduce":
        return os.path.join(logs, f"reduce_{job_id}.out")
    if stage.kind in ("export", "plot"):
        return os.path.join(logs, f"finish_{job_id}.out")
    return None


def show_work(work: str) -> int:
    from videofeat.launcher.slurm.pipeline_dag import load_work_job, read_dag

    job = load_work_job(work)
    pipeline = Pipeline(job, work, out=lambda line: None)
    dag = read_dag(pipeline.work.root)
    jobs: dict[str, object] = {}
    for submission in dag:  # later submissions replace earlier ones stage by stage
        jobs.update(submission.get("jobs", {}))
    if dag and "finish" in dag[-1].get("jobs", {}):
        for sid in dag[-1].get("finish_stages", []):
            jobs[sid] = dag[-1]["jobs"]["finish"]
    logs = dag[-1].get("logs", "") if dag else ""
    queue: dict[str, str] = {}
    if dag:
        from videofeat.launcher.slurm import submit as slurm_submit

        try:
            ids = [str(j) for v in jobs.values() for j in (v if isinstance(v, list) else [v])]
            for entry in slurm_submit.queue(ids):
                queue[entry.job_id] = entry.state
                if entry.active:  # an array is active while any of its tasks is
                    queue[entry.array_job_id] = entry.state
        except slurm_submit.SlurmError as error:
            print(f"(SLURM not reachable: {error})")
    changed = pipeline.changed()
    complete = {s.id: pipeline.complete(s) for s in pipeline.stages}
    progress = pipeline.extraction_progress()
    print(f"{pipeline.work.root}: pipeline of {job.path}: {sum(complete.values())} of {len(complete)} stages complete")
    width = max(len(s.id) for s in pipeline.stages)
    for stage in pipeline.stages:
        ids = jobs.get(stage.id)
        id_list = [str(i) for i in (ids if isinstance(ids, list) else [ids])] if ids else []
        active = [queue[i] for i in id_list if queue.get(i) in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING",
                                                                 "COMPLETING", "SUSPENDED")]
        blocked = [u for u in stage.upstream if not complete[u]]
        if stage.id in changed:
            state = "the job file changes it: " + "; ".join(changed[stage.id])
        elif complete[stage.id]:
            state = "complete"
        elif active:
            state = active[0].lower() + f" (job {' '.join(id_list)})"
        elif blocked and (id_list or pipeline.record(stage.id)):
            state = f"did not run: needs {', '.join(blocked)}, which did not complete"
        elif id_list:
            state = f"failed (job {' '.join(id_list)})"
        elif pipeline.record(stage.id):
            state = "stopped before it was complete"
        else:
            state = "not started"
        detail = ""
        if stage.kind == "finetune":
            detail = _finetune_detail(pipeline.work.finetune(stage.subject, stage.view))
        elif stage.kind == "extract" and progress:
            detail = "shards done: " + ", ".join(f"{n} {d}/{t}" for n, (d, t) in progress.items())
        elif stage.kind == "reduce" and complete[stage.id]:
            with open(os.path.join(pipeline.work.run_dir(stage.subject), "dataset", "summary.json")) as handle:
                summary = json.load(handle)
            detail = ", ".join(f"{v} {r['windows']} windows" for v, r in summary.get("views", {}).items())
        print(f"  {stage.id:<{width}}  {state}" + (f"  [{detail}]" if detail else ""))
        if state.startswith("failed") and logs:
            for job_id in id_list:
                log = _log_of(stage, job_id, logs)
                for line in _tail(log):
                    print(f"  {'':<{width}}  | {line}")
                if log:
                    print(f"  {'':<{width}}  log: {log}")
    if all(complete.values()):
        print("the job is complete; exports: " + ", ".join(f"{e.output}/<set>" for e in job.exports))
    elif dag:
        print(f"continue with: videofeat slurm rerun {shlex.quote(pipeline.work.root)}")
    else:
        print(f"continue with: videofeat pipeline {shlex.quote(job.path)} -o {shlex.quote(pipeline.work.root)}")
    return 0
