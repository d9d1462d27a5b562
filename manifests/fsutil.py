"""Filesystem access through fsspec, so a run directory or a video root may be local or remote."""

from __future__ import annotations

import errno
import hashlib
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
    """Write under a temporary name, then move into place: readers never see half a file.

    A write that fails (a full disk) takes its temporary with it, so no empty or partial
    ``*.tmp-*`` file is left beside the target.
    """
    tmp = f"{path}.tmp-{unique_suffix()}"
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    try:
        with fs.open(tmp, "wb") as handle:
            handle.write(data)
            if is_local(fs):
                handle.flush()
                os.fsync(handle.fileno())
        replace(fs, tmp, path)
    except BaseException:
        remove_quietly(fs, tmp)
        raise


def remove_quietly(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Remove ``path`` if it exists; cleanup after a failure must not hide that failure."""
    try:
        if is_local(fs):
            os.unlink(path)
        elif fs.exists(path):
            fs.rm(path)
    except (FileNotFoundError, OSError):
        pass


def is_no_space(exc: BaseException) -> bool:
    """A full disk or quota: ENOSPC / EDQUOT, also when a library wraps it in its own text."""
    codes = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    while exc is not None:
        if isinstance(exc, OSError) and (exc.errno in codes or "No space left on device" in str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def describe_error(exc: BaseException, where: str) -> str:
    """One line for a failure record; a full disk says so in words and names the fix."""
    if is_no_space(exc):
        return (f"no space left on device while writing {where} ({type(exc).__name__}: {exc}); free space "
                "there, then rerun the same command: it computes only what is missing")
    return f"{type(exc).__name__}: {exc}"


def file_digest(fs: fsspec.AbstractFileSystem, path: str, chunk_bytes: int = 8 << 20) -> tuple[int, str]:
    """(size in bytes, SHA-256 hex) of a file, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as handle:
        while True:
            block = handle.read(chunk_bytes)
            if not block:
                break
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def file_stat(fs: fsspec.AbstractFileSystem, path: str) -> tuple[int, Optional[int]]:
    """(size, mtime in ns or None where the filesystem does not say); FileNotFoundError if absent."""
    if is_local(fs):
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    info = fs.info(path)
    mtime = info.get("mtime") or info.get("LastModified") or info.get("updated")
    if isinstance(mtime, (int, float)):
        return int(info["size"]), int(mtime * 1e9)
    return int(info["size"]), None


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Create ``path`` holding ``data`` only if it does not exist; True when this call created it.

    Locally (and on NFS v3+, where O_EXCL is atomic on the server) this is ``O_CREAT | O_EXCL``;
    elsewhere the best a filesystem offers is an exclusive-mode open, so callers read the file
    back and check that it holds their own data before trusting it.
    """
    if is_local(fs):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, data)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            remove_quietly(fs, path)
            raise
        os.close(fd)
        return True
    if fs.exists(path):
        return False
    try:
        with fs.open(path, "xb") as handle:
            handle.write(data)
    except FileExistsError:
        return False
    except ValueError:  # no exclusive mode on this filesystem: write, and let the caller verify
        with fs.open(path, "wb") as handle:
            handle.write(data)
    return True


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
    ``ParquetFile`` rather than ``read_table``: the latter goes through ``pyarrow.dataset``,
    whose import pulls in pandas (0.4 s and ~33 MB in every process that reads a manifest).
    """
    import pyarrow.parquet as pq

    fs, path = (fs, url) if fs is not None else filesystem(url)
    if is_local(fs):
        return pq.ParquetFile(path).read(columns=columns, use_threads=False)
    with fs.open(path, "rb") as handle:
        return pq.ParquetFile(handle).read(columns=columns, use_threads=False)


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
