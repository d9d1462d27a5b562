"""Process-group init and teardown, in one place.

The backend follows the device (nccl for CUDA, gloo otherwise); the CUDA device is set from
``LOCAL_RANK`` before init; timeouts are explicit; SLURM's variables are a fallback to
torchrun's. Only a group this module created is destroyed. At world size 1 nothing is
initialized and every collective is a no-op, so worker functions run in plain unit tests.

Extraction uses collectives only at start-up (one broadcast of the plan id); after that ranks
claim shards through the rendezvous store's atomic counter, so a slow or dead rank never blocks
the others. Fine-tuning adds the tensor collectives (max, sum, gather) its loop needs.

The CUDA device of a rank is chosen here, and only here (:func:`resolve_device`).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

log = logging.getLogger(__name__)


def resolve_device(device: Union[str, torch.device], local_rank: int = 0) -> torch.device:
    """``auto``: the local rank's GPU when there is one, else the CPU; ``cuda``: the local rank's GPU."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return dev


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """Rank, world size and local rank from torchrun's variables, or SLURM's as a fallback."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return DistInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return DistInfo()


class Distributed:
    """A process group for one entry point: ``init()`` at start-up, ``close()`` at the end."""

    def __init__(self, info: Optional[DistInfo] = None, init_method: Optional[str] = None,
                 timeout_s: float = 600.0):
        self.info = info or env_info()
        self.init_method = init_method
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.device = torch.device("cpu")
        self._created = False

    @property
    def active(self) -> bool:
        return self.info.world_size > 1

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def world_size(self) -> int:
        return self.info.world_size

    @property
    def local_rank(self) -> int:
        return self.info.local_rank

    @property
    def is_main(self) -> bool:
        return self.info.is_main

    def init(self, device: Union[str, torch.device] = "cpu") -> "Distributed":
        """Choose this rank's device (``auto``, ``cpu``, ``cuda``, ``cuda:N``) and join the group."""
        self.device = resolve_device(device, self.info.local_rank)
        if not self.active:
            return self
        import torch.distributed as dist

        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.init_method is None and "MASTER_ADDR" not in os.environ:
                raise RuntimeError("world size > 1 but no MASTER_ADDR: launch with torchrun (or srun with "
                                   "MASTER_ADDR/MASTER_PORT set)")
            dist.init_process_group(backend, init_method=self.init_method or "env://", rank=self.info.rank,
                                    world_size=self.info.world_size, timeout=self.timeout)
            self._created = True
            log.info("process group %s: rank %d of %d", backend, self.info.rank, self.info.world_size)
        return self

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        # gloo carries Python objects on CPU whatever the main backend; use a gloo subgroup for CUDA.
        dist.broadcast_object_list(box, src=src, group=self._object_group())
        return box[0]

    def _object_group(self) -> Any:
        import torch.distributed as dist

        if dist.get_backend() == "gloo":
            return None
        if not hasattr(self, "_gloo"):
            self._gloo = dist.new_group(backend="gloo")
        return self._gloo

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier(group=self._object_group())

    # ----- tensor collectives (identity at world size 1) ---------------------------------------
    def _tensor(self, value: Any, dtype: torch.dtype) -> torch.Tensor:
        import torch.distributed as dist

        # nccl reduces device tensors only; gloo host tensors.
        device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        return torch.as_tensor(value, dtype=dtype, device=device)

    def all_reduce_max(self, value: int) -> int:
        if not self.active:
            return int(value)
        import torch.distributed as dist

        tensor = self._tensor([value], torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return tensor
        import torch.distributed as dist

        moved = self._tensor(tensor, tensor.dtype).clone()
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        return moved.to(tensor.device)

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        if not self.active:
            return [tensor]
        import torch.distributed as dist

        moved = self._tensor(tensor, tensor.dtype).contiguous()
        out = [torch.empty_like(moved) for _ in range(self.world_size)]
        dist.all_gather(out, moved)
        return [t.cpu() for t in out]

    def counter(self, key: str) -> "Counter":
        """An atomic counter shared by all ranks (the rendezvous store's ``add``)."""
        if not self.active:
            return Counter(None, key)
        from torch.distributed import distributed_c10d

        return Counter(distributed_c10d._get_default_store(), key)

    def close(self) -> None:
        if self._created:
            import torch.distributed as dist

            if dist.is_initialized():
                # gloo ranks leave together: one still tearing down while its peer has already
                # exited can die in a background thread (std::terminate -> SIGABRT). Not under
                # nccl, whose watchdog would kill a rank waiting out the others' longer shards.
                if dist.get_backend() == "gloo":
                    try:
                        dist.barrier()
                    except RuntimeError as exc:  # a peer is already gone: nothing to wait for
                        log.warning("barrier before teardown failed: %s", exc)
                dist.destroy_process_group()
            self._created = False


class Counter:
    """``next()`` returns 0, 1, 2, ... across all ranks, each value to exactly one caller."""

    def __init__(self, store: Any, key: str):
        self._store = store
        self._key = key
        self._local = 0

    def add(self, amount: int) -> int:
        """Add ``amount``; returns the new total (``add(0)`` reads it)."""
        if self._store is None:
            self._local += amount
            return self._local
        return int(self._store.add(self._key, amount))

    def next(self) -> int:
        return self.add(1) - 1
