"""Early stopping on the monitored validation accuracy (``train.early_stopping``).

The rule is a pure function of the per-epoch records the Trainer logs (``metrics.jsonl``, also
stored in every checkpoint), so a resumed run and the reproduction pipeline reach the same
decision as the uninterrupted run without extra state:

* an epoch *improves* when its ``metric`` exceeds the best value so far by more than
  ``min_delta`` (the first epoch always improves);
* the *best epoch* is the last improving one (its checkpoint is ``best.pt``);
* training *stops* once ``patience`` epochs in a row have not improved.

A slightly higher value that does not clear ``min_delta`` neither resets the patience nor
becomes the best epoch (the Keras convention).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["StoppingState", "stopping_state"]


@dataclass(frozen=True)
class StoppingState:
    """Where the rule stands after ``epochs`` logged epochs (the epoch it stopped at, if it
    stopped: later records, which a stopped run never writes, are ignored)."""

    epochs: int
    best_epoch: int | None
    best_value: float | None
    since_best: int
    stop: bool

    def as_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "best_epoch": self.best_epoch,
                "best_value": self.best_value, "since_best": self.since_best,
                "stopped_early": self.stop}


def stopping_state(history: Sequence[dict[str, Any]], rule: Any) -> StoppingState:
    """Apply the rule (an :class:`~advdefense.config.EarlyStoppingConfig` or any object with
    ``metric``, ``patience``, ``min_delta``) to the logged epoch records in order."""
    best_epoch: int | None = None
    best: float | None = None
    since = 0
    stop = False
    seen = 0
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
            stop = True
            break
    return StoppingState(seen, best_epoch, best, since, stop)
