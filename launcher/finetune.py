"""Fine-tune a VideoMAE-family ViT on labelled segments of untrimmed videos (DDP under torchrun).

Runs as ``videofeat finetune ...`` (one process), as
``torchrun --nproc_per_node=N launcher/finetune.py --config run.toml`` from the repository, or
``torchrun --nproc_per_node=N -m videofeat.launcher.finetune ...`` from anywhere. Training data
is the labels table joined to the manifest (``--labels --manifest --view``; ``split`` column
``training`` / ``validation``) or the seed's ``<path> <label>`` lists (``--train-list
--val-list``). Flag values come from the command line, then ``--config``, then ``--recipe``.

The run resumes from the newest complete checkpoint in ``--output``. SIGTERM / SIGUSR2 make all
ranks stop at the same step, write a checkpoint and ``OUTPUT/PREEMPTED``, and exit 0: requeue
on the marker, not on an exit code (torchrun does not pass worker exit codes through).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Optional, Sequence

from videofeat.launcher.finetune_recipes import RECIPES, resolve
from videofeat.launcher.logs import init_logger

log = logging.getLogger("videofeat.finetune")


def _bool(parser: argparse.ArgumentParser, flag: str, help_text: str) -> None:
    parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--recipe", choices=sorted(RECIPES), help="preset of every training flag (see finetune_recipes)")
    data.add_argument("-o", "--output", help="output folder: checkpoints, metrics.jsonl, markers")
    data.add_argument("--labels", help="labels table (videofeat labels); needs --manifest")
    data.add_argument("--manifest", help="manifest (videofeat manifest) giving uri, fps, frame count, crop")
    data.add_argument("--view", help="camera view to train on: rear, dashboard or right (default rear)")
    data.add_argument("--train-split", help="labels split to train on (default training)")
    data.add_argument("--val-split", help="labels split to validate on (default validation)")
    data.add_argument("--train-list", help="the seed's '<path> <label>' list of training clips")
    data.add_argument("--val-list", help="the seed's '<path> <label>' list of validation clips")
    data.add_argument("--decoder", choices=("pyav", "decord"), help="decoder backend (default pyav)")
    data.add_argument("--num-workers", type=int, help="data loader processes per rank")

    model = parser.add_argument_group("model")
    model.add_argument("--model", help="registered model name, or 'auto' with --checkpoint")
    model.add_argument("--checkpoint", help="pre-trained / fine-tuned weights to start from (any supported layout)")
    model.add_argument("--num-classes", type=int, help="classes of the new head (AI City: 16)")
    model.add_argument("--drop-path", type=float, help="stochastic depth rate")
    model.add_argument("--fc-drop-rate", type=float, help="dropout before the head")
    _bool(model, "--activation-checkpointing", "recompute blocks in backward (ViT-H at 448)")
    _bool(model, "--compile", "torch.compile the model")
    model.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"),
                       help="auto: bf16 autocast on CUDA, fp32 on CPU; fp16 uses a grad scaler")

    clips = parser.add_argument_group("clips and augmentation")
    clips.add_argument("--sampling", choices=("uniform", "dense"), help="TSN segments (seed) or dense clips")
    clips.add_argument("--num-frames", type=int, help="frames per clip")
    clips.add_argument("--sampling-rate", type=int, help="frame stride of dense sampling")
    clips.add_argument("--num-sample", type=int, help="augmented copies of each clip per batch (seed: 2)")
    clips.add_argument("--input-size", type=int, help="crop size in pixels")
    clips.add_argument("--short-side-size", type=int, help="frames are resized to this short side first")
    clips.add_argument("--crop-scale", help="random resized crop area range 'low,high'")
    clips.add_argument("--crop-ratio", help="random resized crop aspect range 'low,high'")
    clips.add_argument("--rand-augment", help="timm RandAugment string, or 'none'")
    clips.add_argument("--reprob", type=float, help="random erasing probability")
    clips.add_argument("--mixup", type=float, help="mixup alpha (0: off)")
    clips.add_argument("--cutmix", type=float, help="cutmix alpha (0: off)")
    clips.add_argument("--smoothing", type=float, help="label smoothing")

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int)
    opt.add_argument("--batch-size", type=int, help="clips per rank per micro-batch (before --num-sample copies)")
    opt.add_argument("--accum-steps", type=int, help="micro-batches per optimizer step")
    opt.add_argument("--lr", type=float, help="base lr (per 256 clips when --scale-lr)")
    opt.add_argument("--min-lr", type=float)
    opt.add_argument("--warmup-lr", type=float)
    opt.add_argument("--warmup-epochs", type=float)
    opt.add_argument("--weight-decay", type=float)
    opt.add_argument("--layer-decay", type=float)
    opt.add_argument("--clip-grad", type=float, help="max gradient norm (unset: no clipping)")
    _bool(opt, "--scale-lr", "scale lrs by batch x accumulation x world size / 256 (seed)")
    opt.add_argument("--seed", type=int)

    run = parser.add_argument_group("run")
    run.add_argument("--save-every", type=int, help="keep a checkpoint every N epochs")
    run.add_argument("--eval-every", type=int, help="validate every N epochs")
    run.add_argument("--log-every", type=int, help="optimizer steps between metrics lines")
    run.add_argument("--stop-after-epoch", type=int, help="stop (resumably) after this many epochs")
    _bool(run, "--auto-resume", "resume from the newest complete checkpoint in --output (default on)")
    _bool(run, "--progress", "progress bar on rank 0")
    run.add_argument("--log-level", default="INFO", help="logging level on local rank 0")


def _pair(text: str, flag: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in str(text).split(","))
    except ValueError:
        raise ValueError(f"{flag} must be 'low,high', got {text!r}") from None
    return low, high


def build_config(args: argparse.Namespace) -> Any:
    """The resolved :class:`~videofeat.workers.finetune.loop.TrainConfig` of parsed flags."""
    from videofeat.workers.finetune.augment import AugmentConfig
    from videofeat.workers.finetune.clip_sampling import SamplingConfig
    from videofeat.workers.finetune.data import load_segments, read_clip_list
    from videofeat.workers.finetune.optim import OptimConfig
    from videofeat.workers.finetune.loop import TrainConfig

    given = {k: v for k, v in vars(args).items() if k not in ("recipe", "config", "log_level")}
    v = resolve(args.recipe, given)
    if not v.get("output"):
        raise ValueError("--output is required (checkpoints and metrics go there)")
    num_classes = int(v["num_classes"])
    if v.get("train_list"):
        train = read_clip_list(v["train_list"], num_classes)
        val = read_clip_list(v["val_list"], num_classes) if v.get("val_list") else []
    elif v.get("labels") and v.get("manifest"):
        train = load_segments(v["labels"], v["manifest"], v["view"], v["train_split"], num_classes)
        try:
            val = load_segments(v["labels"], v["manifest"], v["view"], v["val_split"], num_classes)
        except ValueError as exc:
            log.warning("no validation: %s", exc)
            val = []
    else:
        raise ValueError("give --labels and --manifest (segments of untrimmed videos) or --train-list")
    rand_augment = v["rand_augment"]
    augment = AugmentConfig(
        input_size=int(v["input_size"]), short_side_size=int(v["short_side_size"]),
        scale=_pair(v["crop_scale"], "--crop-scale"), ratio=_pair(v["crop_ratio"], "--crop-ratio"),
        rand_augment=None if str(rand_augment).lower() in ("none", "") else rand_augment,
        reprob=float(v["reprob"]), mixup=float(v["mixup"]), cutmix=float(v["cutmix"]),
        smoothing=float(v["smoothing"]))
    optim = OptimConfig(lr=float(v["lr"]), min_lr=float(v["min_lr"]), warmup_lr=float(v["warmup_lr"]),
                        warmup_epochs=float(v["warmup_epochs"]), weight_decay=float(v["weight_decay"]),
                        layer_decay=float(v["layer_decay"]), scale_lr=bool(v["scale_lr"]),
                        clip_grad=None if v["clip_grad"] is None else float(v["clip_grad"]))
    sampling = SamplingConfig(mode=v["sampling"], num_frames=int(v["num_frames"]),
                              sampling_rate=int(v["sampling_rate"]))
    return TrainConfig(
        output_dir=v["output"], model=v["model"], num_classes=num_classes, train_segments=tuple(train),
        val_segments=tuple(val), pretrained=v.get("checkpoint"), epochs=int(v["epochs"]),
        batch_size=int(v["batch_size"]), accum_steps=int(v["accum_steps"]), num_sample=int(v["num_sample"]),
        num_workers=int(v["num_workers"]), seed=int(v["seed"]), drop_path=float(v["drop_path"]),
        fc_drop_rate=float(v["fc_drop_rate"]), precision=v["precision"],
        activation_checkpointing=bool(v["activation_checkpointing"]), compile=bool(v["compile"]),
        save_every=int(v["save_every"]), eval_every=int(v["eval_every"]), log_every=int(v["log_every"]),
        stop_after_epoch=v["stop_after_epoch"], decoder=v["decoder"], auto_resume=bool(v["auto_resume"]),
        progress=bool(v["progress"]), sampling=sampling, augment=augment, optim=optim)


def run(args: argparse.Namespace) -> int:
    """0 when the run completed, stopped or was preempted (the markers say which); 1 when it
    diverged. Bad input raises, and the command runner turns it into one message and exit 2."""
    init_logger(level=args.log_level)
    cfg = build_config(args)
    from videofeat.workers.finetune.loop import TrainingDiverged, run_training

    try:
        result = run_training(cfg)
    except TrainingDiverged as exc:
        from videofeat.launcher.cli import reporting_rank

        if reporting_rank():  # every rank stopped at the same step; one says why
            log.error("%s", exc)
        return 1
    log.info("fine-tuning %s at step %d (epoch %d)", result["status"], result["step"], result["epoch"])
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The torchrun entry point: ``@record`` makes torchrun name the failing rank and its error."""
    from torch.distributed.elastic.multiprocessing.errors import record

    from videofeat.launcher.cli import parse_and_run

    # Parsing inside: a bad flag under torchrun is one message and exit 2 like any other bad input.
    return int(record(parse_and_run)("finetune", list(sys.argv[1:] if argv is None else argv)) or 0)


if __name__ == "__main__":
    sys.exit(main())
