"""Plots of evaluation results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .harness import EvalResult  # noqa: E402

__all__ = ["plot_accuracy_vs_eps"]


def plot_accuracy_vs_eps(sweep: dict[float, EvalResult], path: str | Path, *,
                         kind: str = "all", title: str | None = None) -> Path:
    """Robust accuracy against eps: one curve per attack/protocol plus the worst case, with
    95% Clopper–Pearson error bars. ``sweep`` maps eps to the evaluation at that eps."""
    path = Path(path)
    eps_values = sorted(sweep)
    labels: list[str] = []
    for eps in eps_values:
        for label in sweep[eps].entries:
            if label not in labels:
                labels.append(label)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label in [*labels, "worst"]:
        xs, ys, lo, hi = [], [], [], []
        for eps in eps_values:
            r = sweep[eps]
            if label != "worst" and label not in r.entries:
                continue
            a = r.accuracy(label, kind)
            xs.append(eps)
            ys.append(100 * a.value)
            lo.append(100 * (a.value - a.low))
            hi.append(100 * (a.high - a.value))
        style = {"linewidth": 2.5, "color": "black"} if label == "worst" else {}
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3,
                    label="worst case" if label == "worst" else label, **style)
    ax.set_xlabel("eps")
    ax.set_ylabel(f"robust accuracy (%, {kind})")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.set_title(title or "Robust accuracy against eps (95% Clopper–Pearson CI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
