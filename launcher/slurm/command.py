"""Submit extraction arrays, reruns of failed shards and fine-tuning jobs to SLURM.

    videofeat slurm extract MANIFEST -o RUN_DIR [extract flags] [--time T --throttle K ...]
    videofeat slurm rerun RUN_DIR [--time T ...]
    videofeat slurm finetune -o OUT [finetune flags] [--nodes N --tasks-per-node T ...]

``extract`` freezes a plan of the incomplete shards, submits it as one array per MaxArraySize
(``--array=0-(K-1)%T``) and the reducer ``afterok`` on them, and prints the job ids. ``rerun``
submits only failed, interrupted or missing shards, with a new reducer (a stale pending one is
cancelled). ``finetune`` submits ``slurm/finetune.sbatch``, which requeues itself after a
preemption checkpoint. No SLURM option enters a run's fingerprint. Give the worker's TOML file
with ``--worker-config`` (``--config`` belongs to this command).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional

from videofeat.launcher.logs import init_logger
from videofeat.launcher.slurm.finetune_launch import FinetuneLaunch  # noqa: F401 - part of this module's API

log = logging.getLogger("videofeat.slurm")

# The worker's flags are not defined here: whatever ``parse_known_args`` leaves over is the
# worker's command line, passed through (see launcher/cli.py).
PASSES_WORKER_ARGS = True


def _sbatch_flags(parser: argparse.ArgumentParser, gpus: bool = True) -> None:
    group = parser.add_argument_group("SLURM (never part of the fingerprint)")
    group.add_argument("--partition", help="partition to submit to")
    group.add_argument("--account", help="account to charge")
    group.add_argument("--qos", help="quality of service")
    group.add_argument("--time", help="time limit per job / array task, e.g. 04:00:00")
    if gpus:
        group.add_argument("--gpus-per-task", type=int, help="GPUs per task")
    group.add_argument("--cpus-per-task", type=int, help="CPUs per task")
    group.add_argument("--mem", help="memory per node, e.g. 64G")
    group.add_argument("--constraint", help="node features, e.g. a100")
    group.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                       help="any other sbatch option, one per flag (e.g. --sbatch-arg=--exclusive)")
    group.add_argument("--grace", type=int, help="seconds before the time limit that USR2 is sent (default 120)")
    group.add_argument("--max-requeues", type=int, help="requeues after interruptions (default 3)")
    group.add_argument("--job-name", help="job name (default vf-<run dir name>)")
    group.add_argument("--dry-run", action="store_true", help="print the sbatch text; submit nothing")


def _array_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("arrays")
    group.add_argument("--throttle", type=int, help="array tasks running at once (the %%K of --array)")
    group.add_argument("--shards-per-task", type=int, help="shards each array task runs (default 1)")
    group.add_argument("--ranks-per-task", type=int, help="local ranks per task, one per GPU, sharing its shards")
    group.add_argument("--log-dir", help="task output folder on a shared filesystem (default RUN_DIR/slurm/logs)")
    group.add_argument("--reduce-time", help="time limit of the reducer job")
    group.add_argument("--decode-rate", type=float, metavar="FRAMES_PER_S",
                       help="frames per second one rank processes, for the time estimate (default: measured "
                            "from the run's completed shards)")
    group.add_argument("--strict", action="store_true",
                       help="refuse to submit when a task's estimated time exceeds 80%% of --time")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="slurm_command", required=True, metavar="{extract,rerun,finetune,pipeline}")
    # allow_abbrev=False: a worker flag must never be taken for an abbreviation of a SLURM flag.
    extract = sub.add_parser("extract", allow_abbrev=False, help="submit an extraction array and its reducer",
                             usage="videofeat slurm extract MANIFEST -o RUN_DIR [videofeat extract flags] "
                                   "[SLURM flags]")
    extract.add_argument("--worker-config", metavar="FILE.toml", help="TOML defaults of the extract flags")
    _sbatch_flags(extract)
    _array_flags(extract)

    rerun = sub.add_parser("rerun", allow_abbrev=False,
                           help="resubmit failed, interrupted or missing shards with a new reducer")
    rerun.add_argument("run_dir", metavar="RUN_DIR")
    rerun.add_argument("--rerun-failed", action="store_true",
                       help="also shards that gave up, or whose videos failed transiently")
    rerun.add_argument("--max-attempts", type=int, default=3, help="failures before a shard gives up (default 3)")
    _sbatch_flags(rerun)
    _array_flags(rerun)

    pipeline = sub.add_parser("pipeline", allow_abbrev=False,
                              help="submit a pipeline job file as SLURM jobs chained by afterok",
                              usage="videofeat slurm pipeline JOB.toml -o WORK [SLURM flags]")
    pipeline.add_argument("job", metavar="JOB.toml", help="the job file (videofeat pipeline --example)")
    pipeline.add_argument("-o", "--output", required=True, metavar="WORK", help="work folder (shared filesystem)")
    pipeline.add_argument("--gpus-per-node", type=int,
                          help="GPUs of each fine-tuning job: one torchrun rank per GPU")
    _sbatch_flags(pipeline)

    finetune = sub.add_parser("finetune", allow_abbrev=False,
                              help="submit fine-tuning (torchrun under srun, requeued on preemption)",
                              usage="videofeat slurm finetune -o OUTPUT [videofeat finetune flags] [SLURM flags]")
    finetune.add_argument("--worker-config", metavar="FILE.toml", help="TOML defaults of the finetune flags")
    _sbatch_flags(finetune)
    group = finetune.add_argument_group("ranks")
    group.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    group.add_argument("--tasks-per-node", type=int, default=1, help="torchrun agents per node (default 1)")
    group.add_argument("--procs-per-task", type=int, default=1, help="ranks per agent, one per GPU (default 1)")
    group.add_argument("--shutdown-timeout", type=int, default=60,
                       help="seconds torchrun waits for ranks to write a checkpoint after a signal (default 60)")
    group.add_argument("--log-dir", help="job output folder (default OUTPUT/slurm)")


def worker_args(name: str, args: argparse.Namespace) -> tuple[list[str], argparse.Namespace]:
    """The worker's own command line, passed through as typed, and the worker's parse of it.

    The worker's parser checks it once, here, before anything is submitted: a wrong flag fails
    now with the worker's own message, not in every array task. ``--worker-config`` becomes the
    worker's ``--config``.
    """
    from videofeat.launcher.cli import parse_command

    argv = list(getattr(args, "worker_args", None) or [])
    if getattr(args, "worker_config", None):
        argv += ["--config", _absolute_if_local(args.worker_config)]
    parsed, _ = parse_command(name, argv, prog="videofeat slurm")
    return argv, parsed


def _options(args: argparse.Namespace):
    from videofeat.launcher.slurm.submit import SbatchOptions

    return SbatchOptions(partition=args.partition, account=args.account, qos=args.qos, time=args.time,
                         gpus_per_task=getattr(args, "gpus_per_task", None), cpus_per_task=args.cpus_per_task,
                         mem=args.mem, constraint=args.constraint, extra=tuple(args.sbatch_arg))


def _absolute_if_local(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def run_extract(args: argparse.Namespace) -> int:
    from videofeat.manifests.ledger import RerunPolicy, RunDir
    from videofeat.manifests.views import parse_views

    from videofeat.launcher.slurm import arrays as se

    argv, worker = worker_args("extract", args)
    # Relative paths in the passed-through flags resolve in the task's --chdir (this directory).
    manifest, output = _absolute_if_local(worker.manifest), _absolute_if_local(worker.output)
    sets = ()
    if worker.sets:
        # Checked here, before anything is submitted: an unknown key or a missing checkpoint is
        # refused naming the file, the set and the key. Tasks read the file from the same --chdir.
        from videofeat.launcher import extract as extract_cmd

        sets = extract_cmd.build_config(worker).names
    launch = se.ArrayLaunch(
        run_dir=output, manifest=manifest, worker_args=tuple(argv),
        options=_options(args), throttle=args.throttle, shards_per_task=args.shards_per_task or 1,
        ranks_per_task=args.ranks_per_task or 1,
        max_requeues=3 if args.max_requeues is None else args.max_requeues,
        grace_s=args.grace or se.DEFAULT_GRACE_S, log_dir=args.log_dir,
        job_name=args.job_name or f"vf-{os.path.basename(output.rstrip('/'))}", reduce_time=args.reduce_time,
        sets=sets)
    views = parse_views(worker.views)
    frames = se.shard_frames(manifest, views)
    wanted = sorted(frames) if not worker.shards else sorted(int(s) for s in worker.shards.split(",") if s.strip())
    unknown = sorted(set(wanted) - set(frames))
    if unknown:
        raise ValueError(f"--shards {unknown} are not shards of {manifest}")
    run_dir = RunDir(output)
    _refuse_if_busy(run_dir)
    policy = RerunPolicy(worker.rerun_failed, worker.overwrite, worker.max_attempts)
    tasks = se.pack_tasks(se.incomplete_shards(launch, run_dir, wanted, policy), launch.shards_per_task)
    if sets and tasks and not args.dry_run:
        from videofeat.manifests.set_root import write_set_root

        write_set_root(run_dir, sets, _absolute_if_local(worker.sets), manifest)
    return _submit(launch, run_dir, tasks, frames, args, kind="slurm", previous=None,
                   total=len(wanted))


def _submit(launch, run_dir, tasks, frames, args, kind: str, previous: Optional[str], total: int) -> int:
    from videofeat.launcher.slurm import arrays as se

    if not tasks:
        print(f"{launch.run_dir}: all {total} shards are complete; nothing to submit "
              f"(next: videofeat reduce {launch.run_dir})")
        return 0
    rate, source = (args.decode_rate, "--decode-rate") if args.decode_rate else (se.measured_rate(run_dir),
                                                                               "measured on completed shards")
    check = se.check_time(tasks, frames, launch, rate, source)
    if check.too_long:
        log.warning("%s", check.message(tasks))
        if args.strict:
            print(f"videofeat slurm: refusing to submit (--strict): {check.message(tasks)}", file=sys.stderr)
            return 2
    elif launch.options.time_seconds and rate is None:
        log.info("no decode rate known (give --decode-rate): task times not checked against --time")
    shards = sum(len(t) for t in tasks)
    result = se.submit_plan(launch, tasks, kind, dry_run=args.dry_run, previous=previous)
    if result is None:
        print(f"# dry run: {shards} of {total} shards in {len(tasks)} array tasks; nothing submitted")
        return 0
    print(f"plan {result.plan_id}: {shards} of {total} shards in {len(tasks)} array tasks "
          f"(throttle {launch.throttle or 'none'})")
    print("arrays: " + " ".join(result.array_job_ids))
    if result.set_reducer_job_ids:
        print(f"reducers: {' '.join(result.set_reducer_job_ids)} (afterok; one per set: {', '.join(launch.sets)})")
    else:
        print(f"reducer: {result.reducer_job_id} (afterok)")
    print(f"logs: {launch.log_dir}; follow with: videofeat status {launch.run_dir}")
    return 0


def run_rerun(args: argparse.Namespace) -> int:
    from videofeat.launcher.cli import parse_command
    from videofeat.manifests.ledger import RunDir
    from videofeat.manifests.views import parse_views

    from videofeat.launcher.slurm import arrays as se

    from videofeat.launcher.slurm import records as slurm_info

    from videofeat.launcher.slurm import submit as slurm_submit

    from videofeat.launcher.slurm import pipeline_dag

    if pipeline_dag.is_pipeline_work(args.run_dir):
        # A pipeline's WORK: resubmit every stage that is not complete, chained as before.
        jobs = pipeline_dag.rerun_dag(os.path.abspath(args.run_dir), _options(args), dry_run=args.dry_run)
        print(pipeline_dag.describe_submission(jobs, os.path.abspath(args.run_dir)))
        return 0
    run_dir = RunDir(args.run_dir)
    submissions = slurm_info.read_submissions(run_dir)
    if not submissions:
        print(f"videofeat slurm rerun: {args.run_dir} has no SLURM submission (RUN_DIR/slurm/*.json); "
              "start with `videofeat slurm extract`", file=sys.stderr)
        return 2
    last = se.ArrayLaunch.from_dict(submissions[-1]["launch"])
    # --overwrite meant "recompute everything" once; a rerun recomputes only what is not done.
    worker = tuple(a for a in last.worker_args if a not in ("--overwrite", "--rerun-failed"))
    if args.rerun_failed:
        worker += ("--rerun-failed",)
    opts = _options(args)
    launch = se.ArrayLaunch(**{
        **last.to_dict(), "worker_args": worker,
        "options": last.options.overridden(**{k: v for k, v in opts.to_dict().items() if k != "extra"},
                                           extra=opts.extra),
        "throttle": args.throttle or last.throttle, "shards_per_task": args.shards_per_task or last.shards_per_task,
        "ranks_per_task": args.ranks_per_task or last.ranks_per_task,
        "max_requeues": last.max_requeues if args.max_requeues is None else args.max_requeues,
        "grace_s": args.grace or last.grace_s, "log_dir": args.log_dir or last.log_dir,
        "job_name": args.job_name or last.job_name, "reduce_time": args.reduce_time or last.reduce_time})
    stale = _refuse_if_busy(run_dir, submissions)
    views = parse_views(parse_command("extract", list(last.worker_args), prog="videofeat slurm")[0].views)
    frames = se.shard_frames(last.manifest, views)
    tasks = se.rerun_tasks(launch, run_dir, sorted(frames), args.rerun_failed, args.max_attempts)
    if stale and not args.dry_run:
        slurm_submit.cancel(stale)
        print(f"cancelled the stale pending reducer {' '.join(stale)}")
    return _submit(launch, run_dir, tasks, frames, args, kind="rerun", previous=submissions[-1]["plan_id"],
                   total=len(frames))


def _refuse_if_busy(run_dir, submissions=None) -> list[str]:
    """Stop a launch while array tasks of an earlier one are queued; returns stale pending reducers."""
    from videofeat.launcher.slurm import arrays as se
    from videofeat.launcher.slurm import records as slurm_info
    from videofeat.launcher.slurm.submit import SlurmError

    submissions = slurm_info.read_submissions(run_dir) if submissions is None else submissions
    busy, stale = se.active_jobs(submissions)
    if busy:
        raise SlurmError(f"jobs of earlier submissions to {run_dir.url} are still queued or running: "
                         f"{' '.join(busy)}; wait for them (their shards would be computed twice) or scancel them")
    return stale


def run_finetune(args: argparse.Namespace) -> int:
    from videofeat.launcher.slurm import submit as slurm_submit

    argv, worker = worker_args("finetune", args)
    launch = FinetuneLaunch(
        output=_absolute_if_local(worker.output) if worker.output else worker.output, finetune_args=tuple(argv),
        options=_options(args), nodes=args.nodes, tasks_per_node=args.tasks_per_node,
        procs_per_task=args.procs_per_task, shutdown_timeout=args.shutdown_timeout, grace_s=args.grace or 120,
        max_requeues=3 if args.max_requeues is None else args.max_requeues, log_dir=args.log_dir,
        job_name=args.job_name)
    text = launch.render()
    if args.dry_run:
        print(text)
        return 0
    os.makedirs(launch.log_dir, exist_ok=True)
    job_id = slurm_submit.submit(text)
    path = os.path.join(launch.log_dir, f"finetune_{job_id}.sbatch")
    with open(path, "w") as handle:
        handle.write(text)
    print(f"fine-tuning job: {job_id}\nscript: {path}\nlog: {launch.log_dir}/finetune_{job_id}.out")
    return 0


def run_pipeline(args: argparse.Namespace) -> int:
    from videofeat.launcher.pipeline_job import load_job
    from videofeat.launcher.slurm import pipeline_dag

    if args.gpus_per_node is not None and args.gpus_per_node < 1:
        raise ValueError(f"--gpus-per-node must be >= 1, got {args.gpus_per_node}")
    work = os.path.abspath(args.output)
    jobs = pipeline_dag.submit_dag(load_job(args.job), work, _options(args), args.gpus_per_node,
                                   dry_run=args.dry_run)
    print("# dry run: nothing submitted" if args.dry_run else pipeline_dag.describe_submission(jobs, work))
    return 0


def run(args: argparse.Namespace) -> int:
    from videofeat.launcher.slurm.submit import SlurmError

    init_logger()
    handlers = {"extract": run_extract, "rerun": run_rerun, "finetune": run_finetune, "pipeline": run_pipeline}
    if args.slurm_command in ("rerun", "pipeline") and getattr(args, "worker_args", None):
        why = ("a rerun repeats the worker flags of the run's last submission" if args.slurm_command == "rerun"
               else "the job file says what each stage computes")
        print(f"videofeat slurm {args.slurm_command}: unrecognized arguments: {' '.join(args.worker_args)} ({why})",
              file=sys.stderr)
        return 2
    try:
        return handlers[args.slurm_command](args)
    except SlurmError as error:
        print(f"videofeat slurm {args.slurm_command}: {error}", file=sys.stderr)
        return 1
