"""Per-shard claims: which process is computing a shard right now.

A claim is a small JSON file (host, pid, the pid's start time, start time, a random token)
created with create-exclusive and read back, never with ``flock``: ``O_EXCL`` creation is atomic
on local disks and on NFS v3+, where advisory locks are not to be relied on. While it computes,
the holder touches the file every ``heartbeat_s`` (its mtime is the heartbeat).

A claim is broken only when its holder is gone: on the same host, when its pid no longer runs
(or runs with another start time, i.e. the pid was reused, or is a zombie); under SLURM, when the
holder was an earlier run of this very job step (a requeue starts only after that run ended);
on any host, when the heartbeat is older than ``stale_s`` (``VIDEOFEAT_CLAIM_STALE_S``, default
300 s). Breaking renames the claim to a unique name (one breaker
wins the rename), checks that the renamed file is the very claim judged stale, and puts it back
if a new holder slipped in between; then the breaker creates its own claim as usual.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Optional

from videofeat.manifests import fsutil

log = logging.getLogger(__name__)

HEARTBEAT_S = 30.0
# Long against the heartbeat: NFS attribute caches may show an mtime up to a minute late.
STALE_S = float(os.environ.get("VIDEOFEAT_CLAIM_STALE_S", "300"))
# The SLURM ids that name one array task (or job) across its requeues.
_SLURM_TASK = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_PROCID")


class ClaimLost(RuntimeError):
    """This process's claim was broken (its heartbeat stalled past the timeout) or replaced."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    pid_start: Optional[int]
    started: str
    token: str
    slurm: Optional[dict] = None

    @classmethod
    def of_this_process(cls) -> "Holder":
        slurm = {k: os.environ[k] for k in (*_SLURM_TASK, "SLURM_RESTART_COUNT") if k in os.environ}
        return cls(socket.gethostname(), os.getpid(), _pid_start(os.getpid()),
                   time.strftime("%Y-%m-%dT%H:%M:%S%z"), uuid.uuid4().hex, slurm or None)

    @classmethod
    def from_body(cls, body: dict) -> "Holder":
        return cls(**{k: body.get(k) for k in cls.__dataclass_fields__})

    def describe(self) -> str:
        return f"host {self.host} pid {self.pid} since {self.started}"


def _pid_start(pid: int) -> Optional[int]:
    """The process's start time in clock ticks since boot (Linux), None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _pid_runs(pid: int, pid_start: Optional[int]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        if fields[0] == b"Z":
            return False  # killed, not yet reaped
        return pid_start is None or int(fields[19]) == pid_start
    except (OSError, IndexError, ValueError):
        return True


def stale_reason(body: Optional[dict], age_s: float, stale_s: float) -> Optional[str]:
    """Why the claim ``body`` (heartbeat ``age_s`` ago) may be broken, or None while it holds."""
    if body and body.get("host") == socket.gethostname() and body.get("pid"):
        if not _pid_runs(int(body["pid"]), body.get("pid_start")):
            return f"its holder (pid {body['pid']} on {body['host']}) no longer runs"
    theirs, ours = (body or {}).get("slurm") or {}, Holder.of_this_process().slurm or {}
    if theirs.get("SLURM_JOB_ID") and all(theirs.get(k) == ours.get(k) for k in _SLURM_TASK) \
            and theirs.get("SLURM_RESTART_COUNT", "0") != ours.get("SLURM_RESTART_COUNT", "0"):
        return f"its holder was an earlier run of this SLURM job (requeued; restart {ours.get('SLURM_RESTART_COUNT', '0')})"
    if age_s > stale_s:
        return f"no heartbeat for {age_s:.0f} s (timeout {stale_s:.0f} s)"
    return None


def read_claim(fs: Any, path: str) -> tuple[Optional[bytes], Optional[dict], float]:
    """(raw bytes, parsed body or None if half-written, heartbeat age in s); bytes None if absent."""
    try:
        _, mtime_ns = fsutil.file_stat(fs, path)
        with fs.open(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        return None, None, 0.0
    try:
        body = json.loads(raw.decode())
    except ValueError:
        body = None  # its creator is writing it this very moment
    age = 0.0 if mtime_ns is None else max(0.0, time.time() - mtime_ns / 1e9)
    return raw, body, age


class Claim:
    """A claim this process holds; :meth:`release` when the shard is committed or has failed."""

    def __init__(self, fs: Any, path: str, holder: Holder, heartbeat_s: float):
        self.fs, self.path, self.holder = fs, path, holder
        self.lost: Optional[str] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True,
                                        name=f"claim-heartbeat-{path.rsplit('/', 1)[-1]}")
        self._thread.start()

    def holds(self) -> bool:
        _, body, _ = read_claim(self.fs, self.path)
        return bool(body) and body.get("token") == self.holder.token

    def _beat(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                if not self.holds():
                    self.lost = f"the claim {self.path} no longer holds this process's token"
                    return
                if fsutil.is_local(self.fs):
                    os.utime(self.path)
                else:
                    self.fs.pipe_file(self.path, json.dumps(asdict(self.holder)).encode())
            except OSError as exc:  # a full or flaky disk: the next beat tries again
                log.warning("heartbeat of %s failed: %s", self.path, exc)

    def check(self) -> None:
        """Raise :class:`ClaimLost` unless this process still holds the claim (before a commit)."""
        if self.lost or not self.holds():
            raise ClaimLost(self.lost or f"the claim {self.path} was broken or replaced while this process "
                            "computed the shard (a heartbeat late past the timeout?); not committing")

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            if self.holds():
                fsutil.remove_quietly(self.fs, self.path)
        except OSError as exc:
            log.warning("could not release %s: %s", self.path, exc)


def acquire(fs: Any, path: str, stale_s: float = STALE_S,
            heartbeat_s: float = HEARTBEAT_S) -> tuple[Optional[Claim], str]:
    """(claim, "") when this process now holds ``path``; (None, who holds it) otherwise."""
    holder = Holder.of_this_process()
    data = json.dumps(asdict(holder), sort_keys=True).encode()
    for _ in range(3):
        if fsutil.create_exclusive(fs, path, data):
            if read_claim(fs, path)[0] == data:
                return Claim(fs, path, holder, heartbeat_s), ""
            return None, f"{path} was created by another process at the same moment"
        raw, body, age = read_claim(fs, path)
        if raw is None:
            continue  # released between our attempt and our look: try again
        why = stale_reason(body, age, stale_s)
        if why is None:
            who = Holder.from_body(body).describe() if body else "a process that is creating it right now"
            return None, f"claimed by {who} (heartbeat {age:.0f} s ago)"
        if _break(fs, path, raw):
            log.warning("broke the claim %s: %s", path, why)
    return None, f"{path} is contended: claimed and released repeatedly while this process tried"


def _break(fs: Any, path: str, seen: bytes) -> bool:
    """Remove the claim at ``path`` only if it still is the one whose bytes were ``seen``."""
    aside = f"{path}.broken-{fsutil.unique_suffix()}"
    try:
        fsutil.replace(fs, path, aside)
    except FileNotFoundError:
        return False  # another process broke or released it first
    with fs.open(aside, "rb") as handle:
        taken = handle.read()
    if taken == seen:
        fsutil.remove_quietly(fs, aside)
        return True
    # A new holder claimed it between our look and our rename: give it back untouched.
    if fsutil.is_local(fs):
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
    else:
        fsutil.create_exclusive(fs, path, taken)
    fsutil.remove_quietly(fs, aside)
    return False
