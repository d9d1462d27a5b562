"""``videofeat plot``: a real reduced run with known probabilities, drawn, and its PNG read back.

Pixels are read from the PNG on disk (PIL) and located through the axes' data transforms, so
the checks say "at 3.0 s the label lane is class 2's colour", not "the code called a function".
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_reduce import FPS, HOP, SPAN, basic_videos, make_run

from videofeat.launcher.cli import main
from videofeat.manifests.labels import AICITY_CLASSES, write_labels
from videofeat.workers.reduce.merge import ReduceConfig, reduce_run

pytest.importorskip("matplotlib", reason="the plot extra: pip install -e '.[plot]'")
from PIL import Image  # noqa: E402

from videofeat.workers.reduce.plot import (TimelineConfig, class_colour, draw, labelled_video,  # noqa: E402
                                           load_timeline)

VIDEO = "Rear_view_user_id_1_NoAudio_1"       # 200 frames: 11 windows, centres 0.53 .. 5.87 s
HIGH = (2.0, 4.0)                              # class 2 is labelled, and predicted, in this range
HIGH_ROW = (0.05, 0.06, 0.85, 0.04)
LOW_ROW = (0.75, 0.15, 0.02, 0.08)
SEGMENTS = ((0, 0.2, 1.4), (2, *HIGH))
WIDTH, HEIGHT = 1000, 450


def known_probs(video_id: str, windows: np.ndarray, classes: int) -> np.ndarray:
    centre = (windows * HOP + SPAN / 2) / FPS
    if video_id != VIDEO:
        return np.full((len(windows), classes), 1.0 / classes, np.float32)
    inside = (centre >= HIGH[0]) & (centre <= HIGH[1])
    return np.where(inside[:, None], np.array(HIGH_ROW), np.array(LOW_ROW)).astype(np.float32)


def videofeat(capsys, *argv: str) -> tuple[int, str, str]:
    """The real ``videofeat`` entry point, in this process: (exit status, stdout, stderr)."""
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def write_segments(path: str) -> str:
    rows = [{"video_id": VIDEO, "session_id": "user_id_1_NoAudio_1", "view": "rear", "user_id": "1",
             "label_id": c, "label": AICITY_CLASSES[c], "start_s": s, "end_s": e, "split": "validation",
             "source": "user_id_1.csv:2"} for c, s, e in SEGMENTS]
    write_labels(rows, path)
    return path


@pytest.fixture
def plotted(tmp_path, capsys):
    """A reduced run, a labels table, the PNG the real command wrote, and the same figure drawn again."""
    run = make_run(tmp_path, basic_videos(), probs_for=known_probs)
    reduce_run(ReduceConfig(run.url, marker_wait_s=0))
    labels = write_segments(str(tmp_path / "labels.parquet"))
    png = str(tmp_path / "out" / "timeline.png")
    code, out, err = videofeat(capsys, "plot", run.url, "--video", VIDEO, "--labels", labels, "-o", png,
                               "--size", f"{WIDTH}x{HEIGHT}")
    assert code == 0, err
    timeline, rendered = draw(TimelineConfig(run.url, VIDEO, png, labels=labels, width_px=WIDTH, height_px=HEIGHT))
    rendered.figure.canvas.draw()
    return png, out, timeline, rendered


def rgb(class_id: int) -> np.ndarray:
    return np.array(class_colour(class_id, 4)) * 255


def column(image: np.ndarray, axes, x: float, y0: float, y1: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of the image column at data x between data y0 and y1, and each pixel's data y."""
    (px, a), (_, b) = axes.transData.transform([(x, y1), (x, y0)])
    top, bottom = max(a, b), min(a, b)   # the heat strip's y axis points down
    rows = np.arange(int(np.ceil(image.shape[0] - top)), int(image.shape[0] - bottom))
    data_y = axes.transData.inverted().transform(np.c_[np.full(len(rows), px), image.shape[0] - rows - 0.5])[:, 1]
    return image[rows, int(px)], data_y


def matches(pixels: np.ndarray, class_id: int) -> np.ndarray:
    return np.abs(pixels - rgb(class_id)).max(axis=1) < 12


def test_timeline_draws_segments_and_curves_where_the_data_says(plotted):
    png, out, timeline, rendered = plotted
    assert f"11 windows of {VIDEO} [rear], 2 labelled segment(s); {WIDTH}x{HEIGHT} px" in out
    image = np.asarray(Image.open(png).convert("RGB")).astype(float)
    assert image.shape == (HEIGHT, WIDTH, 3)
    assert timeline.class_names == {0: AICITY_CLASSES[0], 1: "class 1", 2: AICITY_CLASSES[2], 3: "class 3"}

    # The label lane: class 2's colour fills 2.0-4.0 s and appears nowhere else; class 0 fills 0.2-1.4 s.
    lane = rendered.segments
    for x in (2.1, 3.0, 3.9):
        pixels, _ = column(image, lane, x, 0.05, 0.45)
        assert matches(pixels, 2).mean() > 0.95, x
    for x in (0.1, 1.0, 1.6, 1.9, 4.1, 5.0, 6.2):
        pixels, _ = column(image, lane, x, 0.05, 0.95)
        assert not matches(pixels, 2).any(), x
    pixels, _ = column(image, lane, 0.8, 0.05, 0.45)
    assert matches(pixels, 0).mean() > 0.95

    # The curves: at every window centre class 2's line passes through its probability (0.85 inside
    # the range, 0.02 outside), and in the flat parts nowhere else.
    curves = rendered.curves
    for window, value in enumerate(known_probs(VIDEO, np.arange(11), 4)[:, 2]):
        pixels, ys = column(image, curves, (window * HOP + SPAN / 2) / FPS, 0.0, 1.0)
        assert matches(pixels, 2).any(), (window, "no class 2 pixel at this window's centre")
        off = np.abs(ys[matches(pixels, 2)] - value)
        assert off.min() < 0.015 and off.max() < 0.08, (window, value, off.min(), off.max())
    inside, outside = (5 * HOP + SPAN / 2) / FPS, (9 * HOP + SPAN / 2) / FPS   # 3.2 s and 5.33 s
    pixels, ys = column(image, curves, inside, 0.0, 1.0)
    assert matches(pixels, 2).any() and np.all(np.abs(ys[matches(pixels, 2)] - 0.85) < 0.03)
    assert np.all(np.abs(ys[matches(pixels, 0)] - 0.05) < 0.03)
    pixels, ys = column(image, curves, outside, 0.0, 1.0)
    assert matches(pixels, 2).any() and np.all(ys[matches(pixels, 2)] < 0.05)
    assert matches(pixels, 0).any() and np.all(np.abs(ys[matches(pixels, 0)] - 0.75) < 0.03)


def test_a_pipeline_finds_the_validation_video_to_draw(tmp_path):
    run = make_run(tmp_path, basic_videos())
    reduce_run(ReduceConfig(run.url, marker_wait_s=0))
    labels = write_segments(str(tmp_path / "labels.parquet"))   # VIDEO is the only validation video
    assert labelled_video(run.url, labels, "rear") == VIDEO
    assert labelled_video(run.url, labels, "Dash") is None
    assert labelled_video(run.url, labels, "rear", split="training") is None


def test_many_classes_draw_a_heat_strip_whose_colour_depth_is_the_probability(tmp_path, capsys):
    classes = 12

    def probs(video_id: str, windows: np.ndarray, count: int) -> np.ndarray:
        four = known_probs(video_id, windows, 4)
        out = np.full((len(windows), count), 0.0, np.float32)
        out[:, :4] = four
        return out / out.sum(axis=1, keepdims=True)

    run = make_run(tmp_path, basic_videos(), classes=classes, probs_for=probs)
    reduce_run(ReduceConfig(run.url, marker_wait_s=0))
    png = str(tmp_path / "heat.png")
    code, out, err = videofeat(capsys, "plot", run.url, "--video", VIDEO, "-o", png, "--size", f"{WIDTH}x{HEIGHT}")
    assert code == 0 and out.rstrip().endswith("px, heat"), (out, err)   # auto: more than 8 classes
    timeline, rendered = draw(TimelineConfig(run.url, VIDEO, png, width_px=WIDTH, height_px=HEIGHT))
    image = np.asarray(Image.open(png).convert("RGB")).astype(float)
    expected = probs(VIDEO, np.arange(11), classes)
    np.testing.assert_allclose(timeline.values, expected, rtol=1e-6)
    # Row c of the strip sits at y = c; each window's cell is white blended toward the class colour.
    for window in (1, 3, 5, 9):
        x = (window * HOP + SPAN / 2) / FPS
        for class_id in (0, 2):
            pixels, ys = column(image, rendered.curves, x, class_id - 0.3, class_id + 0.3)
            colour = np.array(class_colour(class_id, classes)) * 255
            want = 255 - expected[window, class_id] * (255 - colour)
            assert np.abs(pixels - want).max() < 4, (window, class_id, pixels[0], want)


def test_plot_refuses_bad_input_and_plots_norms_without_a_head(tmp_path, capsys):
    run = make_run(tmp_path / "a", basic_videos())
    png = str(tmp_path / "t.png")
    code, _, err = videofeat(capsys, "plot", str(tmp_path), "--video", VIDEO, "-o", png)
    assert code == 2 and f"{tmp_path}/run.json does not exist" in err and "videofeat extract" in err, err
    code, _, err = videofeat(capsys, "plot", run.url, "--video", VIDEO, "-o", png)
    assert code == 2 and f"videofeat reduce {run.url}" in err, err
    reduce_run(ReduceConfig(run.url, marker_wait_s=0))
    code, _, err = videofeat(capsys, "plot", run.url, "--video", "Rear_view_user_id_7_NoAudio_1", "-o", png)
    assert code == 2 and "--video Rear_view_user_id_7_NoAudio_1: not in the dataset" in err, err
    assert "known ids: Dashboard_user_id_1_NoAudio_1, Dashboard_user_id_2_NoAudio_1, " \
           "Rear_view_user_id_1_NoAudio_1" in err
    code, _, err = videofeat(capsys, "plot", run.url, "--video", VIDEO, "-o", png, "--view", "dashboard")
    assert code == 2 and "not in view dashboard" in err, err
    code, _, err = videofeat(capsys, "plot", run.url, "--video", VIDEO, "-o", png,
                             "--labels", str(tmp_path / "none.parquet"))
    assert code == 2 and "none.parquet does not exist" in err and "videofeat labels" in err, err
    assert not os.path.exists(png)

    headless = make_run(tmp_path / "b", basic_videos(), classes=0)
    reduce_run(ReduceConfig(headless.url, marker_wait_s=0))
    code, out, err = videofeat(capsys, "plot", headless.url, "--video", VIDEO, "-o", png, "--size", "640x300")
    assert code == 0 and "feature L2 norms" in out and "no classification head" in out, err
    assert Image.open(png).size == (640, 300)
    timeline = load_timeline(TimelineConfig(headless.url, VIDEO, png))
    rows = pq.read_table(f"{headless.dataset_dir}/rear.parquet").to_pylist()
    expected = np.linalg.norm([r["feature"] for r in rows if r["video_id"] == VIDEO], axis=1)
    np.testing.assert_allclose(timeline.values[:, 0], expected, rtol=1e-6)


def test_matplotlib_is_imported_only_by_plot_and_its_absence_names_the_extra(tmp_path):
    run = make_run(tmp_path, basic_videos())
    reduce_run(ReduceConfig(run.url, marker_wait_s=0))
    code = ("import sys\n"
            "from videofeat.launcher.cli import COMMANDS, build_command_parser, main\n"
            "for name in ('manifest', 'labels', 'status', 'reduce', 'export', 'plot'):\n"
            "    build_command_parser(name)\n"
            f"assert main(['export', {run.url!r}, '-o', {str(tmp_path / 'feats')!r}]) == 0\n"
            "assert 'matplotlib' not in sys.modules, 'a light command imported matplotlib'\n"
            "sys.modules['matplotlib'] = None  # what Python sees when the extra is not installed\n"
            f"sys.exit(main(['plot', {run.url!r}, '--video', {VIDEO!r}, '-o', {str(tmp_path / 'x.png')!r}]))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "pip install 'videofeat[plot]'" in result.stderr and not (tmp_path / "x.png").exists()
