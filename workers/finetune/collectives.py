"""The few tensor collectives the fine-tuning loop needs, over ``workers.distributed``'s group.

``workers.distributed`` owns init and teardown (backend from the device, timeouts, SLURM
fallback); this adds max / sum / gather of tensors. Every collective is the identity at world
size 1, so the loop runs in plain unit tests.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    group: Optional[Any] = None  # the workers.distributed.Distributed that owns the process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _tensor(self, value, dtype) -> torch.Tensor:
        # nccl reduces device tensors only; gloo host tensors.
        device = self.device if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")
        return torch.as_tensor(value, dtype=dtype, device=device)

    def all_reduce_max(self, value: int) -> int:
        if self.world_size == 1:
            return int(value)
        tensor = self._tensor([value], torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        moved = self._tensor(tensor, tensor.dtype).clone()
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        return moved.to(tensor.device)

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        if self.world_size == 1:
            return [tensor]
        moved = self._tensor(tensor, tensor.dtype).contiguous()
        out = [torch.empty_like(moved) for _ in range(self.world_size)]
        dist.all_gather(out, moved)
        return [t.cpu() for t in out]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def init_distributed(timeout_s: float = 1800.0) -> DistEnv:
    """Join the process group torchrun (or srun) set up, through ``workers.distributed``; a
    single process needs none. The timeout covers rank 0 writing a ViT-H checkpoint while the
    others wait at the barrier."""
    from videofeat.workers.distributed import Distributed

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    group = Distributed(timeout_s=timeout_s).init(device_type)
    info = group.info
    device = torch.device("cpu")
    if device_type == "cuda":
        device = torch.device("cuda", info.local_rank % torch.cuda.device_count())
    return DistEnv(rank=info.rank, world_size=info.world_size, local_rank=info.local_rank, device=device,
                   group=group)


def teardown(env: DistEnv) -> None:
    if env.group is not None:
        env.group.close()
