"""Filesystem access through fsspec, so a run directory or a video root may be local or remote."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

import fsspec
from fsspec.core import url_to_fs

from videofeat.manifests.temporaries import owner_tag


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or any fsspec URL."""
    fs, path = url_to_fs(url)
    return fs, path.rstrip("/") if path not in ("/", "") else path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def join(*parts: str) -> str:
    return "/".join(p.rstrip("/") if i == 0 else p.strip("/") for i, p in enumerate(parts) if p != "")


def unique_suffix() -> str:
    """Unique per write and naming the writer (host, pid): see :mod:`videofeat.manifests.temporaries`."""
    return owner_tag()


def replace(fs: fsspec.AbstractFileSystem, source: str, target: str) -> None:
    """Move ``source`` onto ``target`` in one step. Locally this is ``os.replace``: atomic, and an
    error when ``target`` is a directory (``fs.mv`` would move the file into it instead)."""
    if is_local(fs):
        os.replace(source, target)
    else:
        fs.mv(source, target)


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write under a temporary name, then move into place: readers never see half a file."""
    tmp = f"{path}.tmp-{unique_suffix()}"
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    with fs.open(tmp, "wb") as handle:
        handle.write(data)
        if is_local(fs):
            handle.flush()
            os.fsync(handle.fileno())
    replace(fs, tmp, path)


def write_json_atomic(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    write_bytes_atomic(fs, path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    with fs.open(path, "rb") as handle:
        return json.loads(handle.read().decode())


def exists_with_backoff(fs: fsspec.AbstractFileSystem, path: str, budget_s: float) -> bool:
    """On shared filesystems a file written elsewhere can take a while to appear here."""
    deadline = time.monotonic() + budget_s
    delay = 0.25
    while True:
        fs.invalidate_cache()
        if fs.exists(path):
            return True
        if time.monotonic() + delay > deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 8.0)


def read_parquet(url: str, columns: Optional[list[str]] = None, fs: Optional[fsspec.AbstractFileSystem] = None):
    """A whole Parquet file as a table: ``url``, or ``url`` as a path inside ``fs``.

    Always on one thread: these are small tables (manifests, labels, a column of a shard), and
    pyarrow 26's thread pool can abort the process at exit ("terminate called without an active
    exception") after the work is done; through a Python file object it did so every time.
    """
    import pyarrow.parquet as pq

    fs, path = (fs, url) if fs is not None else filesystem(url)
    if is_local(fs):
        return pq.read_table(path, columns=columns, use_threads=False)
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle, columns=columns, use_threads=False)


def optional_read_json(fs: fsspec.AbstractFileSystem, path: str) -> Optional[Any]:
    try:
        return read_json(fs, path)
    except FileNotFoundError:
        return None


# Filesystems on which a file written on one machine can show up late on another (attribute
# caches, client-side metadata): network and cluster filesystems, and FUSE mounts of them.
SHARED_FS_TYPES = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs",
                   "panfs", "wekafs", "9p", "afs", "ocfs2", "gfs2", "orangefs", "cvmfs")


def mount_type(path: str) -> Optional[str]:
    """The filesystem type of the mount holding local ``path`` (``/proc/self/mountinfo``), or None
    where that cannot be read."""
    import re

    real = os.path.realpath(path)
    best, kind = "", None
    try:
        with open("/proc/self/mountinfo") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, right.split()[0]
    return kind


def late_writes_plausible(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Whether a file another machine just wrote may not be visible here yet: object stores and
    shared filesystems yes, a local disk no (unknown counts as yes)."""
    if not is_local(fs):
        return True
    kind = mount_type(path)
    return kind is None or kind.startswith("fuse") or kind.split(".")[0] in SHARED_FS_TYPES
