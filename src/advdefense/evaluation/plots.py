"""Plots of evaluation results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .results import EvalResult  # noqa: E402

__all__ = ["plot_accuracy_vs_eps", "plot_curves"]


def plot_curves(curves: dict[str, list[dict]], path: str | Path, *, title: str,
                ylabel: str = "robust accuracy (%)", bold: str | None = None) -> Path:
    """One line per curve of points ``{"eps", "accuracy", "ci": [low, high]}`` with 95% CI
    error bars; the curve named ``bold`` is drawn thick and black."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, pts in curves.items():
        xs = [p["eps"] for p in pts]
        ys = [100 * p["accuracy"] for p in pts]
        err = [[100 * (p["accuracy"] - p["ci"][0]) for p in pts],
               [100 * (p["ci"][1] - p["accuracy"]) for p in pts]]
        style = {"linewidth": 2.5, "color": "black"} if label == bold else {}
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label, **style)
    ax.set_xlabel("eps")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_accuracy_vs_eps(sweep: dict[float, EvalResult], path: str | Path, *,
                         kind: str = "all", title: str | None = None) -> Path:
    """Robust accuracy against eps: one curve per attack/protocol plus the worst case, with
    95% Clopper–Pearson error bars. ``sweep`` maps eps to the evaluation at that eps."""
    eps_values = sorted(sweep)
    labels: list[str] = []
    for eps in eps_values:
        for label in sweep[eps].entries:
            if label not in labels:
                labels.append(label)
    curves: dict[str, list[dict]] = {}
    for label in [*labels, "worst"]:
        pts = []
        for eps in eps_values:
            r = sweep[eps]
            if label != "worst" and label not in r.entries:
                continue
            a = r.accuracy(label, kind)
            pts.append({"eps": eps, "accuracy": a.value, "ci": [a.low, a.high]})
        curves["worst case" if label == "worst" else label] = pts
    return plot_curves(curves, path, bold="worst case", ylabel=f"robust accuracy (%, {kind})",
                       title=title or "Robust accuracy against eps (95% Clopper–Pearson CI)")
