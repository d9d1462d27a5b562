"""Draw one video's per-window class probabilities over time above its labelled segments (PNG).

``videofeat plot RUN_DIR --video ID [--labels labels.parquet] [--view V] -o timeline.png`` reads
the reduced dataset (``videofeat reduce RUN_DIR`` first). Needs matplotlib, the ``plot`` extra
(``pip install 'videofeat[plot]'``); it is imported only when this command runs. Exit status 2
on bad input: no dataset, an unknown video, a missing labels table, no matplotlib.
"""

from __future__ import annotations

import argparse
import sys

from videofeat.launcher.logs import init_logger


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory with a reduced dataset")
    parser.add_argument("--video", required=True, metavar="ID", help="video id, e.g. Rear_view_user_id_24026_NoAudio_1")
    parser.add_argument("-o", "--output", required=True, metavar="TIMELINE.png", help="PNG file to write")
    parser.add_argument("--labels", default=None, metavar="LABELS.parquet",
                        help="labels table from `videofeat labels`: draws the segments and names the classes")
    parser.add_argument("--view", default=None, help="view holding the video (default: the one whose file has it)")
    parser.add_argument("--dataset", default=None, help="reduced dataset folder, if `reduce -o` put it elsewhere")
    parser.add_argument("--size", default="1200x500", metavar="WxH", help="image size in pixels (default 1200x500)")
    parser.add_argument("--style", default="auto", choices=("auto", "lines", "heat"),
                        help="lines: a curve per class; heat: a strip per class, colour depth = probability; "
                             "auto: lines up to 8 classes, heat beyond (default)")
    parser.add_argument("--dpi", type=int, default=100, help="dots per inch: text size relative to the image")


def run(args: argparse.Namespace) -> int:
    from videofeat.workers.reduce.dataset import DatasetNotReady
    from videofeat.workers.reduce.plot import PlotUnavailable, TimelineConfig, parse_size, plot_timeline

    init_logger()
    width, height = parse_size(args.size)
    config = TimelineConfig(run_dir=args.run_dir, video_id=args.video, output=args.output, labels=args.labels,
                            view=args.view, dataset=args.dataset, width_px=width, height_px=height, dpi=args.dpi,
                            style=args.style)
    try:
        report = plot_timeline(config)
    except (DatasetNotReady, PlotUnavailable) as error:
        print(f"videofeat plot: error: {error}", file=sys.stderr)
        return 2
    print(describe(report))
    return 0


def describe(report: dict) -> str:
    what = ("class probabilities of" if report["kind"] == "probs"
            else "feature L2 norms (the model has no classification head, so no probabilities) of")
    segments = (f"{report['segments']} labelled segment(s)" if report["labels_given"]
                else "no labels (--labels draws the segments)")
    return (f"{report['output']}: {what} {report['windows']} windows of {report['video_id']} [{report['view']}], "
            f"{segments}; {report['size'][0]}x{report['size'][1]} px, {report['style']}")
