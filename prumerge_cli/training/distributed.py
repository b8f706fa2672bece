"""`torchrun` support: one process per device, gradients averaged by DistributedDataParallel."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Rank:
    """This process's place in the job and the device it drives."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Whether this process writes files and shows progress."""
        return self.rank == 0


def init_rank(device_type: str = "cpu") -> Rank:
    """Join the process group when launched by `torchrun` (WORLD_SIZE > 1); a single process otherwise. With
    `device_type` "cuda", each process takes the GPU of its local rank (and makes it the current device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if device_type == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world == 1:
        return Rank(0, 1, device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Rank(dist.get_rank(), world, device)


def barrier(rank: Rank) -> None:
    """Wait for every process (no-op alone)."""
    if rank.world > 1:
        dist.barrier()


def shutdown(rank: Rank) -> None:
    """Leave the process group."""
    if rank.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, rank: Rank) -> torch.Tensor:
    """The sum over processes of a small CPU tensor (itself alone)."""
    if rank.world == 1:
        return values
    moved = values.to(rank.device)
    dist.all_reduce(moved)
    return moved.cpu()
