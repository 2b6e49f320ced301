"""Optimizers and per-epoch learning-rate schedules.

``build_optimizer(model, cfg)``: ``sgd`` (momentum, nesterov, weight decay) or ``adam``.
Parameters carrying the attribute ``_no_weight_decay = True`` go to a group with weight decay
0: PNI's learnable noise scales are trained this way (He et al. 2019, reference ``main.py``).
``optimizer.noise_lr_scale`` multiplies the learning rate of the noise parameters: Adam moves
every element by about ``lr`` per step whatever its gradient, so CNI's per-weight variances
and low-rank factors (initialised at 1e-3-1e-2) outgrow smallcnn's weights within an epoch
at the weights' ``lr`` (measured: ``docs/smoothing.md``).

``EpochSchedule``: ``none``, ``step`` (multiply by ``gamma`` at each milestone epoch),
``cosine`` (``lr_0 * (1 + cos(pi * e / epochs)) / 2``) or ``plateau`` (``lr_0 * gamma^d``
after ``d`` plateaus of the early-stopping rule: the Trainer sets ``d`` from the logged
history, :func:`~.early_stopping.stopping_state`). It is stepped at the **end** of each
epoch, so epoch ``e`` (0-based) trains with ``lr(e)``: with milestones ``[100, 150]`` epochs
0-99 use 0.1, 100-149 use 0.01. Departure: the RNA and CAS reference scripts call
``scheduler.step()`` at the *start* of each epoch (before training it), which shifts every
decay one epoch earlier than the milestones say; we follow the milestones as written.
Its state is just the epoch counter and the base learning rates, so it is ``weights_only``-safe.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..config import OptimizerConfig, ScheduleConfig

__all__ = ["build_optimizer", "EpochSchedule", "build_schedule", "param_groups"]


def param_groups(model: nn.Module, weight_decay: float, *, noise_lr: float | None = None
                 ) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed group and a ``_no_weight_decay`` group; with
    ``noise_lr``, the noise-injection parameters (``_noise_param``: PNI/CNI alpha and F) get
    their own undecayed group at that learning rate."""
    decay, no_decay, noise = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if noise_lr is not None and getattr(p, "_noise_param", False):
            noise.append(p)
        elif getattr(p, "_no_weight_decay", False):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if noise:
        groups.append({"params": noise, "weight_decay": 0.0, "lr": noise_lr})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    noise_lr = cfg.lr * cfg.noise_lr_scale if cfg.noise_lr_scale != 1.0 else None
    groups = param_groups(model, cfg.weight_decay, noise_lr=noise_lr)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


class EpochSchedule:
    """Per-epoch learning-rate schedule (see the module docstring)."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, *,
                 epochs: int) -> None:
        self.optimizer = optimizer
        self.name = cfg.name
        self.milestones = list(cfg.milestones)
        self.gamma = float(cfg.gamma)
        self.epochs = int(epochs)
        self.epoch = 0
        self.decays = 0
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self._apply()

    def factor(self, epoch: int) -> float:
        if self.name == "plateau":
            return self.gamma ** self.decays
        if self.name == "step":
            return self.gamma ** sum(1 for m in self.milestones if epoch >= m)
        if self.name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(epoch, self.epochs) / self.epochs))
        return 1.0

    def _apply(self) -> None:
        f = self.factor(self.epoch)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * f

    def step(self) -> None:
        """Call once at the end of every epoch."""
        self.epoch += 1
        self._apply()

    def set_decays(self, decays: int) -> None:
        """``plateau``: the number of decays so far (from the early-stopping history)."""
        self.decays = int(decays)
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "base_lrs": list(self.base_lrs), "decays": self.decays}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.decays = int(state.get("decays", 0))
        self.base_lrs = [float(v) for v in state["base_lrs"]]
        self._apply()


def build_schedule(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, *,
                   epochs: int) -> EpochSchedule:
    return EpochSchedule(optimizer, cfg, epochs=epochs)
