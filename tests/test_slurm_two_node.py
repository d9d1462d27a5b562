"""videofeat on a real two-node SLURM cluster (``bash scripts/slurm_cluster.sh start --nodes 2``).

Two slurmd daemons on this machine, nodes vfnode1 (127.0.0.2) and vfnode2 (127.0.0.3), each in
its own UTS namespace, so a process on a node sees that node's name as its host name. The tests
reach the cluster through ``SLURM_CONF`` and skip, saying why, where it is not up:

- its daemons listen on loopback addresses only, and a job step sees its node's host name;
- an extraction array whose tasks run on both nodes gives the dataset of one local process;
- fine-tuning on 2 nodes x 1 rank: ``srun torchrun`` meets at the c10d rendezvous on the first
  node and trains to the end;
- a node lost in the middle of a shard (its slurmd and every job step on it SIGKILLed): the
  cluster marks it down, requeues the array task onto the other node, and the dataset equals
  the local one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import run_cli
from helpers_extract import TINY_ARGS, make_dataset, tiny_checkpoint
from slurm_helpers import (TWO_NODES, active, cancel_all, job_ids, jobcomp_records, node_states,
                           require_two_node_cluster, two_node_script, wait_for)
from test_finetune_fixtures import cpu_test_args, make_finetune_data
from videofeat.manifests.ledger import DONE, RunDir
from videofeat.manifests.manifest import write_manifest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# Shard 2 takes several seconds: long enough for its node to be lost in the middle of it.
SPECS = [("Rear_view_user_id_1_NoAudio_1", 48, 0), ("Rear_view_user_id_2_NoAudio_1", 40, 1),
         ("Rear_view_user_id_3_NoAudio_1", 1600, 2), ("Rear_view_user_id_4_NoAudio_1", 56, 3)]
LONG = 2
# Two array tasks of two shards each (shards 0-1 and 2-3). The partition places each job on its
# least loaded node, so the two tasks start on different nodes; few Python starts keep the tests
# short on a small machine.
ARRAY = ("--shards-per-task", "2")
LONG_TASK = 1
WORKER = (*TINY_ARGS, "--decode-procs", "1")


@pytest.fixture
def two_nodes(monkeypatch) -> None:
    """Every command of the test (and videofeat's own sbatch / squeue calls) on the two-node cluster."""
    for key, value in require_two_node_cluster().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    """Videos, manifest, checkpoint, and the reference: the same extraction by one local process,
    started at once beside the cluster's runs (it never touches SLURM) and awaited when needed."""
    require_two_node_cluster()
    root = tmp_path_factory.mktemp("two_node_data")
    write_manifest(make_dataset(root, SPECS, action=False), str(root / "manifest.parquet"))
    data = {"manifest": str(root / "manifest.parquet"), "checkpoint": tiny_checkpoint(root / "tiny.pt"),
            "root": root, "local": str(root / "local")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    data["process"] = subprocess.Popen(
        [sys.executable, "-m", "videofeat.launcher.cli", "extract", data["manifest"], "-o", data["local"], *WORKER,
         "--checkpoint", data["checkpoint"]], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**env, "OMP_NUM_THREADS": "1"})
    yield data
    if data["process"].poll() is None:
        data["process"].kill()


def _reference(data: dict) -> str:
    """The local run's directory, reduced (waits for the local extraction the first time)."""
    if not os.path.exists(os.path.join(data["local"], "dataset")):
        _, err = data["process"].communicate(timeout=180)
        assert data["process"].returncode == 0, err[-3000:]
        run_cli("reduce", data["local"])
    return data["local"]


def _rows(run_dir: str):
    table = pq.read_table(os.path.join(run_dir, "dataset", "rear.parquet"))
    keys = list(zip(table.column("video_id").to_pylist(), table.column("window_index").to_pylist()))
    return keys, np.asarray(table.column("feature").to_pylist(), dtype=np.float64)


def _assert_equals_reference(run_dir: str, data: dict) -> None:
    keys, features = _rows(run_dir)
    local_keys, local_features = _rows(_reference(data))
    assert keys == local_keys and len(keys) == sum((n - 16) // 8 + 1 for _, n, _ in SPECS)
    np.testing.assert_allclose(features, local_features, rtol=0, atol=1e-5)


def _submit_extract(data: dict, out: str, *extra: str) -> tuple[list[str], list[str]]:
    result = run_cli("slurm", "extract", data["manifest"], "-o", out, *WORKER, "--checkpoint", data["checkpoint"],
                     "--time", "10", *extra, cwd=str(data["root"]))
    return job_ids(result.stdout, "arrays"), job_ids(result.stdout, "reducer")


def _task_node(array: str, task: int) -> str:
    """The node SLURM runs an array task on (empty while it is pending)."""
    out = subprocess.run(["squeue", "-h", "-j", f"{array}_{task}", "-o", "%T %N"], capture_output=True,
                         text=True, timeout=15).stdout.split()
    return out[1] if len(out) == 2 and out[0] == "RUNNING" else ""


def _listening(ports: set[int]) -> dict[int, str]:
    """``{port: IPv4 address}`` of the TCP sockets listening on those ports (from /proc/net/tcp)."""
    out = {}
    with open("/proc/net/tcp") as handle:
        for line in handle.readlines()[1:]:
            fields = line.split()
            address, port = fields[1].split(":")
            if fields[3] == "0A" and int(port, 16) in ports:  # 0A: LISTEN
                out[int(port, 16)] = ".".join(str(b) for b in reversed(bytes.fromhex(address)))
    return out


def test_cluster_is_on_loopback_beside_the_single_node_one(two_nodes):
    conf = Path(os.environ["SLURM_CONF"]).read_text()
    ports = {int(re.search(r"^SlurmctldPort=(\d+)", conf, re.M)[1]), *map(int, re.findall(r"\bPort=(\d+)", conf))}
    nodes = dict(re.findall(r"^NodeName=(\S+) NodeAddr=(\S+)", conf, re.M))
    assert nodes == {"vfnode1": "127.0.0.2", "vfnode2": "127.0.0.3"} and len(ports) == 3
    # Every daemon of this cluster listens on a loopback address only, each slurmd on its node's.
    listening = _listening(ports)
    assert set(listening) == ports and all(a.startswith("127.") for a in listening.values()), listening
    assert sorted(listening.values()) == ["127.0.0.1", "127.0.0.2", "127.0.0.3"], listening
    # The client configuration of the single-node cluster is not this one's.
    system = Path("/etc/slurm/slurm.conf")
    assert not system.exists() or "vfnode" not in system.read_text()
    # A job step on a node sees that node's name as its host name.
    result = subprocess.run(["srun", "-N2", "--ntasks-per-node=1", "-l", "hostname"], capture_output=True,
                            text=True, timeout=60, check=True)
    assert sorted(result.stdout.split()) == ["0:", "1:", *TWO_NODES], result.stdout


def test_extraction_array_runs_on_both_nodes(two_nodes, dataset, tmp_path):
    out = str(tmp_path / "run")
    run = RunDir(out)
    submitted: list[str] = []
    try:
        arrays, reducer = _submit_extract(dataset, out, *ARRAY)
        submitted += arrays + reducer
        wait_for(lambda: not active(arrays + reducer), 150, "the array and its reducer to leave the queue", 0.5)
        assert {r.shard_id: r.state for r in run.records(range(4))} == {s: DONE for s in range(4)}
        stats = {r.shard_id: r.stats for r in run.records(range(4))}
        # Each shard's stats name the node that computed it, as its host name and as SLURM's node name.
        assert {s["host"] for s in stats.values()} == set(TWO_NODES), stats
        assert all(s["slurm"]["slurmd_nodename"] == s["host"] for s in stats.values())
        _assert_equals_reference(out, dataset)
    finally:
        cancel_all(submitted)


def test_finetune_two_nodes_one_rank_each(two_nodes, tmp_path):
    data = make_finetune_data(tmp_path / "data")
    out = tmp_path / "ft"
    submitted: list[str] = []
    try:
        result = run_cli("slurm", "finetune", *cpu_test_args(data, out, "--epochs", "1"), "--nodes", "2",
                         "--tasks-per-node", "1", "--procs-per-task", "1", "--time", "10", "--max-requeues", "0",
                         cwd=str(tmp_path))
        job = job_ids(result.stdout, "fine-tuning job")[0]
        submitted.append(job)
        log = out / "slurm" / f"finetune_{job}.out"

        # While it runs, SLURM shows the torchrun step spread over both nodes, one task each.
        def step_on_both_nodes():
            steps = subprocess.run(["squeue", "-h", "-s", "-j", job, "-o", "%i %N"], capture_output=True,
                                   text=True, timeout=15).stdout.split("\n")
            assert active([job]), f"job {job} ended early:\n{log.read_text()[-3000:] if log.exists() else ''}"
            return any(line.split()[-1:] == ["vfnode[1-2]"] for line in steps if line.startswith(f"{job}.0 "))

        wait_for(step_on_both_nodes, 120, "the torchrun step on both nodes")
        wait_for(lambda: not active([job]), 180, "the fine-tuning job to finish", 0.5)
        text = log.read_text()
        assert "fine-tuning finished with exit status 0" in text, text[-3000:]
        # The rendezvous endpoint is the first node of the allocation.
        assert re.search(r"2 agent\(s\), rendezvous vfnode1:\d+", text), text[:2000]
        events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        starts = [e for e in events if e["event"] == "start"]
        assert len(starts) == 1 and starts[0]["world_size"] == 2
        steps = [e["step"] for e in events if e["event"] == "train"]
        assert steps == list(range(1, starts[0]["steps_per_epoch"] + 1))
        assert (out / "COMPLETED").exists() and (out / "checkpoint-last.pt").exists()
    finally:
        cancel_all(submitted)


def test_node_lost_mid_shard_requeues_onto_the_other_node(two_nodes, dataset, tmp_path):
    out = str(tmp_path / "run")
    run = RunDir(out)
    submitted: list[str] = []
    lost = None
    try:
        arrays, reducer = _submit_extract(dataset, out, *ARRAY)
        submitted += arrays + reducer
        log_path = Path(run.log_path(LONG, 1))
        lost = wait_for(lambda: log_path.exists() and _task_node(arrays[0], LONG_TASK), 120, "the long shard to start")
        kept = next(n for n in TWO_NODES if n != lost)
        # The real fault: the node goes away at once, its slurmd and its job steps with it.
        two_node_script("kill-node", lost)
        assert not Path(run.marker_path(LONG)).exists(), "the shard finished before its node was lost"

        wait_for(lambda: node_states().get(lost, "").startswith("down"), 60, f"{lost} to be marked down")
        wait_for(lambda: not active(arrays + reducer), 150, "the requeued array and its reducer", 0.5)
        records = {r.shard_id: r for r in run.records(range(4))}
        assert {s: r.state for s, r in records.items()} == {s: DONE for s in range(4)}
        long_stats = records[LONG].stats
        assert long_stats["host"] == kept and long_stats["slurm"]["slurm_restart_count"] == "1", long_stats
        # SLURM's own record of the task: failed with its node, then completed on the other one.
        attempts = [(r["JobState"], r["NodeList"]) for r in jobcomp_records()
                    if r.get("ArrayJobId") == arrays[0] and r.get("ArrayTaskId") == str(LONG_TASK)]
        assert attempts == [("NODE_FAIL", lost), ("COMPLETED", kept)], attempts
        task_log = Path(run.path("slurm", "logs", f"{arrays[0]}_{LONG_TASK}.out")).read_text()
        assert f"on {lost} (restart 0)" in task_log and f"on {kept} (restart 1)" in task_log, task_log
        _assert_equals_reference(out, dataset)
    finally:
        cancel_all(submitted)
        if lost is not None:
            two_node_script("start")  # the lost node rejoins (ReturnToService=2)
