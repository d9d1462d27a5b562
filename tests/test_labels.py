"""AI City annotation CSVs, quirks included, matched to a real manifest; splits by whole users."""

from __future__ import annotations

import pytest
from conftest import make_aicity_tree, run_cli

from videofeat.manifests.labels import (LabelsError, assign_split, normalize_filename, parse_csv_text, parse_time,
                                        read_labels)

HEADER = "Filename,Camera View,Activity Type,Start Time,End Time,Label (Primary),Appearance Block\n"


def _user_csv(user: int) -> str:
    # The real files' quirks: Filename only on a group's first row, 'Rearview' and 'User_id'
    # spellings, no NoAudio, NA labels, H:MM:SS times, stray spaces.
    return (HEADER
            + f"Dashboard_User_id_{user}_NoAudio_1,Dashboard,Distracted,0:00:00,0:00:01,Class 0,None\n"
            + ",Dashboard,Distracted,0:00:01,0:00:02, Class 3 ,None\n"
            + f"Rearview_user_id_{user}_1,Rear View,Distracted,0:00:00,0:00:02,Class 15,None\n"
            + ",Rear View,Distracted,0:00:02,0:00:03,NA,None\n"
            + f"Right_side_window_user_id_{user}_NoAudio_2,Right Side Window,Distracted,0:00:01,0:00:04,Class 7,None\n"
            + ",Right Side Window,Distracted,0:00:03,0:00:02,Class 7,None\n"
            + ",Right Side Window,Distracted,0:0x:03,0:00:05,Class 7,None\n")


def test_parse_quirks():
    assert parse_time("1:02:03") == 3723 and parse_time("0:00:07") == 7
    assert normalize_filename("Rearview_User_id_24026_3") == ("Rear_view_user_id_24026_NoAudio_3",
                                                             "user_id_24026_NoAudio_3", "rear")
    assert normalize_filename("Dash_user_id_1_NoAudio_2.MP4")[0] == "Dashboard_user_id_1_NoAudio_2"
    parsed = parse_csv_text(_user_csv(11), "user_id_11.csv")
    assert [(r["video_id"], r["label_id"], r["start_s"], r["end_s"]) for r in parsed.rows] == [
        ("Dashboard_user_id_11_NoAudio_1", 0, 0.0, 1.0),
        ("Dashboard_user_id_11_NoAudio_1", 3, 1.0, 2.0),
        ("Rear_view_user_id_11_NoAudio_1", 15, 0.0, 2.0),
        ("Right_side_window_user_id_11_NoAudio_2", 7, 1.0, 4.0),
    ]
    assert parsed.rows[3]["label"] == "Reaching behind"
    lines = sorted(p.split(":")[1] for p in parsed.problems)
    assert lines == ["5", "7", "8"]  # NA, end before start, bad time: each named by file and line


def test_labels_command_matches_manifest_and_splits_whole_users(tmp_path):
    make_aicity_tree(tmp_path / "videos", users=(11, 22, 33, 44), frames=(48,))
    run_cli("manifest", str(tmp_path / "videos"), "-o", str(tmp_path / "m.parquet"))
    ann = tmp_path / "ann"
    ann.mkdir()
    for user in (11, 22, 33, 44, 55):
        (ann / f"user_id_{user}.csv").write_text(_user_csv(user))
    out = tmp_path / "labels.parquet"
    result = run_cli("labels", str(ann), "--manifest", str(tmp_path / "m.parquet"), "-o", str(out),
                     "--val-users", "22,user_id_44")
    rows = read_labels(str(out)).to_pylist()
    assert len(rows) == 16 and {r["user_id"] for r in rows} == {"11", "22", "33", "44"}
    assert {r["user_id"] for r in rows if r["split"] == "validation"} == {"22", "44"}
    assert "user_id_55" in result.stderr and "not in the manifest" in result.stderr
    assert "NA" in result.stderr
    again = tmp_path / "again.parquet"
    for path in (out, again):
        run_cli("labels", str(ann), "--manifest", str(tmp_path / "m.parquet"), "-o", str(path),
                "--val-fraction", "0.5", "--seed", "3")
    first, second = read_labels(str(out)).to_pylist(), read_labels(str(again)).to_pylist()
    assert first == second
    per_user = {}
    for r in first:
        per_user.setdefault(r["user_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in per_user.values())
    assert sum(s == {"validation"} for s in per_user.values()) == 2


def test_split_errors():
    rows = [{"user_id": "1"}, {"user_id": "2"}]
    with pytest.raises(LabelsError, match="have no labelled videos"):
        assign_split(rows, val_users=["9"])
    with pytest.raises(LabelsError, match="val-fraction"):
        assign_split(rows, val_fraction=1.5)
