"""Shared fixtures: real H.264 files in an AI City-style tree, with the bad files users meet."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from videofeat.workers.decode.synthetic import write_index_video

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests may import their helper modules


@pytest.fixture(autouse=True)
def _root_logger_as_found():
    """A command run in-process (``main([...])``) sets the root logger up on that test's captured
    stderr; later tests would log into a closed capture stream. Put it back after every test."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def make_aicity_tree(root: Path, users=(11, 22, 33), sessions=(1, 2), frames=(48, 96, 160),
                     width: int = 64, height: int = 48) -> dict[str, int]:
    """``root/user_id_<u>/<View>_user_id_<u>_NoAudio_<n>.MP4`` for every view; returns frames per video id."""
    counts = {}
    prefixes = ("Dashboard", "Rear_view", "Right_side_window")
    for ui, user in enumerate(users):
        for si, session in enumerate(sessions):
            for vi, prefix in enumerate(prefixes):
                n = frames[(ui + si + vi) % len(frames)]
                video_id = f"{prefix}_user_id_{user}_NoAudio_{session}"
                write_index_video(str(root / f"user_id_{user}" / f"{video_id}.MP4"), n, width, height, gop=16)
                counts[video_id] = n
    return counts


@pytest.fixture(scope="session")
def aicity_tree(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """Good videos plus a zero-byte file, a truncated file, a text file named .MP4, a short video."""
    root = tmp_path_factory.mktemp("aicity")
    counts = make_aicity_tree(root)
    bad = root / "user_id_44"
    bad.mkdir()
    (bad / "Dashboard_user_id_44_NoAudio_1.MP4").write_bytes(b"")
    good = (root / "user_id_11" / "Dashboard_user_id_11_NoAudio_1.MP4").read_bytes()
    (bad / "Rear_view_user_id_44_NoAudio_1.MP4").write_bytes(good[: len(good) // 2])
    (bad / "Right_side_window_user_id_44_NoAudio_1.MP4").write_text("this is not a video\n")
    write_index_video(str(bad / "Rear_view_user_id_44_NoAudio_2.MP4"), 20, 64, 48)
    return root, counts


def run_cli(*args: str, check: bool = True, env: dict | None = None, cwd: str | None = None):
    """Run the real ``videofeat`` entry point in a subprocess."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    result = subprocess.run([sys.executable, "-m", "videofeat.launcher.cli", *args], capture_output=True,
                            text=True, env=full_env, cwd=cwd)
    if check and result.returncode != 0:
        raise AssertionError(f"videofeat {' '.join(args)} exited {result.returncode}\n"
                             f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def pipeline_reference(tmp_path_factory) -> Path:
    """One uninterrupted ``videofeat pipeline`` run of the generated job (tests/helpers_pipeline.py),
    shared by the pipeline tests that must equal it (local, interrupted, on SLURM)."""
    from helpers_pipeline import make_data, write_job
    from videofeat.launcher.cli import main

    root = make_data(tmp_path_factory.mktemp("pipeline-reference"))
    assert main(["pipeline", str(write_job(root)), "-o", str(root / "work")]) == 0
    return root
