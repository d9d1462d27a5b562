"""The per-rank extraction loop: plan, claim shards, decode, infer, write, commit.

Rank 0 records the run (``run.json``, refusing a different fingerprint) and freezes a plan of
the incomplete shards; the plan id is broadcast once, and from then on ranks claim shard ids
through the rendezvous store's counter, with no collective. A SLURM array task instead runs the
shard ids that an existing plan lists at its index. Before computing a shard a rank takes its
claim file, so two launches on one run directory never compute a shard at the same time (one
skips what the other holds, or finished after this launch began). Each shard is committed
through the ledger (Parquet under a temporary name, stats, marker last); a shard that raises
gets an ``error`` record and the rank moves on (when even the record cannot be written, on a
full disk, it says so on stderr and exits non-zero); SIGTERM/SIGUSR2 stop at the next batch
with an ``interrupted`` record and no marker.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from videofeat.manifests import fsutil
from videofeat.manifests.fingerprint import compute_fingerprint
from videofeat.manifests.ledger import FingerprintMismatch, RunDir, process_identity, shard_name, utc_now
from videofeat.manifests.manifest import ManifestRow
from videofeat.manifests.set_root import write_set_root

from videofeat.workers.decode.pool import DecodePool, PoolConfig, frame_spec
from videofeat.workers.decode.resize import FullFrame
from videofeat.workers.distributed import Distributed
from videofeat.workers.extract.config import ExtractConfig
from videofeat.workers.extract.feature_sets import FeatureSets
from videofeat.workers.extract.shard_log import ShardLog
from videofeat.workers.signals import StopSignals
from videofeat.workers.extract.setup import ModelSet, Progress, build_run_record, load_manifest_rows
from videofeat.workers.shard_io import ShardWriter, shard_schema
from videofeat.workers.extract.pipeline import Interrupted, ShardOutput, ShardPipeline

log = logging.getLogger(__name__)
EXIT_INTERRUPTED = 143
# Ring slots per decode process for full-size frames (--resize-on device): the parent resizes
# each frame as it arrives, so a few slots keep the decoder busy; 16 at 1080p is 100 MB.
FULL_FRAME_RING = 16


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
        # Shards another launch committed after this moment are its fresh work, not ours to redo.
        self.launched_ns = time.time_ns()
        self.skipped: list[str] = []

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
        ring = max(48, span + 16)
        self.frame_transforms: list = [None] * len(self.resizes)
        if all(m.config.resize_on_device(self.models.device.type) for m in self.members):
            from videofeat.workers.decode.device_resize import DeviceResize

            # Full-size frames cross once; each distinct resize runs on the device for its sets.
            self.frame_transforms = [DeviceResize(r, self.models.device) for r in self.resizes]
            full, ring = FullFrame(*_largest_frame(self.rows_by_shard, todo)), FULL_FRAME_RING
            log.info("resizing on %s: decode processes ship frames of up to %dx%d, %d ring slots of %.1f MB each",
                     self.models.device, full.max_width, full.max_height, ring,
                     full.max_width * full.max_height * 3 / 2**20)
        pool_cfg = PoolConfig(self.config.decode_procs, self.config.decode_stall_s, self.config.decoder,
                              self.config.decode_threads, ring=ring)
        totals = {m.name or "": sum(m.models.expected_windows(self.rows_by_shard[s]) for s in m.todo)
                  for m in self.members}
        self.progress = Progress(sum(totals.values()), self.dist, plan_id, enabled=self.config.progress,
                                 sets=tuple(totals) if self.sets is not None else ())
        failures = 0
        if self.frame_transforms[0] is not None:
            shape, dtype = frame_spec(full)
            self.pool = DecodePool(pool_cfg, full, shape, dtype)
        elif len(self.resizes) == 1:
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
                failures += outcome in ("error", "unrecorded")
        finally:
            self.pool.close()
            self.progress.close()
            self.signals.restore()
        if self.skipped:
            log.info("skipped %d shard(s) that another launch holds or has finished: %s", len(self.skipped),
                     "; ".join(self.skipped))
        return 1 if failures else 0

    def _claim(self, member: _Member, shard_id: int):
        """This process's claim on the member's shard, or None (after logging why) when it is not ours."""
        run, label = member.run, shard_name(shard_id) + (f" of set {member.name}" if member.name else "")
        claim, holder = run.claim_shard(shard_id)
        if claim is None:
            self.skipped.append(f"{label} ({holder})")
            return None
        if run.committed_since(shard_id, self.launched_ns) or not member.config.policy.wants(
                run.records([shard_id], member.config.max_attempts)[0]):
            self.skipped.append(f"{label} (completed by another launch meanwhile)")
            claim.release()
            return None
        return claim

    def extract_shard(self, shard_id: int) -> str:
        """'done', 'error', 'unrecorded' (an error its record could not hold), 'interrupted' or 'skipped'.

        The shard is decoded once for every member that misses it and whose claim this process
        takes; a member that cannot start or commit the shard records its own error and leaves
        the others alone.
        """
        claimed: list[tuple[_Member, object]] = []
        unrecorded = False
        try:
            for member in self.members:
                if shard_id not in member.todo:
                    continue
                try:
                    claim = self._claim(member, shard_id)
                except OSError as exc:  # not even the claim fits (a full disk): say so, go on
                    import sys

                    print(f"videofeat: shard {shard_name(shard_id)} not attempted"
                          f"{f' for set {member.name}' if member.name else ''}: "
                          f"{fsutil.describe_error(exc, member.run.claim_path(shard_id))}", file=sys.stderr,
                          flush=True)
                    unrecorded = True
                    continue
                if claim is not None:
                    claimed.append((member, claim))
            if not claimed:
                return "unrecorded" if unrecorded else "skipped"
            outcome = self._extract_claimed(shard_id, claimed)
            return "unrecorded" if unrecorded and outcome == "done" else outcome
        finally:
            for _, claim in claimed:
                claim.release()

    def _extract_claimed(self, shard_id: int, claimed: list) -> str:
        info = self.dist.info
        members = [m for m, _ in claimed]
        claims = dict((id(m), c) for m, c in claimed)
        attempts = [m.run.next_attempt(shard_id) for m in members]
        shard_logs = [ShardLog(m.run, shard_id, a, info.rank) for m, a in zip(members, attempts)]
        identity = process_identity(info.rank, info.world_size)
        started, t0 = utc_now(), time.monotonic()
        log.info("shard %s attempt %s: host=%s pid=%d rank=%d%s", shard_name(shard_id),
                 attempts[0] if self.sets is None else dict(zip((m.name for m in members), attempts)),
                 identity["host"], os.getpid(), info.rank,
                 "" if self.sets is None else f" sets={[m.name for m in members]}")
        rows = self.rows_by_shard[shard_id]
        view = rows[0].view
        active: list[tuple[_Member, int, str, Any, Any]] = []  # member, attempt, temp path, writer, runner
        outcome = "done"

        def fail(member: _Member, attempt: int, exc: Exception, temp: Optional[str]) -> None:
            nonlocal outcome
            log.error("shard %s failed: %s", shard_name(shard_id), member.error(str(exc)), exc_info=True)
            recorded = member.run.record_failure_or_say(
                shard_id, attempt, "error", fsutil.describe_error(exc, temp or member.run.shard_path(shard_id)),
                traceback.format_exc(), rank=info.rank)
            if outcome != "unrecorded":
                outcome = "error" if recorded else "unrecorded"

        try:
            for member, attempt in zip(members, attempts):
                run, temp, writer = member.run, None, None
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
                    writer = ShardWriter(temp, run.fs, schema, lineage)
                    active.append((member, attempt, temp, writer, runner))
                except Exception as exc:  # this set cannot take the shard; the others still can
                    # The temporary goes before the record: on a full disk its blocks are the record's room.
                    _discard(run, writer, temp)
                    fail(member, attempt, exc, temp)
            if not active:
                return outcome
            outputs = [ShardOutput(m.preset.sampling, runner, writer, m.frame if self.frame_transforms[0] is None
                                   else 0, m.name or "", self.frame_transforms[m.frame])
                       for m, _, _, writer, runner in active]
            pipeline = ShardPipeline(rows, outputs, self.pool, self.config.batch_size, self.config.feature_dtype,
                                     lambda: self.signals.received is not None, self.progress.windows,
                                     self.progress.frames)
            videos = pipeline.run()
            for _, _, _, writer, _ in active:
                writer.close()
        except Interrupted as exc:
            log.warning("shard %s interrupted: %s", shard_name(shard_id), exc)
            self._clean(active, shard_logs)
            for member, attempt in zip(members, attempts):
                member.run.record_failure_or_say(shard_id, attempt, "interrupted", f"{self.signals.received}: {exc}",
                                                 rank=info.rank)
            return "interrupted"
        except Exception as exc:  # a per-shard failure: record it for every set, move on to the next shard
            self._clean(active, [])
            for member, attempt, temp, _, _ in active:
                fail(member, attempt, exc, temp)
            self._clean([], shard_logs)
            return outcome
        seconds = round(time.monotonic() - t0, 3)
        video_frames = sum(r.piece_end_frame - r.piece_start_frame for r in rows)
        for i, (member, attempt, temp, _, runner) in enumerate(active):
            stats = {"shard_id": shard_id, "attempt": attempt, "fingerprint": member.record["fingerprint"],
                     **identity, "started": started, "finished": utc_now(), "seconds": seconds,
                     "windows": pipeline.windows_written(i),
                     "first_frame_s": None if pipeline.first_frame_s is None else round(pipeline.first_frame_s, 3),
                     "frames_decoded": sum(v["frames_decoded"] for v in videos[i]),
                     "decode_cpu_s": round(pipeline.decode_cpu_s, 3), "videos": videos[i],
                     "batch_size": runner.max_batch or self.config.batch_size}
            if self.sets is not None:
                # The one decode that fed every set of this shard, and its cost per video frame.
                stats["decode"] = {"sets": [m.name for m, *_ in active], "frames_decoded": pipeline.frames_decoded,
                                   "video_frames": video_frames, "decoded_per_video_frame":
                                       round(pipeline.frames_decoded / video_frames, 4) if video_frames else None}
            try:
                member.run.commit_shard(shard_id, temp, stats, claims[id(member)])
            except Exception as exc:
                fsutil.remove_quietly(member.run.fs, temp)
                fail(member, attempt, exc, temp)
                continue
            log.info("shard %s done%s: %d windows from %d videos in %.1f s", shard_name(shard_id),
                     f" for set {member.name}" if member.name else "", stats["windows"], len(videos[i]), seconds)
        self._clean(active, shard_logs)
        return outcome

    @staticmethod
    def _clean(active: list, shard_logs: list) -> None:
        for member, _, temp, writer, _ in active:
            _discard(member.run, writer, temp)
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


def _discard(run: RunDir, writer: Optional[ShardWriter], temp: Optional[str]) -> None:
    """Close and remove an uncommitted temporary shard (a no-op once it was moved into place)."""
    if writer is not None:
        writer.abort()
    if temp is not None:
        fsutil.remove_quietly(run.fs, temp)


def _largest_frame(rows_by_shard: dict[int, list[ManifestRow]], shard_ids: Sequence[int]) -> tuple[int, int]:
    """(height, width) of the largest frame, after its crop box, among the videos of ``shard_ids``."""
    height = width = 0
    for shard_id in shard_ids:
        for row in rows_by_shard[shard_id]:
            w, h = (row.crop[2], row.crop[3]) if row.crop else (row.width, row.height)
            if not w or not h:
                raise ValueError(f"manifest row {row.video_id} has no frame size (width, height): "
                                 "rebuild the manifest with `videofeat manifest`, or use --resize-on decode")
            height, width = max(height, int(h)), max(width, int(w))
    return height, width
