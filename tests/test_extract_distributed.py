"""Real torchrun launches (gloo, 2 ranks): same output as one rank; a rank killed mid-shard, then a rerun."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers_extract import TINY_ARGS, hanging_video, kill_rank_inside_shard, make_dataset, run_extract, tiny_checkpoint
from videofeat.manifests.ledger import INTERRUPTED, MISSING, RunDir
from videofeat.manifests.manifest import write_manifest
from videofeat.workers.extract.config import ExtractConfig
from videofeat.workers.extract.loop import run_extraction

pytestmark = pytest.mark.slow
LIGHT = ("--decode-procs", "1")  # 2 ranks x 1 decode process on the 2-core CI machine


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Four shards of real videos, and their features from an uninterrupted one-process run."""
    root = tmp_path_factory.mktemp("dist")
    specs = [(f"Rear_view_user_id_{i}_NoAudio_1", n, i % 4) for i, n in enumerate((48, 40, 56, 32, 64, 40))]
    manifest = str(root / "manifest.parquet")
    write_manifest(make_dataset(root, specs), manifest)
    ckpt = tiny_checkpoint(root / "tiny.pt")
    out = str(root / "reference")
    config = ExtractConfig(manifest=manifest, output=out, preset="aicity-vith", checkpoints=(("*", ckpt),), span=16,
                           hop=8, num_frames=8, frame_step=2, size=64, decode_procs=1, device="cpu", batch_size=8,
                           progress=False)
    assert run_extraction(config) == 0
    return root, manifest, ckpt, _read_run(out)


def _read_run(run_dir: str) -> tuple[list, np.ndarray]:
    run = RunDir(run_dir)
    keys, feats = [], []
    for shard in run.done_shards():
        table = pq.read_table(run.shard_path(shard))
        keys += list(zip(table.column("video_id").to_pylist(), table.column("window_index").to_pylist()))
        feats += table.column("feature").to_pylist()
    return keys, np.asarray(feats, dtype=np.float32)


def test_two_torchrun_ranks_equal_one_rank(reference):
    root, manifest, ckpt, (ref_keys, ref_feats) = reference
    out = str(root / "two_ranks")
    run_extract(manifest, out, *LIGHT, checkpoint=ckpt, torchrun=2)
    keys, feats = _read_run(out)
    assert keys == ref_keys
    assert np.abs(feats - ref_feats).max() <= 1e-5
    run = RunDir(out)
    stats = [run.records([s])[0].stats for s in run.done_shards()]
    assert {s["world_size"] for s in stats} == {2} and len(run.done_shards()) == 4


def test_rank_killed_mid_shard_then_plain_rerun(reference, tmp_path):
    root, manifest, ckpt, (ref_keys, ref_feats) = reference
    out = str(tmp_path / "killed")
    # Shard 2's first video becomes a FIFO that nobody writes: its rank stays inside shard 2.
    victim = str(root / "Rear_view_user_id_2_NoAudio_1.mp4")
    script = str(Path(__file__).resolve().parents[1] / "launcher" / "extract.py")
    run = RunDir(out)
    with hanging_video(manifest, victim, tmp_path) as manifest:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, manifest,
               "-o", out, *TINY_ARGS, *LIGHT, "--decode-stall-s", "600", "--checkpoint", ckpt]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        kill_rank_inside_shard(proc, Path(run.log_path(2, 1)), lambda: set(run.done_shards()) == {0, 1, 3})
    assert proc.returncode != 0
    (record,) = run.records([2])
    assert record.state in (MISSING, INTERRUPTED) and not run.is_done(2)
    status = subprocess.run([sys.executable, "-m", "videofeat.launcher.cli", "status", out], capture_output=True,
                            text=True)
    assert re.search(r"00002 +(interrupted|missing)", status.stdout), status.stdout

    committed = {s: (Path(run.shard_path(s)).read_bytes(), os.stat(run.shard_path(s)).st_mtime_ns) for s in (0, 1, 3)}
    rerun = run_extract(manifest, out, *LIGHT, checkpoint=ckpt)
    planned = re.findall(r"shards to compute: \[(.*?)\]", rerun.stderr)
    assert planned == ["'00002'"], rerun.stderr[-3000:]
    for shard, (data, mtime) in committed.items():
        assert Path(run.shard_path(shard)).read_bytes() == data and os.stat(run.shard_path(shard)).st_mtime_ns == mtime
    keys, feats = _read_run(out)
    assert keys == ref_keys and np.abs(feats - ref_feats).max() <= 1e-5
