"""The fine-tuning loop: DDP over torchrun ranks, deterministic enough to resume bit-for-bit.

Everything random is a function of the run's seed and a position, never of process state:
data order (DistributedSampler, seed + epoch), frame choice and augmentation (seed, epoch,
index, copy), mixup (seed, step), dropout / drop path (the torch generator is re-seeded from
(seed, step, micro-batch, rank) before each forward). So a run stopped at any optimizer step and
resumed from its checkpoint performs exactly the remaining steps and ends with the same
weights as an uninterrupted run (same world size).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from videofeat.manifests import fsutil
from videofeat.workers.finetune.augment import AugmentConfig, ClipTransform, apply_mixup, build_criterion, build_mixup
from videofeat.workers.finetune.clip_sampling import SamplingConfig
from videofeat.workers.finetune.optim import CosineSchedule, OptimConfig, apply_lr, build_optimizer, scaled_lr
from videofeat.workers.finetune.evaluate import evaluate
from videofeat.workers.finetune import state as ts
from videofeat.workers.distributed import Distributed
from videofeat.workers.signals import StopSignals, ignore_stop_signals, stop_signals_blocked

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# Fields that may change between a run and its resumption; any other difference is refused.
RUNTIME_FIELDS = ("output_dir", "num_workers", "stop_after_epoch", "log_every", "save_every", "progress",
                  "decoder", "compile")


@dataclass(frozen=True)
class TrainConfig:
    """A resolved fine-tuning run; field names are the ``videofeat finetune`` flags."""

    output_dir: str
    model: str
    num_classes: int
    train_segments: tuple = ()
    val_segments: tuple = ()
    pretrained: Optional[str] = None
    epochs: int = 30
    batch_size: int = 2
    accum_steps: int = 1
    num_sample: int = 2
    num_workers: int = 4
    seed: int = 0
    drop_path: float = 0.1
    fc_drop_rate: float = 0.0
    precision: str = "auto"
    activation_checkpointing: bool = False
    compile: bool = False
    save_every: int = 10
    eval_every: int = 1
    log_every: int = 10
    stop_after_epoch: Optional[int] = None
    decoder: str = "pyav"
    auto_resume: bool = True
    progress: bool = True
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        checks = [("--epochs", self.epochs, 1), ("--batch-size", self.batch_size, 1),
                  ("--accum-steps", self.accum_steps, 1), ("--num-sample", self.num_sample, 1),
                  ("--num-workers", self.num_workers, 0), ("--save-every", self.save_every, 1),
                  ("--eval-every", self.eval_every, 1), ("--log-every", self.log_every, 1),
                  ("--num-classes", self.num_classes, 2)]
        for flag, value, low in checks:
            if value < low:
                raise ValueError(f"{flag} must be >= {low}, got {value}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not self.train_segments:
            raise ValueError("no training segments: give --labels with --manifest, or --train-list")
        if self.stop_after_epoch is not None and not 1 <= self.stop_after_epoch <= self.epochs:
            raise ValueError(f"--stop-after-epoch must be in [1, --epochs={self.epochs}], got {self.stop_after_epoch}")
        for flag, value in (("--drop-path", self.drop_path), ("--fc-drop-rate", self.fc_drop_rate)):
            if not 0 <= value < 1:
                raise ValueError(f"{flag} must be in [0, 1), got {value}")
        if self.augment.mixes and (self.batch_size * self.num_sample) % 2:
            raise ValueError("mixup / cutmix need an even number of clips per batch: make --batch-size x "
                             "--num-sample even or set --mixup 0 --cutmix 0")

    def to_json(self) -> str:
        record = asdict(self)
        record["train_segments"] = len(self.train_segments)
        record["val_segments"] = len(self.val_segments)
        return json.dumps(record, sort_keys=True, default=str)


def _seed32(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def _precision(cfg: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    choice = cfg.precision
    if choice == "auto":
        choice = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[choice]


def _config_differences(saved_json: str, cfg: TrainConfig) -> list[str]:
    saved, now = json.loads(saved_json), json.loads(cfg.to_json())
    return sorted(k for k in set(saved) | set(now) if k not in RUNTIME_FIELDS and saved.get(k) != now.get(k))


class TrainingDiverged(RuntimeError):
    """A non-finite loss or weight: the run stops there and writes no checkpoint after it."""


class MetricsLog:
    """Rank 0's JSONL metrics file, appended to across resumptions; each step and evaluation
    appears once (the records of steps a resumed run replays are dropped when it starts)."""

    REPLAYED_EVENTS = ("train", "val")

    def __init__(self, path: str, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, **record: Any) -> None:
        if self.enabled:
            with open(self.path, "a") as handle:
                handle.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    def drop_after(self, step: int) -> None:
        """Forget train / val records past ``step``: the run resumes there and writes them again."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as handle:
            lines = handle.read().splitlines()
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if record.get("event") in self.REPLAYED_EVENTS and int(record.get("step", 0)) > step:
                continue
            kept.append(line)
        if len(kept) == len(lines):
            return
        fs, inner = fsutil.filesystem(self.path)
        fsutil.write_bytes_atomic(fs, inner, "".join(line + "\n" for line in kept).encode())


class Trainer:
    """Builds the model, data, optimizer; resumes; runs epochs; checkpoints; stops on signals."""

    def __init__(self, cfg: TrainConfig, env: Distributed):
        from torch.utils.data import DataLoader, Subset

        from videofeat.models import create_model

        from videofeat.workers.finetune.data import ClipDataset, ResumableDistributedSampler, eval_indices

        self.cfg, self.env = cfg, env
        self.device = env.device
        self.amp_dtype = _precision(cfg, self.device)
        torch.manual_seed(cfg.seed)  # the new head starts the same on every rank
        self.model = create_model(cfg.model, checkpoint=cfg.pretrained, num_classes=cfg.num_classes,
                                  for_finetune=True, img_size=cfg.augment.input_size,
                                  num_frames=cfg.sampling.num_frames, drop_path_rate=cfg.drop_path,
                                  fc_drop_rate=cfg.fc_drop_rate,
                                  use_checkpoint=cfg.activation_checkpointing).to(self.device)
        self.ddp = self.model
        if env.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(self.model, device_ids=[env.local_rank] if self.device.type == "cuda"
                                               else None)
        self.forward = torch.compile(self.ddp) if cfg.compile else self.ddp

        self.train_set = ClipDataset(cfg.train_segments, cfg.sampling, ClipTransform(cfg.augment, train=True),
                                     train=True, num_sample=cfg.num_sample, seed=cfg.seed, decoder=cfg.decoder)
        self.sampler = ResumableDistributedSampler(self.train_set, num_replicas=env.world_size, rank=env.rank,
                                                   shuffle=True, seed=cfg.seed)
        loader_args = dict(num_workers=cfg.num_workers, pin_memory=self.device.type == "cuda",
                           worker_init_fn=ignore_stop_signals if cfg.num_workers else None)
        self.train_loader = DataLoader(self.train_set, batch_size=cfg.batch_size, sampler=self.sampler,
                                       drop_last=True, **loader_args)
        self.val_loader = None
        if cfg.val_segments:
            val_set = ClipDataset(cfg.val_segments, cfg.sampling, ClipTransform(cfg.augment, train=False),
                                  train=False, seed=cfg.seed, decoder=cfg.decoder)
            share = Subset(val_set, eval_indices(len(val_set), env.world_size, env.rank))
            # The seed's validation batch: 1.5 x the training batch.
            self.val_loader = DataLoader(share, batch_size=max(1, int(1.5 * cfg.batch_size)), **loader_args)

        self.steps_per_epoch = len(self.sampler) // cfg.batch_size // cfg.accum_steps
        if self.steps_per_epoch < 1:
            raise ValueError(f"{len(self.train_set)} training clips over {env.world_size} rank(s) make no full "
                             f"step of --batch-size {cfg.batch_size} x --accum-steps {cfg.accum_steps}")
        total_batch = cfg.batch_size * cfg.accum_steps * env.world_size
        o = cfg.optim
        lr = scaled_lr(o.lr, total_batch, o.scale_lr)
        self.schedule = CosineSchedule(lr, scaled_lr(o.min_lr, total_batch, o.scale_lr),
                                       cfg.epochs * self.steps_per_epoch,
                                       int(round(o.warmup_epochs * self.steps_per_epoch)),
                                       scaled_lr(o.warmup_lr, total_batch, o.scale_lr))
        self.optimizer = build_optimizer(self.model, o)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.mixup = build_mixup(cfg.augment, cfg.num_classes)
        self.criterion = build_criterion(cfg.augment)
        self.metrics = MetricsLog(os.path.join(cfg.output_dir, "metrics.jsonl"), env.is_main)
        self.step = self.epoch = self.epoch_step = 0
        self.best_top1 = -1.0
        log.info("fine-tuning %s: %d train / %d val segments, %d steps per epoch, total batch %d, lr %.3g",
                 cfg.model, len(cfg.train_segments), len(cfg.val_segments), self.steps_per_epoch, total_batch, lr)

    # ------------------------------------------------------------------ checkpoints

    def resume(self) -> bool:
        found = ts.load_latest(self.cfg.output_dir) if self.cfg.auto_resume else None
        if found is None:
            return False
        info, ckpt = found
        differences = _config_differences(ckpt["config"], self.cfg)
        if differences:
            raise ValueError(f"{info.path} was written by a run with different settings ({', '.join(differences)}); "
                             "use another --output or restore those settings")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.epoch, self.epoch_step = info.step, info.epoch, info.epoch_step
        self.best_top1 = float(ckpt.get("best_top1", -1.0))
        if not ts.restore_rng_states(ckpt.get("rng", {}), self.env.rank, self.env.world_size):
            log.warning("%s was written with %s ranks, now %d: data order differs from an uninterrupted run",
                        info.path, ckpt.get("world_size"), self.env.world_size)
        log.info("resumed from %s: epoch %d, step %d (%d into the epoch)", info.path, self.epoch, self.step,
                 self.epoch_step)
        return True

    def save(self, name: str) -> None:
        # Every rank holds the same weights under DDP; all agree before any file is touched.
        finite = all(bool(torch.isfinite(t).all()) for t in self.model.state_dict().values()
                     if t.is_floating_point())
        if self.env.all_reduce_max(0 if finite else 1):
            raise TrainingDiverged(f"the weights hold non-finite values after step {self.step}; {name} was "
                                   f"not written. Likely cause: {self._likely_cause()}")
        rng = ts.gather_rng_states(self.env.all_gather)  # a collective: every rank calls save()
        if self.env.is_main:
            ts.save_training_checkpoint(
                os.path.join(self.cfg.output_dir, name), self.model, step=self.step, epoch=self.epoch,
                epoch_step=self.epoch_step, optimizer=self.optimizer.state_dict(),
                scaler=self.scaler.state_dict(), best_top1=self.best_top1, rng=rng,
                world_size=self.env.world_size, config=self.cfg.to_json())
        self.env.barrier()

    # ------------------------------------------------------------------ training

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _micro_step(self, batch: dict, micro: int, sync: bool) -> float:
        cfg = self.cfg
        clips = batch["clips"].flatten(0, 1).to(self.device, non_blocking=True)
        labels = batch["label"].repeat_interleave(batch["clips"].shape[1]).to(self.device)
        targets = labels
        if self.mixup is not None:
            clips, targets = apply_mixup(self.mixup, clips, labels, _seed32(cfg.seed, 3, self.step, micro,
                                                                           self.env.rank))
        torch.manual_seed(_seed32(cfg.seed, 5, self.step, micro, self.env.rank))  # dropout, drop path
        no_sync = getattr(self.ddp, "no_sync", None)
        context = no_sync() if (no_sync is not None and not sync and not cfg.compile) else contextlib.nullcontext()
        with context:
            with self._autocast():
                loss = self.criterion(self.forward(clips), targets)
            self.scaler.scale(loss / cfg.accum_steps).backward()
        return float(loss.detach())

    def _likely_cause(self) -> str:
        if self.step == 0:
            return ("the starting weights (--checkpoint) or the input clips hold non-finite values: no update "
                    "had been made yet")
        if self.amp_dtype == torch.float16:
            return "fp16 overflow (--precision fp16): use --precision bf16 or fp32, or a lower --lr"
        return (f"a learning rate too high for this model (lr {self.schedule(self.step - 1):.3g} at the last "
                f"update, from --lr {self.cfg.optim.lr:g}): lower --lr, or set --clip-grad / --warmup-epochs")

    def _check_finite(self, losses: list[float]) -> None:
        """Stop before an update made from a non-finite loss: every rank agrees at the same step."""
        bad = [loss for loss in losses if not np.isfinite(loss)]
        if not self.env.all_reduce_max(1 if bad else 0):
            return
        step = self.step + 1
        self.metrics.write(event="diverged", step=step, epoch=self.epoch + 1, epoch_step=self.epoch_step + 1,
                           loss=repr(bad[0]) if bad else "non-finite on another rank")
        raise TrainingDiverged(f"non-finite loss ({bad[0] if bad else 'on another rank'}) at step {step} "
                               f"(epoch {self.epoch + 1}, step {self.epoch_step + 1} of {self.steps_per_epoch}); "
                               f"stopped before updating the weights, no checkpoint written since the last good "
                               f"one. Likely cause: {self._likely_cause()}")

    def _optimizer_step(self) -> None:
        apply_lr(self.optimizer, self.schedule(self.step))
        if self.cfg.optim.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.epoch_step += 1

    def train_epoch(self, stop: StopSignals) -> bool:
        """One epoch (or its remainder); True if it was cut short by a stop signal."""
        from tqdm import tqdm

        cfg = self.cfg
        skip = self.epoch_step * cfg.accum_steps * cfg.batch_size
        self.sampler.set_epoch(self.epoch, skip=skip)
        self.train_set.set_epoch(self.epoch)
        self.ddp.train()
        losses: list[float] = []
        started, clips_seen = time.time(), 0
        bar = tqdm(total=self.steps_per_epoch, initial=self.epoch_step, desc=f"epoch {self.epoch + 1}",
                   disable=not (self.env.is_main and cfg.progress), unit="step", dynamic_ncols=True)
        micro = 0
        with stop_signals_blocked():  # the DataLoader workers start here: none may die of a stop signal
            batches = iter(self.train_loader)
        for batch in batches:
            if self.epoch_step >= self.steps_per_epoch:
                break  # the tail that does not fill an accumulation
            sync = (micro + 1) % cfg.accum_steps == 0
            losses.append(self._micro_step(batch, micro % cfg.accum_steps, sync))
            clips_seen += batch["clips"].shape[0] * batch["clips"].shape[1]
            micro += 1
            if not sync:
                continue
            self._check_finite(losses[-cfg.accum_steps:])
            self._optimizer_step()
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.epoch_step == self.steps_per_epoch:
                mean = self.env.all_reduce_sum(torch.tensor([sum(losses), len(losses)], dtype=torch.float64))
                elapsed = max(time.time() - started, 1e-9)
                self.metrics.write(event="train", step=self.step, epoch=self.epoch + 1, epoch_step=self.epoch_step,
                                   loss=float(mean[0] / mean[1]), lr=self.schedule(self.step - 1),
                                   clips_per_s=clips_seen / elapsed)
                bar.set_postfix(loss=f"{float(mean[0] / mean[1]):.4f}")
                losses = []
            if stop.agreed(self.env.all_reduce_max) and self.epoch_step < self.steps_per_epoch:
                bar.close()
                return True
        bar.close()
        return False

    def run(self) -> dict[str, Any]:
        cfg, env = self.cfg, self.env
        if env.is_main:
            os.makedirs(cfg.output_dir, exist_ok=True)
        env.barrier()
        if env.is_main:
            ts.remove_stale_temporaries(cfg.output_dir)
        resumed = self.resume()
        self.metrics.drop_after(self.step)
        if env.is_main:
            ts.remove_marker(cfg.output_dir, ts.PREEMPTED)
            with open(os.path.join(cfg.output_dir, "config.json"), "w") as handle:
                handle.write(cfg.to_json() + "\n")
        self.metrics.write(event="start", step=self.step, epoch=self.epoch + 1, resumed=resumed,
                           world_size=env.world_size, steps_per_epoch=self.steps_per_epoch)
        stop = StopSignals("the next optimizer step").install()
        try:
            while self.epoch < cfg.epochs:
                if self.train_epoch(stop):
                    return self._preempted(stop)
                self.epoch, self.epoch_step = self.epoch + 1, 0
                self._end_of_epoch()
                if stop.agreed(env.all_reduce_max):
                    return self._preempted(stop)
                if cfg.stop_after_epoch is not None and cfg.stop_after_epoch <= self.epoch < cfg.epochs:
                    log.info("stopping after epoch %d as asked (--stop-after-epoch)", self.epoch)
                    return {"status": "stopped", "step": self.step, "epoch": self.epoch}
        finally:
            stop.restore()
        if env.is_main:
            ts.write_marker(cfg.output_dir, ts.COMPLETED, {"step": self.step, "epoch": self.epoch,
                                                           "best_top1": self.best_top1})
        return {"status": "completed", "step": self.step, "epoch": self.epoch, "best_top1": self.best_top1}

    def _end_of_epoch(self) -> None:
        cfg = self.cfg
        improved = False
        if self.val_loader is not None and (self.epoch % cfg.eval_every == 0 or self.epoch == cfg.epochs):
            metrics = evaluate(self.model, self.val_loader, cfg.num_classes, self.device, self.env, self._autocast)
            improved = metrics["top1"] > self.best_top1
            self.best_top1 = max(self.best_top1, metrics["top1"])
            self.metrics.write(event="val", step=self.step, epoch=self.epoch, **metrics)
            log.info("epoch %d: validation top-1 %.4f (%d clips)", self.epoch, metrics["top1"], metrics["count"])
        self.save("checkpoint-last.pt")
        if improved:
            self.save("checkpoint-best.pt")
        if self.epoch % cfg.save_every == 0:
            self.save(f"checkpoint-e{self.epoch:04d}.pt")

    def _preempted(self, stop: StopSignals) -> dict[str, Any]:
        self.save("checkpoint-last.pt")
        if self.env.is_main:
            ts.write_marker(self.cfg.output_dir, ts.PREEMPTED, {"signal": stop.signum, "step": self.step,
                                                                "epoch": self.epoch, "epoch_step": self.epoch_step})
        self.metrics.write(event="preempted", step=self.step, epoch=self.epoch + 1, epoch_step=self.epoch_step)
        log.warning("stopped by a signal at step %d; checkpoint written, %s marker set", self.step, ts.PREEMPTED)
        return {"status": "preempted", "step": self.step, "epoch": self.epoch}


def run_training(cfg: TrainConfig, env: Optional[Distributed] = None) -> dict[str, Any]:
    """Fine-tune as ``cfg`` says, inside the process group torchrun set up (or alone)."""
    own = env is None
    # The timeout covers rank 0 writing a ViT-H checkpoint while the others wait at the barrier.
    env = env or Distributed(timeout_s=1800.0).init("auto")
    try:
        return Trainer(cfg, env).run()
    finally:
        if own:
            env.close()
