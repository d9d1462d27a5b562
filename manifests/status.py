"""The one status vocabulary every stage uses for a video.

A video's status says whether it has (or will have) windows, and if not, whether a rerun can
change that. Permanent statuses are facts about the file; transient ones are facts about an
attempt, so a rerun may clear them.
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

ALL_STATUSES = (OK, EMPTY, UNREADABLE, TOO_SHORT, TIMEOUT, CRASHED, DECODE_ERROR, FRAME_COUNT_MISMATCH)
PERMANENT = frozenset({EMPTY, UNREADABLE, TOO_SHORT})
TRANSIENT = frozenset({TIMEOUT, CRASHED, DECODE_ERROR})
# A frame-count mismatch still yields windows (from the frames that were really decoded); it is
# a warning about the manifest's count, not a failure.
HAS_WINDOWS = frozenset({OK, FRAME_COUNT_MISMATCH})


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
