"""Faults that hit committed shards and concurrent launches, each injected for real, then a plain rerun.

Shards changed after their marker (bytes flipped, truncated, swapped), NaN features from a NaN
checkpoint, a full disk (a real small tmpfs) while a shard and while its failure record is
written, and two real ``videofeat extract`` processes on one run directory. Each ends in a clear
record or message, and a plain rerun ends with a dataset equal to a clean run's.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import run_cli
from helpers_extract import TINY_ARGS, make_dataset, tiny_checkpoint
from test_extract import tiny_config
from videofeat.launcher.cli import main as cli_main
from videofeat.manifests import claims
from videofeat.manifests.ledger import (CORRUPT, DONE, FAILED, INTERRUPTED, MISSING, RUNNING, FingerprintMismatch,
                                        RunDir)
from videofeat.manifests.manifest import write_manifest
from videofeat.workers.extract.loop import run_extraction
from videofeat.workers.reduce.merge import IncompleteRun, ReduceConfig, reduce_run

# Shards 0 and 1 are small; 2 and 3 hold ~70 KB each (44 windows of 64 features and 400 class
# probabilities): the full-disk test needs shards well beyond the room it leaves for plans,
# claims, logs and failure records.
SPECS = [("Rear_view_user_id_1_NoAudio_1", 48, 0), ("Rear_view_user_id_2_NoAudio_1", 40, 0),
         ("Rear_view_user_id_3_NoAudio_1", 64, 1), ("Rear_view_user_id_4_NoAudio_1", 360, 2),
         ("Rear_view_user_id_5_NoAudio_1", 360, 3)]
CLASSES = 400
SHARDS = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    rows = make_dataset(root, SPECS, action=False)
    manifest = str(root / "manifest.parquet")
    write_manifest(rows, manifest)
    ckpt = tiny_checkpoint(root / "tiny.pt", num_classes=CLASSES)
    clean = str(root / "clean")
    assert run_extraction(tiny_config(manifest, clean, ckpt)) == 0
    reduce_run(ReduceConfig(clean, marker_wait_s=0))
    return SimpleNamespace(root=root, manifest=manifest, ckpt=ckpt, clean=clean,
                           dataset=pq.read_table(f"{clean}/dataset/rear.parquet"))


def assert_equals_clean(data, run_dir: str) -> None:
    """Reduce ``run_dir``; its dataset must equal the clean run's, row for row."""
    reduce_run(ReduceConfig(run_dir, marker_wait_s=0))
    got = pq.read_table(f"{run_dir}/dataset/rear.parquet")
    want = data.dataset
    assert got.num_rows == want.num_rows > 0
    for name in want.column_names:
        if name in ("feature", "probs"):
            np.testing.assert_allclose(np.array(got.column(name).to_pylist()), np.array(want.column(name).to_pylist()),
                                       rtol=0, atol=1e-5)
        else:
            assert got.column(name).to_pylist() == want.column(name).to_pylist(), name


def copy_run(data, path: Path) -> RunDir:
    """A finished run to damage (copy2 keeps the mtimes its stats recorded)."""
    shutil.copytree(data.clean, path, ignore=shutil.ignore_patterns("dataset"))
    return RunDir(str(path))


def flip_feature_bytes(path: str, keep_mtime: bool = False) -> None:
    """Flip 8 bytes inside the first row group's feature data page, as a bad disk or cable would."""
    st = os.stat(path)
    meta = pq.read_metadata(path)
    index = next(i for i in range(meta.num_columns) if meta.schema.column(i).path.startswith("feature."))
    column = meta.row_group(0).column(index)
    end = (column.dictionary_page_offset or column.data_page_offset) + column.total_compressed_size
    offset = column.data_page_offset + (end - column.data_page_offset) // 2  # inside the data page
    with open(path, "r+b") as handle:
        handle.seek(offset)
        chunk = handle.read(8)
        handle.seek(offset)
        handle.write(bytes(b ^ 0xFF for b in chunk))
    if keep_mtime:  # bit rot: the bytes change, the file's mtime does not
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def states(run: RunDir, verify: str = "quick") -> dict[int, str]:
    return {r.shard_id: r.state for r in run.records(SHARDS, verify=verify)}


def leftovers(run_dir: str) -> list[str]:
    """Temporaries, empty records and claims: none may survive a launch."""
    found = []
    for sub in ("shards", "failures"):
        for name in os.listdir(os.path.join(run_dir, sub)):
            path = os.path.join(run_dir, sub, name)
            if ".tmp-" in name or name.endswith(".claim") or (sub == "failures" and os.path.getsize(path) == 0):
                found.append(f"{sub}/{name}")
    return found


# ----- shards changed after their marker -------------------------------------------------------
def test_changed_shards_are_corrupt_refused_by_reduce_and_recomputed_by_a_plain_rerun(data, tmp_path, capsys):
    run = copy_run(data, tmp_path / "run")
    flip_feature_bytes(run.shard_path(0), keep_mtime=True)                     # bit rot
    with open(run.shard_path(1), "r+b") as handle:                             # truncated
        handle.truncate(os.path.getsize(run.shard_path(1)) // 2)
    assert os.path.getsize(run.shard_path(2)) == os.path.getsize(run.shard_path(3))
    os.rename(run.shard_path(2), run.shard_path(9))                            # 2 and 3 swapped (same size)
    os.rename(run.shard_path(3), run.shard_path(2))
    os.rename(run.shard_path(9), run.shard_path(3))

    # status: the quick check (size; the hash once the mtime moved) sees all but the silent bit rot
    status = run_cli("status", run.root).stdout
    assert "3 corrupt" in status and "1 done" in status, status
    assert "00001 corrupt" in status and "truncated or replaced after its marker" in status
    assert "00002 corrupt" in status and "00003 corrupt" in status and "changed after its marker: SHA-256" in status
    assert "00003 corrupt" in status and "videofeat extract" in status

    # reduce hashes every shard: it refuses all four, naming them and the command, and writes nothing
    assert cli_main(["reduce", run.root, "--marker-wait", "0"]) == 1
    err = capsys.readouterr().err
    assert "shards corrupt (4): 00000, 00001, 00002, 00003" in err
    assert "changed after its marker" in err and f"videofeat extract {data.manifest} -o {run.root}" in err
    assert not os.path.exists(f"{run.root}/dataset/rear.parquet")
    # ...and what it found is noted, so status and the planner see the bit rot too
    assert states(run) == {s: CORRUPT for s in SHARDS}

    # the printed command is a plain rerun: it recomputes exactly the four
    assert run_extraction(tiny_config(data.manifest, run.root, data.ckpt)) == 0
    assert states(run, "full") == {s: DONE for s in SHARDS}
    assert [run.records([s])[0].stats["attempt"] for s in SHARDS] == [2, 2, 2, 2]
    assert not any(n.endswith(".corrupt") for n in os.listdir(run.path("shards")))
    assert_equals_clean(data, run.root)


def test_an_unreadable_shard_names_its_path_and_the_fix(data, tmp_path, capsys):
    """Shards whose stats predate file digests: the read itself (page CRC, footer) must catch it."""
    run = copy_run(data, tmp_path / "run")
    for shard in (0, 1):
        stats = json.loads(Path(run.stats_path(shard)).read_text())
        del stats["file"]
        Path(run.stats_path(shard)).write_text(json.dumps(stats))
    flip_feature_bytes(run.shard_path(0))
    assert cli_main(["reduce", run.root, "--marker-wait", "0"]) == 2   # found while merging: a page CRC
    err = capsys.readouterr().err
    assert f"shard {run.shard_path(0)} is corrupt" in err and "plain rerun" in err, err
    assert "Traceback" not in err

    with open(run.shard_path(1), "r+b") as handle:
        handle.truncate(100)
    assert cli_main(["reduce", run.root, "--marker-wait", "0"]) == 1   # found while checking: the footer
    err = capsys.readouterr().err
    assert "shards corrupt (2): 00000, 00001" in err and f"{run.shard_path(1)} is corrupt" in err
    assert "magic bytes" in err and "videofeat extract" in err

    assert run_extraction(tiny_config(data.manifest, run.root, data.ckpt)) == 0
    assert [run.records([s])[0].stats["attempt"] for s in SHARDS] == [2, 2, 1, 1]
    assert_equals_clean(data, run.root)


# ----- non-finite features ---------------------------------------------------------------------
def test_nan_features_are_never_written(data, tmp_path):
    import torch

    from videofeat.models import create_model
    from videofeat.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = create_model("videomae_test", num_classes=CLASSES)
    with torch.no_grad():  # one NaN weight, as a diverged fine-tune leaves it
        model.patch_embed.proj.weight[0, 0, 0, 0, 0] = float("nan")
    nan_ckpt = str(tmp_path / "nan.pt")
    save_checkpoint(nan_ckpt, model)
    run = RunDir(str(tmp_path / "run"))
    assert run_extraction(tiny_config(data.manifest, run.root, nan_ckpt), shard_ids=[0, 1]) == 1
    for record in run.records([0, 1]):
        assert record.state == FAILED
        message = record.last_failure["message"]
        assert "NonFiniteFeatures" in message and "not finite" in message and "NaN" in message
        assert "checkpoint" in message and "Nothing of this shard was written" in message
    first = {0: "Rear_view_user_id_1_NoAudio_1", 1: "Rear_view_user_id_3_NoAudio_1"}
    assert all(first[r.shard_id] in r.last_failure["message"] for r in run.records([0, 1]))
    assert not [n for n in os.listdir(run.path("shards")) if "parquet" in n] and not leftovers(run.root)
    with pytest.raises(IncompleteRun, match="shards failed"):
        reduce_run(ReduceConfig(run.root, marker_wait_s=0))
    # The run stays bound to the checkpoint it was started with: a good one needs a new run directory.
    with pytest.raises(FingerprintMismatch, match="checkpoint"):
        run_extraction(tiny_config(data.manifest, run.root, data.ckpt))


# ----- a full disk -----------------------------------------------------------------------------
@contextmanager
def small_tmpfs(path: Path, size: str = "4m"):
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({result.stderr.strip()}): the full-disk test needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(disk: Path, leave_bytes: int) -> Path:
    """Grow a filler file until only ``leave_bytes`` are free on ``disk``."""
    filler = disk / "filler"
    st = os.statvfs(disk)
    with open(filler, "ab") as handle:
        handle.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave_bytes))
    st = os.statvfs(disk)
    assert st.f_bavail * st.f_frsize == leave_bytes
    return filler


def test_full_disk_fails_shards_with_records_then_a_rerun_computes_only_what_is_missing(data, tmp_path, capfd):
    with small_tmpfs(tmp_path / "disk") as disk:
        run = RunDir(str(disk / "run"))
        config = tiny_config(data.manifest, run.root, data.ckpt)
        assert run_extraction(config, shard_ids=[0, 1]) == 0
        committed = {s: run.records([s])[0].stats["file"] for s in (0, 1)}

        # 1. The disk fills up: room for a plan, claims, logs and failure records, not for a 70 KB shard.
        assert min(os.path.getsize(RunDir(data.clean).shard_path(s)) for s in (2, 3)) > 56 * 1024
        filler = fill(disk, 48 * 1024)
        assert run_extraction(config) == 1
        for record in run.records([2, 3]):
            assert record.state == FAILED and "no space left on device" in record.last_failure["message"]
            assert "rerun the same command" in record.last_failure["message"]
        assert leftovers(run.root) == []
        plan = next(p for p in run.list_plans() if run.read_plan(p)["tasks"] == [[2, 3]])

        # 2. Full to the last page: a claim fits, a failure record does not. A SLURM array task's
        #    form of launch (it writes no plan) says so on stderr for each shard and exits 1.
        fill(disk, 4096)
        capfd.readouterr()
        assert run_extraction(config, plan_id=plan, task_index=0) == 1
        err = capfd.readouterr().err
        assert err.count("could not be written either") == 2 and "no space left on device" in err, err
        assert "shard 00002" in err and "shard 00003" in err and "Traceback" not in err
        assert leftovers(run.root) == []
        assert states(run)[2] == INTERRUPTED and "full disk" in run.records([2])[0].last_failure["message"]
        fill(disk, 0)  # not even a claim fits: each shard says so, none is started
        assert run_extraction(config, plan_id=plan, task_index=0) == 1
        err = capfd.readouterr().err
        assert err.count("not attempted: no space left on device") == 2, err
        assert run.attempts(2) == [1, 2] and leftovers(run.root) == []

        # 3. Space freed: a plain rerun computes shards 2 and 3 only.
        filler.unlink()
        assert run_extraction(config) == 0
        assert states(run, "full") == {s: DONE for s in SHARDS}
        assert {s: run.records([s])[0].stats["file"] for s in (0, 1)} == committed
        assert [run.records([s])[0].stats["attempt"] for s in (2, 3)] == [3, 3]
        assert leftovers(run.root) == []
        assert_equals_clean(data, run.root)


# ----- claims and concurrent launches ----------------------------------------------------------
def write_claim(run: RunDir, shard: int, **fields) -> str:
    body = {"host": socket.gethostname(), "pid": 1, "pid_start": None, "started": "then", "token": "t", **fields}
    path = run.claim_path(shard)
    Path(path).write_text(json.dumps(body))
    return path


def test_a_claim_is_broken_only_when_its_holder_is_gone_or_stale(tmp_path, monkeypatch):
    run = RunDir(str(tmp_path / "run"))
    os.makedirs(run.path("shards"))
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        write_claim(run, 0, pid=sleeper.pid, pid_start=claims._pid_start(sleeper.pid))
        claim, holder = run.claim_shard(0)
        assert claim is None and f"pid {sleeper.pid}" in holder and socket.gethostname() in holder
        record = run.records([0])[0]  # status and the reducer say who computes it
        assert record.state == RUNNING and f"pid {sleeper.pid}" in record.last_failure["message"]
    finally:
        sleeper.kill()
        sleeper.wait()
    assert run.records([0])[0].state == MISSING
    claim, _ = run.claim_shard(0)  # its holder is dead: broken at once
    assert claim is not None and claim.holds()
    claim.release()
    assert not os.path.exists(run.claim_path(0))

    path = write_claim(run, 1, host="other-node")  # another host: only the heartbeat tells
    assert run.claim_shard(1, stale_s=60)[0] is None
    os.utime(path, (time.time() - 120, time.time() - 120))
    claim, _ = run.claim_shard(1, stale_s=60)
    assert claim is not None
    claim.release()

    # a SLURM job requeued onto another node: the claim of its earlier run, fresh as it is, is its own
    write_claim(run, 4, host="lost-node", slurm={"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "0"})
    assert run.claim_shard(4)[0] is None
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    claim, _ = run.claim_shard(4)
    assert claim is not None
    claim.release()

    write_claim(run, 2, pid=os.getpid(), pid_start=1)  # a live pid, but started at another time: reused
    claim, _ = run.claim_shard(2)
    assert claim is not None
    claim.release()

    claim, _ = run.claim_shard(3, heartbeat_s=0.05)  # the holder's heartbeat keeps it fresh...
    os.utime(run.claim_path(3), (time.time() - 1000, time.time() - 1000))
    time.sleep(0.3)
    assert time.time() - os.stat(run.claim_path(3)).st_mtime < 5
    os.remove(run.claim_path(3))  # ...and a claim broken under it stops its commit
    with pytest.raises(claims.ClaimLost):
        claim.check()
    claim.release()


CLAIMER = textwrap.dedent("""
    import os, sys, time
    from videofeat.manifests.ledger import RunDir
    run, tag = RunDir(sys.argv[1]), sys.argv[2]
    open(os.path.join(sys.argv[1], "ready-" + tag), "w").close()
    while not os.path.exists(os.path.join(sys.argv[1], "go")):
        time.sleep(0.001)
    won = [s for s in range(60) if run.claim_shard(s, heartbeat_s=3600)[0] is not None]
    print(",".join(map(str, won)), flush=True)
    while not os.path.exists(os.path.join(sys.argv[1], "stop")):
        time.sleep(0.01)
""")


def test_two_processes_racing_for_claims_never_both_win(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    os.makedirs(run.path("shards"))
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, run.root, tag], stdout=subprocess.PIPE, text=True)
             for tag in "ab"]
    deadline = time.time() + 60
    while not all(os.path.exists(f"{run.root}/ready-{t}") for t in "ab") and time.time() < deadline:
        time.sleep(0.01)
    Path(run.root, "go").touch()
    won = [set(map(int, filter(None, p.stdout.readline().strip().split(",")))) for p in procs]
    Path(run.root, "stop").touch()
    for p in procs:
        p.wait(timeout=30)
    assert won[0].isdisjoint(won[1]) and won[0] | won[1] == set(range(60)), won


def test_two_extract_launches_at_once_compute_every_shard_exactly_once(data, tmp_path):
    run = RunDir(str(tmp_path / "run"))
    cmd = [sys.executable, "-m", "videofeat.launcher.cli", "extract", data.manifest, "-o", run.root, *TINY_ARGS,
           "--decode-procs", "1", "--checkpoint", data.ckpt]  # one decoder each: two launches share 2 cores
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-3000:] for o in outs]
    records = run.records(SHARDS, verify="full")
    assert [r.state for r in records] == [DONE] * 4
    # exactly once: one attempt per shard (a skipping launch leaves no log, record or stats)
    assert [run.attempts(s) for s in SHARDS] == [[1]] * 4 and [r.stats["attempt"] for r in records] == [1] * 4
    assert not os.listdir(run.path("failures")) and leftovers(run.root) == []
    computed = {p.pid: [r.shard_id for r in records if r.stats["pid"] == p.pid] for p in procs}
    for proc, (_, err) in zip(procs, outs):
        if len(computed[proc.pid]) < 4:  # the other launch did the rest: this one says what it skipped
            assert "skipped" in err or "nothing to do" in err, err[-3000:]
    print("shards computed by each launch:", computed)
    assert_equals_clean(data, run.root)
