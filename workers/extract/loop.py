"""The per-rank extraction loop: plan, claim shards, decode, infer, write, commit.

Rank 0 records the run (``run.json``, refusing a different fingerprint) and freezes a plan of
the incomplete shards; the plan id is broadcast once, and from then on ranks claim shard ids
through the rendezvous store's counter, with no collective. A SLURM array task instead runs the
shard ids that an existing plan lists at its index. Each shard is committed through the ledger
(Parquet under a temporary name, stats, marker last); a shard that raises gets an ``error``
record and the rank moves on; SIGTERM/SIGUSR2 stop at the next batch with an ``interrupted``
record and no marker.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from videofeat.manifests.fingerprint import compute_fingerprint
from videofeat.manifests.ledger import (FingerprintMismatch, RerunPolicy, RunDir, process_identity, shard_name,
                                        utc_now)
from videofeat.manifests.set_root import write_set_root

from videofeat.workers.decode.pool import DecodePool, PoolConfig, frame_spec
from videofeat.workers.distributed import Distributed
from videofeat.workers.extract.feature_sets import FeatureSets
from videofeat.workers.signals import StopSignals
from videofeat.workers.extract.presets import resolve_preset
from videofeat.workers.extract.setup import ModelSet, Progress, build_run_record, load_manifest_rows
from videofeat.workers.shard_io import ShardWriter, shard_schema
from videofeat.workers.extract.pipeline import Interrupted, ShardOutput, ShardPipeline

log = logging.getLogger(__name__)
EXIT_INTERRUPTED = 143


@dataclass(frozen=True)
class ExtractConfig:
    """Everything ``videofeat extract`` needs; validated here so errors name the flag."""

    manifest: str
    output: str
    preset: str = "aicity-vitl"
    model: str = "auto"
    checkpoints: tuple[tuple[str, str], ...] = ()
    views: Optional[tuple[str, ...]] = None
    span: Optional[int] = None
    hop: Optional[int] = None
    num_frames: Optional[int] = None
    frame_step: Optional[int] = None
    size: Optional[int] = None
    resize: str = "exact"
    decoder: str = "pyav"
    decode_procs: int = 2
    decode_threads: int = 1
    decode_stall_s: float = 120.0
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 16
    feature_dtype: str = "float32"
    max_attempts: int = 3
    rerun_failed: bool = False
    overwrite: bool = False
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        from videofeat.workers.decode.decoders import BACKENDS

        if self.resize not in ("exact", "fast"):
            raise ValueError(f"--resize must be 'exact' or 'fast', got {self.resize!r}")
        if self.decoder not in BACKENDS:
            raise ValueError(f"--decoder must be one of {', '.join(BACKENDS)}, got {self.decoder!r}")
        if self.feature_dtype not in ("float32", "float16"):
            raise ValueError(f"--feature-dtype must be float32 or float16, got {self.feature_dtype!r}")
        if self.model == "auto" and not self.checkpoints:
            raise ValueError("--model auto reads the architecture from a checkpoint: pass --checkpoint "
                             "(VIEW=PATH or PATH), or name a model such as videomae_vit_large_patch16_224")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        RerunPolicy(self.rerun_failed, self.overwrite, self.max_attempts)
        PoolConfig(self.decode_procs, self.decode_stall_s, self.decoder, self.decode_threads)
        self.resolved_preset()

    def resolved_preset(self):
        return resolve_preset(self.preset, span=self.span, hop=self.hop, num_frames=self.num_frames,
                              step=self.frame_step, size=self.size, fast_resize=self.resize == "fast")

    @property
    def policy(self) -> RerunPolicy:
        return RerunPolicy(self.rerun_failed, self.overwrite, self.max_attempts)


class _ShardLog:
    """Mirror the log into ``RUN_DIR/logs/<shard>.<attempt>.log`` while a shard runs."""

    def __init__(self, run: RunDir, shard_id: int, attempt: int, rank: int):
        from videofeat.manifests import fsutil

        self.run, self.path = run, run.log_path(shard_id, attempt)
        self.local = fsutil.is_local(run.fs)
        run.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        if self.local:
            self.handler: logging.Handler = logging.FileHandler(self.path)
        else:
            import io

            self._buffer = io.StringIO()
            self.handler = logging.StreamHandler(self._buffer)
            run.fs.pipe_file(self.path, b"")  # the attempt is visible at once
        # The console's format (launcher/logs.py), so a shard log reads like the rank's output.
        console = next((h.formatter for h in logging.getLogger().handlers if h.formatter), None)
        self.handler.setFormatter(console or logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(self.handler)

    def close(self) -> None:
        logging.getLogger().removeHandler(self.handler)
        self.handler.close()
        if not self.local:
            self.run.fs.pipe_file(self.path, self._buffer.getvalue().encode())


@dataclass
class _Member:
    """One feature set of a launch: its config, run directory, preset, models and run record.

    A plain launch has one member, unnamed, whose run directory is ``--output``.
    """

    name: Optional[str]
    config: ExtractConfig
    run: RunDir
    preset: Any
    models: ModelSet
    frame: int = 0  # index of the member's resize among the pool's
    record: dict = field(default_factory=dict)
    todo: frozenset = frozenset()

    def error(self, message: str) -> str:
        return f"set {self.name!r}: {message}" if self.name else message


class Extractor:
    """One rank's extraction: owns the decode pool and the models for the rank's lifetime.

    With ``sets`` it extracts several feature sets, each into its own run directory, from one
    decode per frame: each shard is decoded once for the sets that miss it.
    """

    def __init__(self, config: ExtractConfig, dist: Distributed, sets: Optional[FeatureSets] = None):
        self.config = config
        self.dist = dist
        self.sets = sets
        self.root = RunDir(sets.root) if sets else None
        self.rows_by_shard, self.manifest_fp = load_manifest_rows(config.manifest, config.views)
        views = sorted({r.view for rows in self.rows_by_shard.values() for r in rows})
        resizes: list = []
        self.members: list[_Member] = []
        for name, member_config in (sets.configs if sets else ((None, config),)):
            preset = member_config.resolved_preset()
            try:
                models = ModelSet(member_config, preset, views, dist.info.local_rank)
            except Exception as exc:
                if name is None:
                    raise
                # Before any shard starts: a set whose checkpoint does not load stops the launch.
                raise ValueError(f"{sets.path}: set {name!r}: {type(exc).__name__}: {exc}") from exc
            if preset.frame_resize not in resizes:
                resizes.append(preset.frame_resize)
            self.members.append(_Member(name, member_config, RunDir(member_config.output), preset, models,
                                        resizes.index(preset.frame_resize)))
        self.resizes = tuple(resizes)
        # The plain run's names, kept for callers that know one run.
        self.run, self.preset, self.models = self.members[0].run, self.members[0].preset, self.members[0].models
        self.signals = StopSignals()
        self.record: dict = {}
        self.pool: Optional[DecodePool] = None
        self.progress = None

    @property
    def plan_dir(self) -> RunDir:
        """Where this launch's plans live: the run directory, or the root of a multi-set launch."""
        return self.root if self.root is not None else self.run

    # ----- start-up (the only collectives) ------------------------------------------------
    def _initialize_runs(self) -> None:
        """Record every member's run; a mismatching fingerprint is refused before any is written."""
        built = [build_run_record(m.config, m.preset, m.models, self.manifest_fp) for m in self.members]
        for member, args in zip(self.members, built):
            existing = member.run.load_run()
            if existing is not None and existing.get("fingerprint") != compute_fingerprint(args[0]):
                try:
                    member.run.initialize(*args)  # raises, naming every part that differs
                except FingerprintMismatch as exc:
                    raise FingerprintMismatch(member.error(str(exc))) from None
        for member, args in zip(self.members, built):
            member.record = member.run.initialize(*args)
        if self.sets is not None:
            write_set_root(self.root, self.sets.names, self.sets.path, self.config.manifest)

    def prepare(self, shard_ids: Optional[Sequence[int]], plan_id: Optional[str],
                task_index: Optional[int]) -> tuple[str, list[int]]:
        info = self.dist.info
        if info.is_main:
            self._initialize_runs()
        records = self.dist.broadcast_object([m.record for m in self.members])
        for member, record in zip(self.members, records):
            member.record = record
        self.record = records[0]
        policy = self.config.policy
        if plan_id is not None:
            plan = self.plan_dir.read_plan(plan_id)
            if task_index is None or not 0 <= task_index < len(plan["tasks"]):
                raise ValueError(f"--task-index must be in [0, {len(plan['tasks'])}) for plan {plan_id}")
            listed = plan["tasks"][task_index]
            for member in self.members:
                member.todo = frozenset(member.run.plan_incomplete(listed, policy))
            todo = sorted(set().union(*(m.todo for m in self.members)))
            log.info("plan %s task %d: %d of %d shards to compute: %s%s", plan_id, task_index, len(todo),
                     len(listed), [shard_name(s) for s in todo], self._todo_by_set())
            return plan_id, todo
        per_member: list[list[int]] = []
        if info.is_main:
            unknown = sorted(set(shard_ids or ()) - set(self.rows_by_shard))
            if unknown:
                raise ValueError(f"--shards {unknown} are not shards of {self.config.manifest} "
                                 f"(for the selected views)")
            candidates = sorted(shard_ids) if shard_ids else sorted(self.rows_by_shard)
            per_member = [m.run.plan_incomplete(candidates, policy) for m in self.members]
            todo = sorted(set().union(*per_member))
            plan_id = f"local-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
            if todo:
                meta = {"kind": "local", "world_size": info.world_size}
                if self.sets is not None:
                    meta["sets"] = {m.name: mine for m, mine in zip(self.members, per_member)}
                    self.root.write_plan(plan_id, [todo], meta)
                for member, mine in zip(self.members, per_member):
                    if mine:
                        member.run.write_plan(plan_id, [todo] if self.sets is None else [mine], meta)
            log.info("plan %s: %d of %d shards to compute: %s", plan_id, len(todo), len(candidates),
                     [shard_name(s) for s in todo])
        plan_id, per_member = self.dist.broadcast_object((plan_id, per_member))
        for member, mine in zip(self.members, per_member):
            member.todo = frozenset(mine)
        todo = sorted(set().union(*(m.todo for m in self.members)))
        if self.sets is not None:
            log.info("shards to compute per set:%s", self._todo_by_set())
        return plan_id, todo

    def _todo_by_set(self) -> str:
        if self.sets is None:
            return ""
        return "".join(f"\n  {m.name}: {[shard_name(s) for s in sorted(m.todo)]}" for m in self.members)

    # ----- the loop -------------------------------------------------------------------------
    def execute(self, plan_id: str, todo: list[int], claim: bool) -> int:
        """Run shards until none are left; returns the exit code."""
        self.signals.install()
        counter = self.dist.counter(f"videofeat/claim/{plan_id}") if claim else None
        span = max(m.preset.sampling.span for m in self.members)
        pool_cfg = PoolConfig(self.config.decode_procs, self.config.decode_stall_s, self.config.decoder,
                              self.config.decode_threads, ring=max(48, span + 16))
        totals = {m.name or "": sum(m.models.expected_windows(self.rows_by_shard[s]) for s in m.todo)
                  for m in self.members}
        self.progress = Progress(sum(totals.values()), self.dist, plan_id, enabled=self.config.progress,
                                 sets=tuple(totals) if self.sets is not None else ())
        failures = 0
        if len(self.resizes) == 1:
            shape, dtype = frame_spec(self.resizes[0])
            self.pool = DecodePool(pool_cfg, self.resizes[0], shape, dtype)
        else:
            self.pool = DecodePool(pool_cfg, self.resizes)
        try:
            position = 0
            while True:
                if self.signals.received:
                    return EXIT_INTERRUPTED
                if counter is not None:
                    position = counter.next()
                if position >= len(todo):
                    break
                shard_id = todo[position]
                position += 1
                outcome = self.extract_shard(shard_id)
                if outcome == "interrupted":
                    return EXIT_INTERRUPTED
                failures += outcome == "error"
        finally:
            self.pool.close()
            self.progress.close()
            self.signals.restore()
        return 1 if failures else 0

    def extract_shard(self, shard_id: int) -> str:
        """'done', 'error' or 'interrupted' (each failure is recorded in its set's run directory).

        The shard is decoded once for every member that misses it; a member that cannot start
        or commit the shard records its own error and leaves the others alone.
        """
        info = self.dist.info
        members = [m for m in self.members if shard_id in m.todo]
        attempts = [m.run.next_attempt(shard_id) for m in members]
        shard_logs = [_ShardLog(m.run, shard_id, a, info.rank) for m, a in zip(members, attempts)]
        identity = process_identity(info.rank, info.world_size)
        started, t0 = utc_now(), time.monotonic()
        log.info("shard %s attempt %s: host=%s pid=%d rank=%d%s", shard_name(shard_id),
                 attempts[0] if self.sets is None else dict(zip((m.name for m in members), attempts)),
                 identity["host"], os.getpid(), info.rank,
                 "" if self.sets is None else f" sets={[m.name for m in members]}")
        rows = self.rows_by_shard[shard_id]
        view = rows[0].view
        active: list[tuple[_Member, int, str, Any, Any]] = []  # member, attempt, temp path, writer, runner
        failed = False

        def fail(member: _Member, attempt: int, exc: Exception) -> None:
            log.error("shard %s failed: %s", shard_name(shard_id), member.error(str(exc)), exc_info=True)
            member.run.record_failure(shard_id, attempt, "error", f"{type(exc).__name__}: {exc}",
                                      traceback.format_exc(), rank=info.rank)

        try:
            for member, attempt in zip(members, attempts):
                run = member.run
                try:
                    run.remove_temporaries(shard_id)
                    run.uncommit(shard_id)
                    runner = member.models.runner(view)
                    temp = run.temp_shard_path(shard_id)
                    schema = shard_schema(member.models.feature_dim, member.models.num_classes,
                                          member.config.feature_dtype)
                    lineage = dict(member.models.lineage(view), shard_id=shard_id,
                                   fingerprint=member.record["fingerprint"], preset=member.preset.to_dict(),
                                   fps={r.video_id: r.fps for r in rows})
                    active.append((member, attempt, temp, ShardWriter(temp, run.fs, schema, lineage), runner))
                except Exception as exc:  # this set cannot take the shard; the others still can
                    fail(member, attempt, exc)
                    failed = True
            if not active:
                return "error"
            outputs = [ShardOutput(m.preset.sampling, runner, writer, m.frame, m.name or "")
                       for m, _, _, writer, runner in active]
            pipeline = ShardPipeline(rows, outputs, self.pool, self.config.batch_size, self.config.feature_dtype,
                                     lambda: self.signals.received is not None, self.progress.windows,
                                     self.progress.frames)
            videos = pipeline.run()
            for _, _, _, writer, _ in active:
                writer.close()
        except Interrupted as exc:
            log.warning("shard %s interrupted: %s", shard_name(shard_id), exc)
            for member, attempt in zip(members, attempts):
                member.run.record_failure(shard_id, attempt, "interrupted", f"{self.signals.received}: {exc}",
                                          rank=info.rank)
            self._clean(active, shard_logs)
            return "interrupted"
        except Exception as exc:  # a per-shard failure: record it for every set, move on to the next shard
            for member, attempt, *_ in active:
                fail(member, attempt, exc)
            self._clean(active, shard_logs)
            return "error"
        seconds = round(time.monotonic() - t0, 3)
        video_frames = sum(r.piece_end_frame - r.piece_start_frame for r in rows)
        for i, (member, attempt, temp, _, runner) in enumerate(active):
            stats = {"shard_id": shard_id, "attempt": attempt, "fingerprint": member.record["fingerprint"],
                     **identity, "started": started, "finished": utc_now(), "seconds": seconds,
                     "windows": pipeline.windows_written(i),
                     "frames_decoded": sum(v["frames_decoded"] for v in videos[i]), "videos": videos[i],
                     "batch_size": runner.max_batch or self.config.batch_size}
            if self.sets is not None:
                # The one decode that fed every set of this shard, and its cost per video frame.
                stats["decode"] = {"sets": [m.name for m, *_ in active], "frames_decoded": pipeline.frames_decoded,
                                   "video_frames": video_frames, "decoded_per_video_frame":
                                       round(pipeline.frames_decoded / video_frames, 4) if video_frames else None}
            try:
                member.run.commit_shard(shard_id, temp, stats)
            except Exception as exc:
                fail(member, attempt, exc)
                failed = True
                continue
            log.info("shard %s done%s: %d windows from %d videos in %.1f s", shard_name(shard_id),
                     f" for set {member.name}" if member.name else "", stats["windows"], len(videos[i]), seconds)
        self._clean(active, shard_logs)
        return "error" if failed else "done"

    @staticmethod
    def _clean(active: list, shard_logs: list) -> None:
        for member, _, temp, _, _ in active:
            if member.run.fs.exists(temp):
                member.run.fs.rm(temp)
        for shard_log in shard_logs:
            shard_log.close()


def run_extraction(config: ExtractConfig | FeatureSets, shard_ids: Optional[Sequence[int]] = None,
                   plan_id: Optional[str] = None, task_index: Optional[int] = None,
                   init_method: Optional[str] = None) -> int:
    """Extract features for ``config`` on this rank; returns the process exit code.

    ``config``: one run, or the :class:`FeatureSets` of a multi-set launch (the other flags are
    those of its sets). ``shard_ids``: restrict a local/torchrun launch to these shards.
    ``plan_id`` + ``task_index``: run what an existing frozen plan lists at that index (SLURM
    array tasks). Under torchrun (``WORLD_SIZE > 1``) ranks claim the plan's shards dynamically.
    """
    sets = config if isinstance(config, FeatureSets) else None
    common = sets.configs[0][1] if sets else config
    dist = Distributed(init_method=init_method)
    try:
        extractor = Extractor(common, dist, sets)
        dist.init(extractor.models.device)
        plan, todo = extractor.prepare(shard_ids, plan_id, task_index)
        if not todo:
            log.info("nothing to do: every selected shard is complete")
            return 0
        # A SLURM task owns its list; torchrun ranks (a lone process, or the N local ranks of
        # one SLURM task under --ranks-per-task) share a list by claiming from it.
        return extractor.execute(plan, todo, claim=plan_id is None or dist.info.world_size > 1)
    finally:
        dist.close()
