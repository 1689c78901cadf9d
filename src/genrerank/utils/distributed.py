"""torch.distributed for the trainer and the evaluation: which process am I, and the few
collectives they use.

A process started without ``torchrun`` is world 1: :func:`context` says so and every collective
here returns its input, so single-process code pays nothing. Under ``torchrun`` (the ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` variables), :func:`init_from_env` joins the process group:
gloo on CPU, NCCL on GPU.

Collectives run under ``torch.no_grad`` and never under ``torch.inference_mode``, where gloo
fails (NOTES.md section 11).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

#: How long a collective waits for a missing rank before failing (instead of hanging forever).
DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job: rank ``rank`` of ``world_size``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, logs and progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, n: int) -> range:
        """Rows ``rank, rank + world, ...`` of ``n``: disjoint across ranks, covering all of
        them once, unpadded (so gathered results never count a request twice)."""
        return range(self.rank, n, self.world_size)


SINGLE = DistContext()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(
    device: str = "cpu", timeout: datetime.timedelta = DEFAULT_TIMEOUT
) -> DistContext:
    """Join the process group ``torchrun`` described in the environment (idempotent); world 1
    when not launched by it. ``device`` picks the backend: NCCL for CUDA, gloo otherwise."""
    if dist.is_available() and dist.is_initialized():
        return context()
    if not launched_by_torchrun():
        return SINGLE
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; run without torchrun")
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timeout)
    return context()


def context() -> DistContext:
    """The current process group's view, or world 1 when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(dist.get_world_size()))),
        backend=str(dist.get_backend()),
    )


def shutdown() -> None:
    """Leave the process group, if any (at the end of a torchrun job)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_of(device: str, ctx: DistContext) -> torch.device:
    """The training device of this rank: ``cuda`` means this rank's own GPU under torchrun."""
    if device == "cuda" and ctx.distributed:
        return torch.device("cuda", ctx.local_rank)
    return torch.device(device)


@torch.no_grad()
def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``values`` over ranks (float64 on the collective's device)."""
    ctx = context()
    if not ctx.distributed:
        return values
    out = values.detach().to(torch.float64).clone()
    if ctx.backend == "nccl":
        out = out.cuda()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.cpu()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (pickled; for results, not for tensors in a loop)."""
    ctx = context()
    if not ctx.distributed:
        return [obj]
    # all_gather_object needs the current CUDA device set under NCCL; it is (init_from_env).
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    ctx = context()
    if not ctx.distributed:
        return obj
    box = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if context().distributed:
        dist.barrier()


def rank_stream(
    permutation: Sequence[int], rank: int, world_size: int, batch_size: int
) -> list[int]:
    """This rank's share of an epoch's ``permutation``, in the order it trains on it.

    The permutation is padded to a multiple of ``world_size`` by wrapping around (as
    ``DistributedSampler`` pads, so every rank takes the same number of steps), then cut into
    global batches of ``world_size * batch_size``; rank r takes the r-th contiguous part of
    each. So optimizer step k of a job with W ranks at batch b sees exactly the requests that
    step k of one process at batch W * b sees. With ``world_size == 1`` it is the permutation.
    """
    perm = list(permutation)
    if world_size == 1:
        return perm
    if not perm:
        return []
    padded_len = -(-len(perm) // world_size) * world_size
    perm = (perm * (padded_len // len(perm) + 1))[:padded_len]
    out: list[int] = []
    step = world_size * batch_size
    for start in range(0, padded_len, step):
        chunk = perm[start : start + step]
        part = len(chunk) // world_size
        out.extend(chunk[rank * part : (rank + 1) * part])
    return out
