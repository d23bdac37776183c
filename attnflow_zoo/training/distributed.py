"""torchrun DDP helpers: which rank this is, the process group, averaging over ranks."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DistContext:
    """This process's place in a torchrun job (a single process is rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> DistContext:
        """What torchrun told this process (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``): the one
        place they are read; rank 0 of 1 when they are absent or not integers."""
        values = []
        for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
            try:
                values.append(int(os.environ.get(name, default)))
            except ValueError:
                values.append(default)
        return cls(values[0], max(1, values[1]), values[2])


def init_distributed(device: torch.device | None) -> DistContext:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1): NCCL for CUDA,
    gloo otherwise. A single process gets ``DistContext()``."""
    launched = DistContext.from_env()
    if not launched.active:
        return DistContext()
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and (device is None or device.type == "cuda")
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), launched.local_rank)


def all_mean(values: Tensor, ctx: DistContext) -> Tensor:
    """The mean of ``values`` over ranks (the values themselves in a single process)."""
    if ctx.active:
        values = values.clone()
        dist.all_reduce(values)
        values /= ctx.world_size
    return values


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op in a single process)."""
    if ctx.active:
        dist.barrier()
