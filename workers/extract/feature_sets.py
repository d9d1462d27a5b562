"""Feature sets: several backbones (or presets) extracted from one decode, listed in a TOML file.

```toml
[[set]]
name = "vith_k400"                   # OUT/vith_k400/ is this set's run directory
preset = "aicity-vith"
model = "auto"                       # optional, as --model
checkpoint = { rear = "ckpt/vith_rear.pt", dashboard = "ckpt/vith_dash.pt" }
[[set]]
name = "vitl_hybrid"
preset = "aicity-vitl"
checkpoint = "ckpt/hybrid_all_views.pt"   # one checkpoint for every view
size = 224                           # optional overrides, as the flags
```

Each set becomes the :class:`ExtractConfig` that ``videofeat extract -o OUT/<name>`` with the
same flags would build, so a set's run directory is an ordinary one (same fingerprint, same
rows) and the two ways of producing it can be mixed. Everything is checked before any work
starts; an error names the file, the set and the key.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional

from videofeat.manifests import fsutil
from videofeat.manifests.views import canonical_view
from videofeat.workers.extract.config import ExtractConfig
from videofeat.workers.extract.presets import PRESETS

# TOML key -> ExtractConfig field, for the per-set overrides (named as the flags are).
OVERRIDES = {"span": "span", "hop": "hop", "num_frames": "num_frames", "frame_step": "frame_step",
             "size": "size", "resize": "resize"}
KEYS = ("name", "preset", "model", "checkpoint", *OVERRIDES)
# Fields a set may give; all but resize describe one set only, so with --sets they belong in the
# file, not on the command line (--resize on the command line applies to every set).
PER_SET_FIELDS = ("preset", "model", "checkpoints", *OVERRIDES.values())
_FILE_ONLY = tuple(k for k in PER_SET_FIELDS if k != "resize")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class FeatureSet:
    """One ``[[set]]`` table: a backbone with its preset and overrides."""

    name: str
    preset: str
    model: str = "auto"
    checkpoints: tuple[tuple[str, str], ...] = ()
    span: Optional[int] = None
    hop: Optional[int] = None
    num_frames: Optional[int] = None
    frame_step: Optional[int] = None
    size: Optional[int] = None
    resize: Optional[str] = None


@dataclass(frozen=True)
class FeatureSets:
    """The sets of one launch: ``root/<name>`` is each set's run directory."""

    path: str
    root: str
    configs: tuple[tuple[str, Any], ...]  # (name, ExtractConfig)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.configs)


def _error(path: str, where: str, message: str) -> ValueError:
    return ValueError(f"{path}: {where}: {message}")


def _int(path: str, where: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _error(path, where, f"{key} must be an integer, got {value!r}")
    return value


def _checkpoints(path: str, where: str, value: Any) -> tuple[tuple[str, str], ...]:
    if isinstance(value, str):
        items = {"*": value}
    elif isinstance(value, Mapping):
        items = {}
        for view, ckpt in value.items():
            try:
                key = canonical_view(view)
            except ValueError as exc:
                raise _error(path, where, f"checkpoint.{view}: {exc}") from None
            if not isinstance(ckpt, str) or not ckpt:
                raise _error(path, where, f"checkpoint.{view} must be a path, got {ckpt!r}")
            items[key] = ckpt
    else:
        raise _error(path, where, "checkpoint must be a path or a table of view = path, "
                                  f"got {type(value).__name__}")
    for view, ckpt in items.items():
        fs, inner = fsutil.filesystem(ckpt)
        if not fs.exists(inner):
            key = "checkpoint" if view == "*" else f"checkpoint.{view}"
            raise _error(path, where, f"{key}: {ckpt} does not exist (relative paths are read from the "
                                      f"working directory, {os.getcwd()}, as --checkpoint is)")
    return tuple(sorted(items.items()))


def parse_feature_sets(path: str, data: Mapping[str, Any]) -> tuple[FeatureSet, ...]:
    """The ``[[set]]`` tables of a parsed TOML document, validated."""
    extra = sorted(set(data) - {"set"})
    if extra:
        raise ValueError(f"{path}: unknown top-level key(s) {', '.join(extra)}; the file lists [[set]] tables")
    tables = data.get("set")
    if not isinstance(tables, list) or not tables:
        raise ValueError(f"{path}: no [[set]] tables; each set needs at least name and preset")
    out: list[FeatureSet] = []
    seen: set[str] = set()
    for number, table in enumerate(tables, 1):
        name = table.get("name") if isinstance(table, Mapping) else None
        where = f"set {name!r}" if isinstance(name, str) else f"set #{number}"
        if not isinstance(table, Mapping):
            raise _error(path, where, "each [[set]] must be a table")
        unknown = sorted(set(table) - set(KEYS))
        if unknown:
            raise _error(path, where, f"unknown key(s) {', '.join(unknown)}; valid keys are {', '.join(KEYS)}")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise _error(path, where, f"name must be a folder name (letters, digits, _ . -), got {name!r}")
        if name in seen:
            raise _error(path, where, "name is used by an earlier set; each set needs its own run directory")
        seen.add(name)
        preset = table.get("preset")
        if preset not in PRESETS:
            raise _error(path, where, f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        model = table.get("model", "auto")
        if not isinstance(model, str) or not model:
            raise _error(path, where, f"model must be a registered model name or auto, got {model!r}")
        values: dict[str, Any] = {}
        for key, field_name in OVERRIDES.items():
            if key in table:
                value = table[key]
                if key == "resize":
                    from videofeat.workers.decode.resize import KERNELS

                    if value not in KERNELS:
                        raise _error(path, where, f"resize must be one of {', '.join(KERNELS)}, got {value!r}")
                else:
                    value = _int(path, where, key, value)
                values[field_name] = value
        checkpoints = _checkpoints(path, where, table["checkpoint"]) if "checkpoint" in table else ()
        if model == "auto" and not checkpoints:
            raise _error(path, where, "checkpoint is missing: model = \"auto\" reads the architecture from a "
                                      "checkpoint; add checkpoint = \"PATH\" or name a registered model")
        out.append(FeatureSet(name=name, preset=preset, model=model, checkpoints=checkpoints, **values))
    return tuple(out)


def _load(path: str) -> dict:
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:  # pragma: no cover - older Pythons
        import tomli as tomllib
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"--sets {path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None


def build_feature_sets(path: str, root: str, common_kwargs: Mapping[str, Any]) -> FeatureSets:
    """Read ``path`` and build each set's :class:`ExtractConfig` from ``common_kwargs``."""
    sets = parse_feature_sets(path, _load(path))
    defaults = {f.name: f.default for f in fields(ExtractConfig)}
    given = [k for k in _FILE_ONLY if k in common_kwargs and common_kwargs[k] not in (defaults[k], None, ())]
    if given:
        flags = ", ".join("--" + ("checkpoint" if k == "checkpoints" else k.replace("_", "-")) for k in given)
        raise ValueError(f"{flags} describe one feature set: with --sets {path} give them in each [[set]] table")
    configs = []
    for fset in sets:
        own = {k: getattr(fset, k) for k in PER_SET_FIELDS if getattr(fset, k) is not None}
        try:
            config = ExtractConfig(**{**common_kwargs, **own, "output": fsutil.join(root, fset.name)})
        except ValueError as exc:
            raise _error(path, f"set {fset.name!r}", str(exc)) from None
        configs.append((fset.name, config))
    # One decoder scaler serves every set: --resize fast cannot give two sizes from one decode.
    resizes = {c.resolved_preset().frame_resize for _, c in configs}
    if len(resizes) > 1 and any(r.fast for r in resizes):
        raise ValueError(f"{path}: resize = \"fast\" uses the decoder's own scaler, which gives one size per "
                         "decode; with sets of different presets or sizes use another resize kernel")
    return FeatureSets(os.path.abspath(path) if "://" not in path else path, root, tuple(configs))

