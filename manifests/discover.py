"""Finding videos: the AI City layout, a glob + regex for other datasets, or an explicit list.

Discovery only lists files and reads names; it never opens a video (probing is the decoder
layer's job, run by the launcher in separate processes).
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

from videofeat.manifests import fsutil
from videofeat.manifests.views import canonical_view

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
    # Folders whose listing failed (permissions, I/O): whatever they hold is not in ``videos``.
    unlisted: list[tuple[str, str]] = field(default_factory=list)


class DiscoveryError(ValueError):
    pass


def _uri(fs, path: str) -> str:
    if fsutil.is_local(fs):
        return path
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return f"{protocol}://{path.lstrip('/') if protocol == 'memory' else path}" if "://" not in path else path


def _find_files(root: str) -> tuple[object, str, list[str], list[tuple[str, str]]]:
    """Every file under ``root``, and the folders that could not be listed, with why.

    fsspec's walk (like ``os.walk``) skips a folder it cannot list unless asked; its videos
    would vanish from the manifest without a word, so every such error is collected.
    """
    fs, base = fsutil.filesystem(root)
    if not fs.exists(base):
        raise DiscoveryError(f"video root {root} does not exist; pass the folder (or bucket URL) that holds the videos")
    unlisted: list[tuple[str, str]] = []
    files = sorted(p for p in _walk(fs, base, unlisted) if not posixpath.basename(p).startswith("."))
    return fs, base, files, unlisted


def _walk(fs, base: str, unlisted: list[tuple[str, str]]) -> list[str]:
    """Files under ``base``; a folder whose listing raises goes to ``unlisted``.

    Not ``fs.find``: its walk hands listing errors of sub-folders to no one. Local folders are
    entered once by real path, so a symlink loop (or two links to one folder) is listed once.
    """
    local = fsutil.is_local(fs)
    seen: set[str] = set()
    files: list[str] = []
    stack = [base]
    while stack:
        folder = stack.pop()
        if local:
            real = os.path.realpath(folder)
            if real in seen:
                continue
            seen.add(real)
        try:
            entries = fs.ls(folder, detail=True)
        except OSError as exc:
            unlisted.append((_uri(fs, folder), f"{type(exc).__name__}: {exc.strerror or exc}"))
            continue
        for info in entries:
            name = info["name"].rstrip("/")
            if name == folder.rstrip("/"):
                continue  # some stores list a folder as its own first entry
            (stack if info.get("type") == "directory" else files).append(name)
    return files


def discover_aicity(root: str, views: Optional[Sequence[str]] = None) -> Discovery:
    """``<root>/user_id_<id>/<View>_user_id_<id>_NoAudio_<n>.MP4`` (any depth, .MP4 or .mp4)."""
    fs, _, files, unlisted = _find_files(root)
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
    return Discovery(_check_unique(found), skipped, unlisted)


def discover_glob(root: str, pattern: str, regex: Optional[str] = None,
                  views: Optional[Sequence[str]] = None) -> Discovery:
    """Files under ``root`` matching ``pattern``; ``regex`` (on the path relative to root) may name
    groups ``video``, ``view``, ``session`` and ``user``."""
    fs, base, files, unlisted = _find_files(root)
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
        view = _view_of(groups.get("view"), _uri(fs, path))
        if views and view not in views:
            continue
        found.append(DiscoveredVideo(video_id, groups.get("session") or video_id, view,
                                     groups.get("user"), _uri(fs, path)))
    return Discovery(_check_unique(found), skipped, unlisted)


def _view_of(raw: Optional[str], where: str) -> str:
    """The canonical view of a regex group or list column; a glob without one gives ``default``."""
    if not raw:
        return DEFAULT_VIEW
    try:
        return canonical_view(raw)
    except ValueError as exc:
        raise DiscoveryError(f"{where}: {exc}") from None


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
        view = _view_of((row.get("view") or "").strip(), f"{list_path} row {line}")
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
             views: Optional[Sequence[str]] = None, skip_unlistable: bool = False) -> Discovery:
    """Find the videos of ``layout`` under ``root``; a folder that cannot be listed is an error
    unless ``skip_unlistable`` (then it stays in ``Discovery.unlisted`` for the caller to report)."""
    if layout == "aicity":
        found = discover_aicity(root, views)
    elif layout == "glob":
        found = discover_glob(root, pattern or "**/*.mp4", regex, views)
    elif layout == "list":
        found = discover_list(root, views)
    else:
        raise DiscoveryError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if found.unlisted and not skip_unlistable:
        folders = "; ".join(f"{folder} ({why})" for folder, why in found.unlisted[:5])
        more = f" and {len(found.unlisted) - 5} more" if len(found.unlisted) > 5 else ""
        raise DiscoveryError(
            f"cannot list {len(found.unlisted)} folder(s) under {root}: {folders}{more}; the videos in them would "
            "be missing from the manifest. Make them readable (e.g. chmod a+rx), or pass --skip-unlistable to "
            "write the manifest without them (they are then listed in its summary and metadata)")
    return found
