"""Fine-tuning checkpoints, resume and preemption.

Layout of the output directory (``OUT``)::

    OUT/checkpoint-last.pt      every epoch end and on preemption (mid-epoch position included)
    OUT/checkpoint-best.pt      best validation top-1 so far
    OUT/checkpoint-eNNNN.pt     every ``--save-every`` epochs
    OUT/<name>.pt.json          completion record, written after the checkpoint is in place
    OUT/metrics.jsonl           one JSON object per logged step / evaluation (rank 0)
    OUT/PREEMPTED               written after the preemption checkpoint; removed on resume
    OUT/COMPLETED               written when the last epoch is done

A checkpoint is written to a temporary name, renamed into place, then its ``.json`` record is
written. A kill before the rename leaves the previous file and its record intact (the run
resumes from them); a kill between the rename and the new record leaves a file whose step
disagrees with its record, which is skipped. Auto-resume takes the checkpoint whose record has
the highest step and that loads; a file without a valid record or one that fails to load is
skipped with a warning. Temporaries of killed writers are removed when a run starts
(:func:`remove_stale_temporaries`), never those of a live process.

Every checkpoint holds ``model`` (VideoMAE layout) and ``arch`` (written by
``videofeat.models.checkpoint.save_checkpoint``, so ``videofeat extract`` reads it as is), plus
``optimizer``, ``scaler``, ``epoch``, ``step``, ``epoch_step``, ``best_top1``, ``rng`` (every
rank's generator states as tensors) and ``config`` (JSON): all loadable with ``weights_only=True``.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from videofeat.manifests import fsutil, temporaries

log = logging.getLogger(__name__)


def _write_text(path: str, text: str) -> None:
    """Atomically, through the one atomic writer (``fsutil``): readers see the old file or the new one."""
    fs, inner = fsutil.filesystem(path)
    fsutil.write_bytes_atomic(fs, inner, text.encode())


PREEMPTED = "PREEMPTED"
COMPLETED = "COMPLETED"


# --------------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """This process's generator states (torch CPU/CUDA, NumPy, Python) as tensors."""
    import torch

    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor([version, *mt], dtype=torch.int64),
        "python_gauss": torch.tensor([float("nan") if gauss is None else gauss], dtype=torch.float64),
        "numpy": torch.tensor([*keys.astype(np.int64), pos, has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([cached], dtype=torch.float64),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    # clone(): a row of the stacked per-rank states is a view with a storage offset, which
    # set_rng_state does not honour (it crashes).
    torch.set_rng_state(state["torch"].to(torch.uint8).clone())
    python = state["python"].tolist()
    gauss = float(state["python_gauss"][0])
    random.setstate((python[0], tuple(python[1:]), None if gauss != gauss else gauss))
    numpy = state["numpy"].tolist()
    np.random.set_state(("MT19937", np.array(numpy[:-2], dtype=np.uint32), numpy[-2], numpy[-1],
                         float(state["numpy_gauss"][0])))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].to(torch.uint8).clone())


def gather_rng_states(all_gather) -> dict[str, Any]:
    """Every rank's :func:`rng_state`, stacked along a rank dimension (``all_gather`` is a callable
    that returns a list of one tensor per rank)."""
    import torch

    return {key: torch.stack(all_gather(value)) for key, value in rng_state().items()}


def restore_rng_states(saved: dict[str, Any], rank: int, world_size: int) -> bool:
    """Restore this rank's states; False (states left alone) if the world size changed."""
    if not saved or next(iter(saved.values())).shape[0] != world_size:
        return False
    set_rng_state({key: value[rank] for key, value in saved.items()})
    return True


# --------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class CheckpointInfo:
    path: str
    step: int
    epoch: int
    epoch_step: int


def record_path(path: str) -> str:
    return path + ".json"


def save_training_checkpoint(path: str, model, *, step: int, epoch: int, epoch_step: int,
                             **extra: Any) -> CheckpointInfo:
    """Write ``path`` atomically (temporary name, rename) and then its completion record.

    ``epoch`` is the epoch in progress and ``epoch_step`` the optimizer steps already done in it
    (equal to the epoch's length once it is finished and ``epoch`` has moved on to the next).
    """
    from videofeat.models.checkpoint import save_checkpoint

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    record = record_path(path)
    # save_checkpoint writes a temporary file and renames it into place; the old record stays
    # until then so that a kill mid-write still leaves a complete checkpoint to resume from.
    save_checkpoint(path, model, step=step, epoch=epoch, epoch_step=epoch_step, **extra)
    info = CheckpointInfo(path=path, step=step, epoch=epoch, epoch_step=epoch_step)
    _write_text(record, json.dumps({"file": os.path.basename(path), "step": step, "epoch": epoch,
                                           "epoch_step": epoch_step}))
    return info


def _ours(base: str) -> bool:
    return base.startswith("checkpoint-") or base in (PREEMPTED, COMPLETED, "config.json", "metrics.jsonl")


def remove_stale_temporaries(directory: str) -> list[str]:
    """Drop the temporaries that killed writers left in a fine-tune output folder."""
    import fsspec

    return temporaries.remove_stale(fsspec.filesystem("file"), os.path.abspath(directory), _ours)


def list_checkpoints(directory: str) -> list[CheckpointInfo]:
    """Complete checkpoints in ``directory`` (those with a record), newest step first."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in sorted(os.listdir(directory)):
        if not (name.startswith("checkpoint-") and name.endswith(".pt")):
            continue
        path = os.path.join(directory, name)
        try:
            with open(record_path(path)) as handle:
                rec = json.load(handle)
            found.append(CheckpointInfo(path, int(rec["step"]), int(rec["epoch"]), int(rec["epoch_step"])))
        except (OSError, ValueError, KeyError):
            log.warning("%s has no valid completion record (interrupted while writing?); ignoring it", path)
    # Newest step first; at equal steps prefer 'last' (it has the exact loop position).
    return sorted(found, key=lambda c: (c.step, os.path.basename(c.path) == "checkpoint-last.pt"), reverse=True)


def load_latest(directory: str) -> Optional[tuple[CheckpointInfo, dict]]:
    """The newest complete checkpoint that loads (``weights_only=True``), or None."""
    import torch

    for info in list_checkpoints(directory):
        try:
            ckpt = torch.load(info.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a corrupt file: try the next one rather than crash the job
            log.warning("cannot load %s (%s); trying an older checkpoint", info.path, exc)
            continue
        if int(ckpt.get("step", -1)) != info.step:
            log.warning("%s holds step %s but its record says %d; ignoring it", info.path, ckpt.get("step"),
                        info.step)
            continue
        return info, ckpt
    return None


# --------------------------------------------------------------------------- preemption


def write_marker(directory: str, name: str, payload: dict) -> None:
    _write_text(os.path.join(directory, name), json.dumps(payload) + "\n")


def remove_marker(directory: str, name: str) -> None:
    try:
        os.remove(os.path.join(directory, name))
    except FileNotFoundError:
        pass
