"""Early stopping on the monitored validation accuracy (``train.early_stopping``).

The rule is a pure function of the per-epoch records the Trainer logs (``metrics.jsonl``, also
stored in every checkpoint), so a resumed run and the reproduction pipeline reach the same
decision as the uninterrupted run without extra state:

* an epoch *improves* when its ``metric`` exceeds the best value so far by more than
  ``min_delta`` (the first epoch always improves);
* the *best epoch* is the last improving one (its checkpoint is ``best.pt``);
* training *stops* once ``patience`` epochs in a row have not improved, unless the schedule
  is ``plateau`` (``train.schedule``) with decays left: then that plateau decays the learning
  rate by ``gamma`` instead, the count of epochs without improvement starts again, and the
  run stops at the first plateau after the last decay (:func:`lr_decays` of a config). The
  number of decays so far is part of the state, so a resumed run trains at the same rate.

A slightly higher value that does not clear ``min_delta`` neither resets the patience nor
becomes the best epoch (the Keras convention).

The monitor the rule reads must not reward gradient masking (a checkpoint chosen by an attack
the model fools is the most masked one, not the most robust one). :func:`monitor_plan` fixes
what the Trainer's monitor runs, from the model itself:

* a stochastic model (RNA paths, PNI/CNI noise, anything :func:`~advdefense.randomness.
  is_stochastic` sees) is attacked with EOT over ``MONITOR_EOT`` draws per step (Athalye et
  al. 2018) and an example counts only if all ``MONITOR_REPEATS`` fresh predictions are
  correct (the evaluation's rule, DESIGN.md contract 4), clean and attacked;
* a model with auxiliary heads trained with a CAS weight ``beta > 0`` is attacked on the
  adaptive loss ``main + beta * mean aux`` (Bai et al. 2021, Sec. 4; the CAS reference's
  ``reg_attack.py``), not on the main logits alone, which the heads' masks can shield.

Every record names its monitor (``monitor``), so a history logged by another monitor is seen
(:func:`expected_monitor`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["MONITOR_EOT", "MONITOR_REPEATS", "MonitorPlan", "StoppingState", "expected_monitor",
           "legacy_monitor", "lr_decays", "monitor_plan", "stopping_state"]

# EOT draws per attack step and repeated predictions of the monitor of a stochastic model
MONITOR_EOT = 4
MONITOR_REPEATS = 4


@dataclass(frozen=True)
class StoppingState:
    """Where the rule stands after ``epochs`` logged epochs (the epoch it stopped at, if it
    stopped: later records, which a stopped run never writes, are ignored)."""

    epochs: int
    best_epoch: int | None
    best_value: float | None
    since_best: int
    stop: bool
    decays: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "best_epoch": self.best_epoch,
                "best_value": self.best_value, "since_best": self.since_best,
                "stopped_early": self.stop, "lr_decays": self.decays}


def lr_decays(cfg: Any) -> int:
    """How many plateaus of the early-stopping rule decay the learning rate before one stops
    the run: ``train.schedule.decays`` for the ``plateau`` schedule, else 0."""
    schedule = cfg.train.schedule
    return int(schedule.decays) if schedule.name == "plateau" else 0


def stopping_state(history: Sequence[dict[str, Any]], rule: Any, *,
                   decays: int = 0) -> StoppingState:
    """Apply the rule (an :class:`~advdefense.config.EarlyStoppingConfig` or any object with
    ``metric``, ``patience``, ``min_delta``) to the logged epoch records in order; the first
    ``decays`` plateaus decay the learning rate instead of stopping (:func:`lr_decays`)."""
    best_epoch: int | None = None
    best: float | None = None
    since = 0
    stop = False
    seen = 0
    done = 0
    for i, record in enumerate(history):
        seen = i + 1
        if rule.metric not in record:
            raise KeyError(f"epoch {i + 1} has no {rule.metric!r} to stop on")
        value = float(record[rule.metric])
        epoch = int(record.get("epoch", i + 1))
        if best is None or value > best + float(rule.min_delta):
            best, best_epoch, since = value, epoch, 0
        else:
            since += 1
        if since >= int(rule.patience):
            if done < int(decays):
                done, since = done + 1, 0
                continue
            stop = True
            break
    return StoppingState(seen, best_epoch, best, since, stop, done)


@dataclass(frozen=True)
class MonitorPlan:
    """What the monitor runs: ``attack`` (``None``: clean accuracy only), the number of
    repeated predictions per verdict and a ``label`` logged with every record."""

    attack: Any
    repeats: int
    label: str


def monitor_plan(model: Any, monitor_attack: Any, *, eps: float, aux_weight: float = 0.0,
                 eot_samples: int = MONITOR_EOT, repeats: int = MONITOR_REPEATS) -> MonitorPlan:
    """The monitor of ``model`` (see the module docstring): PGD per ``train.monitor_attack``
    (``steps``, ``step_size``; ``eps`` resolved by the caller), with EOT and repeated
    predictions for a stochastic model and the CAS loss for a model with heads."""
    from ..randomness import is_stochastic

    stochastic = is_stochastic(model)
    beta = float(aux_weight or 0.0) if hasattr(model, "forward_with_aux") else 0.0
    return _plan(monitor_attack, eps=eps, stochastic=stochastic, aux_weight=beta,
                 eot_samples=eot_samples, repeats=repeats)


def _plan(monitor_attack: Any, *, eps: float, stochastic: bool, aux_weight: float,
          eot_samples: int, repeats: int) -> MonitorPlan:
    from ..attacks import PGD, HeadsObjective

    r = max(1, int(repeats)) if stochastic else 1
    steps = int(monitor_attack.steps)
    if steps < 1:
        label = "clean" + (f", correct on all {r} predictions" if stochastic else "")
        return MonitorPlan(None, r, label)
    step = eps / 4 if monitor_attack.step_size is None else float(monitor_attack.step_size)
    k = max(1, int(eot_samples)) if stochastic else 1
    kwargs: dict[str, Any] = {"eps": eps, "steps": steps, "step_size": step}
    label = f"PGD-{steps} (eps {eps:g}, step {step:g})"
    if stochastic:
        kwargs["eot_samples"] = k
        label += f", EOT {k}, correct on all {r} predictions"
    if aux_weight > 0:
        kwargs["loss"] = HeadsObjective("ce", aux_weight=aux_weight)
        label += f", main + {aux_weight:g}·aux"
    return MonitorPlan(PGD(**kwargs), r, label)


def expected_monitor(cfg: Any, model: Any = None) -> str:
    """The ``monitor`` label a run of ``cfg`` logs (``model``: the model it trains, built from
    ``cfg`` when not given). Records without a label were logged by the single-draw
    main-logit monitor, whose label is that of a deterministic model without heads."""
    from ..config import build_from_config
    from .recipes import recipe_defaults

    if model is None:
        model, _ = build_from_config(cfg)
    tc = cfg.train
    eps = tc.attack.eps if tc.monitor_attack.eps is None else tc.monitor_attack.eps
    beta = {**recipe_defaults(model), **tc.recipe_args}.get("aux_weight", 0.0)
    return monitor_plan(model, tc.monitor_attack, eps=eps, aux_weight=beta).label


def legacy_monitor(cfg: Any) -> str:
    """The label of the monitor that logged records without one: single draw, main logits."""
    tc = cfg.train
    eps = tc.attack.eps if tc.monitor_attack.eps is None else tc.monitor_attack.eps
    return _plan(tc.monitor_attack, eps=eps, stochastic=False, aux_weight=0.0, eot_samples=1,
                 repeats=1).label
