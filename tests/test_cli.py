"""The command line: help everywhere, TOML configs, and light commands that never import torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import make_aicity_tree, run_cli

from videofeat.launcher.cli import COMMANDS, main
from videofeat.manifests.manifest import read_manifest

LIGHT = ("manifest", "labels", "status", "reduce", "export")


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out
    assert main(["no-such-command"]) == 2


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help_with_an_example(name):
    result = run_cli(name, "--help")
    assert "example:" in result.stdout and f"videofeat {name}" in result.stdout


def test_light_commands_import_neither_torch_nor_timm():
    code = (
        "import sys\n"
        "from videofeat.launcher.cli import build_command_parser\n"
        f"for name in {LIGHT!r}:\n"
        "    build_command_parser(name)\n"
        "heavy = [m for m in ('torch', 'timm') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_manifest_run_imports_no_torch_and_reads_a_toml_config(tmp_path):
    make_aicity_tree(tmp_path / "videos", users=(1,), sessions=(1,), frames=(40,))
    config = tmp_path / "manifest.toml"
    config.write_text(f'root = "{tmp_path / "videos"}"\noutput = "{tmp_path / "m.parquet"}"\n'
                      'num-shards = 3\nviews = "rear,Dash"\n')
    code = (
        "import sys\n"
        "from videofeat.launcher.cli import main\n"
        f"assert main(['manifest', '--config', {str(config)!r}]) == 0\n"
        "assert 'torch' not in sys.modules and 'timm' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    rows = read_manifest(str(tmp_path / "m.parquet")).to_pylist()
    assert {r["view"] for r in rows} == {"rear", "dashboard"} and len({r["shard_id"] for r in rows}) == 2
    # A flag on the command line wins over the file; an unknown key names the file.
    run_cli("manifest", "--config", str(config), "--num-shards", "1")
    bad = tmp_path / "bad.toml"
    bad.write_text('root = "x"\nbatchsize = 3\n')
    result = run_cli("manifest", "--config", str(bad), "-o", "x.parquet", check=False)
    assert result.returncode != 0 and "bad.toml" in result.stderr and "batchsize" in result.stderr
