"""Process-group setup for torchrun (gloo on CPU, NCCL on GPUs) and gradient averaging: DDP's bucketed
all-reduce where it applies, else one flat all-reduce after the backward."""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    return info


def all_reduce_mean_grads(params: list[torch.nn.Parameter], world_size: int) -> None:
    """Average gradients over ranks in one flat buffer per dtype, after the whole backward: for the
    parameters DDP ignores, and for everything where DDP is not used (`Trainer._data_parallel`)."""
    if world_size <= 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for group in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat)
        flat /= world_size
        offset = 0
        for g in group:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n


class _Forward(torch.nn.Module):
    """`run(*inputs)`, a function of `model`, as the forward of a module owning the model: what DDP wraps."""

    def __init__(self, model: torch.nn.Module, run: Callable[..., Any]) -> None:
        super().__init__()
        self.model, self.run = model, run

    def forward(self, *inputs: torch.Tensor) -> Any:
        return self.run(*inputs)


def data_parallel(
    model: torch.nn.Module, run: Callable[..., Any], ignore: list[str], device: torch.device
) -> DDP:
    """`run` under DDP, which all-reduces each bucket of gradients as soon as the backward has filled it,
    overlapping communication with the rest of the backward; `no_sync()` defers it to a last micro-batch.

    The parameters named in `ignore` are left to `all_reduce_mean_grads` after the backward: DDP only
    expects gradients of parameters reached from `run`'s outputs, in the backward that follows it, and
    the loss also uses these elsewhere (the temperature on GradCache's cached features, objective heads).
    find_unused_parameters: a part the objectives leave unused (CoCa's decoder under plain clip) then
    keeps no gradient instead of stalling the reduction (static_graph, which would skip that per-step
    graph search, fails under no_sync). No buffer broadcast: rank 0's buffers, the ones saved, are its
    own either way (BatchNorm statistics do not enter a training forward)."""
    module = _Forward(model, run)
    DDP._set_params_and_buffers_to_ignore_for_model(module, [f"model.{n}" for n in ignore])
    no_sync_buffers = (  # the argument's name since torch 2.14
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DDP).parameters
        else {"broadcast_buffers": False}
    )
    # its note when a step left nothing unused (the usual case) is noise in every rank's log
    warnings.filterwarnings("ignore", message=".*find_unused_parameters=True was specified.*")
    return DDP(
        module,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True,
        gradient_as_bucket_view=True,  # no copy between .grad and the buckets
        **no_sync_buffers,
    )


def broadcast_params(model: torch.nn.Module) -> None:
    """Start every rank from rank 0's weights."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


def mean_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Each value averaged over the ranks, in one all-reduce."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
