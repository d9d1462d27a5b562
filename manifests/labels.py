"""AI City track-3 annotations -> one labels table, matched to the manifest's videos.

The per-user CSVs have quirks this parser keeps: ``Filename`` only on the first row of each
video's group, labels spelled ``Class N`` (or ``NA``), times ``H:MM:SS``, file names spelled
``Rearview``/``Rear``/``Dash``/``User_id`` and without ``NoAudio``. Every row that does not give
a segment is reported with its file and line; none is skipped in silence.
"""

from __future__ import annotations

import csv
import io
import random
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

import pyarrow as pa

from videofeat.manifests import fsutil
from videofeat.manifests.views import AICITY_PREFIX, aicity_view

AICITY_CLASSES = (
    "Normal Forward Driving", "Drinking", "Phone Call(right)", "Phone Call(left)", "Eating",
    "Text (Right)", "Text (Left)", "Reaching behind", "Adjust control panel",
    "Pick up from floor (Driver)", "Pick up from floor (Passenger)", "Talk to passenger at the right",
    "Talk to passenger at backseat", "yawning", "Hand on head", "Singing or dancing with music",
)
TRAINING, VALIDATION = "training", "validation"

SCHEMA = pa.schema([
    ("video_id", pa.string()), ("session_id", pa.string()), ("view", pa.string()), ("user_id", pa.string()),
    ("label_id", pa.int32()), ("label", pa.string()), ("start_s", pa.float64()), ("end_s", pa.float64()),
    ("split", pa.string()), ("source", pa.string()),
])


class LabelsError(ValueError):
    pass


@dataclass
class ParsedLabels:
    rows: list[dict]
    problems: list[str] = field(default_factory=list)  # "file:line: why", reported to the user


def parse_time(text: str) -> float:
    """``H:MM:SS`` (also ``MM:SS`` or plain seconds) -> seconds."""
    parts = text.strip().split(":")
    if not parts or not all(re.fullmatch(r"\d+(\.\d+)?", p) for p in parts) or len(parts) > 3:
        raise ValueError(f"time {text!r} is not H:MM:SS")
    seconds = 0.0
    for part in parts:
        seconds = seconds * 60 + float(part)
    return seconds


def parse_label(text: str) -> int:
    match = re.fullmatch(r"\s*class\s*(\d+)\s*", text, re.IGNORECASE)
    if not match or not 0 <= int(match.group(1)) < len(AICITY_CLASSES):
        raise ValueError(f"label {text!r} is not 'Class N' with N in 0..{len(AICITY_CLASSES) - 1}")
    return int(match.group(1))


_FILENAME = re.compile(r"^(?P<view>[A-Za-z_]+?)_user_id_(?P<user>\d+)(?:_NoAudio)?_(?P<index>\d+)$", re.IGNORECASE)


def normalize_filename(name: str) -> tuple[str, str, str]:
    """A CSV ``Filename`` in any of the seed's spellings -> (video_id, session_id, view)."""
    stem = re.sub(r"\.(mp4|MP4)$", "", name.strip())
    match = _FILENAME.match(stem)
    view = aicity_view(match.group("view")) if match else None
    if not match or view is None:
        raise ValueError(f"file name {name!r} is not <View>_user_id_<id>[_NoAudio]_<n>")
    session = f"user_id_{match.group('user')}_NoAudio_{match.group('index')}"
    return f"{AICITY_PREFIX[view]}_{session}", session, view


def parse_csv_text(text: str, source: str) -> ParsedLabels:
    reader = csv.DictReader(io.StringIO(text))
    fields = [f.strip() for f in (reader.fieldnames or [])]
    reader.fieldnames = fields
    needed = {"Filename", "Start Time", "End Time", "Label (Primary)"}
    if not needed <= set(fields):
        return ParsedLabels([], [f"{source}:1: not an AI City annotation file (needs columns "
                                 f"{', '.join(sorted(needed))}; found {', '.join(fields)})"])
    rows, problems = [], []
    current: Optional[tuple[str, str, str]] = None
    for line, raw in enumerate(reader, start=2):
        row = {k: (v or "").strip() for k, v in raw.items() if k}
        if not any(row.values()):
            continue
        where = f"{source}:{line}"
        if row["Filename"]:
            try:
                current = normalize_filename(row["Filename"])
            except ValueError as exc:
                current = None
                problems.append(f"{where}: {exc}; its rows are skipped until the next Filename")
                continue
        if current is None:
            problems.append(f"{where}: row before any Filename; skipped")
            continue
        if row["Label (Primary)"].upper() in ("NA", "N/A", ""):
            problems.append(f"{where}: label {row['Label (Primary)'] or '(empty)'!r} gives no class; skipped")
            continue
        try:
            label_id = parse_label(row["Label (Primary)"])
            start_s, end_s = parse_time(row["Start Time"]), parse_time(row["End Time"])
        except ValueError as exc:
            problems.append(f"{where}: {exc}; skipped")
            continue
        if end_s <= start_s:
            problems.append(f"{where}: end {row['End Time']} is not after start {row['Start Time']}; skipped")
            continue
        video_id, session_id, view = current
        rows.append({"video_id": video_id, "session_id": session_id, "view": view,
                     "user_id": session_id.split("_")[2], "label_id": label_id, "label": AICITY_CLASSES[label_id],
                     "start_s": start_s, "end_s": end_s, "split": None, "source": where})
    return ParsedLabels(rows, problems)


def parse_annotation_dir(root: str) -> ParsedLabels:
    fs, base = fsutil.filesystem(root)
    if not fs.exists(base):
        raise LabelsError(f"annotation folder {root} does not exist")
    files = sorted(p for p in fs.find(base) if p.lower().endswith(".csv"))
    if not files:
        raise LabelsError(f"no .csv annotation files under {root}")
    rows, problems = [], []
    for path in files:
        with fs.open(path, "rb") as handle:
            parsed = parse_csv_text(handle.read().decode("utf-8-sig"), path)
        rows += parsed.rows
        problems += parsed.problems
    return ParsedLabels(rows, problems)


def match_to_manifest(parsed: ParsedLabels, manifest_rows: Sequence[Mapping]) -> ParsedLabels:
    """Keep segments of videos in the manifest (ids in the manifest's spelling); report the rest."""
    by_session_view = {(r["session_id"], r["view"]): r for r in manifest_rows}
    by_id = {r["video_id"]: r for r in manifest_rows}
    kept, problems = [], list(parsed.problems)
    for row in parsed.rows:
        video = by_id.get(row["video_id"]) or by_session_view.get((row["session_id"], row["view"]))
        if video is None:
            problems.append(f"{row['source']}: {row['video_id']} is not in the manifest; skipped")
            continue
        kept.append({**row, "video_id": video["video_id"], "session_id": video["session_id"],
                     "user_id": video.get("user_id") or row["user_id"]})
    return ParsedLabels(kept, problems)


def assign_split(rows: Iterable[dict], val_users: Optional[Sequence[str]] = None,
                 val_fraction: Optional[float] = None, seed: int = 0) -> list[dict]:
    """Whole users go to validation: named by ``val_users`` or a seeded ``val_fraction`` of them."""
    rows = list(rows)
    users = sorted({r["user_id"] for r in rows})
    if val_users is not None:
        chosen = {u.removeprefix("user_id_") for u in val_users}
        unknown = sorted(chosen - set(users))
        if unknown:
            raise LabelsError(f"--val-users {', '.join(unknown)} have no labelled videos (users: {', '.join(users)})")
    elif val_fraction is not None:
        if not 0.0 <= val_fraction < 1.0:
            raise LabelsError(f"--val-fraction must be in [0, 1), got {val_fraction}")
        shuffled = users[:]
        random.Random(seed).shuffle(shuffled)
        count = round(val_fraction * len(users))
        if val_fraction > 0 and count == 0 and len(users) > 1:
            count = 1
        chosen = set(shuffled[:count])
    else:
        chosen = set()
    return [{**r, "split": VALIDATION if r["user_id"] in chosen else TRAINING} for r in rows]


def labels_table(rows: Sequence[Mapping]) -> pa.Table:
    ordered = sorted(rows, key=lambda r: (r["view"], r["video_id"], r["start_s"], r["label_id"]))
    return pa.Table.from_pylist([dict(r) for r in ordered], schema=SCHEMA)


def write_labels(rows: Sequence[Mapping], path: str) -> None:
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(labels_table(rows), sink)
    fs, inner = fsutil.filesystem(path)
    fsutil.write_bytes_atomic(fs, inner, sink.getvalue())


def read_labels(path: str) -> pa.Table:
    return fsutil.read_parquet(path)
