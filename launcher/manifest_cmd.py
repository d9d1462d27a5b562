"""Discover and probe videos, then write an immutable manifest cut into frozen shards."""

from __future__ import annotations

import argparse
import sys
import time

from videofeat.manifests.discover import LAYOUTS, discover
from videofeat.manifests.manifest import (DEFAULT_MIN_FRAMES, ManifestConfig, build_rows, read_crops,
                                          read_manifest, summarize, write_manifest)
from videofeat.manifests.shards import DEFAULT_SHARD_FRAMES, ShardingConfig
from videofeat.manifests.views import parse_views


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", nargs="?",
                        help="folder or fsspec URL holding the videos (for --layout list: a CSV/Parquet list)")
    parser.add_argument("--merge", nargs="+", metavar="MANIFEST",
                        help="instead of probing ROOT: one manifest of these manifests' videos (a training set and "
                             "its test sets), re-cut into shards by --num-shards / --shard-frames")
    parser.add_argument("-o", "--output", required=True, help="where to write the manifest (.parquet)")
    parser.add_argument("--layout", choices=LAYOUTS, default="aicity",
                        help="aicity: <root>/user_id_<id>/<View>_user_id_<id>_NoAudio_<n>.MP4; glob: --pattern/--regex; "
                             "list: ROOT is a table with a 'uri' column")
    parser.add_argument("--pattern", default="**/*.mp4", help="glob under ROOT for --layout glob")
    parser.add_argument("--regex", help="regex on the relative path with named groups video, view, session, user")
    parser.add_argument("--views", help="comma-separated views to keep (rear,dashboard,right; Rear/Dash accepted)")
    sizing = parser.add_mutually_exclusive_group()
    sizing.add_argument("--num-shards", type=int, help="shards per view")
    sizing.add_argument("--shard-frames", type=int, default=DEFAULT_SHARD_FRAMES,
                        help=f"target frames per shard (default {DEFAULT_SHARD_FRAMES}: 30 min at 30 fps)")
    parser.add_argument("--split-long-videos", action="store_true",
                        help="cut videos above a quarter of a shard's work into pieces, stitched by the reducer")
    parser.add_argument("--min-frames", type=int, default=DEFAULT_MIN_FRAMES,
                        help="videos with fewer frames are marked too_short")
    parser.add_argument("--crops", help="CSV video_id,crop_x,crop_y,crop_w,crop_h applied at decode time")
    parser.add_argument("--strict", action="store_true", help="exit non-zero if any video is not ok")
    parser.add_argument("--skip-unlistable", action="store_true",
                        help="write the manifest even if some folders cannot be listed (they are reported "
                             "and recorded in its metadata); by default that is an error")
    parser.add_argument("--probe-procs", type=int, default=2, help="processes probing in parallel")
    parser.add_argument("--probe-timeout-s", type=float, default=120.0, help="per-video probe timeout")


def _probe(uris: list[str], args: argparse.Namespace) -> dict:
    if any(u.startswith("memory://") for u in uris):
        # An in-memory filesystem lives in this process only: probe here.
        from videofeat.manifests.probe import probe_video

        return {u: probe_video(u) for u in uris}
    from tqdm import tqdm

    from videofeat.manifests.probe_pool import probe_all

    with tqdm(total=len(uris), desc="probing", unit="video", disable=None) as bar:
        return probe_all(uris, args.probe_procs, args.probe_timeout_s, on_result=lambda *_: bar.update())


def print_summary(summary: dict, skipped: list, out=sys.stdout, unlisted: list = ()) -> None:
    print(f"{summary['videos']} videos, {summary['hours']:.2f} h of video, {summary['vfr']} with variable "
          f"frame rate, {summary['shards']} shards (max {summary['max_shard_frames']} frames, "
          f"mean {summary['mean_shard_frames']:.0f})", file=out)
    for view, counts in sorted(summary["by_view"].items()):
        print(f"  {view:<10} " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())), file=out)
    print("  estimated windows: " + ", ".join(f"{name} {n}" for name, n in summary["windows_per_preset"].items()),
          file=out)
    for video_id, status, error in summary["not_ok"]:
        print(f"  {status:<12} {video_id}: {error}", file=out)
    for uri, why in skipped:
        print(f"  skipped      {uri}: {why}", file=out)
    for folder, why in unlisted:
        print(f"  unlisted     {folder}: {why} (its videos are not in the manifest)", file=out)


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    if (args.root is None) == (args.merge is None):
        raise ValueError("give ROOT (videos to probe) or --merge MANIFEST... (manifests to join), not both or neither")
    if args.merge:
        from videofeat.manifests.merge import merge_manifests

        sharding = ShardingConfig(args.num_shards, args.shard_frames, args.split_long_videos)
        fingerprint = merge_manifests(args.merge, args.output, sharding)
        rows = read_manifest(args.output).to_pylist()
        print_summary(summarize(rows), [])
        print(f"wrote {args.output} from {len(args.merge)} manifests (fingerprint {fingerprint}) "
              f"in {time.monotonic() - started:.1f} s")
        return 0
    views = parse_views(args.views)
    found = discover(args.root, args.layout, args.pattern, args.regex, views, args.skip_unlistable)
    for folder, why in found.unlisted:
        print(f"warning: cannot list {folder} ({why}): its videos are not in the manifest", file=sys.stderr)
    if not found.videos:
        print(f"no videos found under {args.root} with --layout {args.layout}"
              + (f" and --views {args.views}" if views else ""), file=sys.stderr)
        return 1
    probes = _probe([v.uri for v in found.videos], args)
    config = ManifestConfig(ShardingConfig(args.num_shards, args.shard_frames, args.split_long_videos),
                            args.min_frames)
    rows = build_rows(found.videos, probes, config, read_crops(args.crops) if args.crops else None)
    meta = {"root": args.root, "layout": args.layout, "views": list(views or []), "min_frames": args.min_frames,
            "num_shards": args.num_shards, "shard_frames": args.shard_frames,
            "split_long_videos": args.split_long_videos, "crops": args.crops,
            "unlisted_folders": [list(entry) for entry in found.unlisted]}
    from videofeat import __version__

    fingerprint = write_manifest(rows, args.output, {**meta, "videofeat_version": __version__})
    summary = summarize(rows)
    print_summary(summary, found.skipped, unlisted=found.unlisted)
    print(f"wrote {args.output} (fingerprint {fingerprint}) in {time.monotonic() - started:.1f} s")
    if args.strict and (summary["not_ok"] or found.skipped or found.unlisted):
        print(f"--strict: {len(summary['not_ok'])} video(s) not ok, {len(found.skipped)} skipped", file=sys.stderr)
        return 1
    return 0
