"""The extraction worker in one process: shard contents, reruns, fingerprints, bad videos, faults."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers_extract import make_dataset, manifest_row, tiny_checkpoint
from videofeat.manifests.ledger import FingerprintMismatch, RunDir
from videofeat.manifests.manifest import write_manifest
from videofeat.workers.distributed import Distributed
from videofeat.workers.extract.config import ExtractConfig
from videofeat.workers.extract.loop import Extractor, run_extraction
from videofeat.workers.shard_io import read_shard_metadata
from videofeat.workers.decode.synthetic import write_action_video

SPAN, HOP = 16, 8


def tiny_config(manifest: str, output: str, ckpt: str, **overrides) -> ExtractConfig:
    base = dict(manifest=manifest, output=output, preset="aicity-vith", model="auto", checkpoints=(("*", ckpt),),
                span=SPAN, hop=HOP, num_frames=8, frame_step=2, size=64, decode_procs=2, device="cpu",
                batch_size=8, progress=False)
    return ExtractConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    specs = [("Rear_view_user_id_1_NoAudio_1", 64, 0), ("Rear_view_user_id_2_NoAudio_1", 41, 0),
             ("Rear_view_user_id_3_NoAudio_1", 100, 1)]
    rows = make_dataset(root, specs)
    manifest = str(root / "manifest.parquet")
    write_manifest(rows, manifest)
    return root, manifest, tiny_checkpoint(root / "tiny.pt"), {name: n for name, n, _ in specs}


def test_shards_rows_metadata_and_stats(dataset):
    root, manifest, ckpt, frames = dataset
    out = str(root / "run")
    assert run_extraction(tiny_config(manifest, out, ckpt)) == 0
    run = RunDir(out)
    assert run.done_shards() == [0, 1]
    record = run.load_run()
    assert record["manifest"] == os.path.abspath(manifest) and record["feature_dim"] == 64
    assert record["num_classes"] == 10 and record["checkpoints"]["*"]["sha256"]
    assert record["sampling"] == {"span": 16, "hop": 8, "num_frames": 8, "step": 2}
    table = pq.read_table(run.shard_path(0))
    ids = table.column("video_id").to_pylist()
    assert ids == sorted(ids, key=["Rear_view_user_id_1_NoAudio_1", "Rear_view_user_id_2_NoAudio_1"].index)
    meta = read_shard_metadata(run.shard_path(0))
    assert meta["row_groups"] == {"Rear_view_user_id_1_NoAudio_1": [0], "Rear_view_user_id_2_NoAudio_1": [1]}
    assert meta["checkpoint_sha256"] == record["checkpoints"]["*"]["sha256"] and meta["fingerprint"] == run.fingerprint()
    for video_id in set(ids):
        rows = [r for r in table.to_pylist() if r["video_id"] == video_id]
        n = frames[video_id]
        assert len(rows) == (n - SPAN) // HOP + 1
        for i, row in enumerate(rows):
            assert (row["window_index"], row["start_frame"], row["end_frame"]) == (i, HOP * i, HOP * i + SPAN)
            assert row["center_s"] == pytest.approx((HOP * i + SPAN / 2) / 30)
            assert abs(sum(row["probs"]) - 1) < 1e-5 and len(row["feature"]) == 64
    stats = json.load(open(run.stats_path(0)))
    assert [v["status"] for v in stats["videos"]] == ["ok", "ok"]
    assert [v["frames_decoded"] for v in stats["videos"]] == [64, 41]
    assert stats["windows"] == len(ids) and stats["world_size"] == 1 and stats["attempt"] == 1
    # The decode processes' own CPU time for these 105 frames: some, and no more than the CPUs had.
    assert 0 < stats["decode_cpu_s"] < stats["seconds"] * os.cpu_count()

    # A plain rerun has nothing to do and touches nothing.
    before = {p: os.stat(p).st_mtime_ns for p in (run.shard_path(0), run.shard_path(1))}
    assert run_extraction(tiny_config(manifest, out, ckpt)) == 0
    assert {p: os.stat(p).st_mtime_ns for p in before} == before
    # --overwrite recomputes and gives the same numbers.
    first = pq.read_table(run.shard_path(1)).column("feature").to_pylist()
    assert run_extraction(tiny_config(manifest, out, ckpt, overwrite=True, batch_size=3)) == 0
    assert np.allclose(pq.read_table(run.shard_path(1)).column("feature").to_pylist(), first, atol=1e-5)
    # Other sampling into the same run directory is refused, naming what differs.
    with pytest.raises(FingerprintMismatch, match="preset"):
        run_extraction(tiny_config(manifest, out, ckpt, hop=4))


def test_bad_videos_get_statuses_and_the_shard_completes(dataset, tmp_path):
    root, _, ckpt, _ = dataset
    good = [manifest_row(f"Rear_view_user_id_{i}_NoAudio_1", str(root / f"Rear_view_user_id_{i}_NoAudio_1.mp4"),
                         n, 0) for i, n in ((1, 64), (3, 100))]
    bad = {}
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(os.urandom(20_000))
    bad["corrupt"] = (str(corrupt), 64, "unreadable")
    data = open(good[1]["uri"], "rb").read()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 2])
    bad["truncated"] = (str(truncated), 100, "unreadable")
    zero = tmp_path / "zero.mp4"
    zero.write_bytes(b"")
    bad["zero"] = (str(zero), 64, "empty")
    short = write_action_video(str(tmp_path / "short.mp4"), 10, [], 64, 64, gop=16)
    bad["short"] = (short, 40, "too_short")
    long_video = write_action_video(str(tmp_path / "segv.mp4"), 1500, [(3, 0, 1500)], 64, 64, gop=30)
    bad["segv"] = (long_video, 1500, "crashed")
    fifo = str(tmp_path / "fifo.mp4")  # replaced by a FIFO after the manifest was built: opening it hangs
    bad["fifo"] = (fifo, 64, "timeout")
    rows = [good[0]] + [manifest_row(f"Rear_view_bad_{k}", uri, n, 0) for k, (uri, n, _) in bad.items()] + [good[1]]
    manifest = str(tmp_path / "manifest.parquet")
    write_manifest(rows, manifest)
    os.mkfifo(fifo)

    config = tiny_config(manifest, str(tmp_path / "run"), ckpt, decode_stall_s=3.0)
    extractor = Extractor(config, Distributed())
    plan, todo = extractor.prepare(None, None, None)
    segv_key = [r["video_id"] for r in rows].index("Rear_view_bad_segv")
    killed = []

    def crash_the_decoder_mid_video():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            for worker in list(getattr(extractor.pool, "_workers", [])):
                if worker.job is not None and worker.job.key == segv_key and worker.frames >= 100:
                    os.kill(worker.pid, signal.SIGSEGV)
                    killed.append(worker.pid)
                    return
            time.sleep(0.002)

    thread = threading.Thread(target=crash_the_decoder_mid_video, daemon=True)
    thread.start()
    assert extractor.execute(plan, todo, claim=True) == 0
    thread.join()
    assert killed
    run = RunDir(config.output)
    stats = json.load(open(run.stats_path(0)))
    by_id = {v["video_id"]: v for v in stats["videos"]}
    for key, (_, _, status) in bad.items():
        assert by_id[f"Rear_view_bad_{key}"]["status"] == status, by_id[f"Rear_view_bad_{key}"]
    assert "SIGSEGV" in by_id["Rear_view_bad_segv"]["error"] and by_id["Rear_view_bad_segv"]["failed_at_frame"] >= 100
    assert "decode-stall-s" in by_id["Rear_view_bad_fifo"]["error"]
    table = pq.read_table(run.shard_path(0))
    written = table.column("video_id").to_pylist()
    assert sorted(set(written)) == sorted(r["video_id"] for r in good)
    assert written.count(good[1]["video_id"]) == (100 - SPAN) // HOP + 1
    assert by_id[good[0]["video_id"]]["status"] == "ok"


def test_frame_count_mismatch_and_pieces(dataset, tmp_path):
    root, _, ckpt, frames = dataset
    name = "Rear_view_user_id_3_NoAudio_1"
    uri = str(root / f"{name}.mp4")
    # The manifest believes the video has 120 frames (it has 100) and cuts it into two pieces.
    rows = [manifest_row(name, uri, 120, 0, piece=(0, 2, 0, 48)), manifest_row(name, uri, 120, 1, piece=(1, 2, 48, 120))]
    manifest = str(tmp_path / "manifest.parquet")
    write_manifest(rows, manifest)
    assert run_extraction(tiny_config(manifest, str(tmp_path / "run"), ckpt)) == 0
    run = RunDir(str(tmp_path / "run"))
    first = pq.read_table(run.shard_path(0)).column("window_index").to_pylist()
    second = pq.read_table(run.shard_path(1)).column("window_index").to_pylist()
    assert first + second == list(range((100 - SPAN) // HOP + 1)) and first == list(range(6))
    records = [json.load(open(run.stats_path(s)))["videos"][0] for s in (0, 1)]
    assert [r["status"] for r in records] == ["ok", "frame_count_mismatch"]
    assert (records[1]["piece_start_frame"], records[1]["piece_end_frame"]) == (48, 120)

    # Same features as the whole video extracted in one piece.
    whole_manifest = str(tmp_path / "whole.parquet")
    write_manifest([manifest_row(name, uri, 100, 0)], whole_manifest)
    assert run_extraction(tiny_config(whole_manifest, str(tmp_path / "whole"), ckpt)) == 0
    whole = pq.read_table(RunDir(str(tmp_path / "whole")).shard_path(0)).column("feature").to_pylist()
    pieces = (pq.read_table(run.shard_path(0)).column("feature").to_pylist()
              + pq.read_table(run.shard_path(1)).column("feature").to_pylist())
    assert np.allclose(whole, pieces, atol=1e-5)


def test_config_errors_name_the_flag(dataset):
    _, manifest, ckpt, _ = dataset
    with pytest.raises(ValueError, match="--decode-procs"):
        tiny_config(manifest, "x", ckpt, decode_procs=0)
    with pytest.raises(ValueError, match="--checkpoint"):
        ExtractConfig(manifest=manifest, output="x")
    with pytest.raises(ValueError, match="--resize"):
        tiny_config(manifest, "x", ckpt, resize="slow")


def test_sigusr2_stops_at_once_with_an_interrupted_record(dataset, tmp_path):
    root, _, ckpt, _ = dataset
    fifo = str(tmp_path / "blocked.mp4")
    os.mkfifo(fifo)  # decoding never delivers a frame; the signal must still stop the rank
    rows = [manifest_row("Rear_view_user_id_1_NoAudio_1", str(root / "Rear_view_user_id_1_NoAudio_1.mp4"), 64, 0),
            manifest_row("Rear_view_blocked", fifo, 64, 0)]
    manifest = str(tmp_path / "manifest.parquet")
    write_manifest(rows, manifest)
    config = tiny_config(manifest, str(tmp_path / "run"), ckpt, decode_stall_s=600)
    extractor = Extractor(config, Distributed())
    plan, todo = extractor.prepare(None, None, None)

    def signal_when_blocked():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            workers = list(getattr(extractor.pool, "_workers", []))
            if any(w.job is not None and w.job.key == 1 for w in workers):
                time.sleep(0.5)
                os.kill(os.getpid(), signal.SIGUSR2)
                return
            time.sleep(0.01)

    threading.Thread(target=signal_when_blocked, daemon=True).start()
    started = time.monotonic()
    assert extractor.execute(plan, todo, claim=True) == 143
    assert time.monotonic() - started < 30
    run = RunDir(config.output)
    (record,) = run.records([0])
    assert record.state == "interrupted" and "SIGUSR2" in record.last_failure["message"]
    assert not run.is_done(0) and not os.path.exists(run.shard_path(0))
