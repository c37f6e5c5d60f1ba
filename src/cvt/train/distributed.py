"""The processes of a training run: the environment `torchrun` sets up, data split across ranks, DDP/FSDP2
wrapping, and the collective steps a checkpoint needs (buffers and RNG states gathered, full state dicts)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler

from .rng import rng_state


@dataclass
class DistEnv:
    """This process's place in the run.

    Attributes:
        rank: global rank.
        world_size: number of processes.
        local_rank: rank on this machine (selects the GPU).
        device: the device this process trains on.
        owns_group: whether `setup_env` created the process group (and `teardown_env` destroys it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_env(device: str) -> DistEnv:
    """Read `torchrun`'s environment, pick the device ("auto", "cpu", "cuda") and join the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    env = DistEnv(rank=rank, world_size=world, local_rank=local, device=dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
        env.owns_group = True
    return env


def teardown_env(env: DistEnv) -> None:
    """Destroy the process group if `setup_env` created it."""
    if env.owns_group:
        dist.destroy_process_group()


class ResumableSampler(DistributedSampler):
    """`DistributedSampler` (seeded shuffle per epoch, split across ranks) that can start part-way into an epoch.

    `set_epoch(epoch, start)` skips the first `start` indices of this rank's share without touching the data,
    which is how a resumed run continues from the batch where the interrupted one stopped.
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, seed: int, shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start :])

    def __len__(self) -> int:
        return max(self.num_samples - self.start, 0)


class PaddedEval(Dataset):
    """Evaluation set padded to a multiple of the world size; items carry a flag that is False on the padding.

    Every rank then runs the same number of batches (FSDP needs it) and the padding is not counted.
    """

    def __init__(self, dataset: Dataset, world_size: int) -> None:
        self.dataset, self.size = dataset, len(dataset)
        self.padded = math.ceil(self.size / world_size) * world_size

    def __len__(self) -> int:
        return self.padded

    def __getitem__(self, index: int) -> tuple[Any, Any, bool]:
        image, target = self.dataset[index % self.size]
        return image, target, index < self.size


def wrap_model(net: nn.Module, env: DistEnv, *, fsdp: bool) -> nn.Module:
    """The module the training step runs: `net` sharded with FSDP2, wrapped in DDP, or `net` itself (one process)."""
    if fsdp:
        # FSDP only: a heavy import, and a part of torch that not every build has
        from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

        for stage in net.stages:  # every transformer block, then the rest (embeddings, norm, head)
            for block in stage.blocks:
                fully_shard(block)
        fully_shard(net)
        return net
    if env.distributed:
        ids = [env.device.index] if env.device.type == "cuda" else None
        unused = bool(net.unused_in_forward())  # see `CvT.unused_in_forward`
        return nn.parallel.DistributedDataParallel(net, device_ids=ids, find_unused_parameters=unused)
    return net


def model_state(net: nn.Module, fsdp: bool) -> dict[str, torch.Tensor]:
    """The full model state dict on the CPU (gathered from every rank under FSDP: collective)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: PLC0415

        return get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}


def optimizer_state(net: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> dict[str, Any]:
    """The full optimiser state dict (gathered under FSDP: collective)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (  # noqa: PLC0415
            StateDictOptions,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(net, optimizer, options=options)
    return optimizer.state_dict()


def load_model_state(net: nn.Module, state: dict[str, torch.Tensor], fsdp: bool) -> None:
    """Load a full model state dict (sharded onto the ranks under FSDP)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict  # noqa: PLC0415

        set_model_state_dict(net, state, options=StateDictOptions(full_state_dict=True))
    else:
        net.load_state_dict(state)


def load_optimizer_state(net: nn.Module, optimizer: torch.optim.Optimizer, state: dict, fsdp: bool) -> None:
    """Load a full optimiser state dict (sharded under FSDP)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (  # noqa: PLC0415
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(net, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def gather_rng(env: DistEnv) -> list[dict[str, Any]]:
    """Every rank's RNG states, in rank order (collective)."""
    state = rng_state()
    if not env.distributed:
        return [state]
    states: list[Any] = [None] * env.world_size
    dist.all_gather_object(states, state)
    return states


def sync_buffers(net: nn.Module, env: DistEnv) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics drift apart between DDP forwards; collective)."""
    if env.distributed:
        for buf in net.buffers():
            dist.broadcast(buf, 0)


def all_finite(net: nn.Module, env: DistEnv) -> bool:
    """Whether every parameter of `net` is finite, on every rank (collective; each checks its own shards)."""
    bad = torch.zeros((), device=env.device)
    for p in net.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p  # an FSDP2 shard
        bad += (~torch.isfinite(local.detach())).sum().float()
    if env.distributed:
        dist.all_reduce(bad)
    return bad.item() == 0


def barrier(env: DistEnv) -> None:
    """Wait for every rank (no-op in one process)."""
    if env.distributed:
        dist.barrier()
