"""Faults on the input side, each injected for real, then the rerun a user is told to run.

- views: names a glob layout produces (``default``, ``front``, ``Cabin-Cam``) through manifest,
  extract, status, reduce, export and the multi-view table; AI City aliases stay canonical;
- a file the manifest found readable and that is gone at extract time: ``unavailable``
  (transient), the run incomplete until ``--rerun-failed`` recomputes it;
- a file replaced after the manifest (other length and rate; same length, other content):
  ``changed``, no windows timed with the old probe, ``reduce`` says to rebuild the manifest;
- rotation metadata: frames come out as a player shows them, or a status says why not;
- a folder discovery cannot list: an error naming it and the fix, never a silent gap.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import REPO_ROOT
from helpers_extract import tiny_checkpoint
from videofeat.launcher import manifest_cmd as manifest_args
from videofeat.launcher import status_cmd
from videofeat.manifests.discover import discover
from videofeat.manifests.ledger import RunDir
from videofeat.manifests.manifest import (ManifestConfig, ManifestRow, build_rows, content_fingerprint, manifest_fingerprint,
                                          manifest_metadata, read_manifest, write_manifest)
from videofeat.manifests.probe import probe_video
from videofeat.manifests.views import canonical_view, parse_views
from videofeat.workers.decode.decoders import VideoOpenError, open_video
from videofeat.workers.decode.synthetic import index_frame, read_index, write_action_video, write_video
from videofeat.workers.extract import preflight
from videofeat.workers.extract.config import ExtractConfig
from videofeat.workers.extract.loop import run_extraction
from videofeat.workers.reduce.export import ExportConfig, export_run
from videofeat.workers.reduce.merge import IncompleteRun, ReduceConfig, reduce_run

SPAN, HOP = 16, 8


def extract(manifest: str, output: str, ckpt: str, **overrides) -> int:
    config = dict(manifest=manifest, output=output, preset="aicity-vith", model="auto", checkpoints=(("*", ckpt),),
                  span=SPAN, hop=HOP, num_frames=8, frame_step=2, size=64, decode_procs=1, device="cpu",
                  batch_size=8, progress=False)
    return run_extraction(ExtractConfig(**{**config, **overrides}))


def build_manifest(root: Path, out: Path, regex: str | None = None) -> str:
    """What `videofeat manifest ROOT --layout glob [--regex]` writes, built in this process."""
    found = discover(str(root), "glob", "**/*.mp4", regex)
    probes = {v.uri: probe_video(v.uri) for v in found.videos}
    write_manifest(build_rows(found.videos, probes, ManifestConfig()), str(out))
    return str(out)


def dataset_tables(run_dir: str) -> dict[str, dict]:
    run = RunDir(run_dir)
    return {name[:-len(".parquet")]: pq.read_table(os.path.join(run.dataset_dir, name)).to_pydict()
            for name in sorted(os.listdir(run.dataset_dir)) if name.endswith(".parquet")}


def rotated_video(path: str, degrees: int | None, frames: int = 40, hflip: bool = False) -> str:
    """Index frames 64x48 in H.264, with a display matrix turning them ``degrees`` counter-clockwise
    (None: no matrix). Frames go in as YUV, so no RGB conversion (whose SIMD path depends on the
    buffer's alignment) can make two encodes of the same frames differ."""
    with av.open(path, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"crf": "18", "g": "16", "keyint_min": "16", "sc_threshold": "0", "bf": "0"}
        stream.thread_count = 1
        if degrees is not None:
            stream.set_display_rotation(degrees, hflip=hflip)
        for i in range(frames):
            luma = index_frame(i, 64, 48).mean(axis=2).astype(np.uint8)
            yuv = np.concatenate([luma, np.full((24, 64), 128, np.uint8)])  # U and V planes, 32x24 each
            for packet in stream.encode(av.VideoFrame.from_ndarray(yuv, format="yuv420p")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def views_run(tmp_path_factory):
    """A glob tree whose views are a folder name (or none: ``default``), extracted and reduced once."""
    root = tmp_path_factory.mktemp("views")
    videos = root / "videos"
    for folder, name, seed in (("Front", "front_s1", 1), ("Front", "front_s2", 2), ("Cabin-Cam", "cabin_s1", 3),
                               ("Rearview", "rear_s1", 4), (None, "top_s1", 5)):
        where = videos / folder if folder else videos
        write_action_video(str(where / f"{name}.mp4"), 48, [(seed, 8, 32)], 64, 64, gop=16, seed=seed)
    rotated_video(str(videos / "turned_s2.mp4"), 90, frames=40)
    manifest = build_manifest(videos, root / "manifest.parquet",
                              r"^(?:(?P<view>[^/]+)/)?(?P<video>[a-z]+_(?P<session>s\d))\.mp4$")
    ckpt = tiny_checkpoint(root / "tiny.pt")
    run_dir = str(root / "run")
    assert extract(manifest, run_dir, ckpt) == 0
    summary = reduce_run(ReduceConfig(run_dir, marker_wait_s=0))
    return root, manifest, ckpt, run_dir, summary


def test_view_names_spellings():
    assert [canonical_view(v) for v in ("Rear_view", "Rearview", "Dash", "RIGHT side window")] == \
        ["rear", "rear", "dashboard", "right"]
    assert parse_views("default, Cabin-Cam,front") == ("default", "cabin_cam", "front")
    with pytest.raises(ValueError, match="cannot name a file or column.*letters, digits"):
        canonical_view("cam/1")


def test_any_view_name_works_through_every_stage(views_run, tmp_path, capsys):
    root, manifest, _, run_dir, summary = views_run
    rows = read_manifest(manifest).to_pylist()
    assert sorted({r["view"] for r in rows}) == ["cabin_cam", "default", "front", "rear"]
    turned = next(r for r in rows if r["video_id"] == "turned_s2")
    assert (turned["rotation"], turned["width"], turned["height"]) == (90, 48, 64)  # as a player shows it

    status_cmd.run(status_cmd.argparse.Namespace(run_dir=run_dir, max_attempts=3, all=False))
    assert "all shards are done; next: videofeat reduce" in capsys.readouterr().out
    assert summary["complete"] and sorted(summary["views"]) == ["cabin_cam", "default", "front", "rear"]
    # 48 frames: 5 windows; the rotated 40-frame video: 4
    assert {v: s["windows"] for v, s in summary["views"].items()} == {"cabin_cam": 5, "default": 5 + 4,
                                                                     "front": 10, "rear": 5}

    report = export_run(ExportConfig(run_dir, str(tmp_path / "af"), views=("Default", "front")))
    assert report["views"] == {"default": 2, "front": 2}
    with np.load(tmp_path / "af" / "turned_s2.npz") as npz:
        assert npz["feats"].shape == (4, 64)

    multi = export_run(ExportConfig(run_dir, str(tmp_path / "mv"), format="multiview"))
    table = pq.read_table(multi["table"])
    assert multi["views"] == ["cabin_cam", "default", "front", "rear"] and multi["sessions"] == 2
    assert {"cabin_cam_feature", "default_feature", "front_feature", "rear_feature"} <= set(table.column_names)
    s1 = table.filter(pc.equal(table.column("session_id"), "s1")).to_pydict()
    assert s1["front_video_id"] == ["front_s1"] * 5 and s1["default_video_id"] == ["top_s1"] * 5


def test_file_gone_at_extract_time_is_transient_until_rerun(views_run, tmp_path, capsys):
    root, manifest, ckpt, clean_dir, _ = views_run
    video = root / "videos" / "Front" / "front_s1.mp4"
    aside = tmp_path / "moved.mp4"
    run_dir = str(tmp_path / "run")
    os.rename(video, aside)  # moved away after the manifest was written
    try:
        assert extract(manifest, run_dir, ckpt, views=("front",)) == 0
    finally:
        os.rename(aside, video)
    stats = RunDir(run_dir).records(RunDir(run_dir).done_shards())[0].stats
    record = next(v for v in stats["videos"] if v["video_id"] == "front_s1")
    assert record["status"] == "unavailable" and "FileNotFoundError" in record["error"]

    status_cmd.run(status_cmd.argparse.Namespace(run_dir=run_dir, max_attempts=3, all=False))
    out = capsys.readouterr().out
    assert "unavailable  front_s1 [transient" in out and "--rerun-failed" in out
    with pytest.raises(IncompleteRun) as refused:
        reduce_run(ReduceConfig(run_dir, marker_wait_s=0))
    assert "front_s1 [front]: unavailable" in str(refused.value) and "--rerun-failed" in str(refused.value)

    assert extract(manifest, run_dir, ckpt, views=("front",), rerun_failed=True) == 0
    assert reduce_run(ReduceConfig(run_dir, marker_wait_s=0))["complete"]
    assert dataset_tables(run_dir)["front"] == dataset_tables(clean_dir)["front"]


def test_file_replaced_after_the_manifest_is_changed_not_mistimed(tmp_path, capsys):
    videos = tmp_path / "videos"
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        write_action_video(str(videos / f"{name}.mp4"), 48, [(seed, 8, 32)], 64, 64, gop=16, seed=seed)
    manifest = build_manifest(videos, tmp_path / "manifest.parquet")
    before = {p.name: os.stat(p) for p in videos.iterdir()}
    # a: fewer frames at 25 fps; b: the same 48 frames at 30 fps, other content
    write_action_video(str(videos / "a.mp4"), 40, [(5, 8, 32)], 64, 64, fps=25, gop=16, seed=7)
    write_action_video(str(videos / "b.mp4"), 48, [(9, 8, 32)], 64, 64, gop=16, seed=9)
    assert os.stat(videos / "b.mp4").st_mtime_ns != before["b.mp4"].st_mtime_ns
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    run_dir = str(tmp_path / "run")
    assert extract(manifest, run_dir, ckpt) == 0

    run = RunDir(run_dir)
    videos_stats = {v["video_id"]: v for r in run.records(run.done_shards()) for v in r.stats["videos"]}
    assert videos_stats["c"]["status"] == "ok"
    for name in ("a", "b"):
        assert videos_stats[name]["status"] == "changed" and videos_stats[name]["windows"] == 0
        assert "differs from the manifest" in videos_stats[name]["error"]
    shard_ids = pq.read_table(run.shard_path(0), columns=["video_id"]).column("video_id").to_pylist()
    assert set(shard_ids) == {"c"}  # nothing written with the manifest's 30 fps for a

    status_cmd.run(status_cmd.argparse.Namespace(run_dir=run_dir, max_attempts=3, all=False))
    out = capsys.readouterr().out
    assert "changed      a [rebuild the manifest" in out and "rebuild the manifest with `videofeat manifest`" in out
    with pytest.raises(IncompleteRun) as refused:
        reduce_run(ReduceConfig(run_dir, marker_wait_s=0))
    text = str(refused.value)
    assert "a [default]: changed" in text and "b [default]: changed" in text and "NEW_MANIFEST" in text

    # The fix it names: a rebuilt manifest, extracted into a new run, times a's windows at 25 fps.
    rebuilt = build_manifest(videos, tmp_path / "rebuilt.parquet")
    assert extract(rebuilt, str(tmp_path / "run2"), ckpt) == 0
    assert reduce_run(ReduceConfig(str(tmp_path / "run2"), marker_wait_s=0))["complete"]
    a_rows = pq.read_table(os.path.join(RunDir(str(tmp_path / "run2")).dataset_dir, "default.parquet"),
                           filters=[("video_id", "=", "a")]).to_pydict()
    assert a_rows["window_index"] == [0, 1, 2, 3] and a_rows["end_s"][-1] == pytest.approx((3 * HOP + SPAN) / 25)


def test_decoder_reporting_another_rate_than_the_manifest_is_changed(tmp_path):
    """The second check: what the opened file says (its rate) against the probe, size and mtime aside."""
    path = write_action_video(str(tmp_path / "v.mp4"), 40, [], 64, 64, fps=25, gop=16)
    row = ManifestRow.from_mapping({"video_id": "v", "view": "rear", "uri": path, "status": "ok", "num_frames": 40,
                                    "fps_num": 30, "fps_den": 1, "fps": 30.0, "size_bytes": os.path.getsize(path)})
    assert preflight.check_file(row) is None  # same size, no mtime recorded: only the decoder can tell
    with open_video(path) as source:
        info = {"fps": str(source.fps), "container_frames": source.num_frames}
    status, error = preflight.check_opened(row, info)
    assert status == "changed" and "frame rate 30 -> 25 fps" in error
    assert preflight.check_opened(dataclasses.replace(row, fps_num=25), info) is None


@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_rotated_video_frames_come_out_as_a_player_shows_them(tmp_path, degrees):
    upright = rotated_video(str(tmp_path / "upright.mp4"), None, frames=20)
    turned = rotated_video(str(tmp_path / f"turned{degrees}.mp4"), degrees, frames=20)
    with open_video(upright) as source:
        reference = [np.rot90(rgb, k=degrees // 90) for _, rgb, _ in source.stream()]
    with open_video(turned) as source:
        assert (source.rotation, source.width, source.height) == \
            (degrees, *((48, 64) if degrees % 180 else (64, 48)))
        frames = [rgb for _, rgb, _ in source.stream()]
        # a seek to the middle is rotated too
        middle = [rgb for _, rgb, _ in source.stream(9, 12)]
    assert len(frames) == 20 and all(np.array_equal(a, b) for a, b in zip(frames, reference))
    assert all(np.array_equal(a, b) for a, b in zip(middle, reference[9:12]))
    with open_video(turned) as source:  # --resize fast: FFmpeg turns and scales the frame itself
        fast = [(i, rgb) for i, rgb, _ in source.stream(output_size=(64, 64))]
    assert [read_index(np.rot90(rgb, k=-(degrees // 90))) for _, rgb in fast] == [i for i, _ in fast] == list(range(20))


def test_rotation_that_cannot_be_applied_is_a_status_not_a_sideways_frame(tmp_path):
    mirrored = rotated_video(str(tmp_path / "mirrored.mp4"), 0, hflip=True)
    with pytest.raises(VideoOpenError, match="mirrors the picture.*rotation is not applied"):
        open_video(mirrored)
    probe = probe_video(mirrored)
    assert probe["status"] == "unreadable" and "rotation is not applied" in probe["error"]
    pytest.importorskip("decord")
    turned = rotated_video(str(tmp_path / "turned.mp4"), 90)
    with pytest.raises(VideoOpenError, match="rotation is not applied; use --decoder pyav"):
        open_video(turned, backend="decord")


def test_folder_that_cannot_be_listed_is_reported_not_skipped(tmp_path):
    videos = tmp_path / "videos"
    for folder in ("open", "locked"):
        write_video(str(videos / folder / f"{folder}.mp4"), (index_frame(i) for i in range(40)), gop=16)
    clean_rows = build_rows(*(lambda f: (f.videos, {v.uri: probe_video(v.uri) for v in f.videos}))(
        discover(str(videos), "glob")), ManifestConfig())
    # Root reads any folder; without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH it gets EACCES like anyone.
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("setpriv (util-linux) is needed to list a folder without root's capabilities")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    out = tmp_path / "manifest.parquet"

    def manifest_cmd(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*prefix, sys.executable, "-m", "videofeat.launcher.cli", "manifest", str(videos),
                               "--layout", "glob", "-o", str(out), "--probe-procs", "1", *extra],
                              capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)

    os.chmod(videos / "locked", 0)
    try:
        refused = manifest_cmd()
        assert refused.returncode == 2 and not out.exists()
        assert f"cannot list 1 folder(s) under {videos}: {videos / 'locked'} (PermissionError" in refused.stderr
        assert "--skip-unlistable" in refused.stderr and "chmod" in refused.stderr
        skipped = manifest_cmd("--skip-unlistable")
        assert skipped.returncode == 0, skipped.stderr
        assert f"unlisted     {videos / 'locked'}: PermissionError" in skipped.stdout
        assert manifest_metadata(str(out))["unlisted_folders"][0][0] == str(videos / "locked")
        assert [r["video_id"] for r in read_manifest(str(out)).to_pylist()] == ["open"]
    finally:
        os.chmod(videos / "locked", 0o755)
    # Fixed, the plain command (in this process: no capability to drop now) writes the clean manifest.
    parser = argparse.ArgumentParser()
    manifest_args.add_arguments(parser)
    assert manifest_args.run(parser.parse_args([str(videos), "--layout", "glob", "-o", str(out),
                                                "--probe-procs", "1"])) == 0
    assert manifest_fingerprint(str(out)) == content_fingerprint(clean_rows)

