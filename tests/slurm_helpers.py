"""Helpers for tests on the local SLURM clusters: the single-node one (``bash
scripts/slurm_cluster.sh start``) and the two-node one beside it (``... start --nodes 2``),
which client commands reach through ``SLURM_CONF``."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable

import pytest

from videofeat.launcher.slurm import submit as ss


def require_cluster() -> None:
    """Skip, saying how to enable the test, when SLURM is absent or its cluster is not up."""
    ok, why = ss.slurm_available()
    if not ok:
        pytest.skip(f"no SLURM cluster here ({why}); start one with `bash scripts/slurm_cluster.sh start`")


SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slurm_cluster.sh"
# Where `slurm_cluster.sh start --nodes 2` keeps the two-node cluster's state and slurm.conf.
TWO_NODE_DIR = os.environ.get("VIDEOFEAT_SLURM2_DIR", "/tmp/videofeat-slurm2")
TWO_NODES = ("vfnode1", "vfnode2")


def require_two_node_cluster() -> dict[str, str]:
    """Skip, saying why and how to start it, unless the two-node cluster answers with both nodes up.

    Returns the environment its client commands need (``SLURM_CONF``); a test puts it into
    ``os.environ`` (monkeypatch.setenv) so that every command it runs, and videofeat's own
    calls to sbatch and squeue, reach this cluster and not the single-node one.
    """
    start = f"start it with `VIDEOFEAT_SLURM_DIR={TWO_NODE_DIR} bash scripts/slurm_cluster.sh start --nodes 2`"
    conf = os.path.join(TWO_NODE_DIR, "slurm.conf")
    if not os.path.exists(conf):
        pytest.skip(f"no two-node SLURM cluster here ({conf} does not exist); {start}")
    env = {**os.environ, "SLURM_CONF": conf}
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, env=env, timeout=15)
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, env=env,
                               timeout=15)
    except FileNotFoundError:
        pytest.skip(f"SLURM is not installed; {start}")
    except subprocess.TimeoutExpired:
        pytest.skip(f"the two-node cluster's slurmctld does not answer; {start}")
    if "UP" not in ping.stdout:
        pytest.skip(f"the two-node cluster's slurmctld is not up ({(ping.stdout or ping.stderr).strip()}); {start}")
    states = dict(line.split()[:2] for line in nodes.stdout.splitlines() if len(line.split()) >= 2)
    usable = [n for n in TWO_NODES if states.get(n) in ("idle", "mixed", "allocated")]
    if len(usable) != len(TWO_NODES):
        pytest.skip(f"the two-node cluster's nodes are not both up (sinfo: {states}); {start}")
    return {"SLURM_CONF": conf}


def two_node_script(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """``slurm_cluster.sh ARGS --nodes 2`` on the two-node cluster (kill-node, start)."""
    return subprocess.run(["bash", str(SCRIPT), *args, "--nodes", "2"], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "VIDEOFEAT_SLURM_DIR": TWO_NODE_DIR}, check=True)


def node_states() -> dict[str, str]:
    """``{node: state}`` as sinfo shows them (``down*``: not responding and marked down)."""
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=15).stdout
    return dict(line.split()[:2] for line in out.splitlines() if len(line.split()) >= 2)


def jobcomp_records(state_dir: str = TWO_NODE_DIR) -> list[dict[str, str]]:
    """The cluster's jobcomp file: one ``{field: value}`` per finished job or array task attempt
    (there is no accounting database, so ``sacct`` has nothing)."""
    path = os.path.join(state_dir, "jobcomp.txt")
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [dict(field.split("=", 1) for field in line.split() if "=" in field) for line in handle]


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
