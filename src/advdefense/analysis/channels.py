"""Channel-wise activation statistics, natural vs adversarial (Bai et al., ICLR 2021, Figs. 1-2).

For the examples of one class, a layer's feature map ``f`` (N, K, H, W) is reduced to per-sample
channel means ``g[n, k] = mean_{h,w} f[n, k, h, w]`` (global average pooling; for (N, K) features
``g = f``). Then, for natural and for adversarial examples separately:

* **magnitude** ``m_k = mean_n g[n, k]``: the true mean of channel ``k`` over examples and
  spatial positions;
* **frequency** ``c_k = #{n : g[n, k] > threshold · max_j g[n, j]}``: the number of samples in
  which channel ``k`` is *active* (its mean exceeds ``threshold`` = 1% by default of that
  sample's largest channel mean), reported as a count and as the fraction ``c_k / N``;
* **uniformity** of the normalised frequency ``p_k = c_k / Σ_j c_j``: the entropy
  ``H = -Σ p_k log p_k`` (nats; also ``H / log K`` in [0, 1]) and the Gini coefficient
  ``G = Σ_i Σ_j |p_i - p_j| / (2 K Σ_k p_k)`` (0 = every channel equally often active). The
  paper's claim: adversarial examples activate channels more uniformly (higher H, lower G);
  adversarial training fixes the magnitudes but not the uniformity, CAS fixes both.

Departures from the reference scripts (``ActivationAnalysis/freq_dis_resnet18_*.py``), on
purpose: the magnitude is the true mean (the code averages batches as ``(prev + new) / 2``,
over-weighting later batches, and divides by the activation count, i.e. averages only over
samples where the channel is active; that figure is kept as ``magnitude_active``); channel
indices are aligned between natural and adversarial (one order: natural magnitude,
descending; the code sorts the two magnitude series independently); class, layer, threshold
and attack are parameters and the attack is recorded; a uniformity scalar is added.

:func:`cas_site_stats` reports, per CAS site, the auxiliary head's accuracy and how often the
main prediction equals the head's argmax (clean and adversarial): the test of whether the
main prediction simply follows the first head's class mask.

Layers are module paths (``"stages.3.1"``) whose *output* is analysed, or ``"path:in"`` for a
module's first *input*. On a CAS model (:class:`advdefense.defenses.cas.CASModel`) paths may omit
the leading ``model.``; at a CAS site the features the CAS module receives (before the mask,
as in the reference's CAS analysis) are used, or the masked ones with ``after_mask=True``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AdvDefenseError

log = logging.getLogger(__name__)

IN_SUFFIX = ":in"


@dataclass
class ChannelStats:
    """Per-channel statistics of one set of examples (see the module docstring)."""

    magnitude: torch.Tensor  # (K,) mean over examples and positions
    magnitude_active: torch.Tensor  # (K,) mean over the samples where the channel is active
    count: torch.Tensor  # (K,) number of samples where the channel is active
    n: int

    @property
    def frequency(self) -> torch.Tensor:
        """Fraction of samples in which each channel is active."""
        return self.count.double() / max(self.n, 1)

    def uniformity(self) -> dict[str, float]:
        return uniformity(self.count)


def channel_stats(gap: torch.Tensor, *, threshold: float = 0.01) -> ChannelStats:
    """Statistics of per-sample channel means ``gap`` (N, K)."""
    if gap.dim() != 2:
        raise AdvDefenseError(f"channel means must have shape (N, K), got {tuple(gap.shape)}")
    if not 0 <= threshold < 1:
        raise AdvDefenseError(f"threshold must be in [0, 1), got {threshold}")
    g = gap.detach().double()
    n = g.shape[0]
    if n == 0:
        raise AdvDefenseError("no examples to compute channel statistics on")
    peak = g.max(dim=1, keepdim=True).values
    active = g > threshold * peak
    count = active.sum(dim=0)
    total_active = (g * active).sum(dim=0)
    magnitude_active = torch.where(count > 0, total_active / count.clamp_min(1),
                                   torch.zeros_like(total_active))
    return ChannelStats(g.mean(dim=0), magnitude_active, count, n)


def uniformity(count: torch.Tensor) -> dict[str, float]:
    """Entropy (nats and normalised by log K) and Gini coefficient of ``count / count.sum()``."""
    c = count.detach().double().flatten()
    k = c.numel()
    total = float(c.sum())
    if k == 0 or total <= 0:
        return {"entropy": math.nan, "normalized_entropy": math.nan, "gini": math.nan}
    p = c / total
    nz = p[p > 0]
    entropy = float(-(nz * nz.log()).sum())
    gini = float((p[:, None] - p[None, :]).abs().sum() / (2 * k))
    norm_h = entropy / math.log(k) if k > 1 else 1.0
    return {"entropy": entropy, "normalized_entropy": norm_h, "gini": gini}


# --- feature capture ----------------------------------------------------------------------------

def _resolve(model: nn.Module, layer: str) -> tuple[nn.Module, str]:
    """(module, side) for ``layer``; side is ``"out"`` or ``"in"``."""
    path, side = (layer[: -len(IN_SUFFIX)], "in") if layer.endswith(IN_SUFFIX) else (layer, "out")
    candidates = [path]
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and hasattr(model, "forward_with_aux"):
        candidates.append(f"model.{path}")
    for cand in candidates:
        try:
            return model.get_submodule(cand), side
        except AttributeError:
            continue
    names = [n for n, _ in model.named_modules() if n][:12]
    raise AdvDefenseError(
        f"no layer {path!r} in the model; module paths look like: {', '.join(names)}")


def _pool(f: torch.Tensor, absolute: bool) -> torch.Tensor:
    if not torch.is_tensor(f) or f.dim() < 2:
        raise AdvDefenseError(
            "the chosen layer does not give an (N, K, ...) tensor; choose another")
    f = f.detach()
    if absolute:
        f = f.abs()
    return f.flatten(2).mean(dim=2) if f.dim() > 2 else f


def capture_channel_means(
    model: nn.Module,
    layer: str,
    x: torch.Tensor,
    *,
    after_mask: bool = False,
    absolute: bool = False,
    batch_size: int = 256,
) -> torch.Tensor:
    """Per-sample channel means (N, K) of ``layer`` for inputs ``x``, via a forward hook.

    The model is run under ``torch.no_grad`` in eval mode (every module's mode is restored).
    ``absolute=True`` pools ``|f|`` (for signed features, e.g. after a signed CAS mask).
    """
    from ..attacks.base import eval_mode
    from ..defenses.cas import CASSite

    module, side = _resolve(model, layer)
    captured: list[torch.Tensor] = []
    if isinstance(module, CASSite) and module.where == side:
        if after_mask:
            handle = module.cas.register_forward_hook(
                lambda _m, _i, out: captured.append(_pool(out[0], absolute)))
        else:
            handle = module.cas.register_forward_pre_hook(
                lambda _m, inp: captured.append(_pool(inp[0], absolute)))
    else:
        if after_mask:
            raise AdvDefenseError(f"layer {layer!r} is not a CAS site; drop --after-mask")
        if side == "out":
            handle = module.register_forward_hook(
                lambda _m, _i, out: captured.append(_pool(out, absolute)))
        else:
            handle = module.register_forward_pre_hook(
                lambda _m, inp: captured.append(_pool(inp[0] if inp else None, absolute)))
    parts = []
    try:
        with eval_mode(model), torch.no_grad():
            for i in range(0, x.shape[0], batch_size):
                captured.clear()
                model(x[i : i + batch_size])
                if len(captured) != 1:
                    raise AdvDefenseError(
                        f"layer {layer!r} ran {len(captured)} times in one forward pass; "
                        "choose a module that runs exactly once")
                parts.append(captured[0].cpu())
    finally:
        handle.remove()
    return torch.cat(parts)


# --- the analysis -------------------------------------------------------------------------------

@dataclass
class ChannelReport:
    """Natural vs adversarial channel statistics of one layer and class."""

    layer: str
    cls: int
    threshold: float
    attack: str
    natural: ChannelStats
    adversarial: ChannelStats
    adv_accuracy: float
    clean_accuracy: float

    @property
    def order(self) -> torch.Tensor:
        """Channel indices sorted by natural magnitude, descending (used for both series)."""
        return torch.argsort(self.natural.magnitude, descending=True, stable=True)

    def summary(self) -> dict[str, Any]:
        return {
            "natural": {"mean_magnitude": float(self.natural.magnitude.mean()),
                        "mean_frequency": float(self.natural.frequency.mean()),
                        **self.natural.uniformity()},
            "adversarial": {"mean_magnitude": float(self.adversarial.magnitude.mean()),
                            "mean_frequency": float(self.adversarial.frequency.mean()),
                            **self.adversarial.uniformity()},
        }

    def to_dict(self) -> dict[str, Any]:
        def stats(s: ChannelStats) -> dict[str, Any]:
            return {"magnitude": s.magnitude.tolist(),
                    "magnitude_active": s.magnitude_active.tolist(),
                    "count": s.count.tolist(), "frequency": s.frequency.tolist(), "n": s.n}

        return {"layer": self.layer, "class": self.cls, "threshold": self.threshold,
                "attack": self.attack, "channels": int(self.natural.magnitude.numel()),
                "examples": self.natural.n, "clean_accuracy": self.clean_accuracy,
                "adversarial_accuracy": self.adv_accuracy, "summary": self.summary(),
                "order": self.order.tolist(), "natural": stats(self.natural),
                "adversarial": stats(self.adversarial)}


def describe_attack(attack) -> str:
    """A one-line description of an attack: its repr plus steps, step size and loss."""
    parts = [repr(attack)]
    for key in ("steps", "step_size"):
        if hasattr(attack, key):
            parts.append(f"{key}={getattr(attack, key):g}")
    objective = getattr(attack, "objective", None)
    if objective is not None:
        parts.append(f"loss={getattr(objective, 'name', objective)}")
    return " ".join(parts)


def analyze_channels(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    layer: str,
    cls: int,
    attack,
    threshold: float = 0.01,
    after_mask: bool = False,
    absolute: bool = False,
    batch_size: int = 256,
) -> ChannelReport:
    """Channel statistics of ``layer`` on the examples of class ``cls`` among ``(x, y)``,
    natural vs ``attack(model, x, y)``."""
    sel = y == cls
    if not bool(sel.any()):
        raise AdvDefenseError(f"no examples of class {cls} in the data; choose another class")
    xs, ys = x[sel], y[sel]
    parts = [attack(model, xs[i : i + batch_size], ys[i : i + batch_size])
             for i in range(0, xs.shape[0], batch_size)]
    x_adv = torch.cat(parts)
    kw = dict(after_mask=after_mask, absolute=absolute, batch_size=batch_size)
    g_nat = capture_channel_means(model, layer, xs, **kw)
    g_adv = capture_channel_means(model, layer, x_adv, **kw)
    from ..attacks.base import eval_mode

    with eval_mode(model), torch.no_grad():
        clean = float((model(xs).argmax(1) == ys).float().mean())
        robust = float((model(x_adv).argmax(1) == ys).float().mean())
    return ChannelReport(layer, int(cls), float(threshold), describe_attack(attack),
                         channel_stats(g_nat, threshold=threshold),
                         channel_stats(g_adv, threshold=threshold), robust, clean)


def save_report(report: ChannelReport, out_dir: str | Path, *, title: str = "") -> list[Path]:
    """Write ``channels.json``, ``magnitude.png`` and ``frequency.png`` into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "channels.json", out / "magnitude.png", out / "frequency.png"]
    paths[0].write_text(json.dumps(report.to_dict(), indent=1))
    order = report.order
    idx = torch.arange(order.numel())
    head = title or f"{report.layer}, class {report.cls}"
    summary = report.summary()
    for path, key, ylabel in ((paths[1], "magnitude", "mean activation"),
                              (paths[2], "frequency", "fraction of samples active")):
        fig, ax = plt.subplots(figsize=(8, 3.2))
        nat = getattr(report.natural, key)[order].numpy()
        adv = getattr(report.adversarial, key)[order].numpy()
        ax.bar(idx.numpy(), nat, width=1.0, color="tab:blue", alpha=0.6, label="natural")
        ax.plot(idx.numpy(), adv, color="tab:red", lw=0.9, label="adversarial")
        ax.set_xlabel("channel (sorted by natural magnitude)")
        ax.set_ylabel(ylabel)
        if key == "frequency":
            ax.set_ylim(0, 1.02)
            sub = (f"Gini nat {summary['natural']['gini']:.3f} / adv "
                   f"{summary['adversarial']['gini']:.3f}")
        else:
            sub = (f"mean nat {summary['natural']['mean_magnitude']:.3g} / adv "
                   f"{summary['adversarial']['mean_magnitude']:.3g}")
        ax.set_title(f"{head}: {sub}", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return paths


# --- CAS per-site statistics -------------------------------------------------------------------

def _site_rows(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               batch_size: int) -> dict[str, Any]:
    from ..attacks.base import eval_mode
    from ..models.heads import forward_with_aux

    main_pred, head_preds = [], []
    with eval_mode(model), torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            logits, aux = forward_with_aux(model, x[i : i + batch_size])
            main_pred.append(logits.argmax(1).cpu())
            head_preds.append([a.argmax(1).cpu() for a in aux])
    main = torch.cat(main_pred)
    heads = [torch.cat(cols) for cols in zip(*head_preds, strict=True)] if head_preds else []
    y = y.cpu()
    return {
        "n": int(y.numel()),
        "main_accuracy": float((main == y).float().mean()),
        "heads": [{"accuracy": float((h == y).float().mean()),
                   "agrees_with_main": float((h == main).float().mean())} for h in heads],
    }


def cas_site_stats(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                   x_adv: torch.Tensor | None = None, attack=None,
                   batch_size: int = 250) -> dict[str, Any]:
    """Per CAS site of ``model`` (eval mode, predicted-class masks, as deployed): the
    auxiliary head's accuracy and how often its argmax equals the main prediction, on clean
    ``x`` and on adversarial inputs (``x_adv``, or ``attack(model, x, y)`` when given).

    Why: CAS trains with the *true-class* mask, so every layer after the first site can read the
    label from the mask, and at test time the main prediction tends to follow the **first**
    head's argmax (its mask). Where the first head is a weak classifier (smallcnn's sites) the
    main accuracy collapses to it; where it is nearly as strong as the main head (the last
    stage of a ResNet, as in the paper) it need not. ``agrees_with_main`` of site 0 is that
    agreement. Models without heads give an empty ``sites`` list.
    """
    places = list(getattr(model, "placements", []))
    device = next((p.device for p in model.parameters()), x.device)
    x, y = x.to(device), y.to(device)
    if x_adv is not None:
        x_adv = x_adv.to(device)
    if x_adv is None and attack is not None:
        x_adv = torch.cat([attack(model, x[i : i + batch_size], y[i : i + batch_size])
                           for i in range(0, x.shape[0], batch_size)])
    sets = {"clean": _site_rows(model, x, y, batch_size)}
    if x_adv is not None:
        sets["adversarial"] = _site_rows(model, x_adv, y, batch_size)
    n_sites = len(sets["clean"]["heads"])
    sites = []
    for j in range(n_sites):
        site = {"site": places[j] if j < len(places) else str(j)}
        for kind, rows in sets.items():
            site[kind] = rows["heads"][j]
        sites.append(site)
    return {"n": sets["clean"]["n"], "attack": None if attack is None else describe_attack(attack),
            "main_accuracy": {k: v["main_accuracy"] for k, v in sets.items()},
            "sites": sites}


def cas_site_markdown(stats: dict[str, Any]) -> str:
    """A Markdown table of :func:`cas_site_stats` (percentages)."""
    kinds = list(stats["main_accuracy"])
    head = "| site | " + " | ".join(
        f"head accuracy ({k}) | main = this head ({k})" for k in kinds) + " |"
    lines = [head, "|---|" + "---|---|" * len(kinds),
             "| main head | " + " | ".join(
                 f"{100 * stats['main_accuracy'][k]:.1f} | –" for k in kinds) + " |"]
    for s in stats["sites"]:
        lines.append(f"| {s['site']} | " + " | ".join(
            f"{100 * s[k]['accuracy']:.1f} | {100 * s[k]['agrees_with_main']:.1f}"
            for k in kinds) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["ChannelReport", "ChannelStats", "analyze_channels", "capture_channel_means",
           "cas_site_markdown", "cas_site_stats", "channel_stats", "save_report", "uniformity"]
