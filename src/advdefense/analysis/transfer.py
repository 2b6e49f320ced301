"""Adversarial transferability across normalization types (the motivation of RNA).

Paper: Dong et al., "Random Normalization Aggregation for Adversarial Defense", NeurIPS 2022,
Sec. 3: adversarial examples crafted on a network with one normalization type (BN, IN, LN,
GN) transfer worse to the same network with another type; RNA builds its random space from
such low-transferability paths. The paper's own matrix was not available to us (only the
abstract), so this module measures it; nothing here is copied from the reference code, which
contains no transfer study.

Definition used here: ``M[i][j]`` = attack success rate of adversarial examples made on
source ``i`` (white-box PGD) when classified by target ``j``, computed **only on the examples
that both ``i`` and ``j`` classify correctly when clean** (so a model's clean errors do not
count as transfer). The diagonal is the white-box success rate.

Two studies:

* :func:`train_norm_models` trains one smallcnn per normalization type with the same data,
  order and seed (a small internal Adam loop; standard training by default, PGD-AT optional),
  then :func:`transfer_matrix` over those models;
* the same matrix between *paths of one RNA model* (:class:`FixedPath` wraps a model with a
  path fixed through :func:`advdefense.defenses.rna.set_path`): all-``t`` paths for each type
  of the space, plus a few random mixed paths.

:func:`run_transfer_study` does both and writes ``transfer.json``, ``transfer.md`` and heatmap
PNGs (matplotlib, Agg backend).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..attacks import PGD, Attack
from ..attacks.base import eval_mode
from ..data import as_tensors, dataset_info, load_split
from ..defenses.rna import convert, parse_space, random_path, rna_layers, set_path
from ..errors import AdvDefenseError
from ..models import build_model

log = logging.getLogger(__name__)

__all__ = [
    "FixedPath",
    "TransferResult",
    "transfer_matrix",
    "train_norm_models",
    "train_model",
    "rna_path_models",
    "plot_transfer",
    "run_transfer_study",
]

NORM_TYPES = ("bn", "in", "ln", "gn")


class FixedPath(nn.Module):
    """``model`` with its RNA path fixed to ``path`` (one type per RNA layer, or one name):
    a deterministic network (other stochastic layers, if any, stay random)."""

    def __init__(self, model: nn.Module, path: str | Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.path = path if isinstance(path, str) else tuple(path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with set_path(self.model, self.path):
            return self.model(x)


@dataclass
class TransferResult:
    """``success[i][j]``: success rate of examples made on ``labels[i]`` classified by
    ``labels[j]``, over ``counts[i][j]`` examples clean-correct on both."""

    labels: list[str]
    success: list[list[float]]
    counts: list[list[int]]
    clean_accuracy: list[float]
    attack: str
    eps: float
    n_examples: int
    notes: dict[str, Any] = field(default_factory=dict)

    def diagonal_mean(self) -> float:
        return sum(self.success[i][i] for i in range(len(self.labels))) / len(self.labels)

    def off_diagonal_mean(self) -> float:
        k = len(self.labels)
        vals = [self.success[i][j] for i in range(k) for j in range(k) if i != j]
        return sum(vals) / len(vals) if vals else float("nan")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["diagonal_mean"] = self.diagonal_mean()
        d["off_diagonal_mean"] = self.off_diagonal_mean()
        return d

    def to_markdown(self, title: str = "") -> str:
        lines = [f"### {title}", ""] if title else []
        lines.append(f"Attack success (%) of {self.attack} (eps={self.eps:g}) made on the row "
                     f"model, classified by the column model; {self.n_examples} test examples, "
                     "each cell over the examples both models classify correctly when clean.")
        lines.append("")
        lines.append("| source \\ target | " + " | ".join(self.labels) + " |")
        lines.append("|---" * (len(self.labels) + 1) + "|")
        for i, lab in enumerate(self.labels):
            cells = [f"{100 * v:.1f}" for v in self.success[i]]
            lines.append(f"| {lab} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("Clean accuracy (%): " + ", ".join(
            f"{lab} {100 * a:.1f}"
            for lab, a in zip(self.labels, self.clean_accuracy, strict=True)))
        lines.append(f"Mean white-box (diagonal) success {100 * self.diagonal_mean():.1f}%, "
                     f"mean transfer (off-diagonal) success {100 * self.off_diagonal_mean():.1f}%.")
        return "\n".join(lines) + "\n"


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, max_batch: int) -> torch.Tensor:
    with eval_mode(model):
        return torch.cat([model(x[i : i + max_batch]).argmax(1)
                          for i in range(0, x.shape[0], max_batch)])


def transfer_matrix(
    models: Sequence[nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    attack: Attack,
    labels: Sequence[str] | None = None,
    max_batch: int = 500,
) -> TransferResult:
    """Attack every model with ``attack`` and classify each result with every model.

    Models should be deterministic (stochastic ones give a random matrix: wrap an RNA model
    in :class:`FixedPath`). See the module docstring for the definition of a cell.
    """
    if not models:
        raise AdvDefenseError("transfer_matrix needs at least one model")
    labels = [f"m{i}" for i in range(len(models))] if labels is None else list(labels)
    if len(labels) != len(models):
        raise AdvDefenseError(f"got {len(labels)} labels for {len(models)} models")
    clean_ok = [(_predict(m, x, max_batch) == y) for m in models]
    k = len(models)
    success = [[0.0] * k for _ in range(k)]
    counts = [[0] * k for _ in range(k)]
    for i, src in enumerate(models):
        t0 = time.perf_counter()
        x_adv = torch.cat([attack(src, x[s : s + max_batch], y[s : s + max_batch])
                           for s in range(0, x.shape[0], max_batch)])
        for j, tgt in enumerate(models):
            fooled = _predict(tgt, x_adv, max_batch) != y
            both = clean_ok[i] & clean_ok[j]
            counts[i][j] = int(both.sum())
            success[i][j] = float(fooled[both].float().mean()) if counts[i][j] else float("nan")
        log.info("transfer: source %s attacked in %.1fs", labels[i], time.perf_counter() - t0)
    return TransferResult(labels, success, counts, [float(c.float().mean()) for c in clean_ok],
                          attack=repr(attack), eps=attack.eps, n_examples=int(x.shape[0]))


def train_model(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    seed: int = 0,
    batch_size: int = 100,
    lr: float = 1e-3,
    attack: Attack | None = None,
) -> nn.Module:
    """A small Adam loop (shuffled with a seeded generator); ``attack`` = PGD-AT examples.

    Used so every model of a study sees the same data in the same order.
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for s in range(0, len(y), batch_size):
            idx = perm[s : s + batch_size]
            xb, yb = x[idx], y[idx]
            if attack is not None:
                xb = attack(model, xb, yb)
            model.train()
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model


def _smallcnn(dataset: str, norm: str, seed: int) -> nn.Module:
    info = dataset_info(dataset)
    torch.manual_seed(seed)  # same conv/linear initialization for every norm type
    return build_model("smallcnn", num_classes=info.num_classes, in_channels=info.in_channels,
                       image_size=info.image_size, mean=info.mean, std=info.std, norm=norm)


def _check_norms(norms: Sequence[str]) -> None:
    for norm in norms:
        if norm not in NORM_TYPES:
            raise AdvDefenseError(
                f"unknown normalization type {norm!r} for the transfer study; choose from "
                f"{', '.join(NORM_TYPES)}")


def train_norm_models(
    norms: Sequence[str],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    dataset: str = "mnist5k",
    epochs: int = 3,
    seed: int = 0,
    adversarial_eps: float | None = None,
) -> dict[str, nn.Module]:
    """One smallcnn per normalization type (``bn``, ``in``, ``ln``, ``gn``): same
    initialization of the shared layers, same data order, same seed."""
    _check_norms(norms)
    models = {}
    for norm in norms:
        attack = None if adversarial_eps is None else PGD(
            eps=adversarial_eps, steps=10, step_size=adversarial_eps / 4, seed=seed)
        t0 = time.perf_counter()
        models[norm] = train_model(_smallcnn(dataset, norm, seed), x, y, epochs=epochs,
                                   seed=seed, attack=attack)
        log.info("transfer: trained %s model in %.1fs", norm, time.perf_counter() - t0)
    return models


def train_rna_model(
    x: torch.Tensor, y: torch.Tensor, *, space: str | Sequence[str] = ("bn", "in"),
    dataset: str = "mnist5k", epochs: int = 3, seed: int = 0,
) -> nn.Module:
    """A smallcnn with RNA (fresh path per call) trained with the same loop (standard
    training)."""
    model = convert(_smallcnn(dataset, "bn", seed), space=space)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return train_model(model, x, y, epochs=epochs, seed=seed)


def _short(path: Sequence[str]) -> str:
    return "-".join(path)


def rna_path_models(model: nn.Module, *, random_paths: int = 3, seed: int = 0
                    ) -> tuple[list[nn.Module], list[str]]:
    """All-``t`` paths for each type common to every RNA layer, then ``random_paths``
    distinct random mixed paths (seeded), each wrapped in :class:`FixedPath`."""
    layers = rna_layers(model)
    if not layers:
        raise AdvDefenseError("the RNA checkpoint's model has no RNA layer")
    common = [t for t in layers[0].space if all(t in la.space for la in layers)]
    paths: list[tuple[str, ...]] = [(t,) * len(layers) for t in common]
    g = torch.Generator().manual_seed(seed)
    tries = 0
    while len(paths) < len(common) + random_paths and tries < 100 * (random_paths + 1):
        p = random_path(model, generator=g)
        tries += 1
        if p not in paths:
            paths.append(p)
    labels = [f"all-{p[0]}" if len(set(p)) == 1 else _short(p) for p in paths]
    return [FixedPath(model, p) for p in paths], labels


def plot_transfer(result: TransferResult, path: str | Path, *, title: str = "") -> Path:
    """Save an annotated heatmap (rows: source, columns: target, cells: success %)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(result.labels)
    data = torch.tensor(result.success).numpy() * 100
    fig, ax = plt.subplots(figsize=(1.2 * k + 2.5, 1.0 * k + 2.0))
    im = ax.imshow(data, vmin=0, vmax=100, cmap="viridis")
    ax.set_xticks(range(k), result.labels, rotation=45, ha="right")
    ax.set_yticks(range(k), result.labels)
    ax.set_xlabel("target (classifies)")
    ax.set_ylabel("source (attacked)")
    for i in range(k):
        for j in range(k):
            v = data[i, j]
            ax.text(j, i, "n/a" if v != v else f"{v:.0f}", ha="center", va="center",
                    color="white" if v < 60 else "black", fontsize=9)
    fig.colorbar(im, ax=ax, label="attack success %")
    ax.set_title(title or f"transfer success, eps={result.eps:g}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_transfer_study(
    output: str | Path,
    *,
    dataset: str = "mnist5k",
    norms: Sequence[str] = NORM_TYPES,
    epochs: int = 3,
    eps: float = 0.3,
    steps: int = 20,
    n_examples: int = 500,
    seed: int = 0,
    adversarial_eps: float | None = None,
    rna_model: nn.Module | None = None,
    rna_space: str | Sequence[str] = ("bn", "in"),
    rna_epochs: int | None = None,
    random_paths: int = 3,
    train_limit: int | None = None,
) -> dict[str, TransferResult]:
    """Both studies; writes ``transfer.json``, ``transfer.md``, ``transfer_norms.png`` and
    ``transfer_rna_paths.png`` under ``output``. Without ``rna_model`` an RNA smallcnn over
    ``rna_space`` is trained with the same loop (``rna_epochs``, default ``epochs``).
    ``train_limit`` keeps the first training examples (quick runs)."""
    _check_norms(norms)
    if rna_model is None:
        parse_space(rna_space)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    x_tr, y_tr = as_tensors(load_split(dataset, "train"))
    if train_limit is not None:
        x_tr, y_tr = x_tr[:train_limit], y_tr[:train_limit]
    x_te, y_te = as_tensors(load_split(dataset, "test"))
    x_te, y_te = x_te[:n_examples], y_te[:n_examples]
    attack = PGD(eps=eps, steps=steps, step_size=eps / 4, seed=seed)
    results: dict[str, TransferResult] = {}
    if norms:
        models = train_norm_models(norms, x_tr, y_tr, dataset=dataset, epochs=epochs, seed=seed,
                                   adversarial_eps=adversarial_eps)
        res = transfer_matrix(list(models.values()), x_te, y_te, attack=attack,
                              labels=list(models))
        res.notes = {"training": "standard" if adversarial_eps is None
                     else f"PGD-AT eps={adversarial_eps}", "epochs": epochs, "seed": seed,
                     "dataset": dataset}
        results["norms"] = res
        plot_transfer(res, out / "transfer_norms.png",
                      title=f"{dataset}: transfer across normalization types")
    trained_here = rna_model is None
    if rna_model is None:
        rna_model = train_rna_model(x_tr, y_tr, space=rna_space, dataset=dataset,
                                    epochs=epochs if rna_epochs is None else rna_epochs,
                                    seed=seed)
    paths, labels = rna_path_models(rna_model, random_paths=random_paths, seed=seed)
    res = transfer_matrix(paths, x_te, y_te, attack=attack, labels=labels)
    res.notes = {"rna_model": "trained here (standard training)" if trained_here
                 else "given checkpoint", "random_paths": random_paths, "seed": seed}
    results["rna_paths"] = res
    plot_transfer(res, out / "transfer_rna_paths.png",
                  title=f"{dataset}: transfer between RNA paths")
    (out / "transfer.json").write_text(json.dumps({k: v.to_dict() for k, v in results.items()},
                                                  indent=2))
    md = ["# Transferability study (RNA motivation)", ""]
    if "norms" in results:
        md.append(results["norms"].to_markdown("Models with different normalization types"))
    md.append(results["rna_paths"].to_markdown("Paths of one RNA model"))
    (out / "transfer.md").write_text("\n".join(md))
    return results
