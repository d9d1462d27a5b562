"""``videofeat manifest --merge``: one manifest of a training set and its test sets, re-sharded."""

from __future__ import annotations

import pytest

from videofeat.launcher.cli import main
from videofeat.manifests.manifest import SCHEMA, ManifestError, read_manifest, write_manifest
from videofeat.manifests.merge import merge_manifests
from videofeat.manifests.shards import ShardingConfig


def _row(video_id: str, view: str, frames: int, status: str = "ok") -> dict:
    row = {name: None for name in SCHEMA.names}
    row.update(video_id=video_id, session_id=video_id.split("_", 1)[1], view=view, uri=f"/v/{video_id}.mp4",
               num_frames=frames, fps_num=30, fps_den=1, fps=30.0, status=status, shard_id=0, piece_index=0,
               num_pieces=1, piece_start_frame=0, piece_end_frame=frames)
    return row


def test_merge_reshards_every_dataset_and_refuses_a_duplicate(tmp_path):
    a, b = str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")
    write_manifest([_row("Rear_1", "rear", 900), _row("Dash_1", "dashboard", 300)], a)
    write_manifest([_row("Rear_2", "rear", 600), _row("Rear_3", "rear", 20, status="too_short")], b)
    out = str(tmp_path / "m.parquet")
    assert main(["manifest", "--merge", a, b, "-o", out, "--num-shards", "2"]) == 0
    rows = {r["video_id"]: r for r in read_manifest(out).to_pylist()}
    assert sorted(rows) == ["Dash_1", "Rear_1", "Rear_2", "Rear_3"]
    # Two shards per view, largest first: the rear videos of both datasets are spread over them.
    assert rows["Rear_1"]["shard_id"] != rows["Rear_2"]["shard_id"]
    assert rows["Dash_1"]["shard_id"] not in (rows["Rear_1"]["shard_id"], rows["Rear_2"]["shard_id"])
    assert rows["Rear_3"]["shard_id"] is None and rows["Rear_3"]["status"] == "too_short"
    assert rows["Dash_1"]["view"] == "dashboard" and rows["Dash_1"]["shard_id"] is not None
    with pytest.raises(ManifestError, match=r"Rear_1 is in both .*a.parquet and .*a2.parquet"):
        write_manifest([_row("Rear_1", "rear", 900)], str(tmp_path / "a2.parquet"))
        merge_manifests([a, str(tmp_path / "a2.parquet")], str(tmp_path / "x.parquet"), ShardingConfig(num_shards=1))
    assert main(["manifest", str(tmp_path), "--merge", a, "-o", out]) == 2  # ROOT and --merge exclude each other
