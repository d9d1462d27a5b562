"""Print a checkpoint's layout, architecture, classes and parameter count.

Reads any layout ``videofeat extract`` and ``finetune`` accept (VideoMAE ``checkpoint-N.pth``,
DeepSpeed files and folders, pre-training checkpoints, transformers ``.bin``/``.safetensors``,
videofeat's own) without building the model.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint file or folder (local path or fsspec URL)")
    parser.add_argument("--json", action="store_true", help="print the whole record as JSON")
    parser.add_argument("--sha256", action="store_true", help="also hash the file (reads it all)")


def _format(info: dict) -> str:
    arch = info["arch"]
    heads = arch.get("num_heads") or "unknown (not in the file: --model auto cannot load it, name a registered --model)"
    grid = ""
    if "num_frames" in arch and "img_size" in arch:
        grid = f", recorded clip {arch['num_frames']}x{arch['img_size']}"
    pos = "learned (resampled on load)" if arch["learned_pos_embed"] else "fixed sinusoidal"
    head = f"{info['num_classes']} classes" if info["num_classes"] else "none (features only)"
    rows = [
        ("file", info["path"]),
        ("layout", info["layout"] + ("  [pre-training: fine-tune before extraction]" if info["pretraining"] else "")),
        ("architecture", f"embed {arch['embed_dim']}, depth {arch['depth']}, heads {heads}, "
                         f"mlp ratio {arch['mlp_ratio']:.4g}, patch {arch['tubelet_size']}x{arch['patch_size']}"
                         f"x{arch['patch_size']}{grid}"),
        ("attention", f"q/v bias {'yes' if arch['qkv_bias'] else 'no'}, layer scale "
                      f"{'yes' if arch['init_values'] else 'no'}, positions {pos}, pooling {arch['global_pool']}"),
        ("head", head),
        ("parameters", f"{info['num_params'] / 1e6:.2f} M ({', '.join(f'{n} {k}' for k, n in info['dtypes'].items())} tensors)"),
        ("other keys", ", ".join(info["extra_keys"]) or "-"),
    ]
    if info.get("epoch") is not None:
        rows.append(("epoch", str(info["epoch"])))
    if info["dropped_keys"]:
        rows.append(("dropped", f"{len(info['dropped_keys'])} decoder / mask-token keys"))
    if "sha256" in info:
        rows.append(("sha256", info["sha256"]))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def run(args: argparse.Namespace) -> int:
    from videofeat.models import CheckpointError, inspect_checkpoint, sha256_of

    try:
        info = inspect_checkpoint(args.checkpoint)
    except CheckpointError as err:
        print(f"videofeat inspect: {err}", file=sys.stderr)
        return 1
    if args.sha256:
        info["sha256"] = sha256_of(info["path"])
    print(json.dumps(info, indent=2, default=str) if args.json else _format(info))
    return 0
