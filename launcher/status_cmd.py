"""Show a run's shards (done, failed, interrupted, missing) and every video without windows.

On the root of a multi-set launch (``OUT`` of ``videofeat extract --sets``) it shows every set.
"""

from __future__ import annotations

import argparse
import shlex
from videofeat.launcher.slurm.records import latest_submission, shard_tasks
from videofeat.manifests.ledger import DONE, RunDir, ShardRecord
from videofeat.manifests.manifest import read_manifest
from videofeat.manifests.set_root import read_set_root, set_dirs
from videofeat.manifests.status import HAS_WINDOWS, REBUILD_MANIFEST_HINT, STALE_MANIFEST, TRANSIENT, kind

LOG_TAIL_LINES = 5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory written by `videofeat extract`")
    parser.add_argument("--max-attempts", type=int, default=3, help="as given to extract: failures before giving up")
    parser.add_argument("--all", action="store_true", help="list done shards too")


def _log_tail(run_dir: RunDir, path: str) -> list[str]:
    try:
        with run_dir.fs.open(path, "rb") as handle:
            lines = handle.read().decode(errors="replace").splitlines()
        return lines[-LOG_TAIL_LINES:]
    except FileNotFoundError:
        return []


def _where(record: ShardRecord) -> str:
    info = (record.stats or record.last_failure or {})
    return f"host {info['host']} rank {info.get('rank', 0)}" if info.get("host") else ""


def collect(run_dir: RunDir, max_attempts: int = 3) -> dict:
    """Everything the status table shows, as data (tests and the reducer read it too)."""
    run = run_dir.load_run()
    if run is None:
        raise FileNotFoundError(f"{run_dir.url} has no run.json: not a videofeat run directory (or nothing ran "
                                "yet); `videofeat extract MANIFEST -o RUN_DIR` creates one")
    manifest = read_manifest(run["manifest"]).to_pylist()
    views = set(run.get("views") or []) or {r["view"] for r in manifest}
    rows = [r for r in manifest if r["view"] in views]
    shard_ids = sorted({r["shard_id"] for r in rows if r["shard_id"] is not None})
    records = run_dir.records(shard_ids, max_attempts)
    no_windows = [(r["video_id"], r["status"], r["error"], "manifest") for r in rows if r["shard_id"] is None]
    for record in records:
        for video in (record.stats or {}).get("videos", []):
            if video["status"] not in HAS_WINDOWS or not video.get("windows"):
                if video["status"] in HAS_WINDOWS:
                    continue  # a piece with no window start inside it: nothing is missing
                no_windows.append((video["video_id"], video["status"], video.get("error"), f"shard {record.shard_id}"))
    return {"run": run, "records": records, "no_windows": no_windows}


def run(args: argparse.Namespace) -> int:
    from videofeat.launcher.slurm.pipeline_dag import is_pipeline_work

    if is_pipeline_work(args.run_dir):
        from videofeat.launcher.pipeline_status import show_work

        return show_work(args.run_dir)
    root = RunDir(args.run_dir)
    members = set_dirs(root) if root.load_run() is None else []
    if not members:
        show(args.run_dir, args)
        return 0
    pending = False
    for url in members:
        print(f"== set {url.rstrip('/').rsplit('/', 1)[-1]} ==")
        pending |= show(url, args, hints=False, slurm_dir=root) != 0
    if pending:
        print("rerun every set's missing or failed shards, each decoded once for the sets that miss it, with:\n  "
              + sets_rerun_command(root))
        if latest_submission(root):
            print(f"  or, on SLURM: videofeat slurm rerun {shlex.quote(args.run_dir)}")
    else:
        print("all sets are done; next: videofeat reduce " + shlex.quote(args.run_dir))
    return 0


def sets_rerun_command(root: RunDir) -> str:
    """``videofeat extract --sets`` with the launch's own feature-changing flags."""
    record = read_set_root(root) or {}
    first = RunDir(set_dirs(root)[0]).load_run() or {}
    config = first.get("config") or {}
    words = ["videofeat", "extract", str(record.get("manifest") or config.get("manifest")), "-o", root.url,
             "--sets", str(record.get("sets_file"))]
    for key, flag, default in (("decoder", "--decoder", "pyav"), ("dtype", "--dtype", "auto"),
                               ("feature_dtype", "--feature-dtype", "float32")):
        if config.get(key) not in (None, default):
            words += [flag, str(config[key])]
    if config.get("views"):
        words += ["--views", ",".join(config["views"])]
    return shlex.join(words)


def show(url: str, args: argparse.Namespace, hints: bool = True, slurm_dir: RunDir | None = None) -> int:
    """Print one run directory's status; returns 1 when something is left to rerun, else 0."""
    run_dir = RunDir(url)
    data = collect(run_dir, args.max_attempts)
    records: list[ShardRecord] = data["records"]
    # A set of a multi-set launch was submitted from its root, which keeps the SLURM records.
    slurm_tasks = shard_tasks(slurm_dir or run_dir, records)
    counts: dict[str, int] = {}
    for record in records:
        counts[record.state] = counts.get(record.state, 0) + 1
    print(f"{url}: {len(records)} shards: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    for record in records:
        if record.state == DONE and not args.all:
            continue
        where = _where(record)
        line = f"  {record.shard_id:05d} {record.state:<11} attempts {record.attempts}" + (f"  ({where})" if where else "")
        print(line)
        if record.shard_id in slurm_tasks:
            print(f"        slurm: {slurm_tasks[record.shard_id].describe()}")
        if record.last_failure:
            print(f"        {record.last_failure.get('kind')}: {record.last_failure.get('message')}")
        if record.logs:
            print(f"        log: {record.logs[-1]}")
            for tail in _log_tail(run_dir, record.logs[-1]) if record.state != DONE else []:
                print(f"        | {tail}")
    transient = [v for v in data["no_windows"] if v[1] in TRANSIENT]
    stale = [v for v in data["no_windows"] if v[1] in STALE_MANIFEST]
    if data["no_windows"]:
        print(f"videos without windows ({len(data['no_windows'])}):")
        for video_id, status, error, where in data["no_windows"]:
            print(f"  {status:<12} {video_id} [{kind(status)}, {where}]: {error}")
    pending = [r for r in records if r.state != DONE]
    if pending or transient:
        info = run_dir.load_record()
    if pending:
        print("rerun what is missing or failed with:\n  " + info.rerun_command())
        if hints and latest_submission(run_dir):
            print(f"  or, on SLURM: videofeat slurm rerun {shlex.quote(url)}")
    if transient:
        print("recompute the shards whose videos failed transiently with:\n  " + info.rerun_command(rerun_failed=True))
    if stale:
        print(f"{len(stale)} video(s) changed after the manifest was written; {REBUILD_MANIFEST_HINT}")
    if not pending and not transient and not stale and hints:
        print("all shards are done; next: videofeat reduce " + shlex.quote(url))
    return 1 if pending else 0
