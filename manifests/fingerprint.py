"""Run fingerprints: what makes two shard files comparable, and nothing else.

The fingerprint covers everything that changes a feature value or a window's identity
(manifest, views, model and architecture, checkpoint hashes, preset and every sampling and
resize parameter, crop table, dtypes, videofeat major.minor). It deliberately leaves out what
only changes how fast the same numbers are produced: batch size, worker counts, device count,
world size, SLURM options and paths.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

# Keys that must never enter a fingerprint, even if a caller passes them by mistake.
EXCLUDED_KEYS = frozenset({
    "batch_size", "decode_procs", "num_workers", "device", "world_size", "rank", "nodes",
    "partition", "account", "qos", "time", "output", "run_dir", "manifest_path", "log_dir",
})


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def compute_fingerprint(parts: Mapping[str, Any]) -> str:
    bad = sorted(set(parts) & EXCLUDED_KEYS)
    if bad:
        raise ValueError(f"fingerprint parts must not include {', '.join(bad)}: they do not change features")
    return hashlib.sha256(canonical_json(dict(parts)).encode()).hexdigest()[:20]


def describe_difference(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Human-readable lines naming each fingerprint part that differs, down to nested fields
    (``preset.name: run directory has "aicity-vith", this launch has "aicity-vitl"``)."""
    lines = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if canonical_json(before) == canonical_json(after):
            continue
        if isinstance(before, Mapping) and isinstance(after, Mapping):
            lines += describe_difference(before, after, f"{prefix}{key}.")
        else:
            lines.append(f"{prefix}{key}: run directory has {_short(before)}, this launch has {_short(after)}")
    return lines


def _short(value: Any, limit: int = 120) -> str:
    text = canonical_json(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
