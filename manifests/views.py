"""Camera views: one canonical spelling, and every spelling the seed's scripts and CSVs used."""

from __future__ import annotations

import re
from typing import Iterable, Optional

DASHBOARD = "dashboard"
REAR = "rear"
RIGHT = "right"
CANONICAL_VIEWS = (DASHBOARD, REAR, RIGHT)

# File-name prefixes of the AI City layout, per canonical view.
AICITY_PREFIX = {DASHBOARD: "Dashboard", REAR: "Rear_view", RIGHT: "Right_side_window"}

_ALIASES = {
    "dashboard": DASHBOARD,
    "dash": DASHBOARD,
    "rear": REAR,
    "rearview": REAR,
    "rear_view": REAR,
    "right": RIGHT,
    "right_side_window": RIGHT,
    "rightside": RIGHT,
    "rightsidewindow": RIGHT,
}


def canonical_view(name: str) -> str:
    """Map any accepted spelling of a view (``Rear``, ``Rearview``, ``Dash``, ...) to its name."""
    key = re.sub(r"[\s-]+", "_", name.strip().lower())
    if key in _ALIASES:
        return _ALIASES[key]
    squeezed = key.replace("_", "")
    if squeezed in _ALIASES:
        return _ALIASES[squeezed]
    raise ValueError(
        f"unknown view {name!r}: use one of {', '.join(CANONICAL_VIEWS)} "
        "(the seed's spellings Dash, Rear, Rearview, Right are accepted too)"
    )


def maybe_canonical_view(name: str) -> Optional[str]:
    try:
        return canonical_view(name)
    except ValueError:
        return None


def parse_views(spec: Optional[str | Iterable[str]]) -> Optional[tuple[str, ...]]:
    """``"rear,Dash"`` -> ``("rear", "dashboard")``; None or empty means every view."""
    if spec is None:
        return None
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    views = tuple(dict.fromkeys(canonical_view(v) for v in items if v.strip()))
    return views or None
