"""Merge the completed shards of a run into one Parquet file per view, after checking completeness.

Runs as ``videofeat reduce RUN_DIR``, as ``python launcher/reduce.py RUN_DIR`` and as the SLURM
job that follows an extraction array. Exit status: 0 when the dataset was written (videos with a
permanent status are listed, not errors), 1 when the run is incomplete (the message names the
missing, failed or interrupted shards and videos and the command that reruns them), 2 on bad
input. On the root of a multi-set launch it reduces every set into ``OUT/<name>/dataset`` (exit
status: the worst of the sets'). Imports neither torch nor timm.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence
from videofeat.launcher.logs import init_logger

log = logging.getLogger("videofeat.reduce")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory (local path or fsspec URL)")
    parser.add_argument("-o", "--output", default=None,
                        help="dataset folder (default RUN_DIR/dataset); summary.json is written beside the files")
    parser.add_argument("--manifest", default=None,
                        help="manifest to check against (default: the one named in run.json)")
    parser.add_argument("--allow-partial", action="store_true",
                        help="write what exists and record what is missing instead of failing")
    parser.add_argument("--marker-wait", type=float, default=60.0, metavar="SECONDS",
                        help="on shared filesystems, how long to re-check the marker of a shard that started "
                             "but shows none (bounded backoff, at most 60; default 60)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    import json

    from videofeat.workers.reduce.merge import IncompleteRun, ReduceConfig, format_summary, reduce_run

    from videofeat.manifests.ledger import RunDir
    from videofeat.manifests.set_root import set_dirs

    init_logger()
    root = RunDir(args.run_dir)
    members = set_dirs(root) if root.load_run() is None else []
    if members:
        if args.output or args.manifest:
            raise ValueError(f"{args.run_dir} holds several feature sets: reduce one set (videofeat reduce "
                             f"{members[0]}) to give -o or --manifest")
        codes = []
        for url in members:
            print(f"== set {url.rstrip('/').rsplit('/', 1)[-1]} ==")
            codes.append(run(argparse.Namespace(**{**vars(args), "run_dir": url})))
        return max(codes)
    try:
        config = ReduceConfig(run_dir=args.run_dir, output=args.output, manifest=args.manifest,
                              allow_partial=args.allow_partial, marker_wait_s=args.marker_wait)
        summary = reduce_run(config)
    except IncompleteRun as error:
        print(f"videofeat reduce: {error}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python launcher/reduce.py RUN_DIR``: the same command as ``videofeat reduce``."""
    from videofeat.launcher.cli import main as videofeat_main

    return videofeat_main(["reduce", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
