"""Distributed evaluation: shard the examples over ``torchrun`` processes, gather the
per-example results.

``torchrun --nproc_per_node=N -m advdefense evaluate ...`` gives every process the examples
``rank, rank + N, ...`` (:func:`shard`); each runs :func:`~.harness.evaluate` or
:func:`~.suite.run_suite` on its share, and :func:`gather_result` all-gathers every per-example
verdict back into dataset order, so the accuracies, intervals and the per-example worst case are
those of the whole set. What stays local to a process: the timings (its own) and the
attack-failure checks (each process checks its own shard; rank 0's are reported).

Without a process group both functions are the identity.
"""

from __future__ import annotations

import dataclasses

import torch

from ..distributed import gather_per_example, is_distributed, shard_indices
from .harness import EntryResult, EvalResult
from .protocols import Verdict

__all__ = ["gather_result", "shard"]


def shard(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's examples ``rank::world`` of ``(x, y)`` (all of them in one process)."""
    if not is_distributed():
        return x, y
    idx = torch.tensor(shard_indices(x.shape[0]), dtype=torch.long)
    return x[idx], y[idx]


def _gather_verdict(v: Verdict | None, total: int) -> Verdict | None:
    if v is None:
        return None
    return Verdict(*(gather_per_example(v.get(k), total) for k in Verdict.KINDS))


def _gather_entry(e: EntryResult, total: int) -> EntryResult:
    ran = None if e.ran is None else gather_per_example(e.ran, total)
    return dataclasses.replace(e, verdict=_gather_verdict(e.verdict, total), ran=ran,
                               cumulative=_gather_verdict(e.cumulative, total))


def gather_result(result: EvalResult, total: int) -> EvalResult:
    """The :class:`EvalResult` of all ``total`` examples from each process's shard result.

    Every process must call it (it runs collectives) and every process gets the full result.
    ``worst`` is recomputed as the per-example AND over clean and every entry.
    """
    if not is_distributed():
        return result
    clean = _gather_entry(result.clean, total)
    entries = {label: _gather_entry(e, total) for label, e in result.entries.items()}
    worst = clean.verdict
    for e in entries.values():
        worst = worst & e.verdict
    config = {**result.config, "n": total, "distributed_shard_n": result.n}
    return dataclasses.replace(result, n=total, clean=clean, entries=entries, worst=worst,
                               labels=gather_per_example(result.labels, total), config=config)
