"""The run directory: the contract between every stage of a run.

```
RUN_DIR/run.json                              resolved config, fingerprint and its parts
RUN_DIR/plans/<plan_id>.json                  frozen list for one launch: index -> shard ids
RUN_DIR/shards/<shard:05d>.parquet            committed output (written under a temporary name first)
RUN_DIR/shards/<shard:05d>.stats.json         per-video records, timings, host, rank, SLURM ids, attempt
RUN_DIR/shards/<shard:05d>.done               empty marker, written last
RUN_DIR/shards/<shard:05d>.claim              held while a process computes the shard (see claims.py)
RUN_DIR/shards/<shard:05d>.corrupt            a reader found the committed file changed after its marker
RUN_DIR/failures/<shard:05d>.<attempt>.json   kind (error|interrupted), message, traceback tail, host, ...
RUN_DIR/logs/<shard:05d>.<attempt>.log
RUN_DIR/dataset/                              reducer output and summary.json
```

Commit order per shard: Parquet to a temporary name, close, move into place, stats, marker
last. A reader trusts a shard only when its marker exists, so a process killed at any point
leaves the shard planned, never done.

The stats record the committed file's size, SHA-256 and mtime. A shard whose file no longer
matches them (truncated, bytes flipped, swapped with another) is ``corrupt``, not done: the
planners recompute it. The quick check (size and mtime; the hash only when the mtime moved) runs
on every listing; the full check (the hash always) runs before a merge, and what it finds is
noted beside the shard so the next plain launch recomputes it too.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
import socket
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

from videofeat.manifests import claims, fsutil
from videofeat.manifests.fingerprint import compute_fingerprint, describe_difference
from videofeat.manifests.run_record import RunRecord
from videofeat.manifests.status import TRANSIENT

log = logging.getLogger(__name__)

# Shard states, as `videofeat status` and the planners use them.
DONE = "done"
MISSING = "missing"          # never attempted
INTERRUPTED = "interrupted"  # stopped by a signal, or died without a record (killed, node lost)
FAILED = "failed"            # raised an error; retried until --max-attempts
GAVE_UP = "gave_up"          # failed --max-attempts times; only --rerun-failed retries it
CORRUPT = "corrupt"          # has a marker, but its file changed after the commit; recomputed by a plain rerun
RUNNING = "running"          # no marker, but a live claim: some process computes it right now
SHARD_STATES = (DONE, MISSING, INTERRUPTED, FAILED, GAVE_UP, CORRUPT, RUNNING)

FAILURE_KINDS = ("error", "interrupted")
DEFAULT_MAX_ATTEMPTS = 3


class FingerprintMismatch(RuntimeError):
    """A launch whose features would not be comparable with those already in the run directory."""


def shard_name(shard_id: int) -> str:
    return f"{int(shard_id):05d}"


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def slurm_ids() -> dict[str, str]:
    """The SLURM identifiers of this process, if it runs under SLURM (the node's SLURM name too:
    on a real cluster it need not be the host name)."""
    keys = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_PROCID", "SLURM_RESTART_COUNT",
            "SLURMD_NODENAME")
    return {k.lower(): os.environ[k] for k in keys if k in os.environ}


def process_identity(rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "rank": rank, "world_size": world_size,
            "slurm": slurm_ids()}


@dataclass(frozen=True)
class ShardRecord:
    """What the run directory says about one shard."""

    shard_id: int
    state: str
    attempts: int
    last_failure: Optional[dict] = None
    stats: Optional[dict] = None
    logs: tuple[str, ...] = ()
    # The newest attempt left a log but neither a marker nor a failure record: its process was
    # killed or its node lost (a late marker on a shared filesystem is the other explanation).
    killed: bool = False

    @property
    def transient_videos(self) -> list[dict]:
        videos = (self.stats or {}).get("videos", [])
        return [v for v in videos if v.get("status") in TRANSIENT]


@dataclass(frozen=True)
class RerunPolicy:
    """Which shards a launch recomputes (see the run-directory contract)."""

    rerun_failed: bool = False
    overwrite: bool = False
    max_attempts: int = DEFAULT_MAX_ATTEMPTS

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"--max-attempts must be >= 1, got {self.max_attempts}")

    def wants(self, record: ShardRecord) -> bool:
        if self.overwrite:
            return True
        if record.state == DONE:
            return self.rerun_failed and bool(record.transient_videos)
        if record.state == GAVE_UP:
            return self.rerun_failed
        return True


@dataclass
class RunDir:
    """A run directory on any fsspec filesystem."""

    url: str
    fs: Any = field(init=False, repr=False)
    root: str = field(init=False)

    def __post_init__(self) -> None:
        self.fs, self.root = fsutil.filesystem(self.url)

    # ----- paths -------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return fsutil.join(self.root, *parts)

    @property
    def run_json(self) -> str:
        return self.path("run.json")

    def plan_path(self, plan_id: str) -> str:
        return self.path("plans", f"{plan_id}.json")

    def shard_path(self, shard_id: int) -> str:
        return self.path("shards", f"{shard_name(shard_id)}.parquet")

    def stats_path(self, shard_id: int) -> str:
        return self.path("shards", f"{shard_name(shard_id)}.stats.json")

    def marker_path(self, shard_id: int) -> str:
        return self.path("shards", f"{shard_name(shard_id)}.done")

    def claim_path(self, shard_id: int) -> str:
        return self.path("shards", f"{shard_name(shard_id)}.claim")

    def corrupt_note_path(self, shard_id: int) -> str:
        return self.path("shards", f"{shard_name(shard_id)}.corrupt")

    def failure_path(self, shard_id: int, attempt: int) -> str:
        return self.path("failures", f"{shard_name(shard_id)}.{attempt}.json")

    def log_path(self, shard_id: int, attempt: int) -> str:
        return self.path("logs", f"{shard_name(shard_id)}.{attempt}.log")

    @property
    def dataset_dir(self) -> str:
        return self.path("dataset")

    # ----- run.json and the fingerprint --------------------------------------------------
    def load_run(self) -> Optional[dict]:
        return fsutil.optional_read_json(self.fs, self.run_json)

    def initialize(self, fingerprint_parts: Mapping[str, Any], config: Mapping[str, Any],
                   extra: Optional[Mapping[str, Any]] = None) -> dict:
        """Create ``run.json``, or check that the existing one has the same fingerprint.

        Raises :class:`FingerprintMismatch` naming every part that differs.
        """
        fingerprint = compute_fingerprint(fingerprint_parts)
        existing = self.load_run()
        if existing is not None:
            if existing.get("fingerprint") != fingerprint:
                diff = describe_difference(existing.get("fingerprint_parts", {}), fingerprint_parts)
                raise FingerprintMismatch(
                    f"{self.url} holds a run with another fingerprint ({existing.get('fingerprint')} "
                    f"vs {fingerprint}); its features would not be comparable:\n  - "
                    + "\n  - ".join(diff or ["(parts unknown)"])
                    + "\nUse a new run directory, or launch with the run's original settings."
                )
            return existing
        record = {"fingerprint": fingerprint, "fingerprint_parts": dict(fingerprint_parts),
                  "config": dict(config), "created": utc_now(), **dict(extra or {})}
        self.fs.makedirs(self.root, exist_ok=True)
        for sub in ("plans", "shards", "failures", "logs"):
            self.fs.makedirs(self.path(sub), exist_ok=True)
        fsutil.write_json_atomic(self.fs, self.run_json, record)
        return record

    def load_record(self) -> RunRecord:
        """run.json as a typed record; a clear error where there is none."""
        body = self.load_run()
        if body is None:
            raise FileNotFoundError(f"{self.run_json} does not exist: is {self.url} a videofeat run "
                                    "directory? (`videofeat extract MANIFEST -o RUN_DIR` creates one)")
        return RunRecord.from_json(body, self.url)

    def fingerprint(self) -> str:
        run = self.load_run()
        if run is None:
            raise FileNotFoundError(f"{self.run_json} does not exist: is {self.url} a videofeat run directory?")
        return run["fingerprint"]

    # ----- plans ---------------------------------------------------------------------------
    def write_plan(self, plan_id: str, assignments: Sequence[Sequence[int]], meta: Optional[Mapping] = None) -> str:
        """Freeze ``index -> shard ids`` for one launch; a plan is never rewritten."""
        path = self.plan_path(plan_id)
        if self.fs.exists(path):
            raise FileExistsError(f"plan {path} already exists; plans are frozen")
        body = {"plan_id": plan_id, "created": utc_now(),
                "tasks": [[int(s) for s in shards] for shards in assignments], **dict(meta or {})}
        fsutil.write_json_atomic(self.fs, path, body)
        return path

    def read_plan(self, plan_id: str) -> dict:
        return fsutil.read_json(self.fs, self.plan_path(plan_id))

    def list_plans(self) -> list[str]:
        try:
            names = self.fs.ls(self.path("plans"), detail=False)
        except FileNotFoundError:
            return []
        return sorted(n.rsplit("/", 1)[-1][:-5] for n in names if n.endswith(".json"))

    # ----- shard state ---------------------------------------------------------------------
    def _listing(self, sub: str) -> list[str]:
        try:
            return [n.rsplit("/", 1)[-1] for n in self.fs.ls(self.path(sub), detail=False)]
        except FileNotFoundError:
            return []

    def is_done(self, shard_id: int) -> bool:
        return self.fs.exists(self.marker_path(shard_id))

    def attempts(self, shard_id: int) -> list[int]:
        """Attempt numbers that left a log or a failure record."""
        prefix = shard_name(shard_id) + "."
        numbers = set()
        for sub in ("logs", "failures"):
            for name in self._listing(sub):
                if name.startswith(prefix):
                    match = re.match(r"\d+\.(\d+)\.", name)
                    if match:
                        numbers.add(int(match.group(1)))
        return sorted(numbers)

    def next_attempt(self, shard_id: int) -> int:
        attempts = self.attempts(shard_id)
        return (attempts[-1] + 1) if attempts else 1

    def records(self, shard_ids: Iterable[int], max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                verify: str = "quick") -> list[ShardRecord]:
        """The state of each shard, read with one listing per folder.

        ``verify``: how a done shard's file is checked against its stats: ``quick`` (size and
        mtime, the hash when the mtime moved), ``full`` (the hash always) or ``none``.
        """
        if verify not in ("quick", "full", "none"):
            raise ValueError(f"verify must be quick, full or none, got {verify!r}")
        listings = {sub: set(self._listing(sub)) for sub in ("shards", "failures", "logs")}
        out = []
        for shard_id in shard_ids:
            name = shard_name(shard_id)
            attempts = sorted({int(m.group(1)) for sub in ("logs", "failures") for n in listings[sub]
                               if (m := re.match(re.escape(name) + r"\.(\d+)\.", n))})
            failures = sorted(int(m.group(1)) for n in listings["failures"]
                              if (m := re.match(re.escape(name) + r"\.(\d+)\.json$", n)))
            logs = tuple(self.log_path(shard_id, a) for a in attempts if f"{name}.{a}.log" in listings["logs"])
            if f"{name}.done" in listings["shards"]:
                stats = fsutil.optional_read_json(self.fs, self.stats_path(shard_id))
                problem = None if verify == "none" else self.verify_committed(
                    shard_id, stats, full=verify == "full", noted=f"{name}.corrupt" in listings["shards"])
                if problem:
                    out.append(ShardRecord(shard_id, CORRUPT, len(attempts), {"kind": "corrupt", "message": problem},
                                           stats, logs))
                else:
                    out.append(ShardRecord(shard_id, DONE, len(attempts), None, stats, logs))
                continue
            last_failure = None
            if attempts and failures and failures[-1] == attempts[-1]:
                last_failure = fsutil.optional_read_json(self.fs, self.failure_path(shard_id, failures[-1]))
            killed = bool(attempts) and last_failure is None
            holder = self._live_claim(shard_id) if f"{name}.claim" in listings["shards"] else None
            if holder:
                out.append(ShardRecord(shard_id, RUNNING, len(attempts), {"kind": "running", "message": holder},
                                       None, logs))
                continue
            if not attempts:
                state = MISSING
            elif last_failure is None or last_failure.get("kind") == "interrupted":
                # A newest attempt with a log but no record died without a word: killed or lost.
                state = INTERRUPTED
                if last_failure is None:
                    last_failure = {"kind": "interrupted", "message":
                                    f"attempt {attempts[-1]} left no completion marker and no failure record "
                                    "(the process was killed or its node was lost, or it could not write "
                                    "the record: a full disk, said on its stderr)"}
            else:
                errors = sum(1 for a in failures
                             if (fsutil.optional_read_json(self.fs, self.failure_path(shard_id, a)) or {})
                             .get("kind") == "error")
                state = GAVE_UP if errors >= max_attempts else FAILED
            out.append(ShardRecord(shard_id, state, len(attempts), last_failure, None, logs, killed))
        return out

    def _live_claim(self, shard_id: int) -> Optional[str]:
        """Who computes the shard now, if its claim is live (a stale claim is a dead attempt)."""
        raw, body, age = claims.read_claim(self.fs, self.claim_path(shard_id))
        if raw is None or claims.stale_reason(body, age, claims.STALE_S):
            return None
        who = claims.Holder.from_body(body).describe() if body else "a process creating its claim"
        return f"claimed by {who}, heartbeat {age:.0f} s ago"

    def verify_committed(self, shard_id: int, stats: Optional[dict], full: bool = False,
                         noted: bool = False) -> Optional[str]:
        """Why the committed file of a marked shard cannot be trusted, or None when it matches its stats."""
        path = self.shard_path(shard_id)
        if noted:
            note = fsutil.optional_read_json(self.fs, self.corrupt_note_path(shard_id)) or {}
            return note.get("message") or f"{path} was found corrupt by an earlier check"
        if stats is None:
            return f"{path} has a completion marker but no stats file ({self.stats_path(shard_id)})"
        recorded = stats.get("file")
        if not recorded:
            return None  # committed before files were recorded: nothing to compare with
        try:
            size, mtime_ns = fsutil.file_stat(self.fs, path)
        except FileNotFoundError:
            return f"{path} is missing although its marker exists"
        if size != recorded["size"]:
            return (f"{path} is {size} bytes but was committed with {recorded['size']} "
                    "(truncated or replaced after its marker)")
        if not full and mtime_ns is not None and mtime_ns == recorded.get("mtime_ns"):
            return None
        _, sha256 = fsutil.file_digest(self.fs, path)
        if sha256 != recorded["sha256"]:
            return (f"{path} changed after its marker: SHA-256 {sha256[:16]}... but committed as "
                    f"{recorded['sha256'][:16]}... (bytes flipped, or another shard's file)")
        return None

    def note_corrupt(self, shard_id: int, message: str) -> None:
        """Remember a full check's finding, so the quick checks of status and planners see it too."""
        try:
            fsutil.write_json_atomic(self.fs, self.corrupt_note_path(shard_id),
                                     {"shard_id": int(shard_id), "message": message, "time": utc_now(),
                                      **process_identity()})
        except OSError as exc:  # a read-only run directory: the reducer still refuses, by its own check
            log.warning("could not note %s as corrupt: %s", self.shard_path(shard_id), exc)

    def plan_incomplete(self, shard_ids: Iterable[int], policy: RerunPolicy = RerunPolicy()) -> list[int]:
        """Shards this launch must compute, in ascending order."""
        return [r.shard_id for r in self.records(sorted(set(shard_ids)), policy.max_attempts) if policy.wants(r)]

    # ----- commit protocol -----------------------------------------------------------------
    def temp_shard_path(self, shard_id: int) -> str:
        """Where a worker writes a shard before :meth:`commit_shard` moves it into place."""
        self.fs.makedirs(self.path("shards"), exist_ok=True)
        return self.path("shards", f".{shard_name(shard_id)}.parquet.tmp-{fsutil.unique_suffix()}")

    def uncommit(self, shard_id: int) -> None:
        """Before recomputing a completed shard: the marker goes first, so it is never stale."""
        for path in (self.marker_path(shard_id), self.stats_path(shard_id), self.corrupt_note_path(shard_id)):
            if self.fs.exists(path):
                self.fs.rm(path)

    def commit_shard(self, shard_id: int, temp_path: str, stats: Mapping[str, Any],
                     claim: Optional[claims.Claim] = None) -> None:
        """Move a closed temporary Parquet file into place, write its stats, then the marker.

        The stats gain ``file`` (size, SHA-256, mtime of the committed file), which every later
        reader checks. With ``claim``, nothing is moved unless this process still holds it.
        """
        size, sha256 = fsutil.file_digest(self.fs, temp_path)
        if claim is not None:
            claim.check()
        target = self.shard_path(shard_id)
        fsutil.replace(self.fs, temp_path, target)
        _, mtime_ns = fsutil.file_stat(self.fs, target)
        body = dict(stats, file={"size": size, "sha256": sha256, "mtime_ns": mtime_ns})
        fsutil.write_json_atomic(self.fs, self.stats_path(shard_id), body)
        fsutil.write_bytes_atomic(self.fs, self.marker_path(shard_id), b"")

    def claim_shard(self, shard_id: int, stale_s: float = claims.STALE_S,
                    heartbeat_s: float = claims.HEARTBEAT_S) -> tuple[Optional[claims.Claim], str]:
        """Claim a shard before computing it: (claim, "") or (None, who holds it)."""
        self.fs.makedirs(self.path("shards"), exist_ok=True)
        return claims.acquire(self.fs, self.claim_path(shard_id), stale_s, heartbeat_s)

    def committed_since(self, shard_id: int, since_ns: int) -> bool:
        """Whether the shard's marker was written at or after ``since_ns`` (by a concurrent launch)."""
        try:
            _, mtime_ns = fsutil.file_stat(self.fs, self.marker_path(shard_id))
        except FileNotFoundError:
            return False
        return mtime_ns is not None and mtime_ns >= since_ns

    def record_failure_or_say(self, shard_id: int, attempt: int, kind: str, message: str,
                              traceback_tail: str = "", **extra: Any) -> Optional[str]:
        """:meth:`record_failure`; when even the record cannot be written (a full disk), say so on
        stderr and return None, so that the caller can go on with other shards and exit non-zero."""
        try:
            return self.record_failure(shard_id, attempt, kind, message, traceback_tail, **extra)
        except OSError as exc:
            print(f"videofeat: shard {shard_name(shard_id)} attempt {attempt} failed ({message.strip()}); "
                  f"its failure record {self.failure_path(shard_id, attempt)} could not be written either: "
                  f"{fsutil.describe_error(exc, self.failure_path(shard_id, attempt))}", file=sys.stderr, flush=True)
            return None

    def record_failure(self, shard_id: int, attempt: int, kind: str, message: str,
                       traceback_tail: str = "", **extra: Any) -> str:
        if kind not in FAILURE_KINDS:
            raise ValueError(f"failure kind must be one of {FAILURE_KINDS}, got {kind!r}")
        body = {"shard_id": int(shard_id), "attempt": attempt, "kind": kind, "message": message,
                "traceback": traceback_tail[-4000:], "time": utc_now(), **process_identity(), **extra}
        path = self.failure_path(shard_id, attempt)
        fsutil.write_json_atomic(self.fs, path, body)
        return path

    def remove_temporaries(self, shard_id: int) -> None:
        """Drop leftovers of a killed attempt; they were never visible to readers anyway.

        Only the holder of the shard's claim may call this: another live process's temporaries
        are then impossible, since it would hold the claim."""
        prefix = f".{shard_name(shard_id)}.parquet.tmp-"
        for name in self._listing("shards"):
            if name.startswith(prefix):
                self.fs.rm(self.path("shards", name))

    def done_shards(self) -> list[int]:
        return sorted(int(n[:-5]) for n in self._listing("shards") if re.fullmatch(r"\d+\.done", n))
