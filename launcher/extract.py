"""Extract per-window features of every shard of a manifest into a run directory.

Also runs under torchrun with the same arguments (ranks claim shards from one frozen plan):
    torchrun --nproc_per_node=4 launcher/extract.py manifest.parquet -o runs/vitl --preset aicity-vitl ...

With ``--sets sets.toml`` it extracts several feature sets from one decode, each into
``OUTPUT/<name>/`` (see ``workers/extract/feature_sets.py`` for the file).
"""

from __future__ import annotations

import argparse
import sys
from videofeat.launcher.logs import init_logger


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", help="manifest written by `videofeat manifest` (path or fsspec URL)")
    parser.add_argument("-o", "--output", required=True, help="run directory (path or fsspec URL)")
    parser.add_argument("--preset", default="aicity-vitl", choices=("aicity-vitl", "aicity-vith", "videomae-16x4"),
                        help="window sampling + preprocessing recipe (default aicity-vitl)")
    parser.add_argument("--model", default="auto",
                        help="registered model name, or auto (architecture read from the checkpoint)")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="[VIEW=]PATH",
                        help="checkpoint for one view (repeat per view) or for all views")
    parser.add_argument("--sets", metavar="SETS.toml",
                        help="extract every [[set]] of this file (name, preset, model, checkpoint, overrides) "
                             "from one decode, each into OUTPUT/<name>; the other flags apply to every set")
    parser.add_argument("--views", help="comma-separated views to extract (default: every view in the manifest)")
    parser.add_argument("--shards", help="comma-separated shard ids to extract (default: all incomplete)")
    sampling = parser.add_argument_group("sampling overrides (default: the preset's)")
    sampling.add_argument("--span", type=int, help="frames a window spans")
    sampling.add_argument("--hop", type=int, help="frames between window starts")
    sampling.add_argument("--num-frames", type=int, help="frames fed to the model per window")
    sampling.add_argument("--frame-step", type=int, help="stride between those frames")
    sampling.add_argument("--size", type=int, help="model input height and width")
    sampling.add_argument("--resize", choices=("exact", "bounded", "fast"), default="bounded",
                          help="bounded (default): a vectorised kernel within the preset's bound of the seed "
                               "(<= 1/255 of PIL for aicity-vitl); exact: the seed's own arithmetic (PIL); "
                               "fast: the decoder's scaler (up to ~150/255 off on sharp edges)")
    sampling.add_argument("--resize-on", choices=("auto", "decode", "device"), default="auto",
                          help="where frames are resized: in the decode processes, or on the model's device "
                               "(decode processes then only decode); auto: device on CUDA")
    decoding = parser.add_argument_group("decoding")
    decoding.add_argument("--decoder", choices=("pyav", "decord"), default="pyav")
    decoding.add_argument("--decode-procs", type=int, default=None,
                          help="decode processes per rank (default: this rank's share of the CPUs it may use, "
                               "minus one, at most 8)")
    decoding.add_argument("--decode-threads", type=int, default=1, help="decoder threads per decode process")
    decoding.add_argument("--decode-stall-s", type=float, default=120.0,
                          help="kill a decode process that delivers no frame for this long (status timeout)")
    infer = parser.add_argument_group("inference")
    infer.add_argument("--device", default="auto", help="auto (the local rank's GPU, else CPU), cpu, cuda, cuda:N")
    infer.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                       help="compute dtype (auto: bf16 on CUDA, fp32 on CPU)")
    infer.add_argument("--batch-size", type=int, default=16, help="windows per forward pass (halved on CUDA OOM)")
    infer.add_argument("--feature-dtype", choices=("float32", "float16"), default="float32")
    infer.add_argument("--seed", type=int, default=0, help="seed of random weights when no checkpoint is given")
    rerun = parser.add_argument_group("reruns")
    rerun.add_argument("--max-attempts", type=int, default=3, help="attempts of a failing shard before giving up")
    rerun.add_argument("--rerun-failed", action="store_true",
                       help="also recompute shards that gave up, or whose videos failed transiently")
    rerun.add_argument("--overwrite", action="store_true", help="recompute every selected shard")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # Used by SLURM array tasks: run the shards a frozen plan lists at one index.
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("--task-index", type=int, help=argparse.SUPPRESS)


def build_config(args: argparse.Namespace):
    """The run's ExtractConfig, or with ``--sets`` the FeatureSets of every set."""
    from videofeat.manifests.views import parse_views
    from videofeat.workers.decode.pool import default_decode_procs
    from videofeat.workers.extract.config import ExtractConfig
    from videofeat.workers.extract.setup import parse_checkpoints

    kwargs = dict(
        manifest=args.manifest, output=args.output, preset=args.preset, model=args.model,
        checkpoints=parse_checkpoints(args.checkpoint), views=parse_views(args.views), span=args.span, hop=args.hop,
        num_frames=args.num_frames, frame_step=args.frame_step, size=args.size, resize=args.resize,
        resize_on=args.resize_on, decoder=args.decoder, decode_procs=args.decode_procs or default_decode_procs(),
        decode_threads=args.decode_threads,
        decode_stall_s=args.decode_stall_s, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
        feature_dtype=args.feature_dtype, max_attempts=args.max_attempts, rerun_failed=args.rerun_failed,
        overwrite=args.overwrite, seed=args.seed, progress=not args.no_progress)
    if getattr(args, "sets", None):
        from videofeat.workers.extract.feature_sets import build_feature_sets

        return build_feature_sets(args.sets, args.output, kwargs)
    return ExtractConfig(**kwargs)


def run(args: argparse.Namespace) -> int:
    """Bad input raises (ValueError, FileNotFoundError, FingerprintMismatch): the command runner
    turns it into one message and exit 2, under ``videofeat`` and under torchrun alike."""
    init_logger(args.verbose)
    if (args.plan is None) != (args.task_index is None):
        raise ValueError("--plan and --task-index go together")
    config = build_config(args)
    try:
        shard_ids = [int(s) for s in args.shards.split(",") if s.strip()] if args.shards else None
    except ValueError:
        raise ValueError(f"--shards takes comma-separated shard ids, got {args.shards!r}") from None
    from videofeat.workers.extract.loop import run_extraction

    try:
        return run_extraction(config, shard_ids=shard_ids, plan_id=args.plan, task_index=args.task_index)
    except OSError as exc:
        from videofeat.manifests.fsutil import is_no_space

        if not is_no_space(exc):
            raise
        # Before any shard started (run.json, the plan): nothing was computed, nothing is lost.
        print(f"videofeat extract: no space left on device under {config.output} ({exc}); free space there, "
              "then run the same command again", file=sys.stderr)
        return 1


def main(argv=None) -> int:
    """The torchrun entry point: ``@record`` makes torchrun name the failing rank and its error."""
    from torch.distributed.elastic.multiprocessing.errors import record

    from videofeat.launcher.cli import parse_and_run

    # Parsing inside: a bad flag under torchrun is one message and exit 2 like any other bad input.
    return int(record(parse_and_run)("extract", list(sys.argv[1:] if argv is None else argv)) or 0)


if __name__ == "__main__":
    sys.exit(main())
