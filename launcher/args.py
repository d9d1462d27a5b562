"""Command-line arguments: ``--config FILE.toml`` supplies the default of any flag.

The command line wins over the file; a key the command does not know is an error naming the
file and the valid keys.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence


def load_toml(path: str) -> dict:
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:  # pragma: no cover - older Pythons
        import tomli as tomllib
    with open(path, "rb") as handle:
        try:
            data = tomllib.load(handle)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path} is not valid TOML: {exc}") from None
    return {key.replace("-", "_"): value for key, value in data.items()}


def apply_config_defaults(parser: argparse.ArgumentParser, config_path: Optional[str]) -> None:
    """Let a TOML file supply any flag of ``parser``; unknown keys are an error naming the file."""
    if not config_path:
        return
    values = load_toml(config_path)
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SystemExit(f"{config_path}: unknown option(s) {', '.join(unknown)}; "
                         f"valid keys are the command's flags ({', '.join(sorted(known - {'help'}))})")
    parser.set_defaults(**values)
    # A required positional or option supplied by the file is no longer required.
    for action in parser._actions:
        if action.dest in values:
            action.required = False
            if action.nargs is None and not action.option_strings:
                action.nargs = "?"


def find_config(argv: Sequence[str]) -> Optional[str]:
    """The value of ``--config`` in ``argv``, read before parsing (it supplies the defaults)."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None
