"""What an extraction run needs before its first shard: manifest rows, models, the run record.

Kept apart from the per-rank loop so the loop reads as a loop. One run is one backbone: every
view's checkpoint must give the same architecture, feature size and classes (the seed's six
feature sets are three runs of two views each).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from typing import Any, Optional, Sequence

from videofeat import __version__, version_major_minor
from videofeat.manifests import fsutil
from videofeat.manifests.manifest import ManifestRow, manifest_fingerprint, read_manifest, read_manifest_rows
from videofeat.manifests.views import canonical_view

log = logging.getLogger(__name__)


def load_manifest_rows(path: str, views: Optional[Sequence[str]]) -> tuple[dict[int, list[ManifestRow]], str]:
    """Rows with a shard (ok videos), grouped by shard id in manifest order; and the fingerprint."""
    table = read_manifest(path)
    by_shard: dict[int, list[ManifestRow]] = {}
    for row in read_manifest_rows(table):
        if row.shard_id is None or (views and row.view not in views):
            continue
        by_shard.setdefault(row.shard_id, []).append(row)
    for shard_id, rows in by_shard.items():
        if len({r.view for r in rows}) > 1:
            raise ValueError(f"{path}: shard {shard_id} mixes views; rebuild the manifest with `videofeat manifest`")
    if not by_shard:
        present = sorted({row["view"] for row in table.select(["view"]).to_pylist()})
        raise ValueError(f"{path} has no ok videos" + (f" for --views {','.join(views)} (its views: "
                                                       f"{', '.join(present) or 'none'})" if views else ""))
    return by_shard, manifest_fingerprint(table)


def parse_checkpoints(specs: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``["rear=a.pt", "dashboard=b.pt"]`` or ``["all.pt"]`` -> ((view or "*", path), ...)."""
    out: dict[str, str] = {}
    for spec in specs:
        head, sep, tail = spec.partition("=")
        key, path = (canonical_view(head), tail) if sep and "/" not in head and head else ("*", spec)
        if not path:
            raise ValueError(f"--checkpoint {spec!r}: expected VIEW=PATH or PATH")
        if key in out:
            raise ValueError(f"--checkpoint given twice for {'all views' if key == '*' else key}")
        out[key] = path
    return tuple(sorted(out.items()))


class ModelSet:
    """The model of every view in use (views sharing a checkpoint share a model), on this rank's device."""

    def __init__(self, config: Any, preset: Any, views: Sequence[str], local_rank: int = 0):
        from videofeat.workers.distributed import resolve_device
        from videofeat.workers.extract.inference import resolve_dtype

        self.config = config
        self.preset = preset
        self.device = resolve_device(config.device, local_rank)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.checkpoints = dict(config.checkpoints)
        self.paths: dict[str, Optional[str]] = {}
        for view in views:
            path = self.checkpoints.get(view, self.checkpoints.get("*"))
            if self.checkpoints and path is None:
                raise ValueError(f"--checkpoint: no checkpoint for view {view!r}; pass --checkpoint {view}=PATH "
                                 "or one checkpoint for all views")
            self.paths[view] = path
        self._models: dict[Optional[str], Any] = {}
        self._runners: dict[str, Any] = {}
        self._sha: dict[str, str] = {}
        for view in views:
            self._model(self.paths[view])
        first = next(iter(self._models.values()))
        self.arch = dict(first.arch)
        self.feature_dim = int(first.num_features)
        self.num_classes = int(first.num_classes)
        for path, model in self._models.items():
            arch = {k: v for k, v in dict(model.arch).items() if k != "num_classes"}
            if arch != {k: v for k, v in self.arch.items() if k != "num_classes"} or \
                    model.num_classes != self.num_classes:
                raise ValueError(f"--checkpoint {path} has another architecture than {self.paths[views[0]]}: one "
                                 "run extracts one backbone; run each backbone into its own run directory")

    def _model(self, path: Optional[str]) -> Any:
        if path in self._models:
            return self._models[path]
        import torch

        from videofeat.models import create_model, sha256_of

        s = self.preset.sampling
        overrides = {"num_frames": s.num_frames, "img_size": self.preset.size}
        if path is None:
            log.warning("no --checkpoint: %s runs with random weights (seed %d); its features only serve "
                        "tests and timing", self.config.model, self.config.seed)
            torch.manual_seed(self.config.seed)  # random weights, identical on every rank
            model = create_model(self.config.model, **overrides)
        else:
            model = create_model(self.config.model, checkpoint=path, **overrides)
            self._sha[path] = sha256_of(path)
        self._models[path] = model.eval()
        return model

    def runner(self, view: str) -> Any:
        from videofeat.workers.extract.inference import BatchRunner

        if view not in self._runners:
            model = self._models[self.paths[view]]
            self._runners[view] = BatchRunner(model, self.device, self.dtype, self.preset.mean, self.preset.std)
        return self._runners[view]

    def checkpoint_record(self) -> dict:
        return {key: {"path": path, "sha256": self._sha[path]} for key, path in self.checkpoints.items()
                if path in self._sha}

    def lineage(self, view: str) -> dict:
        path = self.paths[view]
        return {"model": self.config.model, "arch": self.arch, "view": view, "checkpoint": path,
                "checkpoint_sha256": self._sha.get(path) if path else None, "dtype": self.dtype,
                "feature_dtype": self.config.feature_dtype, "videofeat_version": __version__,
                "decoder": self.config.decoder, "resize": self.config.resize,
                "sampling": asdict(self.preset.sampling)}

    def expected_windows(self, rows: Sequence[ManifestRow]) -> int:
        s = self.preset.sampling
        return sum(len(s.windows_starting_in(r.piece_start_frame, r.piece_stop, r.num_frames)) for r in rows)


def build_run_record(config: Any, preset: Any, models: ModelSet, manifest_fp: str) -> tuple[dict, dict, dict]:
    """(fingerprint parts, resolved config, extra run.json fields) for ``RunDir.initialize``."""
    views = sorted(models.paths)
    parts = {
        "manifest_fingerprint": manifest_fp, "views": views, "model": config.model, "arch": models.arch,
        "checkpoints": {v: models._sha.get(p) if p else f"random-init-seed-{config.seed}"
                        for v, p in sorted(models.paths.items())},
        "preset": preset.to_dict(), "compute_dtype": models.dtype, "feature_dtype": config.feature_dtype,
        "videofeat": version_major_minor(),
        # Both decoders give bit-identical frames; only the in-decoder (fast) scaler differs.
        "decoder_scaler": config.decoder if config.resize == "fast" else "exact",
    }
    manifest = config.manifest
    fs, inner = fsutil.filesystem(manifest)
    if fsutil.is_local(fs):
        manifest = os.path.abspath(inner)
    cfg = asdict(config)
    cfg["checkpoints"] = dict(config.checkpoints)
    extra = {"manifest": manifest, "manifest_fingerprint": manifest_fp, "views": views,
             "checkpoints": models.checkpoint_record(), "preset": preset.name, "sampling": asdict(preset.sampling),
             "preprocessing": preset.to_dict(), "model": config.model, "arch": models.arch,
             "dtype": models.dtype, "feature_dtype": config.feature_dtype, "feature_dim": models.feature_dim,
             "num_classes": models.num_classes, "videofeat_version": __version__}
    return parts, cfg, extra


class Progress:
    """Windows/s and ETA for the whole launch: ranks add to a shared counter; local rank 0 shows it.

    A multi-set launch (``sets``) also logs this rank's windows/s per set and decoded frames/s.
    """

    LOG_EVERY_S = 30.0

    def __init__(self, total: int, dist: Any, plan_id: str, enabled: bool = True, sets: Sequence[str] = ()):
        self.total = total
        self.counter = dist.counter(f"videofeat/windows/{plan_id}")
        self.show = enabled and dist.info.local_rank == 0
        self.started = self._last_log = time.monotonic()
        self.bar = None
        if self.show:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="win", desc="extract", disable=None, smoothing=0.1)
        self._mine = 0
        self._per_set = {name: 0 for name in sets}
        self._frames = 0

    def windows(self, name: str, count: int) -> None:
        """``count`` windows of set ``name`` were computed."""
        if name in self._per_set:
            self._per_set[name] += count
        self.update(count)

    def frames(self, count: int) -> None:
        self._frames += count

    def update(self, windows: int) -> None:
        self._mine += windows
        done = self.counter.add(windows)
        if self.bar is not None and not self.bar.disable:
            self.bar.update(max(0, done - self.bar.n))
        now = time.monotonic()
        if now - self._last_log >= self.LOG_EVERY_S:
            self._last_log = now
            elapsed = max(now - self.started, 1e-9)
            rate = done / elapsed
            eta = (self.total - done) / rate if rate > 0 else float("inf")
            log.info("%d/%d windows (%.1f windows/s over all ranks, ETA %.0f s; this rank %d)", done, self.total,
                     rate, eta, self._mine)
            if self._per_set:
                log.info("this rank: %.1f decoded frames/s; windows/s per set: %s", self._frames / elapsed,
                         ", ".join(f"{n} {c / elapsed:.1f}" for n, c in self._per_set.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
