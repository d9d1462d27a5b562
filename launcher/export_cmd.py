"""Write per-video feature files, annotations and config values for temporal action localizers.

``videofeat export RUN_DIR --format actionformer -o DIR`` reads the reduced dataset (never the
shards) and refuses, naming ``videofeat reduce``, when it is missing or older than the newest
shard. Imports neither torch nor timm.
"""

from __future__ import annotations

import argparse
import json
import sys
from videofeat.launcher.logs import init_logger


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory (local path or fsspec URL)")
    parser.add_argument("-o", "--output", required=True, help="folder for the exported files")
    parser.add_argument("--format", default="actionformer", choices=("actionformer", "npy", "multiview"),
                        help="actionformer: <video_id>.npz with feats and probabilities (MA-Actionformer, TriDet); "
                             "npy: <video_id>.npy [T, D]; multiview: the views of each session side by side")
    parser.add_argument("--prob-key", choices=("a_prob", "pred"), default=None,
                        help="write the probabilities under this key only (default: both a_prob and pred)")
    parser.add_argument("--split-views", action="store_true",
                        help="one subfolder per view instead of one flat folder")
    parser.add_argument("--labels", default=None, metavar="LABELS.parquet",
                        help="labels table from `videofeat labels`: also write annotations.json")
    parser.add_argument("--unlabeled-subset", default="validation",
                        help="subset of extracted videos without labels in annotations.json (default validation)")
    parser.add_argument("--dataset", default=None, help="reduced dataset folder, if `reduce -o` put it elsewhere")
    parser.add_argument("--views", default=None, help="comma-separated views to export (default: all)")


def _check_paths(args: argparse.Namespace) -> None:
    """A path that is not a run directory (or a --dataset that is not there) is bad input, exit 2;
    a run that has not been reduced yet is exit 1 (DatasetNotReady)."""
    from videofeat.manifests import fsutil
    from videofeat.manifests.ledger import RunDir

    run_dir = RunDir(args.run_dir)
    if run_dir.load_run() is None:
        raise FileNotFoundError(f"{run_dir.run_json} does not exist: is {args.run_dir} a videofeat run directory? "
                                "(`videofeat extract MANIFEST -o RUN_DIR` creates one)")
    if args.dataset:
        fs, root = fsutil.filesystem(args.dataset)
        if not fs.isdir(root):
            raise FileNotFoundError(f"--dataset {args.dataset} is not a folder: give the folder "
                                    f"`videofeat reduce {args.run_dir} -o DIR` wrote")


def run(args: argparse.Namespace) -> int:
    from videofeat.workers.reduce.dataset import DatasetNotReady
    from videofeat.workers.reduce.export import ExportConfig, export_run

    init_logger()
    _check_paths(args)
    try:
        config = ExportConfig(run_dir=args.run_dir, output=args.output, format=args.format, prob_key=args.prob_key,
                              split_views=args.split_views, labels=args.labels,
                              unlabeled_subset=args.unlabeled_subset, dataset=args.dataset,
                              views=tuple(v for v in args.views.split(",") if v.strip()) if args.views else None)
        report = export_run(config)
    except DatasetNotReady as error:
        print(f"videofeat export: {error}", file=sys.stderr)
        return 1
    print(describe(report))
    return 0


def describe(report: dict) -> str:
    if report["format"] == "multiview":
        lines = [f"multi-view table: {report['table']}", f"  {report['sessions']} sessions, {report['rows']} rows, "
                 f"views {', '.join(report['views'])}"]
        for row in report["sessions_view_mismatch"][:10]:
            lines.append(f"  views differ by more than one hop: {row['session_id']} {json.dumps(row['windows'])}")
        return "\n".join(lines)
    per_view = ", ".join(f"{view} {count}" for view, count in report["views"].items())
    lines = [f"{report['files']} {report['format']} files in {report['output']} ({per_view}); "
             f"keys {', '.join(report['keys'])}, feature dim {report['feature_dim']}",
             f"config values: {report['config']}  {json.dumps(report['config_values'])}"]
    if "annotations" in report:
        lines.append(f"annotations: {report['annotations']} ({report['labelled_videos']} labelled, "
                     f"{report['unlabelled_videos']} without labels)")
        if report["labelled_not_extracted"]:
            lines.append(f"  {len(report['labelled_not_extracted'])} labelled video(s) have no features, e.g. "
                         f"{report['labelled_not_extracted'][0]}")
    return "\n".join(lines)
