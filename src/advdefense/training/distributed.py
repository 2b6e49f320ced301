"""The trainer's process-group helpers: those of :mod:`advdefense.distributed`.

They live one layer down so that evaluation can use them without importing training; this
module keeps ``from advdefense.training import distributed`` working. The DDP wrapping itself
(``_AuxDDP``, which runs ``forward_with_aux`` through DDP's forward) is in
:mod:`advdefense.training.trainer`.
"""

from __future__ import annotations

from .. import distributed as _shared
from ..distributed import (
    DistContext,
    all_reduce_sum,
    barrier,
    cleanup,
    gather_per_example,
    init_from_env,
    is_distributed,
    is_main_process,
    rank,
    shard_indices,
    world_size,
)

__all__ = list(_shared.__all__)
