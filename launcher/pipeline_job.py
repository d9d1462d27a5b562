"""The job file of ``videofeat pipeline``: the whole job, from videos and CSVs to localizer files.

One TOML file says everything once: the datasets (a labelled training set with its annotation
CSVs and validation split, unlabelled test sets), the views, the feature sets (a preset, a
pretrained checkpoint and a fine-tuning recipe, or ready fine-tuned checkpoints per view), and
the exports. :func:`load_job` checks all of it before anything runs: an unknown key, a missing
file, a view the data does not have, two sets of one name are refused naming the file, the key
and the fix. Relative paths are read from the job file's folder. Imports neither torch nor timm.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from videofeat.manifests.discover import LAYOUTS
from videofeat.manifests.views import canonical_view

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
# Fine-tuning flags the pipeline itself supplies for every (set, view).
_FINETUNE_SUPPLIED = {"output", "labels", "manifest", "view", "checkpoint", "recipe", "train_list", "val_list",
                      "train_split", "val_split", "config", "log_level"}
# Fine-tuning flags that never change the weights a run ends with.
FINETUNE_NOT_OUTPUT = {"num_workers", "progress", "log_every", "auto_resume", "eval_every", "save_every"}
EXTRACT_KEYS = {"batch_size": int, "decode_procs": int, "device": str, "dtype": str, "decoder": str,
                "feature_dtype": str, "resize": str}
# Extraction options that never change a feature (the run fingerprint leaves them out too).
EXTRACT_NOT_OUTPUT = {"batch_size", "decode_procs", "device"}
MANIFEST_KEYS = {"shard_frames": int, "num_shards": int, "split_long_videos": bool, "min_frames": int,
                 "probe_procs": int}
EXPORT_FORMATS = ("actionformer", "npy", "multiview")


class JobFileError(ValueError):
    """A mistake in the job file; the message names the file, the key and the fix."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    root: str
    layout: str = "aicity"
    pattern: Optional[str] = None
    regex: Optional[str] = None
    annotations: Optional[str] = None  # the training set only: folder of annotation CSVs


@dataclass(frozen=True)
class SplitSpec:
    """The validation split of the training set: whole users, named or drawn."""

    val_users: tuple[str, ...] = ()
    val_fraction: Optional[float] = None
    seed: int = 0


@dataclass(frozen=True)
class SetSpec:
    """One backbone: extracted with ``preset``; fine-tuned per view unless ``checkpoints`` are given."""

    name: str
    preset: str
    model: str = "auto"
    pretrained: Optional[str] = None
    recipe: Optional[str] = None
    finetune: tuple[tuple[str, Any], ...] = ()   # recipe overrides, as the finetune flags
    checkpoints: tuple[tuple[str, str], ...] = ()  # ready fine-tuned weights: (view, path)
    overrides: tuple[tuple[str, Any], ...] = ()  # extraction overrides (span, hop, size, ...)

    @property
    def fine_tuned_here(self) -> bool:
        return not self.checkpoints


@dataclass(frozen=True)
class ExportSpec:
    name: str
    format: str
    sets: tuple[str, ...]
    output: str  # <output>/<set>/ per set
    prob_key: Optional[str] = None
    split_views: bool = False


@dataclass(frozen=True)
class JobFile:
    path: str
    views: tuple[str, ...]
    train: DatasetSpec
    tests: tuple[DatasetSpec, ...]
    split: SplitSpec
    sets: tuple[SetSpec, ...]
    exports: tuple[ExportSpec, ...]
    manifest: tuple[tuple[str, Any], ...] = ()
    finetune: tuple[tuple[str, Any], ...] = ()  # defaults of every fine-tune
    extract: tuple[tuple[str, Any], ...] = ()
    plots: bool = True

    @property
    def datasets(self) -> tuple[DatasetSpec, ...]:
        return (self.train, *self.tests)

    def set(self, name: str) -> SetSpec:
        return next(s for s in self.sets if s.name == name)


@dataclass
class _Reader:
    """Reads one table of the file, remembering which keys it used, so the rest are unknown."""

    path: str
    where: str
    table: Mapping[str, Any]
    base: str
    used: set = field(default_factory=set)

    def fail(self, key: str, message: str) -> JobFileError:
        return JobFileError(f"{self.path}: {self.where}{key}: {message}")

    def get(self, key: str, kind: Any, default: Any = None, required: bool = False) -> Any:
        self.used.add(key)
        if key not in self.table:
            if required:
                raise self.fail(key, f"is missing; add {key} = ... to [{self.where.rstrip('.') or 'top level'}]")
            return default
        value = self.table[key]
        ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.fail(key, f"must be {names}, got {value!r}")
        return value

    def path_of(self, key: str, required: bool = False, must_exist: bool = True) -> Optional[str]:
        value = self.get(key, str, required=required)
        if value is None:
            return None
        full = value if "://" in value else os.path.normpath(os.path.join(self.base, os.path.expanduser(value)))
        if must_exist and "://" not in full and not os.path.exists(full):
            raise self.fail(key, f"{full} does not exist (relative paths are read from the job file's folder, "
                                 f"{self.base}); fix the path")
        return full

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise self.fail(unknown[0], f"unknown key; valid keys here are {', '.join(sorted(self.used))}")


def _views(reader: _Reader) -> tuple[str, ...]:
    raw = reader.get("views", list, required=True)
    out = []
    for item in raw:
        try:
            out.append(canonical_view(str(item)))
        except ValueError as exc:
            raise reader.fail("views", f"{exc}") from None
    if not out or len(set(out)) != len(out):
        raise reader.fail("views", f"must list distinct views, e.g. [\"rear\", \"dashboard\"], got {raw!r}")
    return tuple(out)


def _dataset(path: str, base: str, name: str, table: Any, where: str, labelled: bool) -> DatasetSpec:
    if not isinstance(table, Mapping):
        raise JobFileError(f"{path}: {where}: must be a table")
    r = _Reader(path, where + ".", table, base)
    layout = r.get("layout", str, "aicity")
    if layout not in LAYOUTS:
        raise r.fail("layout", f"must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    spec = DatasetSpec(name=name, root=r.path_of("root", required=True), layout=layout,
                       pattern=r.get("pattern", str), regex=r.get("regex", str),
                       annotations=r.path_of("annotations", required=True) if labelled else None)
    if labelled:
        r.used |= {"val_users", "val_fraction", "split_seed"}
    r.done()
    return spec


def _split(path: str, base: str, table: Mapping[str, Any]) -> SplitSpec:
    r = _Reader(path, "train.", table, base)
    users = r.get("val_users", list, [])
    fraction = r.get("val_fraction", float)
    if users and fraction is not None:
        raise r.fail("val_fraction", "give val_users or val_fraction, not both")
    if not users and fraction is None:
        raise r.fail("val_users", "the validation split is missing: add val_users = [\"ID\", ...] (whole users) "
                                  "or val_fraction = 0.2")
    if fraction is not None and not 0 < fraction < 1:
        raise r.fail("val_fraction", f"must be between 0 and 1, got {fraction}")
    return SplitSpec(tuple(str(u) for u in users), fraction, r.get("split_seed", int, 0))


def _typed_table(path: str, base: str, name: str, table: Any, keys: Mapping[str, type]) -> tuple:
    if table is None:
        return ()
    if not isinstance(table, Mapping):
        raise JobFileError(f"{path}: [{name}] must be a table")
    r = _Reader(path, name + ".", table, base)
    values = {k: r.get(k, kind) for k, kind in keys.items() if k in table}
    r.done()
    return tuple(sorted(values.items()))


def finetune_flags() -> dict[str, Any]:
    """Fine-tuning flag names (dest) a job file may set, with their argparse types."""
    import argparse

    from videofeat.launcher import finetune as finetune_cmd

    parser = argparse.ArgumentParser()
    finetune_cmd.add_arguments(parser)
    out = {}
    for action in parser._actions:  # the parser is ours: read its destinations and types
        if action.dest in _FINETUNE_SUPPLIED or action.dest == "help":
            continue
        out[action.dest] = action.type or (bool if action.nargs == 0 else str)
    return out


def _finetune_table(path: str, where: str, table: Any, flags: Mapping[str, Any]) -> tuple:
    if table is None:
        return ()
    if not isinstance(table, Mapping):
        raise JobFileError(f"{path}: {where} must be a table of fine-tuning flags")
    out = {}
    for key, value in table.items():
        dest = key.replace("-", "_")
        if dest not in flags:
            supplied = " (the pipeline sets it)" if dest in _FINETUNE_SUPPLIED else ""
            raise JobFileError(f"{path}: {where}.{key}: unknown fine-tuning key{supplied}; valid keys are the "
                               f"flags of `videofeat finetune --help`: {', '.join(sorted(flags))}")
        kind = flags[dest]
        ok = {int: isinstance(value, int) and not isinstance(value, bool),
              float: isinstance(value, (int, float)) and not isinstance(value, bool),
              bool: isinstance(value, bool)}.get(kind, isinstance(value, (str, int, float)) and not isinstance(value, bool))
        if not ok:
            name = kind.__name__ if kind in (int, float, bool) else "str"
            raise JobFileError(f"{path}: {where}.{key}: must be {name} (as `videofeat finetune --{dest.replace('_', '-')}` "
                               f"takes), got {value!r}")
        out[dest] = value
    return tuple(sorted(out.items()))


def _set(path: str, base: str, table: Any, number: int, views: tuple[str, ...], flags: Mapping[str, Any]) -> SetSpec:
    from videofeat.launcher.finetune_recipes import RECIPES
    from videofeat.workers.extract.feature_sets import OVERRIDES
    from videofeat.workers.extract.presets import PRESETS

    name = table.get("name") if isinstance(table, Mapping) else None
    where = f"set {name!r}." if isinstance(name, str) else f"set #{number}."
    if not isinstance(table, Mapping):
        raise JobFileError(f"{path}: {where} each [[set]] must be a table")
    r = _Reader(path, where, table, base)
    name = r.get("name", str, required=True)
    if not _NAME.fullmatch(name):
        raise r.fail("name", f"must be a folder name (letters, digits, _ -), got {name!r}")
    preset = r.get("preset", str, required=True)
    if preset not in PRESETS:
        raise r.fail("preset", f"must be one of {', '.join(PRESETS)}, got {preset!r}")
    model = r.get("model", str, "auto")
    overrides = {k: r.get(k, str if k == "resize" else int) for k in OVERRIDES if k in table}
    r.used.add("checkpoint")
    ready: dict[str, str] = {}
    if "checkpoint" in table:
        given = table["checkpoint"]
        if not isinstance(given, Mapping):
            raise r.fail("checkpoint", "must be a table of view = path, one fine-tuned checkpoint per view, "
                                       "e.g. checkpoint = { rear = \"rear.pt\", dashboard = \"dash.pt\" }")
        sub = _Reader(path, where + "checkpoint.", given, base)
        for view in given:
            try:
                canonical = canonical_view(view)
            except ValueError as exc:
                raise sub.fail(view, str(exc)) from None
            if canonical not in views:
                raise sub.fail(view, f"view {canonical} is not one of the job's views ({', '.join(views)}); "
                                     "remove it or add it to views")
            ready[canonical] = sub.path_of(view)
        missing = [v for v in views if v not in ready]
        if missing:
            raise r.fail("checkpoint", f"has no checkpoint for view(s) {', '.join(missing)}; add "
                                       f"{missing[0]} = \"PATH\" or fine-tune instead (pretrained + recipe)")
    recipe = r.get("recipe", str)
    pretrained = r.path_of("pretrained")
    r.used.add("finetune")
    if ready and (recipe or pretrained or "finetune" in table):
        raise r.fail("checkpoint", "ready fine-tuned checkpoints and fine-tuning (pretrained, recipe, finetune) "
                                   "exclude each other; keep one")
    if not ready:
        if recipe is None:
            raise r.fail("recipe", f"is missing: give recipe = one of {', '.join(RECIPES)} with pretrained = "
                                   "\"PATH\", or ready fine-tuned checkpoint = { VIEW = \"PATH\" }")
        if recipe not in RECIPES:
            raise r.fail("recipe", f"must be one of {', '.join(RECIPES)}, got {recipe!r}")
    r.done()
    return SetSpec(name=name, preset=preset, model=model, pretrained=pretrained, recipe=recipe,
                   finetune=_finetune_table(path, f"set {name!r}.finetune", table.get("finetune"), flags),
                   checkpoints=tuple(sorted(ready.items())), overrides=tuple(sorted(overrides.items())))


def _export(path: str, base: str, table: Any, number: int, set_names: tuple[str, ...]) -> ExportSpec:
    name = table.get("name") if isinstance(table, Mapping) else None
    where = f"export {name!r}." if isinstance(name, str) else f"export #{number}."
    if not isinstance(table, Mapping):
        raise JobFileError(f"{path}: {where} each [[export]] must be a table")
    r = _Reader(path, where, table, base)
    fmt = r.get("format", str, "actionformer")
    if fmt not in EXPORT_FORMATS:
        raise r.fail("format", f"must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    name = r.get("name", str, fmt)
    if not _NAME.fullmatch(name):
        raise r.fail("name", f"must be a folder name (letters, digits, _ -), got {name!r}")
    sets = tuple(r.get("sets", list, list(set_names)))
    for s in sets:
        if s not in set_names:
            raise r.fail("sets", f"names set {s!r}, which is not a [[set]] of the job ({', '.join(set_names)})")
    prob_key = r.get("prob_key", str)
    if prob_key not in (None, "a_prob", "pred"):
        raise r.fail("prob_key", f"must be a_prob or pred, got {prob_key!r}")
    spec = ExportSpec(name=name, format=fmt, sets=sets, output=r.path_of("output", required=True, must_exist=False),
                      prob_key=prob_key, split_views=r.get("split_views", bool, False))
    r.done()
    return spec


def _load_toml(path: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"job file {path} does not exist; `videofeat pipeline --example > job.toml` "
                                "writes one to start from") from None
    except tomllib.TOMLDecodeError as exc:
        raise JobFileError(f"{path}: not valid TOML: {exc}") from None


def load_job(path: str, base_dir: Optional[str] = None) -> JobFile:
    """Parse and check the job file at ``path`` (relative paths from ``base_dir``, default its folder)."""
    path = os.path.abspath(path)
    data = _load_toml(path)
    base = os.path.abspath(base_dir or os.path.dirname(path))
    top = _Reader(path, "", data, base)
    views = _views(top)
    train_table = top.get("train", dict, required=True)
    train = _dataset(path, base, "train", train_table, "train", labelled=True)
    split = _split(path, base, train_table)
    tests = []
    for number, table in enumerate(top.get("test", list, []), 1):
        name = table.get("name", f"test{number}") if isinstance(table, Mapping) else f"test{number}"
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name == "train":
            raise JobFileError(f"{path}: test #{number}.name: must be a folder name other than train, got {name!r}")
        if name in {t.name for t in tests}:
            raise JobFileError(f"{path}: test {name!r}.name: is used by an earlier [[test]]; give each its own name")
        tests.append(_dataset(path, base, name, {k: v for k, v in table.items() if k != "name"},
                              f"test {name!r}", labelled=False))
    flags = finetune_flags()
    raw_sets = top.get("set", list, required=True)
    sets: list[SetSpec] = []
    for number, table in enumerate(raw_sets, 1):
        spec = _set(path, base, table, number, views, flags)
        if spec.name in {s.name for s in sets}:
            raise JobFileError(f"{path}: set {spec.name!r}.name: is used by an earlier [[set]]; each set needs its "
                               "own name (it names the set's run directory and export folder)")
        sets.append(spec)
    names = tuple(s.name for s in sets)
    exports: list[ExportSpec] = []
    for number, table in enumerate(top.get("export", list, []), 1):
        spec = _export(path, base, table, number, names)
        if spec.name in {e.name for e in exports}:
            raise JobFileError(f"{path}: export {spec.name!r}.name: is used by an earlier [[export]]; name each")
        exports.append(spec)
    job = JobFile(path=path, views=views, train=train, tests=tuple(tests), split=split, sets=tuple(sets),
                  exports=tuple(exports),
                  manifest=_typed_table(path, base, "manifest", top.get("manifest", dict), MANIFEST_KEYS),
                  finetune=_finetune_table(path, "finetune", top.get("finetune", dict), flags),
                  extract=_typed_table(path, base, "extract", top.get("extract", dict), EXTRACT_KEYS),
                  plots=top.get("plots", bool, True))
    top.done()
    return job
