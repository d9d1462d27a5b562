"""What the reducer and the exports read from a run's ``run.json``, and the command that reruns it.

``run.json`` is written by ``videofeat extract``; this module reads it defensively: each key is
looked up at the top level, under ``config``, under ``config.preset`` and in the fingerprint
parts, so a writer may nest its keys either way.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Any, Optional

from videofeat.manifests.ledger import RunDir
from videofeat.manifests.views import canonical_view


def expected_windows(frames: int, span: int, hop: int) -> int:
    """Window count of a video of ``frames`` decoded frames (windows start at 0, every ``hop``)."""
    return max(0, (int(frames) - span) // hop + 1)


@dataclass(frozen=True)
class RunInfo:
    """What the reducer needs from ``run.json``, read defensively (writers may nest keys)."""

    run_url: str
    fingerprint: str
    manifest: str
    views: tuple[str, ...]
    span: int
    hop: int
    num_frames: Optional[int]
    step: Optional[int]
    feature_dim: Optional[int]
    num_classes: Optional[int]
    run: dict = field(repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.span < 1 or self.hop < 1:
            raise ValueError(f"{self.run_url}/run.json: preset span and hop must be >= 1 "
                             f"(got span={self.span}, hop={self.hop})")


def _lookup(run: dict, key: str) -> Any:
    """``key`` from run.json's top level, its config, or wherever the sampling parameters sit."""
    config = run.get("config") or {}
    for place in (run, config, run.get("sampling"), config.get("sampling"), config.get("preset"), run.get("preset"),
                  (run.get("fingerprint_parts") or {}).get("preset"), run.get("fingerprint_parts")):
        if isinstance(place, dict) and place.get(key) is not None:
            return place[key]
    return None


def load_run_info(run_dir: RunDir, manifest_override: Optional[str] = None) -> RunInfo:
    run = run_dir.load_run()
    if run is None:
        raise FileNotFoundError(f"{run_dir.run_json} does not exist: is {run_dir.url} a videofeat run "
                                "directory? (`videofeat extract MANIFEST -o RUN_DIR` creates one)")
    manifest = manifest_override or _lookup(run, "manifest") or _lookup(run, "manifest_path")
    if not manifest:
        raise ValueError(f"{run_dir.run_json} names no manifest: pass --manifest MANIFEST.parquet")
    span = _lookup(run, "span")
    hop = _lookup(run, "hop")
    if span is None or hop is None:
        raise ValueError(f"{run_dir.run_json} has no preset span/hop (config.preset.span, config.preset.hop); "
                         "was it written by `videofeat extract`?")
    views = _lookup(run, "views") or ()
    if isinstance(views, str):
        views = views.split(",")
    return RunInfo(
        run_url=run_dir.url, fingerprint=run["fingerprint"], manifest=str(manifest),
        views=tuple(canonical_view(v) for v in views), span=int(span), hop=int(hop),
        num_frames=_maybe_int(_lookup(run, "num_frames")), step=_maybe_int(_lookup(run, "step")),
        feature_dim=_maybe_int(_lookup(run, "feature_dim")),
        num_classes=_maybe_int(_lookup(run, "num_classes")), run=run,
    )


def _maybe_int(value: Any) -> Optional[int]:
    return None if value is None else int(value)


# (config key, flag, default): the extraction flags that change features; speed flags are left out.
_FEATURE_FLAGS = (("model", "--model", None), ("span", "--span", None), ("hop", "--hop", None),
                  ("num_frames", "--num-frames", None), ("frame_step", "--frame-step", None),
                  ("size", "--size", None), ("resize", "--resize", "bounded"), ("decoder", "--decoder", "pyav"),
                  ("dtype", "--dtype", "auto"), ("feature_dtype", "--feature-dtype", "float32"))


def rerun_command(info: RunInfo, rerun_failed: bool = False) -> str:
    """``videofeat extract`` with the run's own flags: a plain rerun computes only what is missing."""
    config = info.run.get("config") or {}
    words = ["videofeat", "extract", str(config.get("manifest") or info.manifest), "-o", info.run_url]
    preset = config.get("preset") or info.run.get("preset")
    name = preset.get("name") if isinstance(preset, dict) else preset
    if name:
        words += ["--preset", str(name)]
    for key, flag, default in _FEATURE_FLAGS:
        value = config.get(key)
        if value is not None and value != default:
            words += [flag, str(value)]
    views = config.get("views")
    if views:
        words += ["--views", ",".join(views) if isinstance(views, (list, tuple)) else str(views)]
    checkpoints = config.get("checkpoints")
    if isinstance(checkpoints, dict) and checkpoints:
        for view, path in sorted(checkpoints.items()):
            words += ["--checkpoint", path if view == "*" else f"{view}={path}"]
    elif config.get("seed"):
        words += ["--seed", str(config["seed"])]
    if rerun_failed:
        words.append("--rerun-failed")
    return shlex.join(words)
