"""A generated AI City-style job for the pipeline tests: train users with CSVs, a test user without."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from videofeat.launcher.demo import DemoConfig, generate_dataset, job_text

CONFIG = DemoConfig(users=2, sessions=1, seconds=6, epochs=2)
VAL_USER = 10001 + 1111  # the second training user validates
SETS = ("tiny_vith", "tiny_vitl", "tiny_vitl_b")
VIEWS = ("rear", "dashboard")


def make_data(root: Path) -> Path:
    """``root/data/A1`` (2 users, CSVs) and ``root/data/A2`` (1 user, no CSVs), 64x64, 6 s each."""
    generate_dataset(str(root / "data" / "A1"), CONFIG)
    generate_dataset(str(root / "data" / "A2"), CONFIG, first_user=CONFIG.users, users_n=1, with_csv=False)
    return root


def write_job(root: Path, **changes) -> Path:
    """The demo's job (three tiny sets, two presets, two views) with 2 shards per view."""
    path = root / "job.toml"
    path.write_text(job_text(VAL_USER, CONFIG.epochs, num_shards=2, **changes))
    return path


def copy_data(source: Path, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source / "data", target / "data")
    return target


def exported(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every npz under ``folder/<set>/`` as arrays, keyed ``<set>/<file>``."""
    out = {}
    for set_name in SETS:
        for name in sorted(os.listdir(folder / set_name)):
            if name.endswith(".npz"):
                with np.load(folder / set_name / name) as data:
                    out[f"{set_name}/{name}"] = {k: data[k] for k in data.files}
    return out


def assert_same_exports(mine: dict, reference: dict, atol: float = 1e-6) -> None:
    assert sorted(mine) == sorted(reference) and mine
    for key, arrays in reference.items():
        assert sorted(mine[key]) == sorted(arrays), key
        for name, value in arrays.items():
            assert mine[key][name].shape == value.shape, (key, name)
            assert np.abs(mine[key][name] - value).max() <= atol, (key, name)
