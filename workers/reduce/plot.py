"""One video's timeline: per-window class probabilities over time above its labelled segments.

The check researchers make by eye before training a localizer: do the probabilities rise where
the annotations say an action happens? Reads the reduced dataset one video (one row group) at a
time. x is seconds at each window's ``center_s``; a class has the same colour as a curve and as
a span. A run whose model had no head has no probabilities: the top panel then shows the
feature L2 norm per window and says so.

matplotlib is an optional extra (``pip install 'videofeat[plot]'``), imported only here, inside
:func:`render_timeline`, on an Agg canvas of its own (no display, no pyplot state).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from videofeat.manifests import fsutil
from videofeat.manifests.ledger import RunDir
from videofeat.manifests.views import canonical_view
from videofeat.workers.reduce.dataset import Dataset
from videofeat.workers.reduce.export import fixed_list_to_numpy

PROBS, FEATURE_NORM = "probs", "feature_norm"
LINES, HEAT = "lines", "heat"
STYLES = ("auto", LINES, HEAT)
MAX_LINES = 8          # beyond this many classes the lines tangle: auto draws a heat strip
KNOWN_IDS_SHOWN = 5
LABEL_COLUMNS = ("video_id", "label_id", "start_s", "end_s")


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


@dataclass(frozen=True)
class TimelineConfig:
    """Options of ``videofeat plot``."""

    run_dir: str
    video_id: str
    output: str
    labels: Optional[str] = None
    view: Optional[str] = None
    dataset: Optional[str] = None      # default RUN_DIR/dataset
    width_px: int = 1200
    height_px: int = 500
    dpi: int = 100
    style: str = "auto"                # lines, heat, or auto (lines for up to MAX_LINES classes)

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"--style must be one of {', '.join(STYLES)}, got {self.style!r}")
        if not self.video_id.strip():
            raise ValueError("--video must name a video id (see `videofeat status RUN_DIR` or the dataset)")
        if not self.output.lower().endswith(".png"):
            raise ValueError(f"-o {self.output}: the timeline is written as PNG; give a path ending in .png")
        if not (200 <= self.width_px <= 8000 and 150 <= self.height_px <= 8000):
            raise ValueError(f"--size {self.width_px}x{self.height_px}: width and height must be 200..8000 "
                             "and 150..8000 pixels")
        if not 30 <= self.dpi <= 600:
            raise ValueError(f"--dpi must be between 30 and 600, got {self.dpi}")


def parse_size(text: str) -> tuple[int, int]:
    """``"1200x500"`` -> (1200, 500)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f"--size {text!r} is not WIDTHxHEIGHT in pixels, e.g. 1200x500")
    return int(match.group(1)), int(match.group(2))


@dataclass(frozen=True)
class VideoTimeline:
    """What one picture shows, read from the dataset and the labels table."""

    video_id: str
    view: str
    center_s: np.ndarray               # [T]
    end_s: float                       # end of the last window
    values: np.ndarray                 # [T, C] probabilities, or [T, 1] feature norms
    kind: str                          # PROBS or FEATURE_NORM
    class_names: dict[int, str]        # class id -> name (from the labels table, else "class N")
    segments: tuple[tuple[int, float, float], ...]   # (class id, start s, end s)
    labels_given: bool


def find_view(dataset: Dataset, video_id: str, view: Optional[str]) -> str:
    """The view holding ``video_id``; an unknown id is an error listing a few known ones."""
    views = [canonical_view(view)] if view else dataset.views
    if view and views[0] not in dataset.files:
        raise ValueError(f"--view {view}: not in the dataset at {dataset.root} (it has {', '.join(dataset.views)})")
    holding = [v for v in views if video_id in dataset.metadata(v)["row_groups"]]
    if len(holding) > 1:
        raise ValueError(f"video {video_id} is in views {', '.join(holding)}: choose one with --view")
    if holding:
        return holding[0]
    known = sorted(vid for v in views for vid in dataset.metadata(v)["row_groups"])
    where = f"view {views[0]}" if view else f"the dataset at {dataset.root}"
    shown = ", ".join(known[:KNOWN_IDS_SHOWN]) + (f", ... ({len(known)} in all)" if len(known) > KNOWN_IDS_SHOWN
                                                  else "")
    raise ValueError(f"--video {video_id}: not in {where}; known ids: {shown or 'none'}")


def read_segments(path: str, video_id: str) -> tuple[tuple[tuple[int, float, float], ...], dict[int, str]]:
    """This video's segments and every class name the labels table knows."""
    fs, inner = fsutil.filesystem(path)
    if not fs.exists(inner):
        raise FileNotFoundError(f"--labels {path} does not exist: write it with `videofeat labels ANNOTATIONS "
                                "--manifest manifest.parquet -o labels.parquet`")
    with fs.open(inner, "rb") as handle:
        table = pq.read_table(handle)
    missing = [c for c in LABEL_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"--labels {path} lacks column(s) {', '.join(missing)}: not a labels table from "
                         "`videofeat labels`")
    names: dict[int, str] = {}
    if "label" in table.column_names:
        for label_id, label in zip(table.column("label_id").to_pylist(), table.column("label").to_pylist()):
            if label_id is not None and label:
                names.setdefault(int(label_id), str(label))
    mine = table.filter(pc.equal(table.column("video_id"), video_id))
    segments = tuple(sorted(((int(r["label_id"]), float(r["start_s"]), float(r["end_s"]))
                             for r in mine.select(["label_id", "start_s", "end_s"]).to_pylist()),
                            key=lambda seg: (seg[1], seg[2], seg[0])))   # in time order: later spans on top
    return segments, names


def labelled_video(run_dir: str, labels: str, view: str, split: str = "validation",
                   dataset: Optional[str] = None) -> Optional[str]:
    """The first video (by id) of ``view`` in the dataset with segments of ``split``: the one a
    pipeline draws for each (set, view). None when the dataset has none."""
    extracted = set(Dataset(run_dir, dataset).metadata(canonical_view(view))["row_groups"])
    table = fsutil.read_parquet(labels, columns=["video_id", "split"])
    wanted = {vid for vid, part in zip(table.column("video_id").to_pylist(), table.column("split").to_pylist())
              if part == split}
    return min(extracted & wanted, default=None)


def load_timeline(config: TimelineConfig) -> VideoTimeline:
    # Not a run at all is another mistake than a run not reduced yet: name it (and the fix) first.
    RunDir(config.run_dir).load_record()
    dataset = Dataset(config.run_dir, config.dataset)
    view = find_view(dataset, config.video_id, config.view)
    groups = dataset.metadata(view)["row_groups"][config.video_id]
    with dataset.fs.open(dataset.files[view], "rb") as handle:
        rows = pq.ParquetFile(handle).read_row_groups(groups)
    if "probs" in rows.column_names:
        values, kind = fixed_list_to_numpy(rows.column("probs")), PROBS
    else:
        # No head, no probabilities: the feature norm still shows where the video changes.
        values = np.linalg.norm(fixed_list_to_numpy(rows.column("feature")), axis=1, keepdims=True)
        kind = FEATURE_NORM
    segments, names = read_segments(config.labels, config.video_id) if config.labels else ((), {})
    num_classes = values.shape[1] if kind == PROBS else 0
    class_ids = set(range(num_classes)) | {c for c, _, _ in segments}
    class_names = {c: names.get(c, f"class {c}") for c in sorted(class_ids)}
    return VideoTimeline(config.video_id, view, rows.column("center_s").to_numpy(),
                         float(rows.column("end_s").to_numpy()[-1]), values, kind, class_names, segments,
                         labels_given=bool(config.labels))


def class_colour(class_id: int, num_colours: int) -> tuple[float, float, float]:
    """One colour per class id, shared by its curve and its spans."""
    from matplotlib import colormaps

    if num_colours <= 10:
        return colormaps["tab10"](class_id % 10)[:3]
    if num_colours <= 20:
        return colormaps["tab20"](class_id % 20)[:3]
    return colormaps["hsv"](class_id / num_colours)[:3]


def _new_figure(width_px: int, height_px: int, dpi: int) -> Any:
    """A figure on its own Agg canvas: no pyplot, so no global backend or figure list is touched."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotUnavailable("matplotlib is not installed: pip install 'videofeat[plot]' "
                              "(or pip install matplotlib)") from None
    figure = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    FigureCanvasAgg(figure)
    return figure


@dataclass
class Rendered:
    """The drawn figure and its two axes (for reading pixels back in data coordinates)."""

    figure: Any
    curves: Any
    segments: Any


def render_timeline(timeline: VideoTimeline, width_px: int, height_px: int, dpi: int,
                    style: str = "auto") -> Rendered:
    fig = _new_figure(width_px, height_px, dpi)
    style = resolve_style(style, timeline)
    # Fixed margins, not a layout engine: the axes sit where the same sizes always put them.
    top, lane = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [4, 1], "hspace": 0.08})
    fig.subplots_adjust(left=0.07, right=0.80, top=0.90, bottom=0.13)
    fig.patch.set_facecolor("white")
    num_colours = max(timeline.class_names, default=-1) + 1
    if timeline.kind == FEATURE_NORM:
        top.plot(timeline.center_s, timeline.values[:, 0], color="0.2", linewidth=2.0, marker="o", markersize=3)
        top.set_ylabel("feature L2 norm")
        top.text(0.5, 0.95, "this run's model has no classification head: feature norms, not probabilities",
                 transform=top.transAxes, ha="center", va="top", fontsize=8, color="0.3")
    elif style == LINES:
        for class_id in range(timeline.values.shape[1]):
            top.plot(timeline.center_s, timeline.values[:, class_id], color=class_colour(class_id, num_colours),
                     linewidth=2.0, marker="o", markersize=3)
        top.set_ylim(0.0, 1.0)
        top.set_ylabel("class probability")
    else:
        _draw_heat(top, timeline, num_colours)
    if style == LINES or timeline.kind == FEATURE_NORM:
        top.grid(True, color="0.9", linewidth=0.8)
    top.set_title(f"{timeline.video_id}  [{timeline.view}]  {len(timeline.center_s)} windows", fontsize=10)

    _draw_segments(lane, timeline, num_colours)
    end = max([timeline.end_s] + [e for _, _, e in timeline.segments])
    lane.set_xlim(0.0, end)
    lane.set_xlabel("time (s), at each window's centre")
    drawn_as = "span" if timeline.kind == FEATURE_NORM else ("curve" if style == LINES else "strip") + " and span"
    _fit_margins(fig, top, lane, _legend(fig, timeline, num_colours, f"class ({drawn_as})"), width_px)
    return Rendered(fig, top, lane)


def _fit_margins(fig: Any, top: Any, lane: Any, legend: Any, width_px: int) -> None:
    """Room for the class names: the legend's measured width on the right, the tick labels' on the left.

    Measured once on this figure and then fixed, so the same inputs put the axes at the same pixels.
    """
    renderer = fig.canvas.get_renderer()
    gap = 12 / width_px
    right = 1.0 - legend.get_window_extent(renderer).width / width_px - 2 * gap
    overhang = -min(ax.get_tightbbox(renderer).x0 for ax in (top, lane)) / width_px
    left = fig.subplotpars.left + max(0.0, overhang + gap)
    fig.subplots_adjust(left=min(left, 0.4), right=max(right, 0.55))
    legend.set_bbox_to_anchor((max(right, 0.55) + gap, 0.90), transform=fig.transFigure)


def resolve_style(style: str, timeline: VideoTimeline) -> str:
    """``auto``: a line per class while lines stay readable, a heat strip per class beyond that."""
    if style not in STYLES:
        raise ValueError(f"--style must be one of {', '.join(STYLES)}, got {style!r}")
    if style != "auto":
        return style
    return LINES if timeline.values.shape[1] <= MAX_LINES else HEAT


def window_edges(center_s: np.ndarray, end_s: float) -> tuple[float, float]:
    """Left and right edge of the strip: each window's cell spans its centre +- half a hop."""
    step = float(np.median(np.diff(center_s))) if len(center_s) > 1 else 2 * (end_s - float(center_s[0]))
    return float(center_s[0]) - step / 2, float(center_s[-1]) + step / 2


def _draw_heat(top: Any, timeline: VideoTimeline, num_colours: int) -> None:
    """Row c is class c's colour at the window's probability: white at 0, the full colour at 1."""
    probs = np.clip(timeline.values, 0.0, 1.0).T[:, :, None]                       # [C, T, 1]
    colours = np.array([class_colour(c, num_colours) for c in range(probs.shape[0])])[:, None, :]
    image = 1.0 - probs * (1.0 - colours)                                           # [C, T, 3]
    left, right = window_edges(timeline.center_s, timeline.end_s)
    top.imshow(image, extent=(left, right, probs.shape[0] - 0.5, -0.5), aspect="auto", interpolation="nearest")
    top.set_yticks(range(probs.shape[0]), [f"{c}: {timeline.class_names[c]}" for c in range(probs.shape[0])],
                   fontsize=7)
    top.set_ylabel("class probability (colour depth)")


def _draw_segments(lane: Any, timeline: VideoTimeline, num_colours: int) -> None:
    lane.set_ylim(0.0, 1.0)
    lane.set_yticks([])
    lane.set_ylabel("labels", rotation=0, ha="right", va="center")
    if not timeline.segments:
        note = ("no labelled segments for this video in the labels table" if timeline.labels_given
                else "no labels given (--labels labels.parquet draws the segments)")
        lane.text(0.5, 0.5, note, transform=lane.transAxes, ha="center", va="center", fontsize=8, color="0.4")
        return
    for class_id, start, end in timeline.segments:
        colour = class_colour(class_id, num_colours)
        lane.broken_barh([(start, end - start)], (0.0, 1.0), facecolors=[colour], edgecolor="none")
        # The class id sits in the span's upper half, dark on light colours; the lower half stays pure colour.
        ink = "0.15" if 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] > 0.6 else "white"
        lane.text((start + end) / 2, 0.72, str(class_id), ha="center", va="center", fontsize=7, color=ink,
                  clip_on=True)


def _legend(fig: Any, timeline: VideoTimeline, num_colours: int, title: str) -> Any:
    """Every class once, as ``id: name``: a line when it has a curve, a patch when only a span."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles, names = [], []
    curves = set(range(timeline.values.shape[1])) if timeline.kind == PROBS else set()
    if timeline.kind == FEATURE_NORM:
        handles.append(Line2D([], [], color="0.2", linewidth=2.0))
        names.append("feature L2 norm")
    for class_id, name in timeline.class_names.items():
        colour = class_colour(class_id, num_colours)
        handles.append(Line2D([], [], color=colour, linewidth=2.0) if class_id in curves else Patch(color=colour))
        names.append(f"{class_id}: {name}")
    return fig.legend(handles, names, loc="upper left", bbox_to_anchor=(0.81, 0.90), fontsize=8, frameon=False,
               title=title, title_fontsize=8)


def draw(config: TimelineConfig) -> tuple[VideoTimeline, Rendered]:
    """Read one video and draw it."""
    timeline = load_timeline(config)
    return timeline, render_timeline(timeline, config.width_px, config.height_px, config.dpi, config.style)


def plot_timeline(config: TimelineConfig) -> dict:
    """Read, draw, save; returns what was drawn, for the terminal and the tests."""
    timeline, rendered = draw(config)
    fs, path = fsutil.filesystem(config.output)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    buffer = io.BytesIO()
    rendered.figure.savefig(buffer, format="png", dpi=config.dpi, facecolor="white")
    fsutil.write_bytes_atomic(fs, path, buffer.getvalue())
    return {"output": config.output, "video_id": timeline.video_id, "view": timeline.view,
            "windows": int(len(timeline.center_s)), "kind": timeline.kind,
            "classes": len(timeline.class_names), "segments": len(timeline.segments),
            "labels_given": timeline.labels_given, "size": [config.width_px, config.height_px],
            "style": resolve_style(config.style, timeline) if timeline.kind == PROBS else LINES}
