"""Parallelism applied from outside the model: torchrun process groups (training, latent extraction,
sample-npz), DDP, FSDP2 sharding and torch.compile."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .utils.devices import resolve_device


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    device: torch.device
    started: bool  # this process created the group and should destroy it

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str) -> Dist:
    """torchrun's process group (NCCL on GPU, gloo on CPU), or a single process.
    The GPU comes from LOCAL_RANK, never the global rank, so many nodes work; an explicit
    cuda:N is kept as given."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # resolve_device refuses what is neither cpu nor cuda (--device tpu) and cuda without a GPU.
    cuda = torch.cuda.is_available() if device_name == "auto" else resolve_device(device_name).type == "cuda"
    if not cuda:
        device = torch.device("cpu")
    elif device_name.startswith("cuda:"):
        device = torch.device(device_name)
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        return Dist(dist.get_rank(), dist.get_world_size(), device, True)
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), device, False)
    return Dist(0, 1, device, False)


def broadcast_object(obj, d: Dist):
    """Rank 0's `obj` on every rank."""
    if d.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def shard(model: torch.nn.Module) -> None:
    """FSDP2: each block is its own unit, so only one block's full weights exist at a time."""
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)


def wrap(model: nn.Module, d: Dist, parallel: str = "ddp", compile: bool = False) -> nn.Module:
    """What the training step calls: DDP across processes (FSDP2 shards in place, see `shard`), then
    torch.compile."""
    net = model
    if d.world > 1 and parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    return torch.compile(net) if compile else net
