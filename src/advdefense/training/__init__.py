"""Training: one :class:`Trainer`, small recipes, atomic checkpoints, schedules and DDP.

* :class:`Trainer` — ``Trainer(cfg).fit(resume=False) -> metrics``;
* recipes — ``build_recipe(name, attack_cfg, **recipe_args)``: ``standard``, ``pgd_at``,
  ``trades``, ``mart`` (each composes with auxiliary heads through ``aux_weight``);
* checkpoints — :func:`save_checkpoint`, :func:`load_checkpoint`,
  :func:`load_model_from_checkpoint` (``weights_only=True``);
* :mod:`.distributed` — the process-group helpers of :mod:`advdefense.distributed`
  (DDP wrapping is in the trainer).

Heavy submodules are imported lazily so ``from advdefense.training import load_checkpoint``
stays cheap and free of import cycles.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Trainer": "trainer",
    "TrainingError": "trainer",
    "seed_everything": "trainer",
    "Recipe": "recipes",
    "RECIPES": "recipes",
    "build_recipe": "recipes",
    "recipe_defaults": "recipes",
    "KLObjective": "recipes",
    "save_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "load_model_from_checkpoint": "checkpoint",
    "make_checkpoint": "checkpoint",
    "capture_rng": "checkpoint",
    "restore_rng": "checkpoint",
    "unwrap_model": "checkpoint",
    "build_optimizer": "optim",
    "build_schedule": "optim",
    "EpochSchedule": "optim",
    "gather_per_example": "distributed",
    "shard_indices": "distributed",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
