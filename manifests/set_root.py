"""The root of a multi-set launch: ``OUT/sets.json`` and one ordinary run directory per set.

```
OUT/sets.json              the sets extracted into OUT (names, in order), the sets file, the manifest
OUT/<name>/                a complete run directory (run.json, shards, stats, markers, failures, logs)
OUT/plans/<plan_id>.json   plans of multi-set launches (each set's plans/ holds its copy)
OUT/slurm/                 SLURM submissions of multi-set launches
```

Each set's run directory is exactly what a single-set launch into ``OUT/<name>`` writes, so
every command that takes a run directory works on it; ``status``, ``reduce`` and ``slurm
rerun`` also take ``OUT`` and act on every set.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from videofeat.manifests import fsutil

SETS_FILE = "sets.json"


def read_set_root(root: Any) -> Optional[dict]:
    """``sets.json`` of ``root`` (a RunDir), or None when ``root`` is not a multi-set root."""
    return fsutil.optional_read_json(root.fs, root.path(SETS_FILE))


def set_dirs(root: Any) -> list[str]:
    """URLs of the run directories of every set under ``root`` (empty when it is not a multi-set root)."""
    record = read_set_root(root)
    return [fsutil.join(root.url, name) for name in (record or {}).get("sets", [])]


def write_set_root(root: Any, names: Sequence[str], sets_file: str, manifest: str) -> dict:
    """Record the sets of a launch; sets recorded by earlier launches into ``root`` are kept."""
    record = read_set_root(root) or {}
    known = list(record.get("sets", []))
    known += [n for n in names if n not in known]
    body = {"sets": known, "sets_file": sets_file, "manifest": manifest}
    root.fs.makedirs(root.root, exist_ok=True)
    if body != record:
        fsutil.write_json_atomic(root.fs, root.path(SETS_FILE), body)
    return body
