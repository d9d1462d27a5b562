"""The manifest command on a real tree of H.264 files, bad files included."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from conftest import run_cli

from videofeat.manifests.discover import DiscoveryError, discover
from videofeat.manifests.manifest import manifest_fingerprint, read_manifest


def test_manifest_records_every_file_with_its_status(aicity_tree, tmp_path):
    root, counts = aicity_tree
    out = tmp_path / "m.parquet"
    result = run_cli("manifest", str(root), "-o", str(out), "--num-shards", "2")
    rows = {r["video_id"]: r for r in read_manifest(str(out)).to_pylist()}
    assert len(rows) == len(counts) + 4
    assert rows["Dashboard_user_id_44_NoAudio_1"]["status"] == "empty"
    assert rows["Rear_view_user_id_44_NoAudio_1"]["status"] == "unreadable"
    assert rows["Right_side_window_user_id_44_NoAudio_1"]["status"] == "unreadable"
    assert rows["Rear_view_user_id_44_NoAudio_2"]["status"] == "too_short"
    for video_id, frames in counts.items():
        row = rows[video_id]
        assert row["status"] == "ok" and row["num_frames"] == frames
        assert (row["fps_num"], row["fps_den"]) == (30, 1) and (row["width"], row["height"]) == (64, 48)
        assert row["codec"] == "h264" and row["vfr"] is False and row["shard_id"] is not None
        assert row["session_id"] == video_id.split("_", 1)[1].replace("view_", "").replace("side_window_", "")
    for bad in ("Dashboard_user_id_44_NoAudio_1", "Rear_view_user_id_44_NoAudio_2"):
        assert rows[bad]["shard_id"] is None and rows[bad]["error"]
    # Views are canonical, shards never mix views, ids are frozen in the file.
    assert {r["view"] for r in rows.values()} == {"dashboard", "rear", "right"}
    by_shard = {}
    for r in rows.values():
        if r["shard_id"] is not None:
            by_shard.setdefault(r["shard_id"], set()).add(r["view"])
    assert len(by_shard) == 6 and all(len(v) == 1 for v in by_shard.values())
    assert "empty" in result.stdout and "too_short" in result.stdout
    assert manifest_fingerprint(str(out))
    strict = run_cli("manifest", str(root), "-o", str(tmp_path / "s.parquet"), "--strict", check=False)
    assert strict.returncode == 1


def test_manifest_is_deterministic_and_view_selection_keeps_whole_shards(aicity_tree, tmp_path):
    root, _ = aicity_tree
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    run_cli("manifest", str(root), "-o", str(a), "--num-shards", "2", "--probe-procs", "1")
    run_cli("manifest", str(root), "-o", str(b), "--num-shards", "2", "--probe-procs", "2")
    assert read_manifest(str(a)).equals(read_manifest(str(b)))
    assert manifest_fingerprint(str(a)) == manifest_fingerprint(str(b))
    rear = tmp_path / "rear.parquet"
    run_cli("manifest", str(root), "-o", str(rear), "--views", "Rearview", "--num-shards", "2")
    table = read_manifest(str(rear)).to_pylist()
    assert {r["view"] for r in table} == {"rear"}


def test_glob_list_layouts_crops_and_duplicate_ids(aicity_tree, tmp_path):
    root, counts = aicity_tree
    found = discover(str(root), "glob", "**/*.MP4", r"(?P<view>Dashboard|Rear_view)_(?P<session>user_id_\d+_NoAudio_\d+)")
    assert {v.view for v in found.videos} == {"dashboard", "rear"}
    assert any("does not match --regex" in why for _, why in found.skipped)
    listing = tmp_path / "list.csv"
    some = sorted(counts)[:3]
    listing.write_text("uri,view\n" + "".join(f"{root / ('user_id_' + v.split('user_id_')[1].split('_')[0]) / (v + '.MP4')},rear\n" for v in some))
    crops = tmp_path / "crops.csv"
    crops.write_text(f"video_id,crop_x,crop_y,crop_w,crop_h\n{some[0]},8,4,32,32\n")
    out = tmp_path / "list.parquet"
    run_cli("manifest", str(listing), "--layout", "list", "-o", str(out), "--crops", str(crops))
    rows = {r["video_id"]: r for r in read_manifest(str(out)).to_pylist()}
    assert set(rows) == set(some)
    assert (rows[some[0]]["crop_x"], rows[some[0]]["crop_w"]) == (8, 32) and rows[some[1]]["crop_x"] is None
    dup = tmp_path / "dup.csv"
    path = root / "user_id_11" / "Dashboard_user_id_11_NoAudio_1.MP4"
    dup.write_text(f"uri\n{path}\n{path}\n")
    with pytest.raises(DiscoveryError, match="two files have video_id"):
        discover(str(dup), "list")
    bad_crop = tmp_path / "bad_crop.csv"
    bad_crop.write_text(f"video_id,crop_x,crop_y,crop_w,crop_h\n{some[0]},40,0,64,32\n")
    result = run_cli("manifest", str(listing), "--layout", "list", "-o", str(tmp_path / "x.parquet"),
                     "--crops", str(bad_crop), check=False)
    assert result.returncode != 0 and "outside its 64x48 frame" in result.stderr


def test_memory_filesystem_root(tmp_path):
    import fsspec

    from videofeat.workers.decode.synthetic import write_index_video

    local = write_index_video(str(tmp_path / "clip.mp4"), 40)
    fs = fsspec.filesystem("memory")
    fs.pipe("/vf-test/videos/cam_a.mp4", open(local, "rb").read())
    from videofeat.launcher.cli import main

    assert main(["manifest", "memory://vf-test/videos", "--layout", "glob", "--pattern", "*.mp4",
                 "-o", "memory://vf-test/m.parquet"]) == 0
    rows = read_manifest("memory://vf-test/m.parquet").to_pylist()
    assert rows[0]["num_frames"] == 40 and rows[0]["uri"].startswith("memory://")


def test_probe_timeout_on_a_fifo(tmp_path):
    import os

    from videofeat.manifests.probe_pool import probe_all

    fifo = tmp_path / "hang.mp4"
    os.mkfifo(fifo)
    from videofeat.workers.decode.synthetic import write_index_video

    good = write_index_video(str(tmp_path / "good.mp4"), 40)
    results = probe_all([str(fifo), good], procs=1, timeout_s=2.0)
    assert results[str(fifo)]["status"] == "timeout" and "FIFO" in results[str(fifo)]["error"]
    assert results[good]["status"] == "ok"


def test_reading_a_manifest_leaves_the_exit_code_alone(aicity_tree, tmp_path):
    """pyarrow's threaded reader over a Python file object used to abort the process at exit."""
    import subprocess
    import sys

    root, _ = aicity_tree
    out = tmp_path / "m.parquet"
    run_cli("manifest", str(root), "-o", str(out))
    code = ("import sys, fsspec\n"
            "from videofeat.manifests.manifest import read_manifest\n"
            f"local = read_manifest({str(out)!r})\n"
            f"fsspec.filesystem('memory').pipe('/exit-test/m.parquet', open({str(out)!r}, 'rb').read())\n"
            "assert read_manifest('memory://exit-test/m.parquet').equals(local)\n"
            # Nor does it import pandas (pyarrow.dataset did: 0.4 s and ~33 MB in every rank).
            "assert 'pandas' not in sys.modules\n"
            "sys.exit(3)\n")
    for _ in range(3):
        assert subprocess.run([sys.executable, "-c", code]).returncode == 3
