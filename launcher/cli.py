"""The ``videofeat`` command: one subcommand per stage, each in its own module.

Subcommand modules are imported only when chosen, so light commands (``manifest``, ``status``,
``reduce``, ``export``, ``--help``) never pay for importing torch or timm. Each module defines
``add_arguments(parser)`` and ``run(args) -> int``.

Any flag may also come from a TOML file given with ``--config``: its keys are flag names
(``batch_size`` or ``batch-size``); flags on the command line win.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import sys
from typing import Optional, Sequence

from videofeat.launcher.args import apply_config_defaults, find_config

# name -> (module, one-line help, example)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "manifest": ("videofeat.launcher.manifest_cmd", "discover and probe videos, write a sharded manifest",
                 "videofeat manifest /data/A1 -o manifest.parquet --views rear,dashboard"),
    "labels": ("videofeat.launcher.labels_cmd", "parse AI City annotation CSVs into a labels table",
               "videofeat labels /data/A1 --manifest manifest.parquet -o labels.parquet --val-users 24026"),
    "extract": ("videofeat.launcher.extract", "extract per-window features into a run directory",
                "videofeat extract manifest.parquet -o runs/vitl --preset aicity-vitl --model auto "
                "--checkpoint rear=rear.pt --checkpoint dashboard=dash.pt"),
    "status": ("videofeat.launcher.status_cmd", "show done, failed and missing shards of a run",
               "videofeat status runs/vitl"),
    "inspect": ("videofeat.launcher.inspect_cmd", "print a checkpoint's layout, architecture and classes",
                "videofeat inspect k400_vith_rearview.pt"),
    "reduce": ("videofeat.launcher.reduce", "merge completed shards into the final dataset",
               "videofeat reduce runs/vitl"),
    "export": ("videofeat.launcher.export_cmd", "write per-video files for temporal action localizers",
               "videofeat export runs/vitl --format actionformer -o feats/vitl --labels labels.parquet"),
    "plot": ("videofeat.launcher.plot_cmd", "draw one video's class probabilities over time above its labels (PNG)",
             "videofeat plot runs/vitl --video Rear_view_user_id_24026_NoAudio_1 --labels labels.parquet "
             "-o timeline.png"),
    "finetune": ("videofeat.launcher.finetune", "fine-tune a VideoMAE-family ViT (also under torchrun)",
                 "videofeat finetune --config finetune.toml"),
    "slurm": ("videofeat.launcher.slurm.command", "submit extraction arrays, reruns and fine-tuning to SLURM",
              "videofeat slurm extract manifest.parquet -o runs/vitl --preset aicity-vitl --time 04:00:00"),
    "pipeline": ("videofeat.launcher.pipeline_cmd", "run a whole job file: manifest to exports, resumable",
                 "videofeat pipeline job.toml -o work/   (videofeat pipeline --example > job.toml)"),
    "demo": ("videofeat.launcher.demo", "run the whole pipeline on a small generated dataset",
             "videofeat demo -o videofeat-demo"),
}


def _user_errors() -> tuple[type[BaseException], ...]:
    from videofeat.manifests.ledger import FingerprintMismatch

    return (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
            ValueError, FingerprintMismatch)


def _describe(exc: BaseException) -> str:
    """The message of a user error; a bare ``FileNotFoundError(path)`` becomes a sentence."""
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    if isinstance(exc, FileNotFoundError) and len(exc.args) == 1 and "/" in str(exc) and " " not in str(exc):
        return f"{exc}: no such file or directory"
    return str(exc)


def reporting_rank() -> bool:
    """Under torchrun (or srun) every rank parses the same flags and meets the same bad input:
    rank 0 alone says so, so the user reads one message."""
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) in ("", "0")


def _available_commands() -> dict[str, tuple[str, str, str]]:
    """Commands whose module is present in this install."""
    import importlib.util

    return {name: row for name, row in COMMANDS.items() if importlib.util.find_spec(row[0]) is not None}


def build_command_parser(name: str, prog: str = "videofeat") -> tuple[argparse.ArgumentParser, object]:
    module_name, help_text, example = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(
        prog=f"{prog} {name}",
        description=(module.__doc__ or help_text).strip().splitlines()[0],
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE.toml", help="read default values of any flag from a TOML file")
    module.add_arguments(parser)
    return parser, module


def parse_command(name: str, argv: Sequence[str], prog: str = "videofeat"):
    parser, module = build_command_parser(name, prog)
    config_path = find_config(argv)
    apply_config_defaults(parser, config_path)
    if getattr(module, "PASSES_WORKER_ARGS", False):
        # A submitting command (videofeat slurm) defines its own flags; what is left over is the
        # worker's command line, which the worker's own parser checks (launcher/slurm/command.py).
        args, rest = parser.parse_known_args(list(argv))
        args.worker_args = rest
        return args, module
    return parser.parse_args(list(argv)), module


def _top_level_help(commands: dict[str, tuple[str, str, str]]) -> str:
    width = max(len(name) for name in commands)
    lines = ["usage: videofeat COMMAND [options]   (videofeat COMMAND --help for each)", "", "commands:"]
    lines += [f"  {name:<{width}}  {row[1]}" for name, row in commands.items()]
    lines += ["", "example:", "  videofeat demo            # the whole pipeline on a small generated dataset"]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _available_commands()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_top_level_help(COMMANDS))
        return 0
    if argv[0] in ("-V", "--version"):
        from videofeat import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in commands:
        print(f"videofeat: unknown command {name!r}\n\n{_top_level_help(COMMANDS)}", file=sys.stderr)
        return 2
    return parse_and_run(name, rest)


def parse_and_run(name: str, argv: Sequence[str], prog: str = "videofeat") -> int:
    """Parse ``argv`` and run the command: ``videofeat`` and the torchrun entry points.

    A bad flag or ``--config`` file is one message and exit status 2 like any other bad input;
    under torchrun every rank parses the same argv, and rank 0 alone says what is wrong.
    """
    reporting = reporting_rank()
    try:
        with contextlib.ExitStack() as stack:
            if not reporting:  # argparse prints its usage error itself
                stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
                stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
            args, module = parse_command(name, argv, prog)
    except SystemExit as exc:
        if isinstance(exc.code, str):  # a check that exits with its message
            return _report(prog, name, exc.code, reporting)
        return 0 if exc.code is None else int(exc.code)  # argparse: --help 0, bad flag 2
    except _user_errors() as exc:
        if os.environ.get("VIDEOFEAT_DEBUG"):
            raise
        return _report(prog, name, _describe(exc), reporting)
    return run_command(name, module, args, prog)


def run_command(name: str, module: object, args: argparse.Namespace, prog: str = "videofeat") -> int:
    """Run one command: the one place where bad input becomes a message and exit status 2.

    Used by ``videofeat`` and by the torchrun entry points (``launcher/extract.py``,
    ``launcher/finetune.py``), so a user error reads the same under every launcher.
    """
    try:
        return int(module.run(args) or 0)  # type: ignore[attr-defined]
    except _user_errors() as exc:
        # Bad input (a missing file, a wrong flag value, a run directory of another fingerprint):
        # the message names the file and the fix; a traceback would only bury it.
        if os.environ.get("VIDEOFEAT_DEBUG"):
            raise
        return _report(prog, name, _describe(exc), reporting_rank())


def _report(prog: str, name: str, message: str, reporting: bool) -> int:
    if reporting:
        print(f"{prog} {name}: error: {message}\n(set VIDEOFEAT_DEBUG=1 to see the traceback)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
