"""Run a whole job from one job file: videos and annotation CSVs to localizer-ready features.

``videofeat pipeline job.toml -o WORK`` runs the fixed stages on this machine (manifest per
dataset, labels, each (set, view) fine-tune, one multi-set extraction over every dataset, a
reduce per set, the exports, a timeline plot per (set, view) where ``videofeat plot`` is
installed). The same command again does only what is missing; ``--redo STAGE`` recomputes a
stage and everything that depends on it. ``videofeat pipeline --example`` prints a commented job
file for the AI City 2023 track-3 job (three backbones x two views). See
``launcher/pipeline_stages.py`` for the stages, ``launcher/pipeline_plan.py`` for the WORK layout.
"""

from __future__ import annotations

import argparse
import sys

EXAMPLE = '''\
# videofeat pipeline job file: the AI City 2023 track-3 feature job (3 backbones x 2 views).
# Relative paths are read from this file's folder. Run: videofeat pipeline job.toml -o work/
views = ["rear", "dashboard"]          # rear, dashboard, right (Rear / Dash accepted)

[train]                                # the labelled training set (AI City A1)
root = "data/A1"                       # user_id_<id>/<View>_user_id_<id>_NoAudio_<n>.MP4
layout = "aicity"                      # aicity | glob (+ pattern, regex) | list (root is a CSV of uris)
annotations = "data/A1"                # folder of the per-user annotation CSVs
val_users = ["49381"]                  # the validation split, whole users (or: val_fraction = 0.2)

[[test]]                               # unlabelled test sets: extracted, never trained on
name = "A2"
root = "data/A2"

[manifest]
shard_frames = 54000                   # frames per shard (30 min at 30 fps); or num_shards
probe_procs = 8

[finetune]                             # flags of `videofeat finetune` for every fine-tune
num_classes = 16
num_workers = 8

[extract]                              # flags of `videofeat extract` for every set
batch_size = 16
decode_procs = 8

# The seed's three backbones, each fine-tuned once per view from its pretrained checkpoint
# with the seed's recipe (videofeat finetune --recipe), then extracted with its preset.
[[set]]
name = "vith_k400"
preset = "aicity-vith"                 # 16 frames at step 2 from 32, torch squash to 224
pretrained = "pretrain/k400_videomae_vitH_pre_finetune.pth"
recipe = "aicity-vith-k400"            # 448 px, 40 epochs, drop path 0.2, fc dropout 0.5

[[set]]
name = "vitl_hybrid"
preset = "aicity-vitl"                 # 32 consecutive frames, PIL-style squash to 224
pretrained = "pretrain/vit_l_hybrid_pt_800e_k700_ft.pth"
recipe = "aicity-vitl-hybrid"          # 35 epochs

[[set]]
name = "vitl_ego4d"
preset = "aicity-vitl"
pretrained = "pretrain/ego4d_verb_pretrain_vitl_k700.pt"
recipe = "aicity-vitl-ego4d"           # 25 epochs
# [set.finetune]                       # overrides of the recipe for this set only
# epochs = 30
# Already fine-tuned? Replace pretrained + recipe with one checkpoint per view:
# checkpoint = { rear = "ckpt/ego_verb_vitl_rearview.pt", dashboard = "ckpt/ego_verb_vitl_dashboard.pt" }

[[export]]                             # MA-Actionformer: one flat folder per backbone, both views
name = "ma_actionformer"
format = "actionformer"                # npz with feats, a_prob and pred; annotations.json; config values
output = "features"                    # features/<set>/
sets = ["vith_k400", "vitl_hybrid", "vitl_ego4d"]

[[export]]                             # TriDet reads the ViT-H features
name = "tridet"
format = "actionformer"
prob_key = "a_prob"
output = "features_tridet"
sets = ["vith_k400"]
'''


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", nargs="?", metavar="JOB.toml", help="the job file (see --example)")
    parser.add_argument("-o", "--output", metavar="WORK", help="work folder: every stage's outputs and records")
    parser.add_argument("--example", action="store_true", help="print a commented job file for the seed's job")
    parser.add_argument("--nproc-per-node", type=int, help="run fine-tuning and extraction under torchrun "
                                                           "with this many ranks (one per GPU)")
    parser.add_argument("--redo", action="append", default=[], metavar="STAGE",
                        help="recompute this stage (an id such as finetune.vith_k400.rear, or a prefix such as "
                             "finetune) and every stage that depends on it; repeat or comma-separate")
    parser.add_argument("--only", action="append", default=[], metavar="STAGE",
                        help="run only these stages (their inputs must be complete)")


def _words(values: list[str]) -> list[str]:
    return [w.strip() for v in values for w in v.split(",") if w.strip()]


def run(args: argparse.Namespace) -> int:
    from videofeat.launcher.logs import init_logger
    from videofeat.launcher.pipeline_job import load_job
    from videofeat.launcher.pipeline_stages import Pipeline, StageIncomplete

    if args.example:
        sys.stdout.write(EXAMPLE)
        return 0
    if not args.job or not args.output:
        raise ValueError("give the job file and -o WORK: videofeat pipeline job.toml -o WORK "
                         "(videofeat pipeline --example > job.toml writes one to start from)")
    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        raise ValueError(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
    init_logger()
    pipeline = Pipeline(load_job(args.job), args.output, args.nproc_per_node)
    try:
        return pipeline.run(redo=_words(args.redo), only=_words(args.only))
    except StageIncomplete as exc:
        print(f"videofeat pipeline: {exc}", file=sys.stderr)
        return 1
