"""Logging, initialised once per entry point: stdlib ``logging``, the rank in every line.

INFO (or DEBUG with ``verbose``) on local rank 0; the other ranks of a node show warnings and
errors only, so eight ranks do not print eight copies of the same progress. Shard logs
(``RUN_DIR/logs/``) reuse the console's format: see ``workers/extract/loop.py``.
"""

from __future__ import annotations

import logging
import os
import sys


def _rank_env() -> tuple[str, int]:
    """(global rank, local rank) from torchrun's variables, or SLURM's as a fallback."""
    env = os.environ
    rank = env.get("RANK", env.get("SLURM_PROCID", "0"))
    local_rank = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", "0")))
    return rank, local_rank


def init_logger(verbose: bool = False, level: str = "") -> None:
    """Replace the root logger's handlers with one stderr handler in the project's format.

    ``level`` (a name, e.g. ``"warning"``) overrides ``verbose``; ranks other than local rank 0
    never go below WARNING.
    """
    rank, local_rank = _rank_env()
    wanted = logging.getLevelName(level.upper()) if level else (logging.DEBUG if verbose else logging.INFO)
    if not isinstance(wanted, int):
        raise ValueError(f"--log-level must be one of debug, info, warning, error; got {level!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(wanted if local_rank == 0 else max(wanted, logging.WARNING))
    handler.setFormatter(logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s",
                                           "%H:%M:%S"))
    root = logging.getLogger()
    root.setLevel(wanted)
    root.handlers = [handler]
