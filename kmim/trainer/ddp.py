"""Distributed plumbing of the training-style loops (``kmim train``, ``kmim eval finetune``): joining the torchrun
process group, the DDP wrapper, metric averaging over ranks and gathering every rank's RNG states."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kmim.trainer.checkpoint import rng_state


class TrainError(RuntimeError):
    """A run that cannot start or continue: incompatible run directory, non-finite loss, too little data."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """Join the torchrun process group when launched by torchrun with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise TrainError("field 'device': cuda requested but CUDA is not available")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=dev if cuda else None)
        return Dist(dist.get_rank(), world, dev)
    return Dist(0, 1, dev)


class MetricWindow:
    """Sums of the step outputs since the last log line, kept on device (no host sync per step)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: dict) -> None:
        """Scalar tensors, or a list of them for ``mto_h`` (per-layer H)."""
        for key, value in values.items():
            v = (torch.stack(value) if key == "mto_h" else value).detach().float().reshape(-1)
            self.sums[key] = self.sums[key] + v if key in self.sums else v.clone()
            self.counts[key] = self.counts.get(key, 0) + 1

    def means(self, world: int) -> dict[str, float | list[float]]:
        """Averages over the window and the ranks (a collective when ``world > 1``); resets the window."""
        keys = sorted(self.sums)
        flat = torch.cat([self.sums[k] / (self.counts[k] * world) for k in keys])
        if world > 1:
            dist.all_reduce(flat)
        values = flat.tolist()
        out: dict[str, float | list[float]] = {}
        for key in keys:
            n = self.sums[key].numel()
            out[key], values = (values[:n] if key == "mto_h" else values[0]), values[n:]
        self.sums, self.counts = {}, {}
        return out


def gather_rng(world: int) -> list[dict]:
    """Every rank's RNG states, indexed by rank (a collective when ``world > 1``)."""
    mine = rng_state()
    if world == 1:
        return [mine]
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine)
    return everyone


def wrap_ddp(model: nn.Module, d: Dist) -> nn.Module:
    """``model`` itself in one process, else its DDP wrapper (gradients all-reduced in ``backward``)."""
    if d.world == 1:
        return model
    return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def grad_sync(ddp: nn.Module, d: Dist, micro: int, accum_steps: int) -> contextlib.AbstractContextManager:
    """The context of micro-batch ``micro``'s backward: DDP all-reduces gradients on the last of ``accum_steps``
    only (``no_sync`` before it)."""
    return contextlib.nullcontext() if micro == accum_steps - 1 or d.world == 1 else ddp.no_sync()


def distributed(device: str, body: Callable[[Dist], dict]) -> dict:
    """``body(Dist)`` in the process group :func:`setup_distributed` joins, left afterwards however body ends."""
    d = setup_distributed(device)
    try:
        return body(d)
    finally:
        if d.world > 1:
            dist.destroy_process_group()
