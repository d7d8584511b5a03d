"""Multi-process training with DistributedDataParallel, launched by torchrun.

``medcli train --multi-gpu`` outside torchrun re-launches itself as
``python -m torch.distributed.run --standalone --nproc_per_node=N -m medcli train ...`` (N = visible GPUs,
or ``--nproc``); inside torchrun (``LOCAL_RANK`` set) each process joins the group here.  NCCL on CUDA,
gloo on CPU: the CPU path is the same code, which is how the tests exercise it with two processes.

Only rank 0 writes files and reports events; validation predictions of all ranks are gathered so metrics
cover every validation subject exactly once (DistributedSampler pads with duplicates, which are dropped
by subject id).
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

NPROC_ENV = "MEDCLI_NPROC"


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def init(device_type: str) -> None:
    """Join the torchrun process group (NCCL for CUDA, gloo for CPU)."""
    if is_initialized():
        return
    if device_type == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", timeout=timedelta(minutes=30), device_id=device)
    else:
        dist.init_process_group(backend="gloo", timeout=timedelta(minutes=30))


def shutdown() -> None:
    """Leave the process group (end of a torchrun child); a no-op in a single process."""
    if is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def stop_agreed(device: torch.device) -> None:
    """KeyboardInterrupt on every rank at once when any rank was sent SIGINT (``medcli.stopping``): called by
    every rank at the same points (each batch), so ranks stop together, never one inside a collective that
    another left.  A no-op in a single process, where SIGINT raises where it lands."""
    from medcli import stopping

    if world_size() > 1 and all_reduce_sum(float(stopping.requested()), device) > 0:
        raise KeyboardInterrupt


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s object on every rank (e.g. an error raised on rank 0 while preparing the run)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(items: list[Any]) -> list[Any]:
    """Concatenate every rank's list (all_gather_object); identity in a single process."""
    if not is_initialized():
        return list(items)
    parts: list[list[Any] | None] = [None] * world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in (part or [])]


def all_reduce_mean(value: float, device: torch.device) -> float:
    if not is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / world_size()


def all_reduce_sum(value: float, device: torch.device) -> float:
    if not is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def no_sync(model: torch.nn.Module, skip: bool):
    """DDP's ``no_sync`` on non-final micro-batches of an accumulation group (saves an all-reduce each)."""
    if skip and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP and/or torch.compile wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
