"""Finding videos: the AI City layout, a glob + regex for other datasets, or an explicit list.

Discovery only lists files and reads names; it never opens a video (probing is the decoder
layer's job, run by the launcher in separate processes).
"""

from __future__ import annotations

import csv
import io
import posixpath
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

from videofeat.manifests import fsutil
from videofeat.manifests.views import canonical_view, maybe_canonical_view

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v")
DEFAULT_VIEW = "default"
LAYOUTS = ("aicity", "glob", "list")

_AICITY_NAME = re.compile(
    r"^(?P<prefix>Dashboard|Rear_?view|Right_side_window)_(?P<session>user_id_(?P<user>\d+)_NoAudio_\d+)"
    r"\.(?:mp4)$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class DiscoveredVideo:
    video_id: str
    session_id: str
    view: str
    user_id: Optional[str]
    uri: str


@dataclass
class Discovery:
    videos: list[DiscoveredVideo]
    # Files that looked like videos but did not fit the layout: reported, never dropped in silence.
    skipped: list[tuple[str, str]] = field(default_factory=list)


class DiscoveryError(ValueError):
    pass


def _uri(fs, path: str) -> str:
    if fsutil.is_local(fs):
        return path
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return f"{protocol}://{path.lstrip('/') if protocol == 'memory' else path}" if "://" not in path else path


def _find_files(root: str) -> tuple[object, str, list[str]]:
    fs, base = fsutil.filesystem(root)
    if not fs.exists(base):
        raise DiscoveryError(f"video root {root} does not exist; pass the folder (or bucket URL) that holds the videos")
    files = sorted(p for p in fs.find(base) if not posixpath.basename(p).startswith("."))
    return fs, base, files


def discover_aicity(root: str, views: Optional[Sequence[str]] = None) -> Discovery:
    """``<root>/user_id_<id>/<View>_user_id_<id>_NoAudio_<n>.MP4`` (any depth, .MP4 or .mp4)."""
    fs, _, files = _find_files(root)
    found, skipped = [], []
    for path in files:
        name = posixpath.basename(path)
        if not name.lower().endswith(VIDEO_EXTENSIONS):
            continue
        match = _AICITY_NAME.match(name)
        if not match:
            skipped.append((_uri(fs, path), "name does not follow <View>_user_id_<id>_NoAudio_<n>.MP4"))
            continue
        view = canonical_view(match.group("prefix"))
        if views and view not in views:
            continue
        video_id = name.rsplit(".", 1)[0]  # the file stem, as the seed's outputs and labels name it
        found.append(DiscoveredVideo(video_id, match.group("session"), view, match.group("user"), _uri(fs, path)))
    return Discovery(_check_unique(found), skipped)


def discover_glob(root: str, pattern: str, regex: Optional[str] = None,
                  views: Optional[Sequence[str]] = None) -> Discovery:
    """Files under ``root`` matching ``pattern``; ``regex`` (on the path relative to root) may name
    groups ``video``, ``view``, ``session`` and ``user``."""
    fs, base, files = _find_files(root)
    compiled = re.compile(regex) if regex else None
    found, skipped = [], []
    for path in files:
        rel = path[len(base):].lstrip("/")
        if not (posixpath.basename(rel) and _glob_match(rel, pattern)):
            continue
        groups: dict[str, Optional[str]] = {}
        if compiled:
            match = compiled.search(rel)
            if not match:
                skipped.append((_uri(fs, path), f"path does not match --regex {regex}"))
                continue
            groups = match.groupdict()
        video_id = groups.get("video") or posixpath.basename(rel).rsplit(".", 1)[0]
        raw_view = groups.get("view")
        view = (maybe_canonical_view(raw_view) or raw_view.lower()) if raw_view else DEFAULT_VIEW
        if views and view not in views:
            continue
        found.append(DiscoveredVideo(video_id, groups.get("session") or video_id, view,
                                     groups.get("user"), _uri(fs, path)))
    return Discovery(_check_unique(found), skipped)


def _glob_match(rel: str, pattern: str) -> bool:
    """fnmatch where ``**/`` spans any number of folders (including none)."""
    regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
    regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
    return re.fullmatch(regex, rel) is not None or ("/" not in pattern and re.fullmatch(regex, posixpath.basename(rel)) is not None)


def discover_list(list_path: str, views: Optional[Sequence[str]] = None) -> Discovery:
    """A CSV or Parquet table with ``uri`` and optional ``view``, ``video_id``, ``session_id``, ``user_id``."""
    rows = _read_table_rows(list_path)
    found = []
    for line, row in enumerate(rows, start=2):
        uri = (row.get("uri") or "").strip()
        if not uri:
            raise DiscoveryError(f"{list_path}: row {line} has no 'uri'; every row needs the video's path or URL")
        raw_view = (row.get("view") or "").strip()
        view = (maybe_canonical_view(raw_view) or raw_view.lower()) if raw_view else DEFAULT_VIEW
        if views and view not in views:
            continue
        video_id = (row.get("video_id") or "").strip() or posixpath.basename(uri).rsplit(".", 1)[0]
        found.append(DiscoveredVideo(video_id, (row.get("session_id") or "").strip() or video_id, view,
                                     (row.get("user_id") or None), uri))
    return Discovery(_check_unique(found))


def _read_table_rows(path: str) -> list[dict]:
    fs, inner = fsutil.filesystem(path)
    if inner.lower().endswith(".parquet"):
        rows = fsutil.read_parquet(path).to_pylist()
        return [{k: (None if v is None else str(v)) for k, v in r.items()} for r in rows]
    with fs.open(inner, "rb") as handle:
        text = handle.read().decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or "uri" not in reader.fieldnames:
        raise DiscoveryError(f"{path}: a list needs a header with a 'uri' column (found {reader.fieldnames})")
    return list(reader)


def _check_unique(videos: list[DiscoveredVideo]) -> list[DiscoveredVideo]:
    seen: dict[str, str] = {}
    for video in videos:
        if video.video_id in seen:
            raise DiscoveryError(
                f"two files have video_id {video.video_id!r}: {seen[video.video_id]} and {video.uri}; "
                "video ids name output files and must be unique (rename one, or use --regex with a 'video' group)"
            )
        seen[video.video_id] = video.uri
    return sorted(videos, key=lambda v: (v.view, v.video_id))


def discover(root: str, layout: str = "aicity", pattern: Optional[str] = None, regex: Optional[str] = None,
             views: Optional[Sequence[str]] = None) -> Discovery:
    if layout == "aicity":
        return discover_aicity(root, views)
    if layout == "glob":
        return discover_glob(root, pattern or "**/*.mp4", regex, views)
    if layout == "list":
        return discover_list(root, views)
    raise DiscoveryError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
