"""Sigma / m sweeps of smoothed inference (Nemcovsky et al. 1911.07198, Sec. 5 ablations),
with the hyper-parameters chosen on a **validation** split and then evaluated once on test.

For each input-noise level ``sigma`` the attack is crafted once on the noisy base
(``pgd``: PGD with one noise draw per step, the paper's PGD, which is implicit EOT with m=1;
``epgd``: mean CE over ``attack_samples`` draws; ``smoothadv``: -log mean softmax). Then
``max(ms)`` Monte-Carlo samples are drawn once for the clean and the adversarial points and
every ``m`` in ``ms`` uses the first ``m`` of them, for every vote — so the curves over ``m``
share their samples (nested Monte-Carlo estimates) and cost one pass.

Departure from the reference: SIAM's ``check_hyper`` picks sigma and m by the best adversarial
accuracy **on the test set**; :func:`choose` picks on ``val`` (ties: higher clean accuracy,
then smaller m) and the caller evaluates the chosen setting on ``test`` once.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..attacks.base import Attack, eval_mode
from ..attacks.epgd import EPGD, SmoothAdv
from ..defenses.smoothing import VOTES, sample_logits, vote_scores
from ..errors import AdvDefenseError
from ..randomness import seeded

log = logging.getLogger(__name__)

SWEEP_ATTACKS = ("pgd", "epgd", "smoothadv", "none")

__all__ = ["SweepRecord", "make_attack", "sweep", "choose", "write_tables", "plot_sweeps",
           "throughput", "attack_table", "table_markdown", "SWEEP_ATTACKS"]


@dataclass
class SweepRecord:
    split: str
    sigma: float
    m: int
    vote: str
    clean: float
    attacked: float
    n: int
    attack: str


def make_attack(name: str, *, sigma: float, eps: float, steps: int = 20,
                step_size: float | None = None, samples: int = 8, norm: str = "linf",
                seed: int = 0, max_batch: int = 4096) -> Attack | None:
    """The sweep's attack on the noisy base at input noise ``sigma`` (``none``: no attack)."""
    if name not in SWEEP_ATTACKS:
        raise AdvDefenseError(f"unknown sweep attack {name!r}; choose one of: "
                              f"{', '.join(SWEEP_ATTACKS)}")
    if name == "none":
        return None
    common = dict(eps=eps, steps=steps, step_size=step_size, norm=norm, sigma=sigma, seed=seed,
                  max_batch=max_batch)
    if name == "pgd":
        return EPGD(eot_samples=1, **common)
    if name == "epgd":
        return EPGD(eot_samples=samples, **common)
    return SmoothAdv(eot_samples=samples, **common)


def _accuracies(base: nn.Module, x: torch.Tensor, y: torch.Tensor, *, sigma: float,
                ms: list[int], votes: list[str], k: int, max_batch: int,
                batch: int) -> dict[tuple[int, str], float]:
    correct = {(m, v): 0 for m in ms for v in votes}
    m_max = max(ms)
    for s in range(0, x.shape[0], batch):
        xs, ys = x[s : s + batch], y[s : s + batch]
        with torch.no_grad():
            logits = sample_logits(base, xs, sigma=sigma, m=m_max, max_batch=max_batch)
        for m in ms:
            for v in votes:
                pred = vote_scores(logits[:m], v, k=k).argmax(1)
                correct[(m, v)] += int((pred == ys).sum())
    return {key: c / x.shape[0] for key, c in correct.items()}


def sweep(base: nn.Module, x: torch.Tensor, y: torch.Tensor, *, sigmas: list[float],
          ms: list[int], votes: list[str] | None = None, attack: str = "pgd", eps: float = 0.3,
          steps: int = 20, step_size: float | None = None, attack_samples: int = 8,
          norm: str = "linf", k: int = 3, split: str = "val", seed: int = 0,
          max_batch: int = 4096, batch: int = 100, progress: bool = False) -> list[SweepRecord]:
    """Clean and attacked accuracy of the smoothed classifier for every (sigma, m, vote)."""
    votes = list(votes or VOTES)
    for v in votes:
        if v not in VOTES:
            raise AdvDefenseError(f"unknown vote {v!r}; choose one of: {', '.join(VOTES)}")
    if not sigmas or not ms or min(ms) < 1 or min(sigmas) < 0:
        raise AdvDefenseError("need non-empty sigmas >= 0 and ms >= 1")
    ms = sorted(set(int(m) for m in ms))
    records: list[SweepRecord] = []
    with eval_mode(base), seeded(seed):
        for sigma in tqdm(sigmas, desc="sigma", disable=not progress, leave=False):
            atk = make_attack(attack, sigma=sigma, eps=eps, steps=steps, step_size=step_size,
                              samples=attack_samples, norm=norm, seed=seed, max_batch=max_batch)
            clean = _accuracies(base, x, y, sigma=sigma, ms=ms, votes=votes, k=k,
                                max_batch=max_batch, batch=batch)
            if atk is None:
                adv = dict(clean)
            else:
                x_adv = torch.cat([atk(base, x[s : s + batch], y[s : s + batch])
                                   for s in range(0, x.shape[0], batch)])
                adv = _accuracies(base, x_adv, y, sigma=sigma, ms=ms, votes=votes, k=k,
                                  max_batch=max_batch, batch=batch)
            for m in ms:
                for v in votes:
                    records.append(SweepRecord(split, float(sigma), m, v, clean[(m, v)],
                                               adv[(m, v)], int(x.shape[0]), attack))
            log.info("sigma %.3f done", sigma)
    return records


def choose(records: list[SweepRecord]) -> SweepRecord:
    """Best attacked accuracy; ties: higher clean accuracy, then smaller m, smaller sigma."""
    if not records:
        raise AdvDefenseError("no sweep records to choose from")
    return max(records, key=lambda r: (r.attacked, r.clean, -r.m, -r.sigma))


def write_tables(records: list[SweepRecord], out: Path, *, extra: dict[str, Any] | None = None
                 ) -> None:
    """``sweep.json`` (every record) and ``sweep.md`` (one table per vote: rows sigma,
    columns m, cells clean / attacked %)."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {"records": [asdict(r) for r in records], **(extra or {})}
    (out / "sweep.json").write_text(json.dumps(payload, indent=2))
    lines = []
    for split in sorted({r.split for r in records}):
        for vote in [v for v in VOTES if any(r.vote == v and r.split == split for r in records)]:
            rs = [r for r in records if r.vote == vote and r.split == split]
            ms = sorted({r.m for r in rs})
            sigmas = sorted({r.sigma for r in rs})
            lines += [f"### {split}: vote `{vote}`, attack `{rs[0].attack}` "
                      f"(clean / attacked accuracy %, n={rs[0].n})", "",
                      "| sigma | " + " | ".join(f"m={m}" for m in ms) + " |",
                      "|---|" + "---|" * len(ms)]
            for s in sigmas:
                cells = []
                for m in ms:
                    r = next(r for r in rs if r.m == m and r.sigma == s)
                    cells.append(f"{100 * r.clean:.1f} / {100 * r.attacked:.1f}")
                lines.append(f"| {s:g} | " + " | ".join(cells) + " |")
            lines.append("")
    (out / "sweep.md").write_text("\n".join(lines))


def plot_sweeps(records: list[SweepRecord], out: Path) -> list[Path]:
    """``acc_vs_sigma.png`` (at the largest m) and ``acc_vs_m.png`` (at each sigma), per vote."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    votes = [v for v in VOTES if any(r.vote == v for r in records)]
    m_max = max(r.m for r in records)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for v in votes:
        rs = sorted((r for r in records if r.vote == v and r.m == m_max), key=lambda r: r.sigma)
        axes[0].plot([r.sigma for r in rs], [100 * r.clean for r in rs], "o-", label=v)
        axes[1].plot([r.sigma for r in rs], [100 * r.attacked for r in rs], "o-", label=v)
    for ax, t in zip(axes, ("clean", f"attacked ({records[0].attack})"), strict=True):
        ax.set_xlabel("sigma (pixel units)")
        ax.set_ylabel("accuracy %")
        ax.set_title(f"{t}, m={m_max}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    paths.append(out / "acc_vs_sigma.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    sigmas = sorted({r.sigma for r in records})
    fig, axes = plt.subplots(1, len(votes), figsize=(4 * len(votes), 3.6), squeeze=False)
    for ax, v in zip(axes[0], votes, strict=True):
        for s in sigmas:
            rs = sorted((r for r in records if r.vote == v and r.sigma == s), key=lambda r: r.m)
            ax.plot([r.m for r in rs], [100 * r.attacked for r in rs], "o-", label=f"σ={s:g} adv")
            ax.plot([r.m for r in rs], [100 * r.clean for r in rs], "x--", alpha=0.5,
                    label=f"σ={s:g} clean")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("m (samples)")
        ax.set_ylabel("accuracy %")
        ax.set_title(f"vote {v}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "acc_vs_m.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def throughput(base: nn.Module, x: torch.Tensor, *, sigma: float, ms: list[int],
               max_batch: int = 4096, repeats: int = 1) -> dict[int, float]:
    """Images per second of smoothed inference (all m samples) for each m."""
    out = {}
    with eval_mode(base), torch.no_grad():
        sample_logits(base, x[:2], sigma=sigma, m=2, max_batch=max_batch)  # warm-up
        for m in sorted(set(ms)):
            t0 = time.perf_counter()
            for _ in range(repeats):
                sample_logits(base, x, sigma=sigma, m=m, max_batch=max_batch)
            out[m] = repeats * x.shape[0] / (time.perf_counter() - t0)
    return out


def _robust(base: nn.Module, x: torch.Tensor, y: torch.Tensor, *, sigma: float, m: int,
            votes: list[str], k: int, repeats: int, max_batch: int,
            batch: int) -> dict[str, torch.Tensor]:
    """Per-example flags: correct on *all* ``repeats`` fresh m-sample votes (per vote).
    The ``repeats * m`` draws are one replicated call (``batch`` is kept for the callers:
    memory is bounded by ``max_batch`` rows)."""
    with torch.no_grad():
        logits = sample_logits(base, x, sigma=sigma, m=m * repeats, max_batch=max_batch)
    logits = logits.view(repeats, m, *logits.shape[1:])
    yc = y.to(logits.device)
    return {v: torch.stack([vote_scores(logits[r], v, k=k).argmax(1) == yc
                            for r in range(repeats)]).all(0).cpu()
            for v in votes}


def attack_table(base: nn.Module, x: torch.Tensor, y: torch.Tensor, *, sigma: float, m: int,
                 votes: list[str] | None = None, k: int = 3, eps: float = 0.3,
                 steps: int = 20, step_size: float | None = None, attack_samples: int = 8,
                 norm: str = "linf", substitute: nn.Module | None = None,
                 nattack: dict[str, Any] | None = None, nattack_vote: str = "prediction",
                 repeats: int = 3, seed: int = 0, max_batch: int = 4096, batch: int = 100,
                 progress: bool = False) -> dict[str, Any]:
    """Test-time table: rows = the base model (one fresh draw, sigma 0) and the smoothed
    classifier with each vote at ``(sigma, m)``; columns = clean, PGD (one draw per step),
    EPGD and SmoothAdv (``attack_samples`` draws), NAttack (black-box, run against the
    deployed smoothed classifier with ``nattack_vote``; options ``nattack``, ``None`` = skip)
    and transfer (PGD-``steps`` on ``substitute``; ``None`` = skip).

    White-box points for the smoothed rows are crafted once on the noisy base at ``sigma``
    and scored with every vote; an example counts as correct only if all ``repeats`` fresh
    m-sample votes are correct. Accuracies come with 95% Clopper–Pearson intervals;
    ``flags[row][column]`` keeps the per-example verdicts (lists of booleans) for paired tests.
    """
    from ..attacks import PGD
    from ..attacks.nattack import NAttack
    from ..defenses.smoothing import SmoothedClassifier
    from ..evaluation.stats import clopper_pearson

    votes = list(votes or VOTES)
    rows: dict[str, dict[str, torch.Tensor]] = {}
    seconds: dict[str, float] = {}
    n = x.shape[0]
    device = next((p.device for p in base.parameters()), x.device)
    x, y = x.to(device), y.to(device)  # the attacks and votes run where the model lives

    def craft(atk, target):
        t0 = time.perf_counter()
        out = torch.cat([atk(target, x[s : s + batch], y[s : s + batch])
                         for s in range(0, n, batch)])
        return out, time.perf_counter() - t0

    settings = [("base", 0.0, 1, ["prediction"]), ("smoothed", sigma, m, votes)]
    with eval_mode(base), seeded(seed):
        transfer_x = None
        if substitute is not None:
            with eval_mode(substitute):
                transfer_x, seconds["transfer"] = craft(
                    PGD(eps=eps, steps=steps, step_size=step_size, norm=norm, seed=seed,
                        max_batch=max_batch), substitute)
        for tag, sg, mm, vs in tqdm(settings, desc="table", disable=not progress, leave=False):
            names = [f"{tag}" if tag == "base" else f"smoothed/{v}" for v in vs]
            res = {nm: {} for nm in names}

            def score(col, xa, res=res, names=names, sg=sg, mm=mm, vs=vs):
                flags = _robust(base, xa, y, sigma=sg, m=mm, votes=vs, k=k, repeats=repeats,
                                max_batch=max_batch, batch=batch)
                for nm, v in zip(names, vs, strict=True):
                    res[nm][col] = flags[v]

            score("clean", x)
            for col in ("pgd", "epgd", "smoothadv"):
                atk = make_attack(col, sigma=sg, eps=eps, steps=steps, step_size=step_size,
                                  samples=attack_samples, norm=norm, seed=seed,
                                  max_batch=max_batch)
                xa, secs = craft(atk, base)
                seconds[f"{tag}/{col}"] = secs
                score(col, xa)
            if nattack is not None:
                # the deployed model's scores; the base row's deployed model is the noisy base
                target = base if tag == "base" else SmoothedClassifier(
                    base, sigma=sg, m=mm, vote=nattack_vote, k=k, max_batch=max_batch)
                xa, secs = craft(NAttack(eps=eps, seed=seed, max_batch=max_batch, **nattack),
                                 target)
                seconds[f"{tag}/nattack"] = secs
                score("nattack", xa)
            if transfer_x is not None:
                score("transfer", transfer_x)
            for nm in names:
                flags = res[nm]
                flags["worst"] = torch.stack(list(flags.values())).all(0)
                rows[nm] = flags

    def acc(flags):
        c = int(flags.sum())
        lo, hi = clopper_pearson(c, n)
        return {"acc": c / n, "low": lo, "high": hi, "correct": c}

    return {"n": n, "sigma": sigma, "m": m, "repeats": repeats, "eps": eps, "norm": norm,
            "steps": steps, "attack_samples": attack_samples, "nattack": nattack,
            "nattack_vote": nattack_vote, "seconds": seconds,
            "rows": {nm: {col: acc(f) for col, f in cols.items()} for nm, cols in rows.items()},
            "flags": {nm: {col: f.tolist() for col, f in cols.items()}
                      for nm, cols in rows.items()}}


def table_markdown(table: dict[str, Any]) -> str:
    """Markdown for :func:`attack_table`'s result (accuracy % with 95% CI)."""
    cols = list(next(iter(table["rows"].values())))
    lines = [f"n={table['n']}, eps={table['eps']:g} ({table['norm']}), sigma={table['sigma']:g},"
             f" m={table['m']}, robust = correct on all {table['repeats']} fresh votes", "",
             "| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, r in table["rows"].items():
        lines.append(f"| {name} | " + " | ".join(
            f"{100 * r[c]['acc']:.1f} [{100 * r[c]['low']:.0f}, {100 * r[c]['high']:.0f}]"
            for c in cols) + " |")
    return "\n".join(lines) + "\n"
