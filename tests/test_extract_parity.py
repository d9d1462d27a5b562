"""Seed presets at 224x224 against an independent reference that uses no videofeat decoding or resizing.

The reference decodes with PyAV frame by frame and resizes exactly as the seed's scripts did:
ViT-L with PIL ``resize((224, 224), BILINEAR)`` before normalizing, ViT-H with
``F.interpolate(bilinear, align_corners=False, antialias=False)`` after normalizing. Only the
model (random weights) is shared. ``--resize exact`` holds the seed's numbers to 1e-5;
``bounded`` (each preset's default) to what its bound allows: pixels within 1/255 of PIL for
ViT-L, float rounding for ViT-H.
"""

from __future__ import annotations

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from helpers_extract import manifest_row, tiny_checkpoint
from videofeat.manifests.ledger import RunDir
from videofeat.manifests.manifest import write_manifest
from videofeat.models import create_model
from videofeat.workers.extract.config import ExtractConfig
from videofeat.workers.extract.loop import run_extraction
from videofeat.workers.decode.synthetic import write_action_video

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
N_FRAMES = 70  # floor(70/16) - 1 = 3 windows


def _reference(path: str, preset: str, model) -> np.ndarray:
    with av.open(path) as container:
        # one swscale thread: its default slices the frame and got boundary rows wrong at random
        frames = [f.to_ndarray(format="rgb24", threads=1) for f in container.decode(video=0)]
    feats = []
    for i in range(len(frames) // 16 - 1):
        window = frames[16 * i: 16 * i + 32]
        if preset == "aicity-vitl":
            clip = np.stack([np.asarray(Image.fromarray(f).resize((224, 224), Image.BILINEAR)) for f in window])
            x = torch.from_numpy(((clip / 255.0 - MEAN) / STD).astype(np.float32)).permute(3, 0, 1, 2)
        else:
            clip = np.stack(window[::2])
            x = torch.from_numpy(((clip / 255.0 - MEAN) / STD).astype(np.float32)).permute(3, 0, 1, 2)
            x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
        with torch.no_grad():
            feature, _ = model.forward_features_and_logits(x[None])
        feats.append(feature[0].numpy())
    return np.stack(feats)


@pytest.mark.parametrize("preset,frames,resize,tolerance", [
    ("aicity-vitl", 32, "exact", 1e-5), ("aicity-vitl", 32, "bounded", 1e-2),
    ("aicity-vith", 16, "exact", 1e-4), ("aicity-vith", 16, "bounded", 1e-4)])
def test_seed_preset_matches_independent_reference(tmp_path, preset, frames, resize, tolerance):
    path = write_action_video(str(tmp_path / "v.mp4"), N_FRAMES, [(2, 10, 40), (7, 40, 70)], 200, 120, gop=30)
    manifest = str(tmp_path / "manifest.parquet")
    write_manifest([manifest_row("Rear_view_user_id_9_NoAudio_1", path, N_FRAMES, 0, width=200, height=120)],
                   manifest)
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    out = str(tmp_path / "run")
    config = ExtractConfig(manifest=manifest, output=out, preset=preset, checkpoints=(("*", ckpt),), decode_procs=1,
                           device="cpu", batch_size=2, progress=False, resize=resize)
    assert run_extraction(config) == 0
    table = pq.read_table(RunDir(out).shard_path(0))
    got = np.asarray(table.column("feature").to_pylist(), dtype=np.float32)
    assert table.column("window_index").to_pylist() == list(range(N_FRAMES // 16 - 1))
    assert table.column("start_frame").to_pylist() == [16 * i for i in range(3)]
    assert table.column("end_frame").to_pylist() == [16 * i + 32 for i in range(3)]
    assert np.allclose(table.column("center_s").to_pylist(), [(16 * i + 16) / 30 for i in range(3)])

    model = create_model("auto", checkpoint=ckpt, num_frames=frames, img_size=224).eval()
    ref = _reference(path, preset, model)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= tolerance
    distances = np.linalg.norm(got[:, None, :] - ref[None, :, :], axis=-1)
    assert (distances.argmin(axis=1) == np.arange(len(ref))).all()
    assert all(distances[i, i] < np.delete(distances[i], i).min() for i in range(len(ref)))
