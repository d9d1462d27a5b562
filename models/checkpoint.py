"""Reading and writing checkpoints of every layout the VideoMAE family ships in.

Reading never runs arbitrary pickled code: ``torch.load(weights_only=True)`` with only
``argparse.Namespace`` allow-listed (VideoMAE's ``save_model`` stores its ``args``). Files are
opened through fsspec, so ``s3://``/``gs://`` paths work like local ones.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import pickle
import re
import socket
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load as load_safetensors_bytes

from videofeat.models.videomae import HEADS_BY_DIM, FilterReport, arch_from_state_dict, filter_state_dict

__all__ = ["CheckpointError", "LoadedCheckpoint", "read_checkpoint", "inspect_checkpoint",
           "save_checkpoint", "sha256_of", "SAFE_GLOBALS"]

_log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

#: Globals real checkpoints hold that are safe to rebuild: VideoMAE's ``args``.
SAFE_GLOBALS: list[Any] = [argparse.Namespace]

DEEPSPEED_FILE = "mp_rank_00_model_states.pt"
_DEEPSPEED_KEYS = {"buffer_names", "param_shapes", "ds_config", "ds_version", "global_steps",
                   "dp_world_size", "mp_world_size", "lr_scheduler", "skipped_steps"}
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit; the message names the file."""


@dataclass
class LoadedCheckpoint:
    """One checkpoint file, unwrapped: the raw state dict plus what else its top level holds."""

    path: str
    container: str  # videofeat | videomae | deepspeed | module | state_dict | bare | safetensors
    state_dict: dict[str, torch.Tensor]
    extra: dict[str, Any] = field(default_factory=dict)
    arch_record: Optional[dict[str, Any]] = None
    hf_config: Optional[dict[str, Any]] = None


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def resolve_checkpoint_file(path: PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """The file to read for ``path``: itself, or inside a DeepSpeed / transformers folder.

    Folders: a DeepSpeed ``save_dir`` whose ``latest`` names the tag folder, a tag folder
    (``checkpoint-N/``) holding ``mp_rank_00_model_states.pt``, or a transformers model folder.
    """
    fs, root = fsspec.core.url_to_fs(os.fspath(path))
    if not fs.exists(root):
        raise CheckpointError(f"{path}: no such checkpoint file or folder")
    if not fs.isdir(root):
        return fs, root
    if fs.exists(_join(root, "latest")):
        tag = fs.cat_file(_join(root, "latest")).decode().strip()
        candidate = _join(_join(root, tag), DEEPSPEED_FILE)
        if not fs.exists(candidate):
            raise CheckpointError(f"{path}: 'latest' names tag {tag!r} but {candidate} does not exist")
        return fs, candidate
    for name in (DEEPSPEED_FILE, *_HF_WEIGHT_FILES):
        if fs.exists(_join(root, name)):
            return fs, _join(root, name)
    raise CheckpointError(f"{path}: a folder without 'latest', {DEEPSPEED_FILE} or transformers weights")


def _load_torch(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    local_zip = isinstance(fs, LocalFileSystem) and zipfile.is_zipfile(path)
    if not local_zip and _is_plain_pickle(fs, path):
        # Refused before torch sees it: torch's own text for a refused pickle advises turning
        # weights_only off, which must never reach a user.
        raise CheckpointError(
            f"{path}: a plain Python pickle (written with pickle.dump, not torch.save); unpickling it "
            "could run any code it holds, so videofeat cannot load it. Have it re-saved from the code "
            "that made it with torch.save(model.state_dict(), 'weights.pth') or "
            "safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            if local_zip:
                # mmap: multi-GB files with optimizer state cost no memory for what we skip
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            with fs.open(path, "rb") as handle:
                return torch.load(handle, map_location="cpu", weights_only=True)
    except (OSError, MemoryError):
        raise  # storage trouble, not a bad file: raised unchanged, never reported as a bad checkpoint
    except Exception as err:  # garbage input fails anywhere in the unpickler (IndexError, ...)
        found = re.search(r"GLOBAL ([\w.]+)", str(err)) if isinstance(err, pickle.UnpicklingError) else None
        if found:
            raise CheckpointError(
                f"{path}: holds the Python object {found.group(1)}, which videofeat will not unpickle "
                "(only tensors, plain containers and argparse.Namespace are allowed); re-save the "
                "weights alone, e.g. torch.save(state_dict, ...)") from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint, truncated or not a checkpoint "
                              f"file ({_unpickler_reason(err)})") from None


#: What ``torch.save`` writes first in its legacy (pre-zip) format: the pickled magic number.
_LEGACY_TORCH_HEAD = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)


def _is_plain_pickle(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """A pickle stream (PROTO opcode first) that is neither torch's zip nor its legacy format."""
    try:
        with fs.open(path, "rb") as handle:
            head = handle.read(len(_LEGACY_TORCH_HEAD))
    except OSError:
        return False  # torch.load then meets the same storage error and raises it as it is
    return head[:1] == pickle.PROTO and not head.startswith(_LEGACY_TORCH_HEAD)


def _unpickler_reason(err: BaseException) -> str:
    """The cause of a failed load, without torch's advice to load with weights_only=False."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and "weights_only" not in line and "torch.load" not in line]
    return lines[0][:300] if lines else type(err).__name__


def _load_safetensors(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors_bytes(fs.cat_file(path))
    except Exception as err:  # safetensors raises its own SafetensorError and others
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__


def _hf_config_beside(fs: fsspec.AbstractFileSystem, path: str) -> Optional[dict[str, Any]]:
    config = _join(path.rsplit("/", 1)[0], "config.json") if "/" in path else "config.json"
    if not fs.exists(config):
        return None
    try:
        data = json.loads(fs.cat_file(config))
    except (ValueError, OSError):
        return None
    return data if data.get("model_type") == "videomae" else None


def _unwrap(obj: Mapping[str, Any]) -> tuple[str, Mapping[str, Any], dict[str, Any]]:
    """(container name, the state dict, other top-level entries)."""
    for key in ("model", "module", "state_dict"):
        value = obj.get(key)
        if isinstance(value, Mapping):
            extra = {k: v for k, v in obj.items() if k != key}
            if key == "model":
                container = "videofeat" if "arch" in obj else "videomae"
            elif key == "module":
                container = "deepspeed" if _DEEPSPEED_KEYS & set(obj) else "module"
            else:
                container = "state_dict"
            inner = value if _is_state_dict(value) else _unwrap(value)[1]
            return container, inner, extra
    return "bare", obj, {}


def _is_state_dict(obj: Mapping[str, Any]) -> bool:
    return any(isinstance(v, torch.Tensor) for v in obj.values())


def read_checkpoint(path: PathLike) -> LoadedCheckpoint:
    """Read and unwrap a checkpoint file or folder (``.pth .pt .bin .safetensors``, DeepSpeed)."""
    fs, file = resolve_checkpoint_file(path)
    if file.endswith(".safetensors"):
        obj: Any = _load_safetensors(fs, file)
    else:
        obj = _load_torch(fs, file)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{file}: holds a {type(obj).__name__}, not a checkpoint dict")
    container, state_dict, extra = _unwrap(obj)
    if file.endswith(".safetensors"):
        container = "safetensors"
    if not _is_state_dict(state_dict):
        raise CheckpointError(f"{file}: no weights found (top-level keys: {sorted(obj)[:10]})")
    record = extra.get("arch")
    if isinstance(record, str):
        try:
            record = json.loads(record)
        except ValueError:
            raise CheckpointError(f"{file}: its 'arch' record is not valid JSON") from None
    return LoadedCheckpoint(path=file, container=container, state_dict=dict(state_dict), extra=extra,
                            arch_record=record if isinstance(record, dict) else None,
                            hf_config=_hf_config_beside(fs, file))


def read_filtered(path: PathLike) -> tuple[LoadedCheckpoint, dict[str, torch.Tensor], FilterReport, dict[str, Any]]:
    """(checkpoint, filtered state dict, filter report, shapes-derived architecture)."""
    ckpt = read_checkpoint(path)
    state_dict, report = filter_state_dict(ckpt.state_dict)
    try:
        shape = arch_from_state_dict(state_dict, source=ckpt.path)
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    return ckpt, state_dict, report, shape


def inspect_checkpoint(path: PathLike) -> dict[str, Any]:
    """Layout, architecture, classes, parameter count and extra top-level keys of a checkpoint."""
    ckpt, state_dict, report, shape = read_filtered(path)
    record = ckpt.arch_record or {}
    hf = ckpt.hf_config or {}
    heads = record.get("num_heads") or hf.get("num_attention_heads") or HEADS_BY_DIM.get(shape["embed_dim"])
    arch = {k: v for k, v in shape.items() if k != "pos_tokens"}
    arch["num_heads"] = heads
    for key in ("name", "num_frames", "img_size", "norm_eps", "fc_norm_eps"):
        if key in record:
            arch[key] = record[key]
    dtypes: dict[str, int] = {}
    for tensor in state_dict.values():
        name = str(tensor.dtype).removeprefix("torch.")
        dtypes[name] = dtypes.get(name, 0) + 1
    return {
        "path": ckpt.path,
        "layout": f"{ckpt.container}/{report.weights}",
        "container": ckpt.container,
        "weights": report.weights,
        "pretraining": report.pretraining,
        "arch": arch,
        "num_classes": shape["num_classes"],
        "num_params": sum(t.numel() for t in state_dict.values()),
        "dtypes": dtypes,
        "dropped_keys": report.dropped,
        "extra_keys": sorted(ckpt.extra),
        "epoch": ckpt.extra.get("epoch"),
    }


# ---------------------------------------------------------------------------------------------
# Writing

_PLAIN = (str, int, float, bool, type(None), bytes, torch.Tensor, torch.dtype, torch.device)


def _check_plain(value: Any, where: str) -> None:
    """Refuse what ``torch.load(weights_only=True)`` could not read back."""
    if isinstance(value, _PLAIN):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(key, f"{where} key {key!r}")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(f"save_checkpoint: {where} is a {type(value).__name__}; store tensors, numbers, strings "
                    "and containers only (configs as JSON strings, RNG states as tensors)")


# Fault injection for the tests of a kill during a checkpoint write: hold the temporary file open,
# written but not yet renamed into place, for this many seconds.
WRITE_DELAY_ENV = "VIDEOFEAT_FAULT_CHECKPOINT_WRITE_DELAY_S"


def _injected_write_delay() -> None:
    delay = os.environ.get(WRITE_DELAY_ENV)
    if delay:
        time.sleep(float(delay))


def save_checkpoint(path: PathLike, model: torch.nn.Module, **extra: Any) -> None:
    """Write ``{"model": weights in VideoMAE layout, "arch": JSON record, **extra}`` atomically.

    The file appears complete or not at all (temporary name, then rename), locally or through
    fsspec, and loads back with ``torch.load(weights_only=True)``.
    """
    inner = getattr(model, "module", model)  # DDP / DeepSpeed wrappers
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile
    if not hasattr(inner, "arch"):
        raise TypeError("save_checkpoint needs a videofeat model (it has no .arch record)")
    clash = sorted({"model", "arch"} & set(extra))
    if clash:
        raise ValueError(f"save_checkpoint: {clash} are reserved keys")
    payload: dict[str, Any] = {
        "model": {k: v.detach().cpu() for k, v in inner.state_dict().items()},
        "arch": json.dumps(inner.arch, sort_keys=True),
        **extra,
    }
    for key, value in extra.items():
        _check_plain(value, repr(key))
    # Written here rather than through manifests.fsutil's atomic writer: models/ imports nothing
    # of ours but its own layers. Same protocol: a temporary name, fsync, one rename.
    fs, target = fsspec.core.url_to_fs(os.fspath(path))
    # <host>-p<pid>-<nonce>: the naming that manifests.temporaries recognises, so a later run can
    # tell the temporary of a killed writer from one a live process is still writing.
    tmp = f"{target}.tmp-{socket.gethostname()}-p{os.getpid()}-{uuid.uuid4().hex[:8]}"
    parent = target.rsplit("/", 1)[0] if "/" in target else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    try:
        with fs.open(tmp, "wb") as handle:
            torch.save(payload, handle)
            _injected_write_delay()
            if isinstance(fs, LocalFileSystem):
                handle.flush()
                os.fsync(handle.fileno())
        if isinstance(fs, LocalFileSystem):
            os.replace(tmp, target)
        else:
            fs.mv(tmp, target)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def sha256_of(path: PathLike, chunk_size: int = 8 << 20) -> str:
    """Hex SHA-256 of a file, streamed in ``chunk_size`` pieces (local or fsspec).

    For a checkpoint folder (DeepSpeed, transformers) it hashes the file ``read_checkpoint``
    reads from it.
    """
    digest = hashlib.sha256()
    fs, file = fsspec.core.url_to_fs(os.fspath(path))
    if fs.isdir(file):
        fs, file = resolve_checkpoint_file(path)
    with fs.open(file, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
