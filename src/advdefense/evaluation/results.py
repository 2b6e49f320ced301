"""What an evaluation returns: per-example results, attack traces and the headline summary.

The dataclasses shared by the harness, the suites, the checks, the reports and the plots live
here, so that each of those modules imports this one and none of them imports another to
reach a result type. :class:`TraceSummary` and :class:`RunRecord` serialize to JSON
(:meth:`TraceSummary.to_json`), so resumable evaluations keep the traces the checks read.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import AdvDefenseError
from .protocols import Verdict
from .stats import Accuracy, accuracy

__all__ = ["EntryResult", "EvalResult", "RunRecord", "TraceSummary", "summary",
           "tensor_from_json", "tensor_to_json"]


def tensor_to_json(t: torch.Tensor | None) -> dict[str, Any] | None:
    """A CPU tensor as ``{"dtype", "shape", "data"}`` (little-endian bytes in base64)."""
    if t is None:
        return None
    t = t.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    a = t.contiguous().numpy()
    if a.dtype == np.bool_:
        a = a.astype(np.uint8)
        dtype = "bool"
    else:
        dtype = str(a.dtype)
    return {"dtype": dtype, "shape": list(a.shape),
            "data": base64.b64encode(a.astype(a.dtype.newbyteorder("<")).tobytes()).decode()}


def tensor_from_json(d: dict[str, Any] | None) -> torch.Tensor | None:
    """The inverse of :func:`tensor_to_json`."""
    if d is None:
        return None
    raw = base64.b64decode(d["data"])
    if d["dtype"] == "bool":
        a = np.frombuffer(raw, dtype="<u1").astype(np.bool_)
    else:
        a = np.frombuffer(raw, dtype=np.dtype(d["dtype"]).newbyteorder("<")).astype(d["dtype"])
    return torch.from_numpy(a.reshape(d["shape"]).copy())


@dataclass
class RunRecord:
    """One run of an attack (a restart or target) in evaluation coordinates: ``idx`` the
    evaluated examples it covered, ``losses`` (steps, len(idx))."""

    idx: torch.Tensor
    losses: torch.Tensor


_SCALARS = ("eot_samples", "steps", "restarts", "access", "maximizes_loss", "nonfinite",
            "forward_rows", "backward_rows", "new_in_last_run")
_MASKS = ("grad_norms", "ever_adversarial", "returned_adversarial", "substitute_adversarial")


@dataclass
class TraceSummary:
    """What the attack-failure checks need of an attack's recorders, over all batches
    (example indices are positions in the evaluation)."""

    eot_samples: int
    steps: int | None = None
    restarts: int = 1
    access: str = "white-box"
    maximizes_loss: bool = True
    runs: list[RunRecord] = field(default_factory=list)
    grad_norms: torch.Tensor | None = None      # (n,) first-step gradient norm, NaN if none
    nonfinite: int = 0
    ever_adversarial: torch.Tensor | None = None
    returned_adversarial: torch.Tensor | None = None
    substitute_adversarial: torch.Tensor | None = None
    forward_rows: int = 0
    backward_rows: int = 0
    new_in_last_run: int | None = None  # restarts > 1: new adversarial examples, last run

    @property
    def losses(self) -> torch.Tensor | None:
        """(steps, n) losses when the attack made one full-length run per batch of the same
        length (PGD, APGD-CE); ``None`` for ragged traces (use :attr:`runs`)."""
        full = list(self.runs)
        if not full or len({r.losses.shape[0] for r in full}) != 1:
            return None
        idx = torch.cat([r.idx for r in full])
        if len(idx) != len(torch.unique(idx)):
            return None
        order = idx.argsort()
        return torch.cat([r.losses for r in full], dim=1)[:, order]

    def to_json(self) -> dict[str, Any]:
        """Everything in JSON-able form (tensors via :func:`tensor_to_json`)."""
        out: dict[str, Any] = {k: getattr(self, k) for k in _SCALARS}
        out.update({k: tensor_to_json(getattr(self, k)) for k in _MASKS})
        out["runs"] = [{"idx": tensor_to_json(r.idx), "losses": tensor_to_json(r.losses)}
                       for r in self.runs]
        return out

    @staticmethod
    def from_json(d: dict[str, Any]) -> TraceSummary:
        """The summary saved by :meth:`to_json`."""
        try:
            return TraceSummary(
                runs=[RunRecord(tensor_from_json(r["idx"]), tensor_from_json(r["losses"]))
                      for r in d["runs"]],
                **{k: d[k] for k in _SCALARS}, **{k: tensor_from_json(d[k]) for k in _MASKS})
        except (KeyError, TypeError, ValueError) as exc:
            raise AdvDefenseError(f"a saved attack trace is damaged ({exc}); delete the state "
                                  "file") from None

    @staticmethod
    def from_recorder(rec, attack: Any, positions: torch.Tensor, eot: int) -> TraceSummary:
        """Summary of one batch's :class:`~advdefense.attacks.base.AttackRecorder`;
        ``positions`` maps the batch's rows to evaluation indices."""
        steps = getattr(attack, "steps", None) or getattr(attack, "n_iter", None)
        runs = [RunRecord(positions[r.idx.cpu()], r.loss_matrix()) for r in rec.runs
                if r.losses]
        first = torch.full((len(positions),), float("nan"))
        for r in reversed(rec.runs):
            if r.grad_norms:
                first[r.idx.cpu()] = r.grad_norms[0].cpu()

        def flag(t):
            return None if t is None else t.detach().bool().cpu()

        return TraceSummary(
            eot, steps, int(getattr(attack, "restarts", 1)),
            getattr(attack, "access", "white-box"), getattr(attack, "maximizes_loss", True),
            runs, first, rec.nonfinite, flag(rec.ever_adversarial),
            flag(rec.returned_adversarial), flag(rec.substitute_adversarial),
            rec.forward_rows, rec.backward_rows,
            rec.runs[-1].new_adversarial if len(rec.runs) > 1 else None)

    @staticmethod
    def merge(parts: list[TraceSummary], n: int, positions: list[torch.Tensor]
              ) -> TraceSummary | None:
        """Join batch summaries into one over ``n`` evaluated examples."""
        if not parts:
            return None
        first = parts[0]

        def scatter(attr: str, fill):
            values = [getattr(p, attr) for p in parts]
            if any(v is None for v in values):
                return None
            out = torch.full((n,), fill, dtype=values[0].dtype)
            for v, pos in zip(values, positions, strict=True):
                out[pos] = v
            return out

        return TraceSummary(
            first.eot_samples, first.steps, first.restarts, first.access, first.maximizes_loss,
            [r for p in parts for r in p.runs], scatter("grad_norms", float("nan")),
            sum(p.nonfinite for p in parts), scatter("ever_adversarial", False),
            scatter("returned_adversarial", False), scatter("substitute_adversarial", False),
            sum(p.forward_rows for p in parts), sum(p.backward_rows for p in parts),
            None if all(p.new_in_last_run is None for p in parts)
            else sum(p.new_in_last_run or 0 for p in parts))


@dataclass
class EntryResult:
    """Per-example results of clean data or of one spec."""

    label: str
    name: str
    protocol: str
    verdict: Verdict
    seconds: float = 0.0
    attack: str = ""
    trace: TraceSummary | None = None
    ran: torch.Tensor | None = None   # suites: examples the attack actually ran on
    cumulative: Verdict | None = None  # suites: robust after this stage of the cascade
    states: list[Any] = field(default_factory=list)  # paper/fixed: frozen draw per batch

    @property
    def passes(self) -> dict[str, int]:
        """Rows the attack pushed through the model: forward and backward passes."""
        t = self.trace
        return {"forward": 0 if t is None else t.forward_rows,
                "backward": 0 if t is None else t.backward_rows}

    def accuracy(self, kind: str = "all") -> Accuracy:
        return accuracy(self.verdict.get(kind))


@dataclass
class EvalResult:
    """Everything an evaluation measured, per example.

    ``clean`` and each of ``entries`` (keyed by label ``name/protocol``) hold per-example
    verdicts; ``worst`` is their per-example AND; ``checks`` the attack-failure checks.
    """

    n: int
    stochastic: bool
    repeats: int
    clean: EntryResult
    entries: dict[str, EntryResult]
    worst: Verdict
    labels: torch.Tensor
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    checks: list = field(default_factory=list)
    kind: str = "specs"
    adv: torch.Tensor | None = None          # keep_adv: worst-case input per example
    adv_source: list[str] | None = None      # keep_adv: label of the attack that gave it

    def summary(self) -> dict[str, Any]:
        """Headline numbers as a small dict (:func:`summary`)."""
        return summary(self)

    def accuracy(self, label: str = "worst", kind: str = "all") -> Accuracy:
        """Accuracy with CI of ``"clean"``, ``"worst"`` or an entry label."""
        if label == "worst":
            return accuracy(self.worst.get(kind))
        if label == "clean":
            return self.clean.accuracy(kind)
        if label not in self.entries:
            raise AdvDefenseError(
                f"no result {label!r}; choose clean, worst or one of: {', '.join(self.entries)}")
        return self.entries[label].accuracy(kind)

    def worst_over(self, protocol: str) -> Verdict:
        """Per-example AND of clean and the entries run under ``protocol``."""
        out = self.clean.verdict
        for e in self.entries.values():
            if e.protocol == protocol:
                out = out & e.verdict
        return out

    def rows(self) -> list[dict[str, Any]]:
        """One row per line of the report table (clean, entries, worst case)."""
        rows = []
        for e in [self.clean, *self.entries.values()]:
            v = e.cumulative if e.cumulative is not None else e.verdict
            rows.append({"label": e.label, "attack": e.name, "protocol": e.protocol,
                         "all": accuracy(v.all), "majority": accuracy(v.majority),
                         "single": accuracy(v.single), "seconds": e.seconds,
                         "ran": None if e.ran is None else int(e.ran.sum())})
        rows.append({"label": "worst", "attack": "worst case", "protocol": "all", "ran": None,
                     "all": self.accuracy("worst", "all"),
                     "majority": self.accuracy("worst", "majority"),
                     "single": self.accuracy("worst", "single"), "seconds": self.seconds})
        return rows


def clean_float(value):
    """``value``, with non-finite floats as ``None`` (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def main_eps(result: EvalResult) -> float:
    """The eps of a result: the suite's, else the largest of its specs (0 if none)."""
    eps = result.config.get("eps")
    if eps is None:
        values = [s.get("eps") for s in result.config.get("specs", []) if s.get("eps") is not None]
        eps = max(values) if values else 0.0
    return float(eps)


def summary(result: EvalResult) -> dict[str, Any]:
    """Headline numbers as a small dict: clean and robust (worst-case) accuracy with their 95%
    Clopper–Pearson intervals, the accuracy after every attack, and the setting."""

    def pair(a) -> dict[str, Any]:
        return {"accuracy": clean_float(a.value), "ci95": [clean_float(a.low),
                                                          clean_float(a.high)]}

    per_attack = {label: clean_float(accuracy(
        (e.cumulative if e.cumulative is not None else e.verdict).all).value)
        for label, e in result.entries.items()}
    cfg = result.config
    return {"n": result.n, "clean": pair(result.accuracy("clean")),
            "robust": pair(result.accuracy("worst")), "per_attack": per_attack,
            "eps": cfg.get("eps", main_eps(result) if cfg.get("specs") else None),
            "norm": cfg.get("norm") or next((s.get("norm") for s in cfg.get("specs", [])
                                              if s.get("norm")), None),
            "suite": cfg.get("suite"), "stochastic": result.stochastic,
            "repeats": result.repeats}
