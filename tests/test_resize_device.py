"""``--resize-on device`` on the CPU: full-size frames through the real decode pool, resized where
the batch is assembled, against the decode-process path; and what the fingerprint records."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from helpers_extract import manifest_row, tiny_checkpoint
from videofeat.manifests.fingerprint import describe_difference
from videofeat.manifests.ledger import RunDir
from videofeat.manifests.manifest import write_manifest
from videofeat.workers.decode.device_resize import DeviceResize
from videofeat.workers.decode.pool import DecodeJob, DecodePool, PoolConfig, frame_spec
from videofeat.workers.decode.resize import BOUNDS, FrameResize, FullFrame
from videofeat.workers.decode.synthetic import write_action_video
from videofeat.workers.extract.config import ExtractConfig
from videofeat.workers.extract.loop import run_extraction
from videofeat.workers.extract.presets import resolve_preset


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("device")
    return (write_action_video(str(root / "a.mp4"), 40, [(3, 5, 30)], 64, 64, gop=16),
            write_action_video(str(root / "b.mp4"), 24, [(9, 0, 20)], 64, 64, gop=8, seed=1))


def _frames(transform, jobs, ring: int = 4) -> dict:
    """{(video, frame index): frame} from a real one-process pool, or the failure events."""
    shape, dtype = frame_spec(transform)
    out, failed = {}, {}
    with DecodePool(PoolConfig(procs=1, ring=ring), transform, shape, dtype) as pool:
        for event in pool.run(jobs):
            if event.kind == "frame":
                out[(event.key, event.index)] = np.array(event.frame, copy=True)
            elif event.kind == "failed":
                failed[event.key] = event
    return out, failed


@pytest.mark.parametrize("method", ["pil_bilinear", "interpolate_bilinear"])
def test_full_frames_resized_on_the_device_equal_the_decode_process_frames(videos, method):
    # Two sizes through one ring: a whole 64x64 video and a 40x52 crop box of another.
    jobs = [DecodeJob(0, videos[0], 3, 35), DecodeJob(1, videos[1], 0, None, crop=(5, 9, 40, 52))]
    resize = FrameResize(method, 32, "bounded")
    in_decoder, _ = _frames(resize, jobs)
    full, _ = _frames(FullFrame(64, 64), jobs)
    assert sorted(full) == sorted(in_decoder) and len(full) == 32 + 24
    assert full[(1, 0)].shape == (52, 40, 3) and full[(0, 3)].shape == (64, 64, 3)
    on_device, seed = DeviceResize(resize, torch.device("cpu")), FrameResize(method, 32, "exact")
    off_by_two = 0
    for key, frame in full.items():
        got = on_device(frame)
        assert got.shape == in_decoder[key].shape and got.dtype == in_decoder[key].dtype
        # Both paths hold the preset's bound to the seed's own numbers (PIL, or the float interpolate) ...
        assert np.abs(got.astype(np.float64) - seed(frame)).max() <= BOUNDS[method], key
        # ... so they agree within twice it; a pixel one level above PIL on one path and one below
        # on the other is a rare double rounding tie.
        diff = np.abs(got.astype(np.float64) - in_decoder[key])
        assert diff.max() <= 2 * BOUNDS[method], key
        off_by_two += int((diff > BOUNDS[method]).sum())
    assert off_by_two <= 1e-4 * len(full) * 32 * 32 * 3


def test_a_frame_larger_than_the_ring_slot_fails_only_its_video(videos):
    _, failed = _frames(FullFrame(48, 64), [DecodeJob(0, videos[0]), DecodeJob(1, videos[1], crop=(0, 0, 64, 48))])
    assert list(failed) == [0]
    error = failed[0].error
    assert failed[0].status == "decode_error" and "(64, 64, 3)" in error and "at most (48, 64, 3)" in error
    assert videos[0] in error and "videofeat manifest" in error


def test_extraction_with_resize_on_device_matches_resize_in_the_decoders(tmp_path, videos):
    manifest = str(tmp_path / "manifest.parquet")
    write_manifest([manifest_row("Rear_view_user_id_1_NoAudio_1", videos[0], 40, 0)], manifest)
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    results = {}
    for where in ("decode", "device"):
        out = str(tmp_path / where)
        config = ExtractConfig(manifest=manifest, output=out, preset="aicity-vitl", checkpoints=(("*", ckpt),),
                               span=16, hop=8, num_frames=8, frame_step=2, size=32, decode_procs=1, device="cpu",
                               batch_size=2, progress=False, resize_on=where)
        assert run_extraction(config) == 0
        table = pq.read_table(RunDir(out).shard_path(0))
        results[where] = (RunDir(out).fingerprint(), table.column("window_index").to_pylist(),
                          np.asarray(table.column("feature").to_pylist()))
    (fp_a, windows_a, feats_a), (fp_b, windows_b, feats_b) = results["decode"], results["device"]
    # Where the resize runs is not what it computes: one fingerprint, the same windows, features
    # within what a 1/255 pixel difference moves them.
    assert fp_a == fp_b and windows_a == windows_b == [0, 1, 2, 3]
    assert np.abs(feats_a - feats_b).max() <= 1e-2


def test_resize_on_choices_and_errors(tmp_path):
    base = dict(manifest="m.parquet", output="o", model="videomae_test")
    assert not ExtractConfig(**base).resize_on_device("cpu")
    assert ExtractConfig(**base).resize_on_device("cuda")
    assert not ExtractConfig(**base, resize="exact").resize_on_device("cuda")  # PIL runs in the decoders
    assert ExtractConfig(**base, preset="aicity-vith", resize="exact").resize_on_device("cuda")
    assert ExtractConfig(**base, resize_on="device").resize_on_device("cpu")
    with pytest.raises(ValueError, match="--resize exact is PIL"):
        ExtractConfig(**base, resize="exact", resize_on="device")
    with pytest.raises(ValueError, match="--resize fast"):
        ExtractConfig(**base, resize="fast", resize_on="device")
    with pytest.raises(ValueError, match="--resize-on"):
        ExtractConfig(**base, resize_on="gpu")


def test_the_fingerprint_records_a_kernel_that_changes_numbers():
    exact = resolve_preset("aicity-vitl", kernel="exact").to_dict()
    bounded = resolve_preset("aicity-vitl").to_dict()
    # exact keeps the record it always had (so existing run directories keep their fingerprint).
    assert "resize_kernel" not in exact and exact["fast_resize"] is False and exact["resize"] == "pil_bilinear"
    assert bounded == {**exact, "resize_kernel": "torch_antialias_uint8"}
    lines = describe_difference({"preset": exact}, {"preset": bounded})
    assert lines == ['preset.resize_kernel: run directory has null, this launch has "torch_antialias_uint8"']
    # aicity-vith's two blends round differently (float rounding apart): two fingerprints.
    vith_exact, vith_bounded = (resolve_preset("aicity-vith", kernel=k).to_dict() for k in ("exact", "bounded"))
    assert vith_bounded == {**vith_exact, "resize_kernel": "torch_lerp"}
    assert resolve_preset("aicity-vitl", fast_resize=True).to_dict()["fast_resize"] is True
    assert json.dumps(bounded)  # what run.json stores


def _parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as handle:
        return int(handle.read().rsplit(")", 1)[1].split()[1])


def test_torch_kernel_decoders_fork_from_a_server_that_ignores_stop_signals(videos):
    resize = FrameResize("pil_bilinear", 32, "bounded")
    shape, dtype = frame_spec(resize)
    with DecodePool(PoolConfig(procs=1, ring=4), resize, shape, dtype) as pool:
        pool.start()
        child = pool.pids()[0]
        server = _parent_pid(child)
        assert server != os.getpid()  # forked from the server that imported torch, not from us
        # SLURM signals every process of a step: neither the server nor a decode process dies of it.
        os.kill(server, signal.SIGTERM)
        os.kill(child, signal.SIGUSR2)
        events = list(pool.run([DecodeJob(0, videos[0])]))
        assert [e.kind for e in events].count("frame") == 40 and events[-1].kind == "done"
        # A decode process killed by a signal is a crashed video, named so, and is replaced.
        events = []
        for event in pool.run([DecodeJob(1, videos[0]), DecodeJob(2, videos[1])]):
            events.append(event)
            if event.kind == "frame" and event.key == 1 and event.index == 2:
                os.kill(child, signal.SIGKILL)
        failed = [e for e in events if e.kind == "failed"]
        assert [(e.key, e.status) for e in failed] == [(1, "crashed")] and "SIGKILL" in failed[0].error
        assert [e.key for e in events if e.kind == "done"] == [2] and pool.respawns == 1
        assert _parent_pid(pool.pids()[0]) == server


RANK_THAT_STOPS_READING = """
import sys, time
from videofeat.workers.decode.pool import DecodeJob, DecodePool, PoolConfig, frame_spec
from videofeat.workers.decode.resize import FrameResize
resize = FrameResize("pil_bilinear", 32, "bounded")
shape, dtype = frame_spec(resize)
pool = DecodePool(PoolConfig(procs=1, ring=2), resize, shape, dtype)
pool.start()
print(pool.pids()[0], flush=True)
events = pool.run([DecodeJob(0, sys.argv[1])])
next(events)  # a video: one frame taken, then no more, and the decode process waits on a full ring
time.sleep(600)  # (a FIFO: the decode process waits in open(), and so does this, for the first event)
"""


def _gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                if handle.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("blocked_in", ["a full ring", "opening a FIFO"])
def test_a_sigkilled_rank_leaves_no_decode_process_or_fork_server(videos, tmp_path, blocked_in):
    # A fork server's child is not the rank's child, so the rank's death signal never reaches
    # it; waiting on a full ring, or in an open() that never returns, it (and the server it
    # keeps alive) used to outlive the rank.
    source = videos[0]
    if blocked_in == "opening a FIFO":
        source = str(tmp_path / "never-written.mp4")
        os.mkfifo(source)
    rank = subprocess.Popen([sys.executable, "-c", RANK_THAT_STOPS_READING, source],
                            stdout=subprocess.PIPE, text=True)
    try:
        child = int(rank.stdout.readline())
        server = _parent_pid(child)
        assert server != rank.pid
        time.sleep(1.0)  # the ring is full, or the open() is waiting, by now
        rank.kill()
        rank.wait()
        assert _gone(child, 10) and _gone(server, 10)
    finally:
        rank.kill()


RANK_SIGNALLED_WHILE_ITS_DECODERS_START = """
import sys
from videofeat.workers.decode.pool import DecodeJob, DecodePool, PoolConfig, frame_spec
from videofeat.workers.decode.resize import FrameResize
from videofeat.workers.signals import StopSignals
signals = StopSignals().install()
resize = FrameResize(sys.argv[2], 32, sys.argv[3])
shape, dtype = frame_spec(resize)
print("starting", flush=True)
with DecodePool(PoolConfig(procs=1, ring=4), resize, shape, dtype) as pool:
    events = list(pool.run([DecodeJob(0, sys.argv[1])]))
print([e.kind for e in events].count("frame"), events[-1].kind, signals.received, flush=True)
sys.stdin.read()  # exit once the signals have stopped (an exiting interpreter has no handlers left)
"""


@pytest.mark.parametrize("kernel", ["bounded", "exact"], ids=["fork-server", "spawn"])
def test_stop_signals_while_decoders_start_reach_only_the_rank(videos, kernel):
    # SLURM signals every process of a step. One that lands while a decode process (or its fork
    # server, importing torch for ~2 s) is still starting used to kill it: the rank, which meant
    # to stop cleanly, recorded a decoder error instead.
    rank = subprocess.Popen([sys.executable, "-c", RANK_SIGNALLED_WHILE_ITS_DECODERS_START, videos[0],
                             "pil_bilinear", kernel], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert rank.stdout.readline().strip() == "starting"
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline and rank.poll() is None:
            os.killpg(rank.pid, signal.SIGUSR2)  # the whole process group, as srun does
            time.sleep(0.05)
        out, err = rank.communicate(timeout=60)
        assert rank.returncode == 0 and out.split() == ["40", "done", "SIGUSR2"], err
        assert "died unexpectedly" not in err, err  # multiprocessing's resource tracker neither
    finally:
        rank.kill()
