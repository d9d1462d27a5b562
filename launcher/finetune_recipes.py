"""Fine-tuning presets (``videofeat finetune --recipe NAME``).

The three seed recipes reproduce the AI City 2023 track-3 fine-tuning scripts
(``Track3_finetune_*.sh`` with ``run_class_finetuning.py``'s defaults, see the seed reference,
section 2): per-GPU batch, epochs, checkpoint frequency, drop path, resolution, TSN sampling of
16 frames, two repeated-augmentation copies, RandAugment, random erasing, mixup / cutmix with
label smoothing, AdamW with layer decay 0.75, 5 warmup epochs, lr scaled by total batch / 256.
The seed ran them on 4 GPUs with DeepSpeed fp16; here precision is ``auto`` (bf16 on CUDA).

``cpu-test`` is for tests and demos: the tiny model at 64 px, 8 frames, no RandAugment, mixup,
cutmix or erasing, and an unscaled lr, so a few steps on a CPU learn something.

Values are flag defaults: the config file and the command line override them. This module
imports nothing heavy (it is read by ``--help``).
"""

from __future__ import annotations

from typing import Any

# run_class_finetuning.py defaults the seed relied on
SEED_COMMON: dict[str, Any] = {
    "num_classes": 16, "sampling": "uniform", "num_frames": 16, "sampling_rate": 4, "num_sample": 2,
    "lr": 2e-3, "min_lr": 1e-6, "warmup_lr": 0.0, "warmup_epochs": 5.0, "weight_decay": 0.05,
    "layer_decay": 0.75, "scale_lr": True, "accum_steps": 1, "clip_grad": None,
    "crop_scale": "0.08,1.0", "crop_ratio": "0.75,1.3333", "rand_augment": "rand-m7-n4-mstd0.5-inc1",
    "reprob": 0.25, "mixup": 0.8, "cutmix": 1.0, "smoothing": 0.1, "fc_drop_rate": 0.0, "eval_every": 1,
}

RECIPES: dict[str, dict[str, Any]] = {
    # Track3_finetune_K400_vitH.sh: ViT-H K400 (VideoMAE), 448 px, 40 epochs.
    "aicity-vith-k400": {
        **SEED_COMMON, "model": "videomae_vit_huge_patch16_224", "input_size": 448, "short_side_size": 448,
        "batch_size": 1, "epochs": 40, "save_every": 2, "drop_path": 0.2, "fc_drop_rate": 0.5,
        "activation_checkpointing": True,
    },
    # Track3_finetune_hybrid_vitL.sh: ViT-L hybrid K700 (InternVideo), 35 epochs.
    "aicity-vitl-hybrid": {
        **SEED_COMMON, "model": "videomae_vit_large_patch16_224", "input_size": 224, "short_side_size": 224,
        "batch_size": 2, "epochs": 35, "save_every": 10, "drop_path": 0.1,
    },
    # Track3_finetune_ego_vitL.sh: ViT-L Ego4D-verb (from K700), 25 epochs.
    "aicity-vitl-ego4d": {
        **SEED_COMMON, "model": "videomae_vit_large_patch16_224", "input_size": 224, "short_side_size": 224,
        "batch_size": 2, "epochs": 25, "save_every": 10, "drop_path": 0.1,
    },
    "cpu-test": {
        "model": "videomae_test", "num_classes": 4, "sampling": "uniform", "num_frames": 8, "sampling_rate": 2,
        "num_sample": 2, "input_size": 64, "short_side_size": 64, "crop_scale": "0.6,1.0",
        "crop_ratio": "0.75,1.3333", "rand_augment": "none", "reprob": 0.0, "mixup": 0.0, "cutmix": 0.0,
        "smoothing": 0.0, "lr": 5e-3, "min_lr": 1e-5, "warmup_lr": 0.0, "warmup_epochs": 0.0,
        "weight_decay": 0.05, "layer_decay": 0.75, "scale_lr": False, "accum_steps": 1, "clip_grad": 1.0,
        "batch_size": 2, "epochs": 2, "save_every": 1, "eval_every": 1, "drop_path": 0.1, "fc_drop_rate": 0.0,
        "precision": "fp32", "num_workers": 0, "log_every": 1,
    },
}

# Used where neither the recipe, the config file nor the command line sets a flag.
BASE_DEFAULTS: dict[str, Any] = {
    **SEED_COMMON, "model": "videomae_vit_large_patch16_224", "input_size": 224, "short_side_size": 224,
    "batch_size": 2, "epochs": 30, "save_every": 10, "drop_path": 0.1, "activation_checkpointing": False,
    "compile": False, "precision": "auto", "num_workers": 4, "seed": 0, "log_every": 10, "decoder": "pyav",
    "auto_resume": True, "progress": True, "view": "rear", "train_split": "training",
    "val_split": "validation", "stop_after_epoch": None,
}


def resolve(recipe: str | None, given: dict[str, Any]) -> dict[str, Any]:
    """Flag values: those ``given`` (not None) over the recipe's over :data:`BASE_DEFAULTS`."""
    if recipe is not None and recipe not in RECIPES:
        raise ValueError(f"--recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    values = {**BASE_DEFAULTS, **(RECIPES[recipe] if recipe else {})}
    values.update({key: value for key, value in given.items() if value is not None})
    return values
