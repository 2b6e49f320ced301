"""Process-group helpers shared by training and evaluation (``torchrun``).

``torchrun --nproc_per_node=N -m advdefense train|evaluate ...`` starts N processes with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set;
:func:`init_from_env` then joins the process group (``nccl`` on CUDA, ``gloo`` on CPU).
:func:`shard_indices` gives a process its examples (``rank::world``, the order of a
``DistributedSampler(shuffle=False)``) and :func:`gather_per_example` puts per-example results
back in dataset order. Without a process group every helper is the identity (world size 1).

Work queues need no process group: :func:`job_store` is the key-value store every process of
a ``torchrun`` job shares (the default group's store, else torchrun's rendezvous store at
``MASTER_ADDR:MASTER_PORT``, else an in-process store), and :func:`claim` hands out numbered
items through its atomic counters (``store.add(key, 1)``), so a process that dies loses only
the item it held and no process ever waits for another.

Users: the Trainer (:mod:`advdefense.training.trainer`, which also wraps the model in
DistributedDataParallel) and evaluation and certification over units
(:mod:`advdefense.evaluation.units`).
"""

from __future__ import annotations

import gc
import logging
import os
import threading
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import AdvDefenseError

log = logging.getLogger(__name__)

__all__ = [
    "DistContext",
    "init_from_env",
    "is_distributed",
    "rank",
    "world_size",
    "is_main_process",
    "barrier",
    "all_reduce_sum",
    "shard_indices",
    "gather_per_example",
    "cleanup",
    "env_rank",
    "env_world_size",
    "use_local_device",
    "LocalStore",
    "job_store",
    "claim",
]


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: ``rank`` of ``world_size`` (``local_rank`` on its node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def init_from_env(device_type: str = "cpu") -> DistContext:
    """Join the process group described by torchrun's environment variables.

    Returns a single-process context when ``WORLD_SIZE`` is unset or 1. An already
    initialized process group is reused.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not dist.is_available():
        raise AdvDefenseError("WORLD_SIZE > 1 but torch.distributed is not available in this "
                              "PyTorch build; run a single process")
    rk = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rk)))
    _set_local_device(local)
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local,
                           dist.get_backend(), False)
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise AdvDefenseError(f"WORLD_SIZE={world} but {var} is not set; launch with "
                                  "torchrun --nproc_per_node=N -m advdefense train|evaluate ...")
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=rk, world_size=world)
    log.info("joined process group: rank %d of %d (%s)", rk, world, backend)
    return DistContext(rk, world, local, backend, True)


def _set_local_device(local: int) -> None:
    """Make ``cuda:LOCAL_RANK`` the current device whenever CUDA is present, whatever the
    backend: code that uses "the current device" (default ``cuda`` tensors, the current
    device's generator) then works on this process's own GPU, not on GPU 0."""
    if torch.cuda.is_available() and local < torch.cuda.device_count():
        torch.cuda.set_device(local)


def cleanup(ctx: DistContext) -> None:
    """Destroy the process group if :func:`init_from_env` created it: after a barrier (no
    rank tears its connections down while another still uses them) and a garbage collection
    (wrappers that hold the group, such as DistributedDataParallel in a reference cycle,
    are freed now, while the interpreter is alive, not at its shutdown)."""
    gc.collect()
    if ctx.initialized_here and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over processes (in place; returned)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def shard_indices(n: int, rank_: int | None = None, world: int | None = None) -> list[int]:
    """Indices ``rank, rank + world, ...`` of ``range(n)``: this process's share."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    return list(range(rank_, n, world))


def gather_per_example(local: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """All-gather per-example results computed on :func:`shard_indices` shards, in dataset order.

    ``local`` holds the results (first dimension = examples) for indices ``rank::world``
    (also the order of a ``DistributedSampler(shuffle=False)``, whose padding is cut off by
    ``total``). Shards may differ in length by one. Every process gets the full
    ``(total, ...)`` tensor. Single-process: returns ``local`` (cut to ``total``).
    """
    if not is_distributed():
        return local if total is None else local[:total]
    world = dist.get_world_size()
    n_local = torch.tensor([local.shape[0]], device=local.device, dtype=torch.long)
    sizes = [torch.zeros_like(n_local) for _ in range(world)]
    dist.all_gather(sizes, n_local)
    counts = [int(s) for s in sizes]
    width = max(counts)
    padded = local
    if local.shape[0] < width:
        pad = local.new_zeros((width - local.shape[0], *local.shape[1:]))
        padded = torch.cat([local, pad])
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    n = sum(counts) if total is None else total
    out = local.new_empty((sum(counts), *local.shape[1:]))
    for r, (part, c) in enumerate(zip(parts, counts, strict=True)):
        out[r::world][:c] = part[:c]
    return out[:n]


# -- work queues through the rendezvous store ---------------------------------------------------
def env_rank() -> int:
    """This process's rank as torchrun set it (``RANK``; 0 without torchrun)."""
    return int(os.environ.get("RANK", "0") or 0)


def env_world_size() -> int:
    """The number of processes as torchrun set it (``WORLD_SIZE``; 1 without torchrun)."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))


def use_local_device() -> None:
    """Make ``cuda:LOCAL_RANK`` the current CUDA device (nothing without CUDA)."""
    _set_local_device(int(os.environ.get("LOCAL_RANK", "0") or 0))


class LocalStore:
    """The part of a ``torch.distributed.Store`` that :func:`claim` uses (``add``), in one
    process."""

    def __init__(self) -> None:
        self._values: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, key: str, amount: int) -> int:
        with self._lock:
            self._values[key] = self._values.get(key, 0) + int(amount)
            return self._values[key]


def job_store(timeout: timedelta = timedelta(minutes=30)):
    """The store every process of this job shares, under a prefix of its own.

    The default process group's store when one is initialized; else, under ``torchrun``
    (``WORLD_SIZE > 1``), a client of the rendezvous store at ``MASTER_ADDR:MASTER_PORT``
    (torchrun's agent hosts it, so it outlives every worker); else a :class:`LocalStore`.
    The prefix holds ``TORCHELASTIC_RESTART_COUNT``, so a restarted worker group starts from
    fresh counters.
    """
    prefix = f"advdefense/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    if dist.is_available() and dist.is_initialized():
        return dist.PrefixStore(prefix, dist.distributed_c10d._get_default_store())
    if env_world_size() <= 1:
        return LocalStore()
    if not dist.is_available():
        raise AdvDefenseError("WORLD_SIZE > 1 but torch.distributed is not available in this "
                              "PyTorch build; run a single process")
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
        if var not in os.environ:
            raise AdvDefenseError(f"WORLD_SIZE={env_world_size()} but {var} is not set; "
                                  "launch with torchrun --nproc_per_node=N -m advdefense ...")
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    return dist.PrefixStore(prefix, store)


def claim(store, key: str) -> int:
    """The next number of counter ``key`` (0, 1, 2, ... over all processes; each number is
    given to exactly one caller)."""
    return int(store.add(key, 1)) - 1
