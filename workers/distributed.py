"""Process-group init and teardown, in one place.

The backend follows the device (nccl for CUDA, gloo otherwise); the CUDA device is set from
``LOCAL_RANK`` before init; timeouts are explicit; SLURM's variables are a fallback to
torchrun's. Only a group this module created is destroyed. At world size 1 nothing is
initialized and every collective is a no-op, so worker functions run in plain unit tests.

Extraction uses collectives only at start-up (one broadcast of the plan id); after that ranks
claim shards through the rendezvous store's atomic counter, so a slow or dead rank never blocks
the others.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

log = logging.getLogger(__name__)


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
        self._created = False

    @property
    def active(self) -> bool:
        return self.info.world_size > 1

    def init(self, device_type: str = "cpu") -> "Distributed":
        if not self.active:
            return self
        import torch
        import torch.distributed as dist

        if device_type == "cuda":
            torch.cuda.set_device(self.info.local_rank % torch.cuda.device_count())
        if not dist.is_initialized():
            backend = "nccl" if device_type == "cuda" else "gloo"
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
