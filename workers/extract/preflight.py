"""Before a video is decoded: is its file still the one the manifest probed?

The manifest's frame count and frame rate time every window, so a file replaced after the
manifest was written (re-encoded at another rate, cut shorter, same length but other content)
must not be decoded against them: it gets ``changed``, which only a rebuilt manifest clears. A
file that cannot be reached at all gets ``unavailable``, which a rerun retries.

Two checks: the file's size and mtime against the manifest's, before the job is handed to a
decode process; then, once the decoder has opened it, its frame rate against the probe's.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, Mapping, Optional

from videofeat.manifests.manifest import ManifestRow
from videofeat.manifests.probe import file_signature
from videofeat.manifests.status import CHANGED, REBUILD_MANIFEST_HINT, UNAVAILABLE

# Relative frame-rate difference that counts as another rate: decord rounds rates to /1001.
FPS_TOLERANCE = 1e-4

Refusal = Optional[tuple[str, str]]


def check_file(row: ManifestRow) -> Refusal:
    """``(status, error)`` when the file cannot be used as the manifest describes it, else None."""
    uri = row.uri
    try:
        size, mtime_ns = file_signature(uri)
    except OSError as exc:
        return UNAVAILABLE, (f"cannot read {uri} ({type(exc).__name__}: {exc}); the manifest found it readable, "
                             "so this is retried: restore access, then rerun with --rerun-failed (to leave the video "
                             "out on purpose: `videofeat reduce --allow-partial`, or a manifest rebuilt without it)")
    differs = []
    if row.size_bytes is not None and size is not None and row.size_bytes != size:
        differs.append(f"size {row.size_bytes} -> {size} bytes")
    if row.mtime_ns is not None and mtime_ns is not None and row.mtime_ns != mtime_ns:
        differs.append(f"mtime {row.mtime_ns} -> {mtime_ns} ns")
    return _changed(uri, differs)


def check_opened(row: ManifestRow, info: Optional[Mapping[str, Any]]) -> Refusal:
    """Compare what the decoder reports on opening the file with the manifest's probe."""
    if not info:
        return None
    differs = []
    expected = row.fps
    if info.get("fps") and expected:
        got = float(Fraction(info["fps"]))
        if abs(got - expected) > FPS_TOLERANCE * expected:
            differs.append(f"frame rate {expected:g} -> {got:g} fps")
    # The frame count is not compared here: a header count that disagrees with the frames that
    # really decode is ``frame_count_mismatch`` (windows from the decoded frames, timed at the
    # same rate); a file replaced by one of another length is caught by its size and mtime.
    return _changed(row.uri, differs)


def _changed(uri: str, differs: list[str]) -> Refusal:
    if not differs:
        return None
    return CHANGED, f"{uri} differs from the manifest ({'; '.join(differs)}), no windows written: {REBUILD_MANIFEST_HINT}"

