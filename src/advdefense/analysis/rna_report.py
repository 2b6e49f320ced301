"""RNA evaluated three ways, side by side (Dong et al., NeurIPS 2022; DESIGN.md "honest").

``rna_report(model, x, y, eps=...)`` runs clean, FGSM, PGD-20, CW-L-inf and APGD-CE (when
registered) through the evaluation harness (:func:`advdefense.evaluation.evaluate`) under:

``paper``
    the reference ``evaluate.py`` protocol: the attack is crafted on one frozen random path A,
    the result is classified on fresh paths. A transfer attack between paths.
``fixed``
    fixed-path white-box: attack and classification on the same frozen path (the model is a
    plain deterministic network inside the freeze).
``fresh``
    adaptive: EOT over paths (``eot_samples`` independent paths per gradient, batched along the
    batch dimension) on the live model, classified on fresh paths.

For every stochastic verdict a prediction is repeated ``repeats`` times and an example counts
as correct only if all repeats are correct ("all"); the majority-vote figure is kept beside
it. The reference reports a single draw (one path per test batch), closest to our "single".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..evaluation import evaluate
from ..evaluation.harness import EvalResult, standard_attack_specs

__all__ = ["RNAReport", "rna_report", "PROTOCOL_ORDER"]

PROTOCOL_ORDER = ("paper", "fixed", "fresh")
_PROTOCOL_TITLE = {"paper": "paper (attack path A, classify fresh)",
                   "fixed": "fixed path (white-box)",
                   "fresh": "EOT over paths (adaptive)"}


@dataclass
class RNAReport:
    """The harness result plus a table ``attack -> protocol -> accuracy``."""

    result: EvalResult
    eps: float
    eot_samples: int
    repeats: int

    def table(self, kind: str = "all") -> dict[str, dict[str, Any]]:
        rows: dict[str, dict[str, Any]] = {"clean": {"-": self.result.accuracy("clean", kind)}}
        for entry in self.result.entries.values():
            rows.setdefault(entry.name, {})[entry.protocol] = entry.accuracy(kind)
        for p in PROTOCOL_ORDER:
            if any(e.protocol == p for e in self.result.entries.values()):
                rows.setdefault("worst case", {})[p] = _acc(self.result.worst_over(p), kind)
        return rows

    def columns(self) -> list[tuple[str, str, str]]:
        """``(protocol, verdict kind, title)`` of the table's columns. The paper protocol is
        shown as the authors ran it, one prediction on a fresh path (``single``), with the
        all-repeats verdict beside it; the other protocols use the all-repeats verdict."""
        present = [p for p in PROTOCOL_ORDER
                   if any(e.protocol == p for e in self.result.entries.values())]
        cols = []
        for p in present:
            if p == "paper":
                cols.append(("paper", "single", "paper (attack path A, classify once on a "
                                                "fresh path B)"))
                cols.append(("paper", "all", f"paper, correct on all {self.repeats} fresh "
                                             "paths"))
            else:
                cols.append((p, "all", _PROTOCOL_TITLE[p]))
        return cols

    def to_markdown(self, kind: str | None = None) -> str:
        cols = self.columns()
        if kind is not None:
            cols = [(p, kind, t) for p, k, t in cols if k != "single" or kind == "single"]
        tables = {k: self.table(k) for k in {k for _, k, _ in cols}}
        head = "| attack | " + " | ".join(t for _, _, t in cols) + " |"
        lines = [head, "|---" * (len(cols) + 1) + "|"]
        for name in tables[cols[0][1]]:
            vals = []
            for p, k, _ in cols:
                cells = tables[k][name]
                vals.append(_fmt(cells["-"]) if name == "clean" else
                            (_fmt(cells[p]) if p in cells else "-"))
            lines.append(f"| {name} | " + " | ".join(vals) + " |")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"eps": self.eps, "eot_samples": self.eot_samples,
                               "repeats": self.repeats, "n": self.result.n}
        for kind in ("all", "majority", "single"):
            out[kind] = {name: {p: _as_dict(a) for p, a in cells.items()}
                         for name, cells in self.table(kind).items()}
        return out


def _acc(v, kind: str = "all"):
    from ..evaluation.stats import accuracy

    return accuracy(v.get(kind))


def _fmt(acc) -> str:
    value = getattr(acc, "value", None)
    low, high = getattr(acc, "low", None), getattr(acc, "high", None)
    if value is None:
        return str(acc)
    if low is None or high is None:
        return f"{100 * value:.1f}"
    return f"{100 * value:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def _as_dict(acc) -> Any:
    return acc.as_dict() if hasattr(acc, "as_dict") else str(acc)


def rna_report(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    steps: int = 20,
    eot_samples: int = 16,
    repeats: int = 10,
    protocols: Sequence[str] = PROTOCOL_ORDER,
    attacks: Sequence[str] | None = None,
    batch_size: int = 250,
    max_batch: int = 4096,
    seed: int = 0,
    progress: bool = False,
) -> RNAReport:
    """Clean, FGSM, PGD-``steps``, CW and APGD-CE under the paper / fixed-path / EOT protocols.

    ``eot_samples`` applies to the adaptive (``fresh``) protocol only: under ``paper`` and
    ``fixed`` the attacked model is frozen, hence deterministic, and attacks use one draw.
    ``attacks`` keeps only the named ones (``fgsm``, ``pgd``, ``cw``, ``apgd-ce``).
    """
    specs = standard_attack_specs(eps, steps=steps, eot_samples=eot_samples, seed=seed,
                                  protocols=tuple(protocols), max_batch=max_batch)
    if attacks is not None:
        specs = [s for s in specs if s.name in set(attacks)]
    result = evaluate(model, (x, y), specs, repeats=repeats, batch_size=batch_size, seed=seed,
                      progress=progress, max_batch=max_batch, checks=False)
    return RNAReport(result, float(eps), int(eot_samples), int(repeats))
