"""Square attack (Andriushchenko, Croce, Flammarion & Hein 2020, "Square Attack: a
query-efficient black-box adversarial attack via random search", ECCV), L-inf (Alg. 2) and
L2 (Alg. 3), with the margin loss and batched EOT.

Random search on the margin ``m(x) = z_y(x) - max_{c != y} z_c(x)`` (targeted:
``max_{c != t} z_c - z_t``), lower is better, an example is done once adversarial:

* L-inf: start from vertical stripes ``x + eps * s`` (one random sign per column and channel);
  each query changes one random square window of side ``s_i = round(sqrt(p_i * h * w))``
  (capped at ``min(h, w) - 1``) to ``x +- eps`` (one random sign per channel), the signs
  re-drawn while the window would stay as it is (as in the authors' code: with one channel
  half the proposals would otherwise change nothing), and is kept if the margin decreases;
* L2: start from a 5x5 grid of "pseudo-Gaussian" tiles (concentric squares weighted
  ``1/(r+1)^2``, upper half positive, lower half negative) with random signs, scaled to norm
  eps; each query moves the perturbation mass of two random windows W1, W2 into W1, adds a new
  pseudo-Gaussian pattern with random sign per channel (window side odd, >= 3), and rescales
  the whole perturbation to norm eps (window side capped at ``min(h, w) - 1`` as well);
* ``p_i``: AutoAttack's schedule ``p = p_init / 2^{#{b in (10, 50, 200, 500, 1000, 2000, 4000,
  6000, 8000) : b < i}}`` on the query index ``i``, as AutoAttack's standard version runs it
  (``resc_schedule=False``); ``rescale_schedule=True`` maps ``i`` to ``floor(i / n_queries *
  10^4)`` first (the Square paper's rescaling to the budget).

Defaults are AutoAttack's: ``n_queries=5000``, ``p_init=0.8``, ``restarts=1``, margin loss.
Every query evaluates only the examples not yet fooled. ``trace.losses`` records minus the
current point's margin after each query. On a deterministic model that margin never
increases; under EOT it is re-estimated on fresh draws at every query (below), so it can rise
although the point only changes when a proposal is accepted.

Departures from the reference code (``fra31/auto-attack``, ``square.py``), on purpose:

* window positions, signs and pattern orientation are drawn **per example** (vectorized with
  masks), as in the paper's Algorithms 2-3; AutoAttack's PyTorch version shares one window per
  query across the batch;
* ``n_queries`` is the total budget per example, the initialization included (the reference
  makes ``n_queries`` iterations after it);
* stochastic models: the margin of a query is the mean over ``eot_samples`` draws evaluated
  batched along the batch dimension (:func:`~.base.eot_loss_grad` without gradients). The
  current best and the proposal are scored on the **same** draws (common random numbers) and
  the best's margin is re-estimated at every query, so one lucky estimate never sticks; a
  proposal is accepted when its margin is lower on those draws. An example stops only when the
  proposal is adversarial on all ``eot_samples`` draws *and* on the majority of
  ``confirm_draws`` fresh draws (a repeated verdict), not after one lucky draw.
  AutoAttack's Square has no EOT;
* our pseudo-Gaussian pattern is written from the paper's description, not from the code;
* the L-inf re-drawing of a window's signs is bounded (10 draws, then the opposite signs,
  which always change the window) where the authors' code loops until the window changes;
  the window side is capped at ``min(h, w) - 1`` for both norms (AutoAttack caps the L-inf
  side at ``h - 1``), so a window always has more than one position;
* inside a bf16 attack (:mod:`advdefense.precision`) queries run under autocast, but an
  example stops (and a proposal is accepted as adversarial) only once fp32 agrees
  (:func:`~.base.confirm_logits`, :func:`~.base.majority_adversarial`).

Example::

    x_adv = Square(eps=0.3, n_queries=1000, seed=0)(model, x, y)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import AdvDefenseError
from ..randomness import fresh_seed, is_stochastic
from .base import (
    Attack,
    AttackRecorder,
    Objective,
    as_objective,
    eot_loss_grad,
    majority_adversarial,
)
from .losses import LossFn

__all__ = ["Square", "pseudo_gaussian", "square_p", "window_side"]

_THRESHOLDS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
_REDRAWS = 10  # sign draws per L-inf proposal before taking the opposite signs


def square_p(i: int, n_queries: int, p_init: float, rescale: bool = False) -> float:
    """Fraction of pixels changed at query ``i``: AutoAttack's schedule, on the raw query
    index (its standard version) or, with ``rescale``, on ``i`` rescaled to 10,000 queries."""
    j = int(i / n_queries * 10000) if rescale else int(i)
    return p_init / 2 ** sum(j > b for b in _THRESHOLDS)


def _concentric(rows: int, cols: int) -> torch.Tensor:
    """Sum of indicator functions of concentric rectangles, the k-th weighted 1/(k+1)^2."""
    if rows == 0 or cols == 0:
        return torch.zeros(rows, cols)
    ci, cj = rows // 2, cols // 2
    ii = torch.arange(rows)[:, None]
    jj = torch.arange(cols)[None, :]
    ring = torch.maximum((ii - ci).abs(), (jj - cj).abs())     # Chebyshev distance to centre
    depth = max(ci, cj, rows - 1 - ci, cols - 1 - cj) + 1
    weights = 1.0 / torch.arange(1, depth + 1, dtype=torch.float32) ** 2
    tail = weights.flip(0).cumsum(0).flip(0)                   # tail[r] = sum_{k >= r} w_k
    return tail[ring]


def pseudo_gaussian(s: int) -> torch.Tensor:
    """The (s, s) "meta pseudo-Gaussian" pattern of the paper: positive concentric pattern in
    the upper half, negative in the lower half, unit L2 norm."""
    pat = torch.cat([_concentric(s // 2, s), -_concentric(s - s // 2, s)], dim=0)
    return pat / pat.norm().clamp_min(1e-12)


def window_side(p: float, h: int, w: int, norm: str = "linf") -> int:
    """Side of the square window changed at a query with fraction ``p``:
    ``round(sqrt(p * h * w))``, at least 1 (L-inf) or 3 and odd (L2), at most
    ``min(h, w) - 1`` (so a window always has more than one position)."""
    s = int(round(math.sqrt(p * h * w)))
    if norm == "linf":
        s = max(s, 1)
    else:
        s = max(s, 3)
        s += 1 - s % 2
    return max(min(s, min(h, w) - 1), 1)


def _window_mask(m: int, h: int, w: int, s: int, device) -> tuple[torch.Tensor, torch.Tensor,
                                                                   torch.Tensor]:
    """Random s x s window per example: mask (m, 1, h, w) and top-left corners (m,), (m,)."""
    vh = torch.randint(0, h - s + 1, (m,), device=device)
    vw = torch.randint(0, w - s + 1, (m,), device=device)
    rows = torch.arange(h, device=device)[None, :]
    cols = torch.arange(w, device=device)[None, :]
    in_r = (rows >= vh[:, None]) & (rows < vh[:, None] + s)
    in_c = (cols >= vw[:, None]) & (cols < vw[:, None] + s)
    return (in_r[:, :, None] & in_c[:, None, :])[:, None], vh, vw


def _place(patch: torch.Tensor, vh, vw, h: int, w: int) -> torch.Tensor:
    """Put per-example patches (m, c, s, s) at (vh, vw) into zero images (m, c, h, w)."""
    m, c, s, _ = patch.shape
    out = torch.zeros(m, c, h, w, device=patch.device, dtype=patch.dtype)
    b = torch.arange(m, device=patch.device)[:, None, None]
    r = (vh[:, None] + torch.arange(s, device=patch.device)[None])[:, :, None]
    q = (vw[:, None] + torch.arange(s, device=patch.device)[None])[:, None, :]
    out[b, :, r, q] = patch.permute(0, 2, 3, 1)
    return out


def _take(img: torch.Tensor, vh, vw, s: int) -> torch.Tensor:
    """Per-example windows (m, c, s, s) of ``img`` (m, c, h, w) at (vh, vw)."""
    m = img.shape[0]
    b = torch.arange(m, device=img.device)[:, None, None]
    r = (vh[:, None] + torch.arange(s, device=img.device)[None])[:, :, None]
    q = (vw[:, None] + torch.arange(s, device=img.device)[None])[:, None, :]
    return img[b, :, r, q].permute(0, 3, 1, 2)


def _signs(*shape, device) -> torch.Tensor:
    return torch.randint(0, 2, shape, device=device).float() * 2 - 1


class Square(Attack):
    """Square attack (Andriushchenko et al. 2020), score-based black box (no gradients).

    Keyword-only hyper-parameters: ``n_queries=5000`` (per example, init included),
    ``p_init=0.8``, ``rescale_schedule=False``, ``loss="margin"`` (or any loss of
    :mod:`.losses`/:class:`Objective`, minimized as ``-loss``), ``confirm_draws=10``
    (stochastic models), plus the common ones of :class:`~.base.Attack`. Inputs must be
    images (N, C, H, W).
    """

    name = "square"
    access = "gradient-free"

    def __init__(self, *, eps: float, norm: str = "linf", n_queries: int = 5000,
                 p_init: float = 0.8, rescale_schedule: bool = False,
                 loss: str | LossFn | Objective = "margin", confirm_draws: int = 10,
                 eot_samples: int | None = None, max_batch: int = 4096, seed: int | None = None,
                 restarts: int = 1, targeted: bool = False) -> None:
        super().__init__(eps=eps, norm=norm, eot_samples=eot_samples, max_batch=max_batch,
                         seed=seed, restarts=restarts, targeted=targeted)
        if int(n_queries) < 1:
            raise AdvDefenseError(f"n_queries must be >= 1, got {n_queries}")
        if not 0.0 < p_init <= 1.0:
            raise AdvDefenseError(f"p_init must be in (0, 1], got {p_init}")
        if int(confirm_draws) < 1:
            raise AdvDefenseError(f"confirm_draws must be >= 1, got {confirm_draws}")
        self.n_queries = int(n_queries)
        self.p_init = float(p_init)
        self.rescale_schedule = bool(rescale_schedule)
        self.confirm_draws = int(confirm_draws)
        self.objective = as_objective(loss)
        self.loss = self.objective

    @property
    def steps(self) -> int:
        return self.n_queries

    def _margin(self, model, x, y, target, k, recorder, seed=None):
        res = eot_loss_grad(model, x, y, self.objective, eot_samples=k,
                            max_batch=self.max_batch, target=target, need_grad=False,
                            seed=seed, recorder=recorder)
        return -res.loss, res.wrong_fraction(y, target) == 1.0

    def _confirmed(self, model, x, y, target, fooled, recorder, stochastic: bool):
        """``fooled`` examples that stay adversarial on the majority of fresh draws."""
        if not stochastic or not bool(fooled.any()):
            return fooled
        out = fooled.clone()
        sel = fooled.nonzero().squeeze(1)
        out[sel] = majority_adversarial(model, x[sel], y[sel],
                                        None if target is None else target[sel],
                                        draws=self.confirm_draws, max_batch=self.max_batch,
                                        recorder=recorder)
        return out

    # -- initializations ---------------------------------------------------------------------
    def _init_linf(self, x: torch.Tensor) -> torch.Tensor:
        m, c, _, w = x.shape
        return (x + self.eps * _signs(m, c, 1, w, device=x.device)).clamp(0.0, 1.0)

    def _init_l2(self, x: torch.Tensor) -> torch.Tensor:
        m, c, h, w = x.shape
        s = max(min(h, w) // 5, 1)
        tiles = min(h // s, 5), min(w // s, 5)
        pat = pseudo_gaussian(s).to(x.device)
        signs = _signs(m, c, tiles[0], tiles[1], device=x.device)
        grid = torch.kron(signs, pat)                                   # (m, c, t0*s, t1*s)
        delta = torch.zeros_like(x)
        oh, ow = (h - tiles[0] * s) // 2, (w - tiles[1] * s) // 2
        delta[:, :, oh:oh + grid.shape[2], ow:ow + grid.shape[3]] = grid
        return (x + self._to_eps(delta)).clamp(0.0, 1.0)

    def _to_eps(self, delta: torch.Tensor) -> torch.Tensor:
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        return delta * (self.eps / norms).view(-1, 1, 1, 1)

    # -- proposals ---------------------------------------------------------------------------
    def _propose_linf(self, x, xb, p):
        m, c, h, w = x.shape
        s = window_side(p, h, w, "linf")
        mask, vh, vw = _window_mask(m, h, w, s, x.device)
        base, current = _take(x, vh, vw, s), _take(xb, vh, vw, s)

        def unchanged(signs: torch.Tensor) -> torch.Tensor:
            new = (base + self.eps * signs).clamp(0.0, 1.0)
            return ((new - current).abs().flatten(1).amax(dim=1) < 1e-7).view(m, 1, 1, 1)

        signs = _signs(m, c, 1, 1, device=x.device)
        same = unchanged(signs)
        for _ in range(_REDRAWS):
            if not bool(same.any()):
                break
            signs = torch.where(same, _signs(m, c, 1, 1, device=x.device), signs)
            same = unchanged(signs)
        signs = torch.where(same, -signs, signs)  # x - eps s differs from x + eps s (eps > 0)
        corner = (x + self.eps * signs).clamp(0.0, 1.0)
        return torch.where(mask, corner, xb)

    def _propose_l2(self, x, xb, p):
        m, c, h, w = x.shape
        s = window_side(p, h, w, "l2")
        delta = xb - x
        mask1, vh, vw = _window_mask(m, h, w, s, x.device)
        mask2, _, _ = _window_mask(m, h, w, s, x.device)
        union = mask1 | mask2
        nu2 = (delta * union).flatten(2).pow(2).sum(2)                           # (m, c)
        unused = (self.eps ** 2 - delta.flatten(1).pow(2).sum(1)).clamp_min(0.0)  # (m,)
        old = _take(delta, vh, vw, s)                                             # (m, c, s, s)
        old = old / old.flatten(2).norm(dim=2).clamp_min(1e-12)[:, :, None, None]
        pat = pseudo_gaussian(s).to(x.device)
        flip = torch.rand(m, device=x.device) < 0.5
        pats = torch.where(flip[:, None, None], pat.t()[None], pat[None])[:, None]  # (m,1,s,s)
        new = pats * _signs(m, c, 1, 1, device=x.device) + old
        target_norm = (nu2 + unused[:, None] / c).sqrt()
        new = new / new.flatten(2).norm(dim=2).clamp_min(1e-12)[:, :, None, None]
        new = new * target_norm[:, :, None, None]
        delta = torch.where(union, torch.zeros_like(delta), delta)
        delta = torch.where(mask1, _place(new, vh, vw, h, w), delta)
        return (x + self._to_eps(delta)).clamp(0.0, 1.0)

    # -- the search --------------------------------------------------------------------------
    def run(self, model: nn.Module, x, y, target, recorder: AttackRecorder):
        if x.dim() != 4:
            raise AdvDefenseError(f"square needs images (N, C, H, W), got shape {tuple(x.shape)}")
        k = self.effective_eot(model, x, y)
        stochastic = is_stochastic(model) or k > 1
        n = x.shape[0]
        best_x = x.clone()
        best_margin = torch.full((n,), float("inf"), device=x.device)
        done = torch.zeros(n, dtype=torch.bool, device=x.device)
        init = self._init_linf if self.norm == "linf" else self._init_l2
        propose = self._propose_linf if self.norm == "linf" else self._propose_l2

        for r in range(self.restarts):
            idx = torch.arange(n, device=x.device) if r == 0 else (~done).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            recorder.begin_run(idx)
            xs, ys = x[idx], y[idx]
            ts = None if target is None else target[idx]
            run_x = init(xs)
            run_margin, fooled = self._margin(model, run_x, ys, ts, k, recorder)
            run_done = self._confirmed(model, run_x, ys, ts, fooled, recorder, stochastic)
            recorder.saw(idx, run_done)
            recorder.step(-run_margin)
            for i in range(1, self.n_queries):
                active = (~run_done).nonzero().squeeze(1)
                if active.numel() == 0:
                    break
                xa, ya = xs[active], ys[active]
                ta = None if ts is None else ts[active]
                p = square_p(i - 1, self.n_queries, self.p_init, self.rescale_schedule)
                cand = propose(xa, run_x[active], p)
                if stochastic:  # the best and the proposal on the same fresh draws
                    draws = fresh_seed()
                    current, _ = self._margin(model, run_x[active], ya, ta, k, recorder, draws)
                    run_margin[active] = current
                    margin, fooled = self._margin(model, cand, ya, ta, k, recorder, draws)
                else:
                    margin, fooled = self._margin(model, cand, ya, ta, k, recorder)
                fooled = self._confirmed(model, cand, ya, ta, fooled, recorder, stochastic)
                accept = (margin < run_margin[active]) | fooled
                sel = active[accept]
                run_x[sel] = cand[accept]
                run_margin[sel] = margin[accept]
                run_done[sel] = fooled[accept]
                recorder.saw(idx[sel], fooled[accept])
                recorder.step(-run_margin)
            better = (run_done & ~done[idx]) | (
                (run_done == done[idx]) & (run_margin < best_margin[idx]))
            sel = idx[better]
            best_x[sel] = run_x[better]
            best_margin[sel] = run_margin[better]
            done[sel] = run_done[better]
        recorder.returned_adversarial = done.clone()
        return best_x
