"""The reducer on real run directories: shards written with ShardWriter, committed with RunDir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from videofeat.manifests.ledger import RunDir
from videofeat.manifests.status import PERMANENT
from videofeat.manifests.manifest import write_manifest
from videofeat.manifests.windows import num_windows as expected_windows
from videofeat.workers.reduce.merge import IncompleteRun, ReduceConfig, reduce_run
from videofeat.workers.shard_io import ShardWriter, read_shard_metadata, shard_schema

SPAN, HOP, FPS = 32, 16, 30.0
PREFIX = {"rear": "Rear_view", "dashboard": "Dashboard", "right": "Right_side_window"}


@dataclass
class Video:
    """One manifest video; ``pieces`` are (shard_id, start_frame, end_frame) when split."""

    session: str
    view: str
    frames: int
    shard: Optional[int] = 0
    status: str = "ok"
    error: Optional[str] = None
    pieces: list = field(default_factory=list)
    decoded: Optional[int] = None       # frames really decoded (frame_count_mismatch)

    @property
    def video_id(self) -> str:
        return f"{PREFIX[self.view]}_{self.session}"


def features_for(video_id: str, windows: np.ndarray, dim: int) -> np.ndarray:
    """Features that tell which video and window a row came from."""
    seed = sum(map(ord, video_id)) % 1000
    out = np.zeros((len(windows), dim), np.float32)
    out[:, 0] = windows
    out[:, 1] = seed
    out[:, 2:] = np.random.default_rng(seed).standard_normal((len(windows), dim - 2)).astype(np.float32)
    return out


def manifest_table(videos: list[Video]) -> pa.Table:
    rows = []
    for v in videos:
        # the manifest knows only what probing finds; decode-time statuses live in shard stats
        status = v.status if v.status in PERMANENT else "ok"
        pieces = v.pieces or [(v.shard, 0, v.frames)]
        for index, (shard, start, end) in enumerate(pieces):
            rows.append({
                "video_id": v.video_id, "session_id": v.session, "view": v.view, "user_id": v.session.split("_")[2],
                "uri": f"/data/{v.video_id}.MP4", "num_frames": v.frames, "fps_num": 30, "fps_den": 1, "fps": FPS,
                "start_time_s": 0.0, "duration_s": v.frames / FPS, "vfr": False, "width": 64, "height": 64,
                "codec": "h264", "size_bytes": 1000, "status": status, "error": v.error if status != "ok" else None,
                "crop_x": None, "crop_y": None, "crop_w": None, "crop_h": None,
                "shard_id": shard if status == "ok" else None, "piece_index": index, "num_pieces": len(pieces),
                "piece_start_frame": start, "piece_end_frame": end})
    schema = pa.schema([
        ("video_id", pa.string()), ("session_id", pa.string()), ("view", pa.string()), ("user_id", pa.string()),
        ("uri", pa.string()), ("num_frames", pa.int64()), ("fps_num", pa.int64()), ("fps_den", pa.int64()),
        ("fps", pa.float64()), ("start_time_s", pa.float64()), ("duration_s", pa.float64()), ("vfr", pa.bool_()),
        ("width", pa.int32()), ("height", pa.int32()), ("codec", pa.string()), ("size_bytes", pa.int64()),
        ("status", pa.string()), ("error", pa.string()), ("crop_x", pa.int32()), ("crop_y", pa.int32()),
        ("crop_w", pa.int32()), ("crop_h", pa.int32()), ("shard_id", pa.int32()), ("piece_index", pa.int32()),
        ("num_pieces", pa.int32()), ("piece_start_frame", pa.int64()), ("piece_end_frame", pa.int64())])
    return pa.Table.from_pylist(rows, schema=schema)


def write_shard(run: RunDir, shard_id: int, videos: list[Video], dim: int, classes: int,
                fingerprint: Optional[str] = None, stats_override: Optional[dict] = None) -> None:
    """Write and commit one shard the way an extraction worker does."""
    fingerprint = fingerprint or run.fingerprint()
    tmp = run.temp_shard_path(shard_id)
    writer = ShardWriter(tmp, run.fs, shard_schema(dim, classes),
                         {"fingerprint": fingerprint, "model": "tiny", "preset": {"span": SPAN, "hop": HOP}})
    records, total = [], 0
    for v in videos:
        for shard, start, end in (v.pieces or [(v.shard, 0, v.frames)]):
            if shard != shard_id:
                continue
            record = {"video_id": v.video_id, "status": v.status, "error": v.error, "frames_decoded": 0,
                      "windows": 0, "failed_at_frame": None, "seconds": 0.1,
                      "piece_start_frame": start, "piece_end_frame": end}
            if v.status in ("ok", "frame_count_mismatch"):
                n = v.decoded if v.decoded is not None else v.frames
                t = expected_windows(n, SPAN, HOP)
                idx = np.array([k for k in range(t) if start <= k * HOP < end or (end >= v.frames and k * HOP >= start)])
                last_frame = min(n, max(end, (idx[-1] * HOP + SPAN) if len(idx) else end))
                decode_start = -(-start // HOP) * HOP
                record.update(frames_decoded=int(max(0, last_frame - decode_start)), windows=len(idx))
                if not len(idx):  # what the worker says of a piece past the real end of its video
                    record.update(status="too_short", error=f"{record['frames_decoded']} frames decoded")
                if len(idx):
                    writer.write_video(
                        video_id=v.video_id, session_id=v.session, view=v.view, window_index=idx,
                        start_frame=idx * HOP, end_frame=idx * HOP + SPAN, start_s=idx * HOP / FPS,
                        end_s=(idx * HOP + SPAN) / FPS, center_s=(idx * HOP + SPAN / 2) / FPS,
                        feature=features_for(v.video_id, idx, dim),
                        probs=np.full((len(idx), classes), 1.0 / classes, np.float32) if classes else None)
                total += len(idx)
            records.append(record)
    writer.close()
    stats = {"shard_id": shard_id, "attempt": 1, "fingerprint": fingerprint, "host": "test", "pid": os.getpid(),
             "rank": 0, "world_size": 1, "slurm": {}, "started": "2024-01-01T00:00:00+00:00",
             "finished": "2024-01-01T00:00:10+00:00", "seconds": 10.0, "windows": total,
             "frames_decoded": sum(r["frames_decoded"] for r in records), "videos": records}
    stats.update(stats_override or {})
    run.commit_shard(shard_id, tmp, stats)


def make_run(root, videos: list[Video], dim: int = 8, classes: int = 4, skip: tuple = (),
             views=("rear", "dashboard"), run_url: Optional[str] = None) -> RunDir:
    """A run directory (``root/run`` or ``run_url``) with every shard of ``videos`` committed
    except those in ``skip``."""
    manifest = os.path.join(root, "manifest.parquet")
    os.makedirs(root, exist_ok=True)
    write_manifest(manifest_table(videos).to_pylist(), manifest)
    run = RunDir(run_url or os.path.join(root, "run"))
    run.initialize({"manifest": "m1", "model": "tiny", "views": list(views)},
                   {"preset": "test", "model": "tiny", "checkpoints": {"rear": "rear.pt", "dashboard": "dash.pt"}},
                   extra={"manifest": manifest, "views": list(views), "feature_dim": dim, "num_classes": classes,
                          "preset": "test", "sampling": {"span": SPAN, "hop": HOP, "num_frames": 16, "step": 2}})
    shards = sorted({s for v in videos for s, *_ in (v.pieces or [(v.shard,)]) if s is not None})
    for shard_id in shards:
        if shard_id not in skip:
            write_shard(run, shard_id, videos, dim, classes)
    return run


def basic_videos() -> list[Video]:
    return [
        Video("user_id_1_NoAudio_1", "rear", 200, shard=0),
        Video("user_id_1_NoAudio_1", "dashboard", 200, shard=1),
        Video("user_id_2_NoAudio_1", "rear", 130, shard=0),
        Video("user_id_2_NoAudio_1", "dashboard", 129, shard=1),
        Video("user_id_3_NoAudio_1", "rear", 10, shard=None, status="too_short", error="10 frames < 32"),
        Video("user_id_3_NoAudio_1", "right", 300, shard=2),  # not one of the run's views
    ]


def read_view(path: str) -> pa.Table:
    return pq.read_table(path)


def test_reduce_complete_run_writes_sorted_files_and_summary(tmp_path):
    run = make_run(tmp_path, basic_videos())
    summary = reduce_run(ReduceConfig(run.url, marker_wait_s=0))
    rear = read_view(os.path.join(run.dataset_dir, "rear.parquet"))
    dash = read_view(os.path.join(run.dataset_dir, "dashboard.parquet"))
    assert not os.path.exists(os.path.join(run.dataset_dir, "right.parquet"))
    # rear: 200 frames -> 11 windows, 130 -> 7; sorted by video_id then window_index
    assert rear.column("video_id").to_pylist() == ["Rear_view_user_id_1_NoAudio_1"] * 11 + \
        ["Rear_view_user_id_2_NoAudio_1"] * 7
    assert rear.column("window_index").to_pylist() == list(range(11)) + list(range(7))
    assert dash.num_rows == 11 + 7
    feats = np.stack(rear.column("feature").to_numpy(zero_copy_only=False))
    assert feats.shape == (18, 8) and feats.dtype == np.float32
    np.testing.assert_array_equal(feats[:11], features_for("Rear_view_user_id_1_NoAudio_1", np.arange(11), 8))
    meta = read_shard_metadata(os.path.join(run.dataset_dir, "rear.parquet"))
    assert meta["fingerprint"] == run.fingerprint() and meta["model"] == "tiny" and meta["partial"] is False
    assert meta["row_groups"] == {"Rear_view_user_id_1_NoAudio_1": [0], "Rear_view_user_id_2_NoAudio_1": [1]}
    on_disk = json.load(open(os.path.join(run.dataset_dir, "summary.json")))
    assert on_disk["views"] == summary["views"]
    assert summary["views"]["rear"]["videos"] == 2 and summary["views"]["rear"]["windows"] == 18
    assert summary["views"]["rear"]["expected_absent"] == 1
    assert summary["complete"] and summary["feature_dim"] == 8 and summary["num_classes"] == 4
    assert summary["videos_by_status"] == {"ok": 4, "too_short": 1}
    assert summary["not_extracted"][0]["video_id"] == "Rear_view_user_id_3_NoAudio_1"
    assert summary["run"]["wall_s"] == 10.0 and summary["run"]["windows_per_s"] == 3.6


def test_incomplete_run_is_refused_naming_shards_videos_and_rerun(tmp_path):
    videos = basic_videos()
    videos.append(Video("user_id_4_NoAudio_1", "rear", 100, shard=3))
    videos.append(Video("user_id_5_NoAudio_1", "dashboard", 100, shard=4))
    run = make_run(tmp_path, videos, skip=(1, 3, 4))
    # shard 3 failed with an error, shard 4 started and vanished, shard 1 never ran
    run.record_failure(3, 1, "error", "CUDA out of memory")
    run.fs.makedirs(run.path("logs"), exist_ok=True)
    open(run.log_path(4, 1), "w").write("started\n")
    with pytest.raises(IncompleteRun) as caught:
        reduce_run(ReduceConfig(run.url, marker_wait_s=0))
    text = str(caught.value)
    assert "shards missing (1): 00001" in text
    assert "shards failed (1): 00003" in text and "CUDA out of memory" in text
    assert "shards interrupted (1): 00004" in text
    assert "Dashboard_user_id_1_NoAudio_1 [dashboard]: shard 00001 is missing" in text
    assert "videofeat extract" in text and run.url in text and "--preset test" in text
    assert "--checkpoint rear=rear.pt" in text
    assert not os.path.exists(run.dataset_dir + "/rear.parquet")

    summary = reduce_run(ReduceConfig(run.url, allow_partial=True, marker_wait_s=0))
    assert summary["partial"] and summary["views"]["rear"]["windows"] == 18
    assert summary["views"]["rear"]["incomplete"] == 1 and summary["views"]["dashboard"]["incomplete"] == 3
    assert {r["video_id"] for r in summary["not_extracted"] if r["verdict"] == "incomplete"} == {
        "Dashboard_user_id_1_NoAudio_1", "Dashboard_user_id_2_NoAudio_1", "Rear_view_user_id_4_NoAudio_1",
        "Dashboard_user_id_5_NoAudio_1"}
    assert not os.path.exists(run.dataset_dir + "/dashboard.parquet")  # no dashboard video is complete
    meta = read_shard_metadata(run.dataset_dir + "/rear.parquet")
    assert meta["partial"] is True and meta["incomplete_videos"] == ["Rear_view_user_id_4_NoAudio_1"]

    # the rerun lands: the reducer now accepts the run
    for shard_id in (1, 3, 4):
        write_shard(run, shard_id, videos, 8, 4)
    assert reduce_run(ReduceConfig(run.url, marker_wait_s=0))["complete"]


def test_shard_committed_twice_or_copied_cannot_duplicate_rows(tmp_path):
    videos = basic_videos()
    run = make_run(tmp_path, videos)
    write_shard(run, 0, videos, 8, 4)  # recommitted by a second attempt
    # a stray shard that also holds a rear video: the manifest does not assign it there
    stray = Video("user_id_1_NoAudio_1", "rear", 200, shard=7)
    write_shard(run, 7, [stray], 8, 4)
    reduce_run(ReduceConfig(run.url, marker_wait_s=0))
    rear = read_view(run.dataset_dir + "/rear.parquet")
    keys = list(zip(rear.column("video_id").to_pylist(), rear.column("window_index").to_pylist()))
    assert len(keys) == len(set(keys)) == 18


def test_duplicated_rows_inside_a_shard_are_named(tmp_path):
    videos = basic_videos()[:2]
    run = make_run(tmp_path, videos)
    # a buggy writer appended the same video twice into shard 0
    tmp = run.temp_shard_path(0)
    writer = ShardWriter(tmp, run.fs, shard_schema(8, 4), {"fingerprint": run.fingerprint()})
    idx = np.arange(11)
    for _ in range(2):
        writer.write_video(video_id=videos[0].video_id, session_id=videos[0].session, view="rear", window_index=idx,
                           start_frame=idx * HOP, end_frame=idx * HOP + SPAN, start_s=idx * 0.5, end_s=idx * 0.5,
                           center_s=idx * 0.5, feature=features_for(videos[0].video_id, idx, 8),
                           probs=np.zeros((11, 4), np.float32))
    writer.close()
    stats = json.load(open(run.stats_path(0)))
    run.uncommit(0)
    run.commit_shard(0, tmp, stats)
    with pytest.raises(IncompleteRun, match=r"duplicate window_index 0-10"):
        reduce_run(ReduceConfig(run.url, marker_wait_s=0))


def test_split_videos_stitch_and_gaps_are_caught(tmp_path):
    long = Video("user_id_7_NoAudio_2", "rear", 500, pieces=[(0, 0, 160), (1, 160, 336), (2, 336, 500)])
    other = Video("user_id_7_NoAudio_2", "dashboard", 480, shard=3, status="frame_count_mismatch",
                  error="manifest says 480 frames, decoded 470", decoded=470)
    run = make_run(tmp_path, [long, other])
    summary = reduce_run(ReduceConfig(run.url, marker_wait_s=0))
    rear = read_view(run.dataset_dir + "/rear.parquet")
    assert rear.column("window_index").to_pylist() == list(range(expected_windows(500, SPAN, HOP)))
    assert np.stack(rear.column("feature").to_numpy(zero_copy_only=False))[:, 0].tolist() == list(range(30))
    assert summary["views"]["dashboard"]["windows"] == expected_windows(470, SPAN, HOP)
    assert summary["videos_by_status"] == {"frame_count_mismatch": 1, "ok": 1}

    # the video is shorter than probed: its last piece decodes 20 frames, no window of its own
    shorter = Video("user_id_7_NoAudio_3", "rear", 500, pieces=[(0, 0, 160), (1, 160, 500)],
                    status="frame_count_mismatch", decoded=180)
    run3 = make_run(tmp_path / "c", [shorter])
    summary = reduce_run(ReduceConfig(run3.url, marker_wait_s=0))
    assert summary["views"]["rear"]["windows"] == expected_windows(180, SPAN, HOP) == 10
    assert summary["videos_by_status"] == {"frame_count_mismatch": 1}

    # pieces that do not meet (the first ends at 144, the next starts at 160) leave a gap
    broken = Video("user_id_7_NoAudio_2", "rear", 500, pieces=[(0, 0, 144), (1, 160, 336), (2, 336, 500)])
    run2 = make_run(tmp_path / "b", [broken])
    with pytest.raises(IncompleteRun, match=r"missing window_index 9"):
        reduce_run(ReduceConfig(run2.url, marker_wait_s=0))


def test_transient_video_failure_is_incomplete_and_rerun_failed_named(tmp_path):
    videos = basic_videos()[:2]
    videos[0].status, videos[0].error = "timeout", "decode watchdog after 600 s"
    run = make_run(tmp_path, videos)
    with pytest.raises(IncompleteRun) as caught:
        reduce_run(ReduceConfig(run.url, marker_wait_s=0))
    assert "timeout: decode watchdog after 600 s" in str(caught.value)
    assert "--rerun-failed" in str(caught.value)


def test_foreign_fingerprint_shard_is_not_merged(tmp_path):
    videos = basic_videos()[:2]
    run = make_run(tmp_path, videos, skip=(0,))
    write_shard(run, 0, videos, 8, 4, fingerprint="0123456789abcdef0000")
    with pytest.raises(IncompleteRun, match="shards other fingerprint"):
        reduce_run(ReduceConfig(run.url, marker_wait_s=0))


def test_reduce_command_exit_codes_and_no_torch(tmp_path):
    videos = basic_videos()
    run = make_run(tmp_path, videos, skip=(1,))
    code = ("import sys; from videofeat.launcher.cli import main; rc = main(['reduce'] + sys.argv[1:]);"
            "assert 'torch' not in sys.modules and 'timm' not in sys.modules, 'reduce imported torch';"
            "sys.exit(rc)")
    failed = subprocess.run([sys.executable, "-c", code, run.url, "--marker-wait", "0"],
                            capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1, failed.stderr
    assert "shards missing (1): 00001" in failed.stderr
    partial = subprocess.run([sys.executable, "-c", code, run.url, "--marker-wait", "0", "--allow-partial"],
                             capture_output=True, text=True, timeout=60)
    assert partial.returncode == 0, partial.stderr
    assert "PARTIAL" in partial.stdout and "rear" in partial.stdout
    script = os.path.join(os.path.dirname(__file__), "..", "launcher", "reduce.py")
    write_shard(run, 1, videos, 8, 4)
    out = tmp_path / "elsewhere"
    done = subprocess.run([sys.executable, script, run.url, "--marker-wait", "0", "-o", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (out / "rear.parquet").exists() and (out / "summary.json").exists()
    bad = subprocess.run([sys.executable, script, str(tmp_path / "nothing")], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "is" in bad.stderr and "run.json" in bad.stderr


def test_real_extraction_run_refused_then_completed_by_the_printed_command(tmp_path):
    """The real `videofeat extract`: a shard that lost its marker is named, and the printed rerun fixes it."""
    import shlex

    from helpers_extract import make_completed_run

    manifest, run_url = make_completed_run(tmp_path)
    run = RunDir(run_url)
    os.remove(run.marker_path(1))  # the node died between stats and marker
    with pytest.raises(IncompleteRun) as caught:
        reduce_run(ReduceConfig(run_url, marker_wait_s=0))
    text = str(caught.value)
    assert "shards interrupted (1): 00001" in text and "Rear_view_user_id_3_NoAudio_1" in text
    command = shlex.split(text.rsplit("rerun with:\n", 1)[1].strip().splitlines()[0])
    assert command[:3] == ["videofeat", "extract", manifest] and "--span" in command and "--checkpoint" in command
    rerun = subprocess.run([sys.executable, "-m", "videofeat.launcher.cli", *command[1:], "--no-progress"],
                           capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = reduce_run(ReduceConfig(run_url, marker_wait_s=0))
    # 64, 40 and 48 frames at span 16, hop 8
    assert summary["complete"] and summary["views"]["rear"]["windows"] == 7 + 4 + 5
    rows = pq.read_table(os.path.join(run.dataset_dir, "rear.parquet"), columns=["video_id", "window_index"])
    assert rows.column("video_id").to_pylist() == ["Rear_view_user_id_1_NoAudio_1"] * 7 + \
        ["Rear_view_user_id_2_NoAudio_1"] * 4 + ["Rear_view_user_id_3_NoAudio_1"] * 5


def test_marker_that_appears_late_on_a_shared_filesystem_is_waited_for(tmp_path):
    """Where a marker written elsewhere can show up late (here fsspec's in-memory filesystem,
    which like an object store is not a local disk), an interrupted-looking shard is waited for."""
    import threading
    import uuid

    videos = basic_videos()
    run = make_run(tmp_path, videos, run_url=f"memory://late-marker-{uuid.uuid4().hex[:8]}/run")
    run.fs.rm(run.marker_path(1))
    with run.fs.open(run.log_path(1, 1), "wb") as handle:  # started elsewhere, marker not visible yet
        handle.write(b"shard 1 attempt 1\n")
    late = threading.Timer(0.6, lambda: run.fs.pipe(run.marker_path(1), b""))
    late.start()
    try:
        summary = reduce_run(ReduceConfig(run.url, marker_wait_s=10))
    finally:
        late.cancel()
    assert summary["complete"] and summary["views"]["dashboard"]["windows"] == 18
    with pytest.raises(ValueError, match="--marker-wait must be between 0 and 60"):
        ReduceConfig(run.url, marker_wait_s=600)


def test_interrupted_shard_on_a_local_disk_is_reported_without_waiting(tmp_path):
    """A worker killed mid-shard leaves its log and nothing else. On a local disk its marker
    cannot be on its way, so the default 60 s marker wait is not spent."""
    import time

    from videofeat.manifests import fsutil

    videos = basic_videos()
    run = make_run(tmp_path, videos, skip=(1,))
    assert not fsutil.late_writes_plausible(run.fs, run.root), fsutil.mount_type(run.root)
    run.fs.makedirs(run.path("logs"), exist_ok=True)
    with run.fs.open(run.log_path(1, 1), "wb") as handle:
        handle.write(b"extracting shard 00001\n")
    began = time.monotonic()
    with pytest.raises(IncompleteRun, match="shards interrupted \\(1\\): 00001") as caught:
        reduce_run(ReduceConfig(run.url))  # the default --marker-wait
    assert time.monotonic() - began < 10, "waited for a marker on a local disk"
    assert "left no completion marker" in str(caught.value)


def test_reduce_removes_temporaries_of_dead_writers_only(tmp_path):
    """Leftovers of a killed reduce in dataset/ go; a live process's temporary, another host's
    recent one and files not of our naming stay."""
    import socket
    import time

    videos = basic_videos()
    run = make_run(tmp_path, videos)
    dataset = tmp_path / "run" / "dataset"
    dataset.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    host = socket.gethostname()
    try:
        names = {
            "dead": f"rear.parquet.tmp-{host}-p{dead.pid}-0badc0de",
            "live": f"rear.parquet.tmp-{host}-p{live.pid}-00c0ffee",
            "elsewhere_recent": f"dashboard.parquet.tmp-node-b-p{dead.pid}-12345678",
            "elsewhere_old": f"summary.json.tmp-node-b-p{dead.pid}-87654321",
            "not_ours": "notes.txt.tmp-1234",
        }
        for name in names.values():
            (dataset / name).write_bytes(b"x" * 1000)
        old = time.time() - 3600
        os.utime(dataset / names["elsewhere_old"], (old, old))
        reduce_run(ReduceConfig(run.url, marker_wait_s=0))
        left = set(os.listdir(dataset))
    finally:
        live.kill()
        live.wait()
    assert names["dead"] not in left and names["elsewhere_old"] not in left
    assert {names["live"], names["elsewhere_recent"], names["not_ours"]} <= left
    assert {"rear.parquet", "dashboard.parquet", "summary.json"} <= left
