"""Parse AI City annotation CSVs into a labels table matched to a manifest."""

from __future__ import annotations

import argparse
import sys

from videofeat.manifests.labels import assign_split, match_to_manifest, parse_annotation_dir, write_labels
from videofeat.manifests.manifest import read_manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("annotation_dir", help="folder with the per-user annotation CSVs (searched recursively)")
    parser.add_argument("--manifest", required=True, help="manifest built by `videofeat manifest`")
    parser.add_argument("-o", "--output", required=True, help="labels table to write (.parquet)")
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--val-users", help="comma-separated user ids whose videos form the validation split")
    split.add_argument("--val-fraction", type=float, help="fraction of users (whole users) for validation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --val-fraction draw")
    parser.add_argument("--strict", action="store_true", help="exit non-zero if any row was not usable")


def run(args: argparse.Namespace) -> int:
    manifest_rows = read_manifest(args.manifest).select(["video_id", "session_id", "view", "user_id"]).to_pylist()
    parsed = match_to_manifest(parse_annotation_dir(args.annotation_dir), manifest_rows)
    val_users = [u.strip() for u in args.val_users.split(",") if u.strip()] if args.val_users else None
    rows = assign_split(parsed.rows, val_users, args.val_fraction, args.seed)
    write_labels(rows, args.output)
    for problem in parsed.problems:
        print(f"  skipped: {problem}", file=sys.stderr)
    splits = {}
    for row in rows:
        splits.setdefault(row["split"], set()).add(row["user_id"])
    print(f"wrote {args.output}: {len(rows)} segments of {len({r['video_id'] for r in rows})} videos; "
          + ", ".join(f"{s}: {len(u)} users" for s, u in sorted(splits.items()))
          + (f"; {len(parsed.problems)} row(s) skipped (listed above)" if parsed.problems else ""))
    return 1 if args.strict and parsed.problems else 0
