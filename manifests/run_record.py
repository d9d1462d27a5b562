"""``run.json``: what an extraction run is, written once by rank 0 and read by every later stage.

Extraction (``workers/extract/setup.py``) writes it through :meth:`RunDir.initialize`; the
reducer, ``status`` and the exports read it here, as one typed record, and nowhere else.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from videofeat.manifests.views import canonical_view
from videofeat.manifests.windows import Sampling


class RunRecordError(ValueError):
    """run.json is missing a field every stage needs."""


@dataclass(frozen=True)
class RunRecord:
    """The typed contents of ``RUN_DIR/run.json``."""

    url: str
    fingerprint: str
    manifest: str
    views: tuple[str, ...]
    sampling: Sampling
    feature_dim: Optional[int]
    num_classes: Optional[int]
    preset: Optional[str] = None
    model: Optional[str] = None
    config: Mapping[str, Any] = field(default_factory=dict, repr=False)
    fingerprint_parts: Mapping[str, Any] = field(default_factory=dict, repr=False)
    body: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, body: Mapping[str, Any], url: str) -> "RunRecord":
        where = f"{url}/run.json"
        missing = [k for k in ("fingerprint", "manifest", "sampling") if not body.get(k)]
        if missing:
            raise RunRecordError(f"{where} lacks {', '.join(missing)}: it was not written by `videofeat extract` "
                                 "(or by an older version); extract into a new run directory")
        sampling = body["sampling"]
        try:
            sampling = Sampling(int(sampling["span"]), int(sampling["hop"]), int(sampling["num_frames"]),
                                int(sampling["step"]))
        except (KeyError, TypeError, ValueError) as error:
            raise RunRecordError(f"{where}: sampling {sampling!r} is not span/hop/num_frames/step ({error})") from None
        views = body.get("views") or ()
        preset = body.get("preset")
        return cls(url=url, fingerprint=str(body["fingerprint"]), manifest=str(body["manifest"]),
                   views=tuple(canonical_view(v) for v in views), sampling=sampling,
                   feature_dim=_maybe_int(body.get("feature_dim")), num_classes=_maybe_int(body.get("num_classes")),
                   preset=preset if isinstance(preset, str) else None, model=body.get("model"),
                   config=dict(body.get("config") or {}), fingerprint_parts=dict(body.get("fingerprint_parts") or {}),
                   body=dict(body))

    @property
    def span(self) -> int:
        return self.sampling.span

    @property
    def hop(self) -> int:
        return self.sampling.hop

    def with_manifest(self, manifest: Optional[str]) -> "RunRecord":
        """The same record reading another manifest path (the manifest moved since extraction)."""
        if not manifest:
            return self
        return RunRecord(**{**self.__dict__, "manifest": manifest})

    def rerun_command(self, rerun_failed: bool = False) -> str:
        """``videofeat extract`` with the run's own flags: a plain rerun computes only what is missing."""
        config = self.config
        words = ["videofeat", "extract", str(config.get("manifest") or self.manifest), "-o", self.url]
        name = config.get("preset") or self.preset
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


def _maybe_int(value: Any) -> Optional[int]:
    return None if value is None else int(value)


# (config key, flag, default): the extraction flags that change features; speed flags are left out.
_FEATURE_FLAGS = (("model", "--model", None), ("span", "--span", None), ("hop", "--hop", None),
                  ("num_frames", "--num-frames", None), ("frame_step", "--frame-step", None),
                  ("size", "--size", None), ("resize", "--resize", "bounded"), ("decoder", "--decoder", "pyav"),
                  ("dtype", "--dtype", "auto"), ("feature_dtype", "--feature-dtype", "float32"))
