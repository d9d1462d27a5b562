"""Bad command-line input: one message and exit status 2, under ``videofeat`` and under a real
``torchrun launcher/*.py`` launch of two ranks."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import REPO_ROOT, run_cli
from test_reduce import basic_videos, make_run


def _torchrun(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("VIDEOFEAT_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           script, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)


def _rank_output(result: subprocess.CompletedProcess) -> str:
    """What the ranks printed: everything before torchrun's own failure report (torchrun always
    ends a failed launch with its ChildFailedError traceback and exit status 1)."""
    out = result.stdout + result.stderr
    cut = [i for i in (out.find("torch/distributed/elastic"), out.find("Traceback (most recent call last)"))
           if i >= 0]
    return out[:min(cut)] if cut else out


def _assert_one_message_exit_2(result: subprocess.CompletedProcess, needle: str) -> None:
    ranks = _rank_output(result)
    assert ranks.count(needle) == 1, ranks  # rank 0 says it once; rank 1 stays quiet
    assert "Traceback" not in ranks, ranks
    summary = result.stdout + result.stderr
    # torchrun's summary lists each worker's exit code: the first to fail exited 2; the other one
    # did too, unless torchrun's SIGTERM reached it first.
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", summary)
    assert codes and codes[-1] == "2" and set(codes) <= {"2", "-15"}, summary[-3000:]
    assert result.returncode != 0


def test_torchrun_extract_bad_value_is_one_message_exit_2(tmp_path):
    result = _torchrun("launcher/extract.py", str(tmp_path / "manifest.parquet"), "-o", str(tmp_path / "run"))
    _assert_one_message_exit_2(result, "--model auto reads the architecture from a checkpoint")
    assert not (tmp_path / "run").exists()


def test_torchrun_finetune_bad_config_file_is_one_message_exit_2(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('recipe = "cpu-test"\nbatchsize = 4\n')
    result = _torchrun("launcher/finetune.py", "--config", str(config), "--output", str(tmp_path / "out"))
    _assert_one_message_exit_2(result, f"{config}: unknown option(s) batchsize")
    assert not (tmp_path / "out").exists()


def test_status_export_finetune_on_bad_paths_exit_2(tmp_path):
    not_a_run = tmp_path / "not-a-run"
    not_a_run.mkdir()
    status = run_cli("status", str(not_a_run), check=False)
    assert status.returncode == 2 and "has no run.json" in status.stderr and "videofeat extract" in status.stderr
    assert "Traceback" not in status.stderr
    export = run_cli("export", str(tmp_path / "nowhere"), "-o", str(tmp_path / "out"), check=False)
    assert export.returncode == 2 and "run.json does not exist" in export.stderr, export.stderr
    assert "Traceback" not in export.stderr and not (tmp_path / "out").exists()
    run = make_run(tmp_path / "real", basic_videos())
    elsewhere = run_cli("export", run.url, "-o", str(tmp_path / "out"), "--dataset", str(tmp_path / "none"),
                        check=False)
    assert elsewhere.returncode == 2 and "--dataset" in elsewhere.stderr and "is not a folder" in elsewhere.stderr
    not_reduced = run_cli("export", run.url, "-o", str(tmp_path / "out"), check=False)
    assert not_reduced.returncode == 1 and "videofeat reduce" in not_reduced.stderr  # a state, not bad input
    missing = run_cli("finetune", "--recipe", "cpu-test", "--output", str(tmp_path / "ft"), "--labels",
                      str(tmp_path / "labels.parquet"), "--manifest", str(tmp_path / "m.parquet"), check=False)
    assert missing.returncode == 2 and "labels.parquet" in missing.stderr, missing.stderr
    assert "Traceback" not in missing.stderr
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("output = [unclosed\n")
    parsed = run_cli("status", "--config", str(bad_toml), str(not_a_run), check=False)
    assert parsed.returncode == 2 and f"{bad_toml} is not valid TOML" in parsed.stderr, parsed.stderr
