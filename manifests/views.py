"""Camera views: one canonical spelling per view, for the AI City names and for any other.

The AI City views keep the spellings the seed's outputs use (``dashboard``, ``rear``,
``right``), whatever alias a file name, CSV or flag gives. Any other name a layout produces
(``default`` for a glob without a view group, ``front``, ``cam_2``, ...) is a view too: it is
lower-cased with spaces and dashes folded to ``_``, and must then be a safe file-name and
column-name part, because it names ``dataset/<view>.parquet`` and ``<view>_feature``.
"""

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


_VIEW_NAME = re.compile(r"^[a-z0-9][a-z0-9_]{0,63}$")


def aicity_view(name: str) -> Optional[str]:
    """The AI City view an alias names (``Rear``, ``Rearview``, ``Dash``, ...), or None."""
    key = re.sub(r"[\s-]+", "_", name.strip().lower())
    return _ALIASES.get(key) or _ALIASES.get(key.replace("_", ""))


def canonical_view(name: str) -> str:
    """The one spelling of a view every stage uses: an AI City alias maps to its canonical name,
    any other name is lower-cased with spaces and dashes as ``_``."""
    known = aicity_view(name)
    if known:
        return known
    key = re.sub(r"[\s-]+", "_", name.strip().lower())
    if not _VIEW_NAME.match(key):
        raise ValueError(
            f"view name {name!r} cannot name a file or column: use letters, digits and '_' "
            f"(at most 64), e.g. front or cam_2; the AI City views are {', '.join(CANONICAL_VIEWS)}"
        )
    return key


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
