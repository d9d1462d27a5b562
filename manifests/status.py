"""The one status vocabulary every stage uses for a video.

A video's status says whether it has (or will have) windows, and if not, whether a rerun can
change that. Permanent statuses are facts about the file; transient ones are facts about an
attempt, so a rerun may clear them; a stale-manifest status is a fact about the manifest (the
file is no longer the one it describes), so only a rebuilt manifest clears it, and until then
the run is incomplete.
"""

from __future__ import annotations

import signal
from dataclasses import asdict, dataclass
from typing import Optional

OK = "ok"
EMPTY = "empty"
UNREADABLE = "unreadable"
TOO_SHORT = "too_short"
TIMEOUT = "timeout"
CRASHED = "crashed"
DECODE_ERROR = "decode_error"
FRAME_COUNT_MISMATCH = "frame_count_mismatch"
# The manifest says ok, but at extract time the file could not be read (moved, permissions, a
# storage hiccup): the next attempt may well succeed, so it is never a permanent absence.
UNAVAILABLE = "unavailable"
# The file is not the one the manifest probed (size, mtime, frame rate or frame count differ):
# its windows would be timed with the old probe, so none are written.
CHANGED = "changed"

ALL_STATUSES = (OK, EMPTY, UNREADABLE, TOO_SHORT, TIMEOUT, CRASHED, DECODE_ERROR, FRAME_COUNT_MISMATCH,
                UNAVAILABLE, CHANGED)
PERMANENT = frozenset({EMPTY, UNREADABLE, TOO_SHORT})
TRANSIENT = frozenset({TIMEOUT, CRASHED, DECODE_ERROR, UNAVAILABLE})
STALE_MANIFEST = frozenset({CHANGED})
REBUILD_MANIFEST_HINT = ("the file changed after the manifest was written: rebuild the manifest with "
                         "`videofeat manifest` and extract into a new run directory")
# A frame-count mismatch still yields windows (from the frames that were really decoded); it is
# a warning about the manifest's count, not a failure.
HAS_WINDOWS = frozenset({OK, FRAME_COUNT_MISMATCH})


def kind(status: str) -> str:
    """``permanent``, ``transient``, ``rebuild the manifest`` or the status itself (ok, mismatch)."""
    if status in PERMANENT:
        return "permanent"
    if status in TRANSIENT:
        return "transient"
    if status in STALE_MANIFEST:
        return "rebuild the manifest"
    return status


def describe_exit(exitcode: Optional[int]) -> str:
    """How a child process ended, for a ``crashed`` record: ``SIGSEGV``, ``exit code 3``."""
    if exitcode is not None and exitcode < 0:
        try:
            return signal.Signals(-exitcode).name
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


def validate(status: str) -> str:
    if status not in ALL_STATUSES:
        raise ValueError(f"unknown video status {status!r}; expected one of {', '.join(ALL_STATUSES)}")
    return status


@dataclass(frozen=True)
class VideoRecord:
    """What one attempt at one video produced; stored in each shard's stats file."""

    video_id: str
    status: str
    error: Optional[str] = None
    frames_decoded: int = 0
    windows: int = 0
    failed_at_frame: Optional[int] = None
    seconds: float = 0.0

    def __post_init__(self) -> None:
        validate(self.status)

    def to_dict(self) -> dict:
        return asdict(self)
