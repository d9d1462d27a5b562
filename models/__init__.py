"""VideoMAE-family video ViTs and their checkpoints.

``create_model(name, checkpoint=...)`` builds a registered model (or ``"auto"``: the
architecture read from the checkpoint) and loads any supported checkpoint layout;
``save_checkpoint`` writes videofeat's own layout, which records the architecture.

Imports run one way: ``registry`` (a leaf) <- ``videomae`` (registers its entry points on
import, here) <- ``checkpoint`` <- ``factory``.
"""

from videofeat.models.checkpoint import (CheckpointError, LoadedCheckpoint, inspect_checkpoint, read_checkpoint,
                                         save_checkpoint, sha256_of)
from videofeat.models.factory import create_model
from videofeat.models.registry import list_models, register_model
from videofeat.models.videomae import (HEADS_BY_DIM, VideoMAEArch, VideoMAEViT, arch_from_state_dict,
                                       checkpoint_filter_fn, convert_hf_state_dict, filter_state_dict, model_arch)

__all__ = [
    "CheckpointError", "HEADS_BY_DIM", "LoadedCheckpoint", "VideoMAEArch", "VideoMAEViT",
    "arch_from_state_dict", "checkpoint_filter_fn", "convert_hf_state_dict", "create_model",
    "filter_state_dict", "inspect_checkpoint", "list_models", "model_arch", "read_checkpoint",
    "register_model", "save_checkpoint", "sha256_of",
]
