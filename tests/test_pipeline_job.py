"""Job files with a mistake are refused before anything runs, naming the file, the key and the fix."""

from __future__ import annotations

import csv
import os
import re

import pytest

from videofeat.launcher.cli import main
from videofeat.launcher.pipeline_cmd import EXAMPLE
from videofeat.launcher.pipeline_job import load_job
from videofeat.workers.decode.synthetic import write_action_video

GOOD = '''
views = ["rear"]
[train]
root = "data"
annotations = "data"
val_users = ["2"]
[[set]]
name = "a"
preset = "aicity-vith"
recipe = "cpu-test"
[set.finetune]
epochs = 1
[[export]]
output = "features"
'''


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two users' rear-view videos (no dashboard) with their CSVs, and a pretrained checkpoint file."""
    root = tmp_path_factory.mktemp("jobs")
    for user in (1, 2):
        name = f"Rear_view_user_id_{user}_NoAudio_1"
        write_action_video(str(root / "data" / f"user_id_{user}" / f"{name}.MP4"), 64, [(0, 0, 32)], 64, 64)
        with open(root / "data" / f"user_id_{user}" / f"user_id_{user}.csv", "w", newline="") as handle:
            csv.writer(handle).writerows([["Filename", "Camera View", "Activity Type", "Start Time", "End Time",
                                           "Label (Primary)", "Appearance Block"],
                                          [name, "Rear View", "Distracted", "0:00:00", "0:00:01", "Class 0", "None"]])
    (root / "pre.pt").write_bytes(b"weights")
    return root


CASES = {
    "unknown top-level key": (GOOD + "viewz = 1\n", "viewz: unknown key", "valid keys here are"),
    "unknown set key": (GOOD.replace('recipe = "cpu-test"', 'recipe = "cpu-test"\nhop_size = 8'),
                        "set 'a'.hop_size: unknown key", "valid keys here are"),
    "unknown fine-tuning key": (GOOD.replace("epochs = 1", "epoch = 1"), "set 'a'.finetune.epoch: unknown",
                                "flags of `videofeat finetune --help`"),
    "a fine-tuning value of the wrong type": (GOOD.replace("epochs = 1", 'epochs = "1"'),
                                              "set 'a'.finetune.epochs: must be int", "got '1'"),
    "a missing pretrained checkpoint": (GOOD.replace('recipe = "cpu-test"', 'recipe = "cpu-test"\npretrained = "x.pt"'),
                                        "set 'a'.pretrained:", "x.pt does not exist"),
    "a missing fine-tuned checkpoint": (GOOD.replace('recipe = "cpu-test"\n[set.finetune]\nepochs = 1',
                                                     'checkpoint = { rear = "ckpt/rear.pt" }'),
                                        "set 'a'.checkpoint.rear:", "ckpt/rear.pt does not exist"),
    "a checkpoint for a view the job lacks": (
        GOOD.replace('recipe = "cpu-test"\n[set.finetune]\nepochs = 1',
                     'checkpoint = { rear = "pre.pt", dashboard = "pre.pt" }'),
        "set 'a'.checkpoint.dashboard: view dashboard is not one of the job's views", "add it to views"),
    "a view not in the data": (GOOD.replace('views = ["rear"]', 'views = ["rear", "dashboard"]'),
                               "views: dashboard has no videos in the training set", "remove the view"),
    "an unknown view": (GOOD.replace('views = ["rear"]', 'views = ["rear", "roof"]'), "views:", "roof"),
    "two sets with one name": (GOOD.replace("[[export]]", '[[set]]\nname = "a"\npreset = "aicity-vitl"\n'
                                            'recipe = "cpu-test"\n[[export]]'),
                               "set 'a'.name: is used by an earlier [[set]]", "own name"),
    "an export of an unknown set": (GOOD + 'sets = ["b"]\n', "export #1.sets: names set 'b'",
                                    "not a [[set]]"),
    "no validation split": (GOOD.replace('val_users = ["2"]\n', ""), "train.val_users: the validation split is "
                            "missing", "val_fraction"),
    "a missing recipe": (GOOD.replace('recipe = "cpu-test"\n', ""), "set 'a'.recipe: is missing", "pretrained"),
    "a missing video root": (GOOD.replace('root = "data"', 'root = "videos"'), "train.root:", "fix the path"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_mistake_is_refused_before_anything_runs(folder, case, capsys):
    text, where, fix = CASES[case]
    job = folder / f"{re.sub(r'[^a-z]+', '_', case)}.toml"
    job.write_text(text)
    work = folder / f"work_{job.stem}"
    assert main(["pipeline", str(job), "-o", str(work)]) == 2
    err = capsys.readouterr().err
    assert str(job) in err and where in err and fix in err, err
    assert not work.exists()  # nothing ran, nothing was written


def test_the_example_job_file_parses_and_names_the_seed_job(tmp_path, capsys):
    assert main(["pipeline", "--example"]) == 0
    text = capsys.readouterr().out
    assert text == EXAMPLE
    for path in ("pre/k400_videomae_vitH_pre_finetune.pth", "pre/vit_l_hybrid_pt_800e_k700_ft.pth",
                 "pre/ego4d_verb_pretrain_vitl_k700.pt"):
        os.makedirs(tmp_path / os.path.dirname(path), exist_ok=True)
        (tmp_path / path).write_bytes(b"")
    os.makedirs(tmp_path / "data" / "A1")
    os.makedirs(tmp_path / "data" / "A2")
    (tmp_path / "job.toml").write_text(text.replace('"pretrain/', '"pre/'))
    job = load_job(str(tmp_path / "job.toml"))
    assert [(s.name, s.preset, s.recipe) for s in job.sets] == [
        ("vith_k400", "aicity-vith", "aicity-vith-k400"), ("vitl_hybrid", "aicity-vitl", "aicity-vitl-hybrid"),
        ("vitl_ego4d", "aicity-vitl", "aicity-vitl-ego4d")]
    assert job.views == ("rear", "dashboard") and [t.name for t in job.tests] == ["A2"]
    assert [(e.name, e.sets) for e in job.exports] == [
        ("ma_actionformer", ("vith_k400", "vitl_hybrid", "vitl_ego4d")), ("tridet", ("vith_k400",))]
