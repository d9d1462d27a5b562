"""Several feature sets from one decode: equal to single-set runs, one decode per frame, reruns per (set, shard).

Three sets over two views: ``a`` uses the aicity-vith preset (float32 interpolate resize), ``b``
and ``c`` the aicity-vitl preset (PIL resize on uint8) and so share windows and batches; three
tiny models with different random weights. Shard 1 holds a truncated video, which must fail the
same way for every set.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import run_cli
from helpers_extract import (TINY_SAMPLING, hanging_video, kill_rank_inside_shard, make_dataset, manifest_row, sets_toml,
                             tiny_checkpoint)
from videofeat.manifests.ledger import INTERRUPTED, MISSING, RunDir
from videofeat.manifests.manifest import write_manifest
from videofeat.workers.decode.synthetic import write_action_video
from videofeat.workers.extract.feature_sets import build_feature_sets, parse_feature_sets
from videofeat.workers.extract.config import ExtractConfig
from videofeat.workers.extract.loop import run_extraction

SETS = ("a", "b", "c")
SHARDS = (0, 1, 2, 3)
SAMPLING = TINY_SAMPLING
COMMON = dict(decode_procs=1, device="cpu", batch_size=8, progress=False)
CLI_COMMON = ("--decode-procs", "1", "--device", "cpu", "--batch-size", "8", "--no-progress")
TRUNCATED = "Rear_view_user_id_4_NoAudio_1"


def single_config(world: dict, name: str, output: str, **overrides) -> ExtractConfig:
    """The plain single-set config equal to set ``name``: what `videofeat extract -o OUT/<name>` builds."""
    preset, ckpt = {"a": ("aicity-vith", world["ckpts"][0]), "b": ("aicity-vitl", world["ckpts"][1]),
                    "c": ("aicity-vitl", world["ckpts"][2])}[name]
    checkpoints = (("dashboard", ckpt), ("rear", ckpt)) if name == "b" else (("*", ckpt),)
    return ExtractConfig(manifest=world["manifest"], output=output, preset=preset, checkpoints=checkpoints,
                         **SAMPLING, **COMMON, **overrides)


def multi_config(world: dict, root: str, **overrides):
    base = dict(manifest=world["manifest"], output=root, **COMMON, **overrides)
    return build_feature_sets(world["sets"], root, base)


def read_rows(run_dir: str) -> tuple[list, np.ndarray, np.ndarray]:
    run = RunDir(run_dir)
    keys, feats, probs = [], [], []
    for shard in run.done_shards():
        table = pq.read_table(run.shard_path(shard))
        keys += list(zip(table.column("video_id").to_pylist(), table.column("window_index").to_pylist(),
                         table.column("start_frame").to_pylist(), table.column("center_s").to_pylist()))
        feats += table.column("feature").to_pylist()
        probs += table.column("probs").to_pylist()
    return keys, np.asarray(feats, dtype=np.float64), np.asarray(probs, dtype=np.float64)


def snapshot(run_dir: str) -> dict:
    """Bytes and mtime of every output file of a run directory's shards/ folder (claims are leases, not output)."""
    folder = Path(run_dir, "shards")
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())
            if not p.name.endswith(".claim")}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The dataset, the sets file, a 3-set CLI run (OUT) and three single-set runs (SINGLE/<name>)."""
    root = tmp_path_factory.mktemp("multiset")
    rows = make_dataset(root, [("Rear_view_user_id_1_NoAudio_1", 64, 0), ("Rear_view_user_id_2_NoAudio_1", 41, 0),
                               ("Rear_view_user_id_3_NoAudio_1", 56, 1)])
    rows += make_dataset(root, [("Dashboard_user_id_1_NoAudio_1", 48, 2), ("Dashboard_user_id_2_NoAudio_1", 40, 3)],
                         view="dashboard")
    whole = root / "whole.mp4"
    write_action_video(str(whole), 64, [(3, 16, 32)], 64, 64, gop=16, seed=9)
    data = whole.read_bytes()
    (root / f"{TRUNCATED}.mp4").write_bytes(data[: len(data) // 2])
    rows.append(manifest_row(TRUNCATED, str(root / f"{TRUNCATED}.mp4"), 64, 1))
    manifest = str(root / "manifest.parquet")
    write_manifest(rows, manifest)
    ckpts = [tiny_checkpoint(root / f"tiny{i}.pt", seed=i) for i in range(3)]
    sets = root / "sets.toml"
    sets.write_text(sets_toml(ckpts))
    world = {"root": root, "manifest": manifest, "ckpts": ckpts, "sets": str(sets), "frames": {}}
    out = str(root / "out")
    t0 = time.monotonic()
    result = run_cli("extract", manifest, "-o", out, "--sets", str(sets), *CLI_COMMON, env={"OMP_NUM_THREADS": "1"})
    world["multi_log"] = result.stderr
    world["multi_s"] = time.monotonic() - t0
    for name in SETS:
        assert run_extraction(single_config(world, name, str(root / "single" / name))) == 0
    world["out"], world["single"] = out, str(root / "single")
    return world


def test_three_sets_equal_three_single_set_runs_from_one_decode(world):
    out, single = world["out"], world["single"]
    for name in SETS:
        mine, alone = RunDir(os.path.join(out, name)), RunDir(os.path.join(single, name))
        assert mine.fingerprint() == alone.fingerprint(), name
        assert mine.done_shards() == alone.done_shards() == list(SHARDS)
        keys, feats, probs = read_rows(mine.url)
        ref_keys, ref_feats, ref_probs = read_rows(alone.url)
        assert keys == ref_keys and len(keys) > 0, name
        assert np.abs(feats - ref_feats).max() <= 1e-6 and np.abs(probs - ref_probs).max() <= 1e-6
        # The same file a single-set run writes: same columns and the same lineage metadata.
        for shard in SHARDS:
            assert pq.read_schema(mine.shard_path(shard)) == pq.read_schema(alone.shard_path(shard))
    # The three models really differ, and b and c (one preset) got the same windows.
    feats = {name: read_rows(os.path.join(out, name))[1] for name in SETS}
    assert np.abs(feats["b"] - feats["c"]).max() > 1e-3 and np.abs(feats["a"] - feats["b"]).max() > 1e-3
    assert read_rows(os.path.join(out, "b"))[0] == read_rows(os.path.join(out, "c"))[0]

    # One decode per frame for all three sets, against three for three runs; the stats say so.
    multi_decoded = single_decoded = video_frames = 0
    for shard in SHARDS:
        stats = [json.loads(Path(RunDir(os.path.join(out, n)).stats_path(shard)).read_text()) for n in SETS]
        decode = stats[0]["decode"]
        assert all(s["decode"] == decode for s in stats) and decode["sets"] == list(SETS)
        multi_decoded += decode["frames_decoded"]
        video_frames += decode["video_frames"]
        for name in SETS:
            single_decoded += json.loads(Path(RunDir(os.path.join(single, name)).stats_path(shard)).read_text()
                                         )["frames_decoded"]
    # The truncated video decodes only part of its frames, whichever way it is run.
    assert multi_decoded / video_frames == pytest.approx(single_decoded / video_frames / 3)
    complete = [s for s in SHARDS if s != 1]
    per_frame = [json.loads(Path(RunDir(os.path.join(out, "a")).stats_path(s)).read_text())["decode"] for s in complete]
    assert sum(d["frames_decoded"] for d in per_frame) / sum(d["video_frames"] for d in per_frame) == 1.0
    single_complete = sum(json.loads(Path(RunDir(os.path.join(single, n)).stats_path(s)).read_text())["frames_decoded"]
                          for n in SETS for s in complete)
    assert single_complete / sum(d["video_frames"] for d in per_frame) == 3.0


def test_a_failing_video_fails_the_same_way_for_every_set(world):
    records = []
    for base in (world["out"], world["single"]):
        for name in SETS:
            stats = json.loads(Path(RunDir(os.path.join(base, name)).stats_path(1)).read_text())
            (video,) = [v for v in stats["videos"] if v["video_id"] == TRUNCATED]
            records.append({k: video[k] for k in ("status", "error", "frames_decoded", "failed_at_frame")})
    assert records[0]["status"] not in ("ok", "frame_count_mismatch")
    assert all(r == records[0] for r in records), records


def test_status_and_reduce_take_the_root(world, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(world["out"], out)
    os.remove(RunDir(os.path.join(out, "b")).marker_path(2))
    status = run_cli("status", out).stdout
    for name in SETS:
        assert f"== set {name} ==" in status
    assert re.search(r"out/b: 4 shards: 3 done, 1 interrupted", status) and "00002 interrupted" in status, status
    assert f"--sets {world['sets']}" in status
    failed = run_cli("reduce", out, "--marker-wait", "0", check=False)  # no marker will come: do not wait
    assert failed.returncode == 1 and "00002" in failed.stderr
    # Only b is incomplete: a and c were reduced, b was refused.
    assert Path(out, "a", "dataset", "rear.parquet").exists() and not Path(out, "b", "dataset").exists()
    shutil.rmtree(os.path.join(out, "b"))
    shutil.copytree(os.path.join(world["out"], "b"), os.path.join(out, "b"))
    run_cli("reduce", out)
    for name in SETS:
        table = pq.read_table(os.path.join(out, name, "dataset", "rear.parquet"))
        assert table.num_rows == sum(k[0].startswith("Rear") for k in read_rows(os.path.join(out, name))[0])


def test_mixing_single_set_and_multi_set_runs(world, tmp_path):
    out = str(tmp_path / "out")
    # Set a alone, then a 3-set run over the same OUT: it completes b and c and leaves a alone.
    assert run_extraction(single_config(world, "a", os.path.join(out, "a"))) == 0
    before = snapshot(os.path.join(out, "a"))
    assert run_extraction(multi_config(world, out)) == 0
    assert snapshot(os.path.join(out, "a")) == before
    for name in ("b", "c"):
        stats = json.loads(Path(RunDir(os.path.join(out, name)).stats_path(0)).read_text())
        assert stats["decode"]["sets"] == ["b", "c"] and stats["decode"]["decoded_per_video_frame"] == 1.0
    for name in SETS:
        assert read_rows(os.path.join(out, name))[0] == read_rows(os.path.join(world["single"], name))[0]
        np.testing.assert_allclose(read_rows(os.path.join(out, name))[1],
                                   read_rows(os.path.join(world["single"], name))[1], rtol=0, atol=1e-6)

    # One (set, shard) pair lost: a 3-set rerun decodes that shard for that set only.
    c_run = RunDir(os.path.join(out, "c"))
    os.remove(c_run.marker_path(3))
    untouched = {n: snapshot(os.path.join(out, n)) for n in ("a", "b")}
    assert run_extraction(multi_config(world, out)) == 0
    assert {n: snapshot(os.path.join(out, n)) for n in ("a", "b")} == untouched
    stats = json.loads(Path(c_run.stats_path(3)).read_text())
    assert stats["decode"]["sets"] == ["c"] and stats["attempt"] == 2
    # And the other way round: a plain single-set rerun completes a set a 3-set run started.
    os.remove(c_run.marker_path(0))
    others = snapshot(c_run.url)
    assert run_extraction(single_config(world, "c", c_run.url)) == 0
    after = snapshot(c_run.url)
    assert {k: v for k, v in after.items() if not k.startswith("00000")} == \
        {k: v for k, v in others.items() if not k.startswith("00000")}
    assert "decode" not in json.loads(Path(c_run.stats_path(0)).read_text())
    np.testing.assert_allclose(read_rows(c_run.url)[1], read_rows(os.path.join(world["single"], "c"))[1],
                               rtol=0, atol=1e-6)


def test_rank_killed_mid_shard_of_a_three_set_torchrun_then_plain_rerun(world, tmp_path):
    root, manifest = world["root"], world["manifest"]
    out = str(tmp_path / "killed")
    # Shard 2's first video becomes a FIFO nobody writes: its rank stays inside shard 2.
    victim = str(root / "Dashboard_user_id_1_NoAudio_1.mp4")
    script = str(Path(__file__).resolve().parents[1] / "launcher" / "extract.py")
    runs = {name: RunDir(os.path.join(out, name)) for name in SETS}
    with hanging_video(manifest, victim, tmp_path) as manifest:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, manifest,
               "-o", out, "--sets", world["sets"], *CLI_COMMON, "--decode-stall-s", "600"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        kill_rank_inside_shard(proc, Path(runs["a"].log_path(2, 1)),
                               lambda: all(set(r.done_shards()) == {0, 1, 3} for r in runs.values()))
    assert proc.returncode != 0
    for run in runs.values():
        (record,) = run.records([2])
        assert record.state in (MISSING, INTERRUPTED) and not run.is_done(2)

    committed = {name: snapshot(run.url) for name, run in runs.items()}
    rerun = run_cli("extract", manifest, "-o", out, "--sets", world["sets"], *CLI_COMMON,
                    env={"OMP_NUM_THREADS": "1"})
    for name in SETS:
        assert re.search(rf"^  {name}: \['00002'\]$", rerun.stderr, re.M), rerun.stderr[-3000:]
        now = snapshot(runs[name].url)
        assert {k: v for k, v in now.items() if not k.startswith("00002")} == committed[name]
        clean = read_rows(os.path.join(world["out"], name))
        mine = read_rows(runs[name].url)
        assert mine[0] == clean[0] and np.abs(mine[1] - clean[1]).max() <= 1e-6


def test_bad_sets_files_are_refused_before_any_work(world, tmp_path):
    ckpt = world["ckpts"][0]
    cases = {
        'name = "a"\npreset = "aicity-vith"\ncheckpoint = "CKPT"\nhop_size = 4\n': ("set 'a'", "hop_size"),
        'name = "a"\npreset = "aicity-vith"\ncheckpoint = "/nowhere/x.pt"\n': ("set 'a'", "checkpoint: /nowhere/x.pt"),
        'name = "a"\npreset = "aicity-vith"\n': ("set 'a'", "checkpoint is missing"),
        'name = "a"\npreset = "nope"\ncheckpoint = "CKPT"\n': ("set 'a'", "preset must be one of"),
        'name = "a"\npreset = "aicity-vith"\ncheckpoint = { rear = "/nowhere/r.pt" }\n':
            ("set 'a'", "checkpoint.rear: /nowhere/r.pt"),
    }
    for body, (where, what) in cases.items():
        with pytest.raises(ValueError) as info:
            parse_feature_sets("sets.toml", _toml(f"[[set]]\n{body.replace('CKPT', ckpt)}"))
        assert str(info.value).startswith(f"sets.toml: {where}: ") and what in str(info.value), str(info.value)
    with pytest.raises(ValueError, match=r"sets.toml: set 'a': name is used by an earlier set"):
        parse_feature_sets("sets.toml", _toml(f'[[set]]\nname = "a"\npreset = "aicity-vith"\ncheckpoint = "{ckpt}"\n' * 2))

    # Through the real command: exit 2, one message naming the file, the set and the key; nothing written.
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[[set]]\nname = "x"\npreset = "aicity-vith"\ncheckpoint = "{ckpt}"\nstride = 2\n')
    result = run_cli("extract", world["manifest"], "-o", str(tmp_path / "o1"), "--sets", str(bad), check=False)
    assert result.returncode == 2 and f"{bad}: set 'x': unknown key(s) stride" in result.stderr
    assert not (tmp_path / "o1").exists()
    with pytest.raises(ValueError, match="--checkpoint describe one feature set"):
        multi_config(world, str(tmp_path / "o2"), checkpoints=(("*", ckpt),))
    # A checkpoint that does not load: refused, naming the set, before any shard starts.
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    text = Path(world["sets"]).read_text().replace(world["ckpts"][2], str(broken))
    (tmp_path / "broken.toml").write_text(text)
    sets = build_feature_sets(str(tmp_path / "broken.toml"), str(tmp_path / "o3"),
                              dict(manifest=world["manifest"], output=str(tmp_path / "o3"), **COMMON))
    with pytest.raises(ValueError, match=r"broken.toml: set 'c': "):
        run_extraction(sets)
    assert not list((tmp_path / "o3").glob("*/shards/*"))


def _toml(text: str) -> dict:
    import tomllib

    return tomllib.loads(text)
