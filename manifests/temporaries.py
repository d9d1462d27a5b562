"""Temporary files of our own naming: who wrote them, and whether that writer is gone.

Every file is written under ``<final name>.tmp-<host>-p<pid>-<nonce>`` and renamed into place,
so a process killed mid-write leaves its temporary behind (a checkpoint-sized one for a ViT-L
fine-tune). Each stage removes the stale ones of its own folder when it starts, and never one a
live process may still be writing:

- written on this host: stale once its pid is no longer a running process;
- written on another host, or by a version that did not record its host (``.tmp-<pid>``,
  ``.tmp-<pid>-<nonce>``, ``.tmp.<pid>``): its pid means nothing here, but a live writer keeps
  the file's mtime fresh, so it is stale only when untouched for ``grace_s``.

Hostnames are assumed distinct between the machines that share a folder, as SLURM requires.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)

DEFAULT_GRACE_S = 600.0

_TAGGED = re.compile(r"^(?P<base>.+)\.tmp-(?P<host>.+)-p(?P<pid>\d+)-[0-9a-f]{8}$")
_LEGACY = re.compile(r"^(?P<base>.+)\.tmp[-.](?P<pid>\d+)(?:-[0-9a-f]{8})?$")


def owner_tag() -> str:
    """``<host>-p<pid>-<nonce>``: unique per write, and names the writer."""
    return f"{socket.gethostname()}-p{os.getpid()}-{uuid.uuid4().hex[:8]}"


def temp_path(path: str) -> str:
    return f"{path}.tmp-{owner_tag()}"


@dataclass(frozen=True)
class Temporary:
    name: str
    base: str              # the final name it was going to become
    host: Optional[str]    # None: not recorded
    pid: int


def parse(name: str) -> Optional[Temporary]:
    """The writer of a temporary of our naming, or None for any other name."""
    match = _TAGGED.match(name)
    if match:
        return Temporary(name, match["base"], match["host"], int(match["pid"]))
    match = _LEGACY.match(name)
    if match:
        return Temporary(name, match["base"], None, int(match["pid"]))
    return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def is_stale(temp: Temporary, mtime: Optional[float], grace_s: float = DEFAULT_GRACE_S,
             now: Optional[float] = None) -> bool:
    if temp.pid == os.getpid() and temp.host in (None, socket.gethostname()):
        return False  # this very process may be writing it
    if temp.host == socket.gethostname():
        return not pid_alive(temp.pid)
    if temp.host is None and pid_alive(temp.pid):
        return False
    if mtime is None:
        return False  # cannot tell its age: leave it
    return (time.time() if now is None else now) - mtime > grace_s


def _mtime(info: dict) -> Optional[float]:
    value: Any = info.get("mtime", info.get("LastModified", info.get("last_modified")))
    if value is None:
        return None
    return value.timestamp() if hasattr(value, "timestamp") else float(value)


def remove_stale(fs: Any, directory: str, ours: Callable[[str], bool],
                 grace_s: float = DEFAULT_GRACE_S) -> list[str]:
    """Remove stale temporaries in ``directory`` whose final name satisfies ``ours``; returns their
    paths. A temporary that vanishes meanwhile (its writer renamed it) is not an error."""
    try:
        entries = fs.ls(directory, detail=True)
    except FileNotFoundError:
        return []
    removed = []
    for entry in entries:
        path = entry["name"]
        temp = parse(path.rstrip("/").rsplit("/", 1)[-1])
        if temp is None or entry.get("type") == "directory" or not ours(temp.base):
            continue
        if not is_stale(temp, _mtime(entry), grace_s):
            continue
        try:
            fs.rm(path)
        except FileNotFoundError:
            continue
        removed.append(path)
    if removed:
        log.info("removed %d stale temporary file(s) of killed writers in %s", len(removed), directory)
    return removed
