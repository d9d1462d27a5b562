"""Helpers for tests on the local SLURM cluster (``bash scripts/slurm_cluster.sh start``)."""

from __future__ import annotations

import re
import subprocess
import time
from typing import Callable, Iterable

import pytest

from videofeat.launcher.slurm import submit as ss


def require_cluster() -> None:
    """Skip, saying how to enable the test, when SLURM is absent or its cluster is not up."""
    ok, why = ss.slurm_available()
    if not ok:
        pytest.skip(f"no SLURM cluster here ({why}); start one with `bash scripts/slurm_cluster.sh start`")


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.2):
    """Poll ``predicate`` until it returns something truthy; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; queue: {queue_text()}")


def queue_text() -> str:
    return subprocess.run(["squeue", "-t", "all", "-o", "%i %T %r"], capture_output=True, text=True).stdout


def job_ids(text: str, label: str) -> list[str]:
    """Job ids printed by ``videofeat slurm`` after ``label:`` (e.g. ``arrays: 12 13``)."""
    match = re.search(rf"^{label}: ([\d ]+)", text, re.M)
    assert match, f"no '{label}:' line in:\n{text}"
    return match.group(1).split()


def active(ids: Iterable[str]) -> list[ss.QueuedJob]:
    return [j for j in ss.queue(list(ids)) if j.active]


def cancel_all(ids: Iterable[str]) -> None:
    """Teardown: leave no job of the test behind, whatever happened."""
    ids = [i for i in ids if i]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True)
