"""One process group setup for every script of the example: torchrun (any number of nodes) or a plain process.

Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` / ``MASTER_PORT`` in the
environment) :func:`setup_distributed` joins the group — NCCL with one GPU per process when CUDA is
available, gloo on the CPU — and otherwise returns a single-process context. Scripts call
:func:`barrier` and :func:`cleanup` unconditionally; both do nothing without a group, as
:func:`all_mean` and :func:`gather_objects` do nothing in a single process.

Timeouts. Every collective of the group fails once it has waited the group's timeout (NCCL's watchdog
then tears the job down): torch's default (``torch.distributed.constants``: one for NCCL, a longer one for
gloo) unless ``SIT_DIST_TIMEOUT_MINUTES`` sets it, for every script. A wait for work that one rank does
alone (rank 0 reading or writing a checkpoint, hashing a file, writing a folder's metadata) has no bound the
ranks could agree on: :func:`barrier` and :func:`broadcast_object` take ``long_wait=True`` there, which
waits on a second, gloo group (CPU, no watchdog) whose timeout is :data:`LONG_WAIT`. A rank that dies still
ends the wait at once (its connections close).

Example:
    >>> from distributed import setup_distributed, barrier, cleanup
    >>> ctx = setup_distributed()
    >>> (ctx.rank, ctx.world_size, ctx.is_main)
    (0, 1, True)
    >>> barrier(); cleanup(ctx)
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from runtime.cli import UsageError

__all__ = ["DistContext", "setup_distributed", "barrier", "broadcast_object", "all_reduce_", "all_mean", "any_rank",
           "gather_objects", "cleanup", "group_timeout", "TIMEOUT_ENV", "LONG_WAIT"]

TIMEOUT_ENV = "SIT_DIST_TIMEOUT_MINUTES"  # the process group's timeout, for every script
# The long-wait group's timeout: far past any single-rank file work; a hung rank, not a slow one, hits it.
LONG_WAIT = timedelta(hours=24)
_long_group: Any = None  # the gloo group of long_wait=True, while this process's group exists


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: its global rank, rank on its node, number of processes and device.

    created says whether :func:`setup_distributed` made the process group (and :func:`cleanup` destroys it).
    """

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    created: bool

    @property
    def is_main(self) -> bool:
        """True on global rank 0, the process that writes shared files and prints progress."""
        return self.rank == 0


def group_timeout() -> timedelta | None:
    """The timeout ``SIT_DIST_TIMEOUT_MINUTES`` asks for (None: torch's default); UsageError if it is no
    positive number."""
    value = os.environ.get(TIMEOUT_ENV, "").strip()
    if not value:
        return None
    try:
        minutes = float(value)
    except ValueError:
        minutes = math.nan
    if not 0 < minutes < math.inf:
        raise UsageError(f"{TIMEOUT_ENV}={value!r} must be a number of minutes > 0, e.g. {TIMEOUT_ENV}=30")
    return timedelta(minutes=minutes)


def setup_distributed() -> DistContext:
    """Join torchrun's process group if launched by torchrun (else one process) and pick this rank's device.

    The group times out after ``SIT_DIST_TIMEOUT_MINUTES`` (torch's default without it); a second, gloo
    group serves the waits of ``long_wait=True``."""
    global _long_group
    created = False
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        timeout = group_timeout()
        if torch.cuda.is_available():
            # Before init: NCCL binds each process to the device that is current when it starts.
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)
        created = True
        if dist.get_world_size() > 1:  # every rank creates it, at the same point: new_group is collective
            _long_group = dist.new_group(backend="gloo", timeout=LONG_WAIT)
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    else:
        rank, local_rank, world_size = 0, 0, 1
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return DistContext(rank, local_rank, world_size, device, created)


def _wait_group(long_wait: bool) -> Any:
    """The group a wait goes through: the long-wait one where asked for and made, else the default group."""
    return _long_group if long_wait and _long_group is not None else None


def barrier(long_wait: bool = False) -> None:
    """Wait for every process (no-op without a process group). ``long_wait``: after work one rank does alone,
    however long it takes (the long-wait group: no NCCL watchdog, :data:`LONG_WAIT`)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier(group=_wait_group(long_wait))


def broadcast_object(obj: Any, src: int = 0, long_wait: bool = False) -> Any:
    """Rank src's picklable obj on every rank (obj itself without a process group). ``long_wait``: the other
    ranks wait for src's work alone, however long it takes (see :func:`barrier`)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_wait_group(long_wait))
    return box[0]


def all_reduce_(tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """``dist.all_reduce`` in place, waited on through its handle, so that the work's last reference (and with it
    the tensor's) is dropped here, under the GIL. Dropped in gloo's worker thread, it needs the GIL there and can
    deadlock against a process-group teardown that holds it (seen with DDP's reducer being freed)."""
    work = dist.all_reduce(tensor, op=op, async_op=True)
    work.wait()
    return tensor


def all_mean(values: torch.Tensor, world_size: int) -> torch.Tensor:
    """Mean over ranks (identity in a single process)."""
    if world_size > 1:
        values = all_reduce_(values.clone())
        values /= world_size
    return values


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """Whether flag holds on any rank (every rank calls it; the flag itself in a single process). Also a
    barrier: a script's last sync, where a rank that stopped early meets the ones that finished."""
    if ctx.world_size == 1:
        return flag
    value = all_reduce_(torch.tensor([float(flag)], device=ctx.device), op=dist.ReduceOp.MAX)
    return value.item() > 0


def gather_objects(obj: Any, world_size: int) -> list[Any]:
    """obj (tensors, containers, numbers) from every rank, in rank order (on every rank)."""
    if world_size == 1:
        return [obj]
    # Sent as torch.save bytes: all_gather_object's own pickling of tensors fails to load in some versions.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, buffer.getvalue())
    return [torch.load(io.BytesIO(data), weights_only=True) for data in out]


def cleanup(ctx: DistContext) -> None:
    """Destroy the process group if :func:`setup_distributed` created it (and its long-wait group); calling it
    again does nothing. Not a collective: a rank may leave while others still work alone (see sample_ddp.py)."""
    global _long_group
    if ctx.created and dist.is_initialized():
        dist.destroy_process_group()
        _long_group = None
