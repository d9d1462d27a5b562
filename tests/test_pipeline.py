"""``videofeat pipeline`` end to end on a generated AI City-style job, and stopped inside each stage.

One uninterrupted reference run (module fixture) is shared: the same steps typed one by one
must give the same exports, and a run SIGTERMed inside every stage in turn, then started again
with the same command, must finish without recomputing anything complete and equal it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest  # noqa: F401 - fixtures

from helpers_pipeline import SETS, VAL_USER, VIEWS, assert_same_exports, copy_data, exported, write_job
from videofeat.launcher.cli import main
from videofeat.launcher.demo import NUM_CLASSES, SET_OVERRIDES
from videofeat.manifests.ledger import RunDir

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def reference(pipeline_reference):
    return pipeline_reference  # the session's uninterrupted run (tests/conftest.py)


def test_end_to_end_equals_the_steps_typed_one_by_one(reference, tmp_path):
    work = reference / "work"
    # Six fine-tunes, each complete.
    for name in SETS:
        for view in VIEWS:
            assert (work / "finetune" / name / view / "COMPLETED").exists(), (name, view)
    # Three sets x two views from one decode: every shard's stats name the three sets, one decode per frame.
    decoded = frames = 0
    for shard in RunDir(str(work / "features" / SETS[0])).done_shards():
        stats = [json.loads(Path(RunDir(str(work / "features" / n)).stats_path(shard)).read_text()) for n in SETS]
        assert all(s["decode"] == stats[0]["decode"] for s in stats) and stats[0]["decode"]["sets"] == list(SETS)
        decoded += stats[0]["decode"]["frames_decoded"]
        frames += stats[0]["decode"]["video_frames"]
    assert frames > 0 and decoded == frames
    # MA-Actionformer: one flat folder per backbone with both views of the training and test videos.
    windows = (6 * 30 - 32) // 16 + 1
    for name in SETS:
        folder = reference / "features" / name
        npz = sorted(p for p in os.listdir(folder) if p.endswith(".npz"))
        assert len(npz) == 3 * len(VIEWS), npz  # 2 training users + 1 test user, 2 views each
        database = json.loads((folder / "annotations.json").read_text())["database"]
        subsets = {vid: entry["subset"] for vid, entry in database.items()}
        assert subsets[f"Rear_view_user_id_{VAL_USER}_NoAudio_1"] == "validation"
        assert subsets["Rear_view_user_id_10001_NoAudio_1"] == "training"
        assert subsets["Dashboard_user_id_12223_NoAudio_1"] == "test"
        assert not database["Dashboard_user_id_12223_NoAudio_1"]["annotations"]
    import numpy as np

    ref = exported(reference / "features")
    assert ref["tiny_vith/Rear_view_user_id_10001_NoAudio_1.npz"]["feats"].shape == (windows, 64)
    assert np.abs(ref["tiny_vitl/Rear_view_user_id_10001_NoAudio_1.npz"]["feats"]
                  - ref["tiny_vitl_b/Rear_view_user_id_10001_NoAudio_1.npz"]["feats"]).max() > 1e-3

    # The same job typed one command at a time.
    root = copy_data(reference, tmp_path)
    a1, a2 = str(root / "data" / "A1"), str(root / "data" / "A2")
    m1, m2, merged, labels = (str(root / n) for n in ("a1.parquet", "a2.parquet", "manifest.parquet",
                                                      "labels.parquet"))
    steps = [["manifest", a1, "-o", m1, "--views", "rear,dashboard", "--probe-procs", "2"],
             ["manifest", a2, "-o", m2, "--views", "rear,dashboard", "--probe-procs", "2"],
             ["manifest", "--merge", m1, m2, "-o", merged, "--num-shards", "2"],
             ["labels", a1, "--manifest", m1, "-o", labels, "--val-users", str(VAL_USER)]]
    overrides = [w for k, v in SET_OVERRIDES.items() for w in ("--" + k.replace("_", "-"), str(v))]
    for seed, (name, preset) in enumerate(zip(SETS, ("aicity-vith", "aicity-vitl", "aicity-vitl"))):
        ckpts = []
        for view in VIEWS:
            out = str(root / "ft" / name / view)
            steps.append(["finetune", "--recipe", "cpu-test", "--labels", labels, "--manifest", m1, "--view", view,
                          "-o", out, "--num-classes", str(NUM_CLASSES), "--epochs", "2", "--seed", str(seed),
                          "--no-progress"])
            ckpts += ["--checkpoint", f"{view}={out}/checkpoint-last.pt"]
        run = str(root / "runs" / name)
        steps += [["extract", merged, "-o", run, "--preset", preset, *ckpts, *overrides, "--views", "rear,dashboard",
                   "--device", "cpu", "--decode-procs", "1", "--no-progress"],
                  ["reduce", run],
                  ["export", run, "--format", "actionformer", "-o", str(root / "features" / name), "--labels",
                   labels, "--unlabeled-subset", "test"]]
    for argv in steps:
        assert main(argv) == 0, argv
    assert_same_exports(exported(root / "features"), ref)
    for name in SETS:
        # The run fingerprints differ only because the videos live in another folder (uris are in it).
        mine, theirs = (json.loads((r / "features" / name / "annotations.json").read_text()) for r in (root, reference))
        assert {k: v for k, v in mine.items() if k != "fingerprint"} == {
            k: v for k, v in theirs.items() if k != "fingerprint"} and mine["database"]


def _evidence(work: Path) -> dict[str, int]:
    """mtimes of what completed stages wrote: none of it may be written again."""
    out: dict[str, int] = {}

    def add(path: Path) -> None:
        out[str(path)] = path.stat().st_mtime_ns

    for path in [work / "manifest.parquet", work / "labels.parquet", *(work / "manifests").glob("*.parquet"),
                 *(work / "stages").glob("*.done")]:
        if path.exists():
            add(path)
    for done in (work / "finetune").glob("*/*/COMPLETED"):
        for path in done.parent.glob("*.pt"):
            add(path)
        add(done)
    for marker in (work / "features").glob("*/shards/*.done"):
        add(marker)
        add(marker.with_suffix(".parquet"))
    for summary in (work / "features").glob("*/dataset/summary.json"):
        if json.loads(summary.read_text()).get("complete"):
            for path in summary.parent.iterdir():
                add(path)
    return out


def _stop_inside(job: Path, work: Path, stage: str, ready) -> tuple[int, str]:
    """Start the pipeline, SIGTERM it once ``stage`` has started and ``ready()``; (exit status, output)."""
    proc = subprocess.Popen([sys.executable, "-m", "videofeat.launcher.cli", "pipeline", str(job), "-o", str(work)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    record = work / "stages" / f"{stage}.json"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and not (record.exists() and ready()):
        time.sleep(0.02)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


def test_sigterm_inside_each_stage_then_the_same_command_finishes(reference, tmp_path):
    root = copy_data(reference, tmp_path)
    job, work = write_job(root), root / "work"
    first_train = lambda: any('"event": "train"' in line for line in  # noqa: E731
                              (work / "finetune/tiny_vitl/rear/metrics.jsonl").read_text().splitlines()) \
        if (work / "finetune/tiny_vitl/rear/metrics.jsonl").exists() else False
    first_shard = lambda: any((work / "features").glob("*/shards/*.done"))  # noqa: E731
    always = lambda: True  # noqa: E731
    plan = [("manifest.train", always), ("manifest.A2", always), ("manifest", always), ("labels", always),
            ("finetune.tiny_vitl.rear", first_train), ("extract", first_shard), ("reduce.tiny_vitl", always),
            ("export.ma_actionformer", always)]
    stopped, finished, stopped_in = 0, set(), []
    for stage, ready in plan:
        before = _evidence(work)
        if stage in finished:
            continue  # an earlier stop landed after this stage: nothing left to stop inside
        code, out = _stop_inside(job, work, stage, ready)
        finished |= {line.split()[0] for line in out.splitlines() if line.startswith("   ") and " done in " in line}
        after = _evidence(work)
        # Nothing that was complete before this run was written again.
        assert {p: after.get(p) for p in before} == before, (stage, out[-3000:])
        if code == 0:
            break  # the stage finished before the signal; the job is complete
        stopped += 1
        assert code in (1, -signal.SIGTERM), (stage, code, out[-3000:])
        where = re.search(r"in stage (\S+);", out) or re.search(r"stage (\S+) stopped before", out)
        stopped_in.append(where.group(1) if where else "(before the first stage)")
    print("stopped inside:", stopped_in)
    assert stopped >= 4 and "finetune.tiny_vitl.rear" in stopped_in and "extract" in stopped_in
    # The fine-tune stopped mid-training resumed from its checkpoint instead of starting over.
    events = [json.loads(line) for line in (work / "finetune/tiny_vitl/rear/metrics.jsonl").read_text().splitlines()]
    starts = [e for e in events if e["event"] == "start"]
    if any(e["event"] == "preempted" for e in events):
        assert starts[-1]["resumed"] and starts[-1]["step"] > 0
    # status names what is not complete and the command that continues the job.
    status = subprocess.run([sys.executable, "-m", "videofeat.launcher.cli", "status", str(work)],
                            capture_output=True, text=True, env=ENV, timeout=60).stdout
    assert "finetune.tiny_vitl.rear" in status and "validation top-1" in status
    assert re.search(r"stopped before it was complete|not started", status), status
    assert f"continue with: videofeat pipeline {job} -o {work}" in status, status
    before = _evidence(work)
    last = subprocess.run([sys.executable, "-m", "videofeat.launcher.cli", "pipeline", str(job), "-o", str(work)],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert last.returncode == 0, last.stdout[-3000:] + last.stderr[-3000:]
    after = _evidence(work)
    assert {p: after.get(p) for p in before} == before
    assert_same_exports(exported(root / "features"), exported(reference / "features"))

    # Again: every stage is complete and nothing is written.
    again = subprocess.run([sys.executable, "-m", "videofeat.launcher.cli", "pipeline", str(job), "-o", str(work)],
                           capture_output=True, text=True, env=ENV, timeout=300)
    assert again.returncode == 0 and again.stdout.count("complete, skipped") == again.stdout.count("== ")
    assert _evidence(work) == after

    # A changed job file is refused for the stages it changes, naming the key; --redo recomputes those.
    write_job(root, decode_procs=2)  # not an output-changing value: still complete
    assert main(["pipeline", str(job), "-o", str(work)]) == 0
    text = job.read_text().replace('name = "ma_actionformer"\nformat = "actionformer"',
                                   'name = "ma_actionformer"\nformat = "actionformer"\nprob_key = "pred"')
    job.write_text(text)
    refused = subprocess.run([sys.executable, "-m", "videofeat.launcher.cli", "pipeline", str(job), "-o", str(work)],
                             capture_output=True, text=True, env=ENV, timeout=120)
    assert refused.returncode == 2
    assert "export.ma_actionformer: prob_key: recorded null, job file now \"pred\"" in refused.stderr
    assert "--redo export.ma_actionformer" in refused.stderr and str(job) in refused.stderr
    assert main(["pipeline", str(job), "-o", str(work), "--redo", "export"]) == 0
    with __import__("numpy").load(root / "features" / "tiny_vith" / "Rear_view_user_id_10001_NoAudio_1.npz") as data:
        assert sorted(data.files) == ["feats", "pred"]
    untouched = _evidence(work)
    assert all(untouched[p] == after[p] for p in after if "/stages/" not in p)
