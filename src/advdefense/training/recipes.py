"""Training recipes: ``recipe.loss(model, x, y) -> (loss, logs)`` (DESIGN.md, contract 5).

The model is in train mode when :meth:`Recipe.loss` is called. Inner maximizations run through
:mod:`advdefense.attacks` (eval mode inside, so BatchNorm statistics are not touched by them).

**Heads (composition with CAS).** Every recipe evaluates the model through
:func:`advdefense.models.heads.forward_with_aux` (passing the true labels, which CAS needs in
train mode) and combines, per term, ``main_term + aux_weight * mean_s aux_term_s``. The inner
maximization maximizes the same combination (:class:`~advdefense.attacks.HeadsObjective` for
CE). ``aux_weight`` defaults to 0 (auxiliary heads ignored); the CAS defense asks for its
``beta`` (2 in Bai et al. 2021) through the model attribute ``recipe_defaults`` (see
:func:`recipe_defaults`). There are no CAS-specific recipes.

**Randomness (``draw``).** How the model's stochastic layers (:mod:`advdefense.randomness`)
are used by the attack and by the training forward:

``fresh`` (default)
    every forward draws anew;
``shared``
    the attack and the training step use one frozen draw (the RNA reference without BAT);
``independent``
    the attack is crafted on a frozen draw A, the training forward uses a fresh draw B (RNA's
    "black-box adversarial training", Dong et al. 2022 reference ``train.py``).

**Precision.** Under a training autocast (``train.amp``) the inner maximization runs in fp32
by default (:attr:`Recipe.attack_autocast` = False switches autocast off around it): it takes
input gradients with ``torch.autograd.grad`` and no loss scaling, and in fp16 a large share of
the TRADES KL gradient's entries underflows to zero (a third on a small CNN at TRADES' start;
more as the per-example gradients shrink), which quietly turns adversarial training towards
clean training. Only the outer loss runs under autocast.

**One forward under DistributedDataParallel.** TRADES, MART and ``pgd_at`` with
``clean_weight > 0`` evaluate the model on the clean and on the adversarial batch. Under DDP
a second forward before the backward breaks the gradient reduction of stochastic models
("Expected to mark a variable ready only once"), so there the two batches go through one
forward of their concatenation (as two draw groups: independent randomness per half, as two
forwards would draw) and the logits are split. Train-mode BatchNorm then normalizes the clean
and adversarial halves with joint statistics (two forwards: separate ones), and ``pgd_at``
with ``attack_label: predicted`` takes the label from an eval-mode forward. One process keeps
the two forwards of the reference code.

Registry: :data:`RECIPES`; :func:`build_recipe` validates the recipe arguments.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..attacks import PGD, HeadsObjective, Objective, eot_loss_grad, eval_mode, project
from ..attacks.base import normalize_step
from ..defenses.noise import training_noise
from ..errors import ConfigError
from ..models.heads import forward_with_aux
from ..randomness import draw_groups, freeze, is_stochastic

__all__ = [
    "Recipe",
    "StandardRecipe",
    "PGDATRecipe",
    "TradesRecipe",
    "MartRecipe",
    "KLObjective",
    "RECIPES",
    "build_recipe",
    "recipe_defaults",
]

DRAWS = ("fresh", "shared", "independent")


def recipe_defaults(model: nn.Module) -> dict[str, Any]:
    """Recipe arguments a defense asks for (e.g. CAS: ``{"aux_weight": 2.0}``).

    A defense sets ``model.recipe_defaults = {...}`` on the model it returns (or on any
    submodule); explicit ``train.recipe_args`` override these.
    """
    out: dict[str, Any] = {}
    for m in model.modules():
        d = getattr(m, "recipe_defaults", None)
        if isinstance(d, dict):
            out.update(d)
    return out


def _attack_model(model: nn.Module) -> nn.Module:
    """Inner attacks run on the module under DistributedDataParallel: an input-gradient pass
    through the DDP wrapper would start a gradient reduction that never completes."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _joint_forward(model: nn.Module) -> bool:
    """Whether the clean and adversarial batches must share one forward (DDP)."""
    return isinstance(model, nn.parallel.DistributedDataParallel)


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.detach().argmax(1) == y).float().mean())


def _combine(main: torch.Tensor, aux: list[torch.Tensor], weight: float) -> torch.Tensor:
    """``main + weight * mean_s aux_s`` (just ``main`` when the weight is 0 or no heads)."""
    if weight and aux:
        return main + weight * torch.stack(aux).mean(0)
    return main


def _kl_rows(log_p_adv: torch.Tensor, p_nat: torch.Tensor) -> torch.Tensor:
    """Per-example ``sum_c p_nat,c (log p_nat,c - log p_adv,c)`` (``nn.KLDivLoss`` convention)."""
    return F.kl_div(log_p_adv, p_nat, reduction="none").sum(1)


class Recipe:
    """Base: holds ``aux_weight`` and the ``draw`` policy; subclasses implement :meth:`_loss`.

    ``attack_cfg`` is an :class:`~advdefense.config.AttackConfig` (or any object with ``eps,
    steps, step_size, norm, eot_samples, random_start``); recipes without an inner
    maximization ignore it.
    """

    name = "recipe"
    adversarial = True
    attack_autocast = False
    """Run the inner maximization under the caller's autocast (True) or in fp32 (False)."""

    def __init__(self, attack_cfg: Any = None, *, aux_weight: float = 0.0,
                 draw: str = "fresh", max_batch: int = 4096) -> None:
        if draw not in DRAWS:
            raise ConfigError(f"recipe_args.draw: {draw!r} is not valid; choose one of: "
                              f"{', '.join(DRAWS)}")
        if not math.isfinite(float(aux_weight)) or float(aux_weight) < 0:
            raise ConfigError(f"recipe_args.aux_weight must be >= 0, got {aux_weight}")
        self.attack_cfg = attack_cfg
        self.aux_weight = float(aux_weight)
        self.draw = draw
        self.max_batch = int(max_batch)
        if self.adversarial and attack_cfg is None:
            raise ConfigError(f"recipe {self.name} needs train.attack settings")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(aux_weight={self.aux_weight}, draw={self.draw!r})"

    # -- randomness policy ----------------------------------------------------------------
    @contextlib.contextmanager
    def _phases(self, model: nn.Module) -> Iterator[Callable[[], Any]]:
        """Yields a factory of the context the *attack* runs in; the training forward runs in
        the outer context. ``shared``: both inside one freeze. ``independent``: the attack in its
        own freeze, the training forward outside (fresh draw)."""
        target = _attack_model(model)
        if self.draw == "shared" and is_stochastic(target):
            with freeze(target):
                yield contextlib.nullcontext
        elif self.draw == "independent" and is_stochastic(target):
            yield lambda: freeze(target)
        else:
            yield contextlib.nullcontext

    def _heads(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        if self.aux_weight:
            return forward_with_aux(model, x, y)
        logits, _aux = forward_with_aux(model, x, y)
        return logits, []

    def _heads_pair(self, model: nn.Module, x_nat: torch.Tensor, x_adv: torch.Tensor,
                    y: torch.Tensor):
        """``(_heads(x_nat), _heads(x_adv))``: two forwards, or one under DDP (module doc)."""
        if not _joint_forward(model):
            return self._heads(model, x_nat, y), self._heads(model, x_adv, y)
        n = x_nat.shape[0]
        groups = draw_groups(2) if is_stochastic(_attack_model(model)) else contextlib.nullcontext()
        with groups:
            logits, aux = self._heads(model, torch.cat([x_nat, x_adv]), torch.cat([y, y]))
        return ((logits[:n], [a[:n] for a in aux]), (logits[n:], [a[n:] for a in aux]))

    def _precision(self, device_type: str):
        if self.attack_autocast or not torch.is_autocast_enabled(device_type):
            return contextlib.nullcontext()
        return torch.autocast(device_type, enabled=False)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """The training loss on a batch and a dict of float logs (``loss``, ``acc``, ...).

        Runs inside :func:`advdefense.defenses.noise.training_noise`: train-time input noise
        stays on in the inner attack (eval mode), as in the smoothing paper's training.
        """
        with self._phases(model) as phase, training_noise():

            @contextlib.contextmanager
            def attack_context() -> Iterator[None]:
                with phase(), self._precision(x.device.type):
                    yield

            return self._loss(model, x, y, attack_context)

    def _loss(self, model, x, y, attack_context):  # pragma: no cover - abstract
        raise NotImplementedError


class StandardRecipe(Recipe):
    """Empirical risk minimization: cross-entropy on clean inputs (+ ``aux_weight`` x mean CE
    of the auxiliary heads)."""

    name = "standard"
    adversarial = False

    def __init__(self, attack_cfg: Any = None, *, aux_weight: float = 0.0,
                 draw: str = "fresh", max_batch: int = 4096) -> None:
        super().__init__(attack_cfg, aux_weight=aux_weight, draw=draw, max_batch=max_batch)

    def _loss(self, model, x, y, attack_context):
        logits, aux = self._heads(model, x, y)
        loss = _combine(F.cross_entropy(logits, y), [F.cross_entropy(a, y) for a in aux],
                        self.aux_weight)
        return loss, {"loss": float(loss.detach()), "acc": _accuracy(logits, y)}


class PGDATRecipe(Recipe):
    """PGD adversarial training (Madry et al. 2018, eq. 2.1): ``min E[max_{||d||<=eps}
    CE(f(x+d), y)]``, the inner max by PGD (:class:`advdefense.attacks.PGD`).

    Options:

    ``clean_weight`` (default 0 = Madry)
        loss ``(1 - w) * CE_adv + w * CE_clean``; ``0.5`` is PNI's objective (He et al. 2019,
        reference ``main.py``: 0.5 clean + 0.5 adversarial).
    ``attack_label`` (``true`` | ``predicted``; YAML's boolean ``true`` is accepted)
        ``predicted`` crafts PGD against the model's clean prediction (PNI, against label
        leaking); the training loss always uses the true label.
    ``draw`` (``fresh`` | ``shared`` | ``independent``)
        see the module docstring (``independent`` = RNA's BAT).
    ``aux_weight``
        CAS composition: ``CE(main) + aux_weight * mean_s CE(aux_s)``, also maximized by the
        attack (:class:`~advdefense.attacks.HeadsObjective`).

    ``train.attack.eot_samples = m > 1`` makes the inner max EPGD (mean CE over m draws of the
    model's randomness), the smoothing paper's fine-tuning attack.

    Departures from the reference code: the attack runs in eval mode (Madry/RNA craft in train
    mode, which also updates BN statistics with adversarial batches); PGD returns, per example,
    the best iterate (most draws misclassified, then highest loss) rather than the last one;
    with ``attack_label: predicted`` and ``clean_weight > 0`` the label comes from the
    train-mode clean forward, as in PNI, otherwise (and under DDP, where the clean forward
    follows the attack: see the module docstring) from an eval-mode forward.
    """

    name = "pgd_at"

    def __init__(self, attack_cfg: Any = None, *, clean_weight: float = 0.0,
                 attack_label: str | bool = "true", aux_weight: float = 0.0, draw: str = "fresh",
                 max_batch: int = 4096) -> None:
        super().__init__(attack_cfg, aux_weight=aux_weight, draw=draw, max_batch=max_batch)
        if not 0.0 <= float(clean_weight) <= 1.0:
            raise ConfigError(f"recipe_args.clean_weight must be in [0, 1], got {clean_weight}")
        if attack_label is True:  # YAML reads an unquoted `true` as a boolean
            attack_label = "true"
        if attack_label not in ("true", "predicted"):
            raise ConfigError(f"recipe_args.attack_label: {attack_label!r} is not valid; "
                              "choose one of: true, predicted")
        self.clean_weight = float(clean_weight)
        self.attack_label = attack_label
        a = attack_cfg
        objective: Objective | str = (HeadsObjective("ce", aux_weight=self.aux_weight)
                                      if self.aux_weight else "ce")
        step = a.eps / 4 if a.step_size is None else a.step_size
        self.attack = PGD(eps=a.eps, steps=a.steps, step_size=step, norm=a.norm,
                          eot_samples=a.eot_samples, random_start=a.random_start,
                          loss=objective, max_batch=max_batch)

    def _ce(self, logits, aux, y):
        return _combine(F.cross_entropy(logits, y), [F.cross_entropy(a, y) for a in aux],
                        self.aux_weight)

    def _loss(self, model, x, y, attack_context):
        logs: dict[str, float] = {}
        clean_term = None
        label = y
        joint = self.clean_weight > 0 and _joint_forward(model)
        if self.clean_weight > 0 and not joint:
            logits_nat, aux_nat = self._heads(model, x, y)
            clean_term = self._ce(logits_nat, aux_nat, y)
            logs["clean_acc"] = _accuracy(logits_nat, y)
            if self.attack_label == "predicted":
                label = logits_nat.detach().argmax(1)
        with attack_context():
            target = _attack_model(model)
            if self.attack_label == "predicted" and clean_term is None:
                with torch.no_grad(), eval_mode(target):
                    label = target(x).argmax(1)
            x_adv = self.attack(target, x, label)
        if joint:
            (logits_nat, aux_nat), (logits_adv, aux_adv) = self._heads_pair(model, x, x_adv, y)
            clean_term = self._ce(logits_nat, aux_nat, y)
            logs["clean_acc"] = _accuracy(logits_nat, y)
        else:
            logits_adv, aux_adv = self._heads(model, x_adv, y)
        adv_term = self._ce(logits_adv, aux_adv, y)
        if clean_term is None:
            loss = adv_term
        else:
            loss = (1 - self.clean_weight) * adv_term + self.clean_weight * clean_term
        logs.update({"loss": float(loss.detach()), "adv_loss": float(adv_term.detach()),
                     "adv_acc": _accuracy(logits_adv, y)})
        logs["acc"] = logs.get("clean_acc", logs["adv_acc"])
        return loss, logs


class KLObjective(Objective):
    """TRADES inner objective: per-example ``KL(p_nat || p(x'))`` on the main logits plus
    ``aux_weight`` x the mean over auxiliary heads (CAS TRADES form).

    ``p_nat`` (main and per head) is stored at construction; batches repeated for EOT
    (``k`` stacked copies) are matched by repeating ``p_nat``.
    """

    def __init__(self, p_nat: torch.Tensor, p_nat_aux: list[torch.Tensor] | None = None, *,
                 aux_weight: float = 0.0) -> None:
        super().__init__("ce")
        self.p_nat = p_nat.detach()
        self.p_nat_aux = [p.detach() for p in (p_nat_aux or [])]
        self.aux_weight = float(aux_weight)
        self.name = "trades_kl"

    def select(self, index):
        """The objective of examples ``index`` (their clean probabilities only)."""
        return KLObjective(self.p_nat[index], [p[index] for p in self.p_nat_aux],
                           aux_weight=self.aux_weight)

    @staticmethod
    def _rep(p: torch.Tensor, rows: int) -> torch.Tensor:
        return p if p.shape[0] == rows else p.repeat(rows // p.shape[0], 1)

    def __call__(self, model, x, y, target=None):
        if self.aux_weight and self.p_nat_aux:
            logits, aux = forward_with_aux(model, x)
        else:
            logits, aux = model(x), []
        rows = x.shape[0]
        loss = _kl_rows(F.log_softmax(logits, 1), self._rep(self.p_nat, rows))
        if aux and self.p_nat_aux:
            aux_terms = [_kl_rows(F.log_softmax(a, 1), self._rep(p, rows))
                         for a, p in zip(aux, self.p_nat_aux, strict=True)]
            loss = _combine(loss, aux_terms, self.aux_weight)
        return loss, logits


class _SmallNoiseAscent(Recipe):
    """Shared inner loop of TRADES and MART (their reference code, not Madry's PGD): start at
    ``x + 0.001 * N(0, 1)`` (or ``x`` with ``random_start: false``), take ``steps`` signed
    (L-inf) or normalized (L2) gradient steps of the objective, project, return the last
    iterate. Runs in eval mode; ``eot_samples`` averages the objective over draws."""

    def _ascend(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                objective: Objective | str) -> torch.Tensor:
        a = self.attack_cfg
        step = a.eps / 4 if a.step_size is None else a.step_size
        k = a.eot_samples if is_stochastic(model) else 1
        x = x.detach()
        with eval_mode(model):
            x_adv = x + 0.001 * torch.randn_like(x) if a.random_start else x.clone()
            x_adv = project(x_adv, x, a.eps, a.norm)
            for _ in range(a.steps):
                res = eot_loss_grad(model, x_adv, y, objective, eot_samples=k,
                                    max_batch=self.max_batch)
                grad = torch.nan_to_num(res.grad, nan=0.0, posinf=0.0, neginf=0.0)
                x_adv = project(x_adv + step * normalize_step(grad, a.norm), x, a.eps, a.norm)
        return x_adv.detach()


class TradesRecipe(_SmallNoiseAscent):
    """TRADES (Zhang et al. 2019, eq. 5): ``CE(f(x), y) + beta * KL(p(x) || p(x'))`` with
    ``x' = argmax_{||x'-x||<=eps} KL(p(x) || p(x'))``, written in the reference code's
    ``nn.KLDivLoss(log p(x'), p(x))`` convention, i.e. ``sum_c p_c(x) log(p_c(x) / p_c(x'))``,
    averaged over the batch. ``beta`` defaults to 6.0 (the paper's CIFAR-10 value; the CAS code
    uses 4.0). Both forwards of the outer loss run in train mode and gradients flow through
    both, as in the reference code.

    With auxiliary heads (CAS TRADES, Bai et al. 2021 ``trades_reg.py``) every head gets its
    own ``CE + beta * KL`` and the total is ``main + aux_weight * mean_s head_s``; the inner
    max uses ``KL_main + aux_weight * mean_s KL_s`` (:class:`KLObjective`).

    Departure: ``p(x)`` for the inner max is computed in eval mode, like the reference code
    (``model.eval()`` before the attack); the initial noise is ``0.001 * N(0, 1)`` as there.
    """

    name = "trades"

    def __init__(self, attack_cfg: Any = None, *, beta: float = 6.0, aux_weight: float = 0.0,
                 draw: str = "fresh", max_batch: int = 4096) -> None:
        super().__init__(attack_cfg, aux_weight=aux_weight, draw=draw, max_batch=max_batch)
        if not float(beta) >= 0:
            raise ConfigError(f"recipe_args.beta must be >= 0, got {beta}")
        self.beta = float(beta)

    def _loss(self, model, x, y, attack_context):
        with attack_context():
            target = _attack_model(model)
            with torch.no_grad(), eval_mode(target):
                if self.aux_weight:
                    nat_logits, nat_aux = forward_with_aux(target, x)
                else:
                    nat_logits, nat_aux = target(x), []
            objective = KLObjective(F.softmax(nat_logits, 1), [F.softmax(a, 1) for a in nat_aux],
                                    aux_weight=self.aux_weight)
            x_adv = self._ascend(target, x, y, objective)
        (logits_nat, aux_nat), (logits_adv, aux_adv) = self._heads_pair(model, x, x_adv, y)

        def term(ln, la):
            ce = F.cross_entropy(ln, y)
            kl = _kl_rows(F.log_softmax(la, 1), F.softmax(ln, 1)).mean()
            return ce + self.beta * kl, ce, kl

        main, ce, kl = term(logits_nat, logits_adv)
        heads = [term(a, b)[0] for a, b in zip(aux_nat, aux_adv, strict=True)]
        loss = _combine(main, heads, self.aux_weight)
        return loss, {"loss": float(loss.detach()), "ce": float(ce.detach()),
                      "kl": float(kl.detach()), "acc": _accuracy(logits_nat, y),
                      "adv_acc": _accuracy(logits_adv, y)}


class MartRecipe(_SmallNoiseAscent):
    """MART (Wang et al. 2020, eq. 10): ``BCE(p(x'), y) + beta * KL(p(x) || p(x')) * (1 -
    p_y(x))`` where ``BCE = -log p_y(x') - log(1 - max_{k != y} p_k(x'))`` (boosted CE), the
    inner max is CE by PGD from ``x + 0.001 * N(0, 1)`` (reference ``mart.py``). ``beta``
    defaults to 6.0 (the paper's value; the CAS code uses 5.0).

    With auxiliary heads each head gets its own MART term (its own probabilities, including the
    ``1 - p_y(x)`` weight) and the total is ``main + aux_weight * mean_s head_s``; the inner max
    is CE on the main logits + ``aux_weight`` x mean auxiliary CE.

    Departure: the CAS code weights the auxiliary KL terms with the *main* head's ``p_y(x)``; we
    use each head's own, which is what eq. 10 applied per head means. Numerical guards follow
    the reference (``1.0001 - p``, ``+1e-12``).
    """

    name = "mart"

    def __init__(self, attack_cfg: Any = None, *, beta: float = 6.0, aux_weight: float = 0.0,
                 draw: str = "fresh", max_batch: int = 4096) -> None:
        super().__init__(attack_cfg, aux_weight=aux_weight, draw=draw, max_batch=max_batch)
        if not float(beta) >= 0:
            raise ConfigError(f"recipe_args.beta must be >= 0, got {beta}")
        self.beta = float(beta)

    def _term(self, ln: torch.Tensor, la: torch.Tensor, y: torch.Tensor):
        p_adv = F.softmax(la, 1)
        top2 = p_adv.topk(2, dim=1).indices
        wrong = torch.where(top2[:, 0] == y, top2[:, 1], top2[:, 0])
        bce = F.cross_entropy(la, y) + F.nll_loss(torch.log(1.0001 - p_adv + 1e-12), wrong)
        p_nat = F.softmax(ln, 1)
        true_p = p_nat.gather(1, y[:, None]).squeeze(1)
        kl = (_kl_rows(torch.log(p_adv + 1e-12), p_nat) * (1.0000001 - true_p)).mean()
        return bce + self.beta * kl, bce, kl

    def _loss(self, model, x, y, attack_context):
        objective: Objective | str = (HeadsObjective("ce", aux_weight=self.aux_weight)
                                      if self.aux_weight else "ce")
        with attack_context():
            x_adv = self._ascend(_attack_model(model), x, y, objective)
        (logits_nat, aux_nat), (logits_adv, aux_adv) = self._heads_pair(model, x, x_adv, y)
        main, bce, kl = self._term(logits_nat, logits_adv, y)
        heads = [self._term(a, b, y)[0] for a, b in zip(aux_nat, aux_adv, strict=True)]
        loss = _combine(main, heads, self.aux_weight)
        return loss, {"loss": float(loss.detach()), "bce": float(bce.detach()),
                      "kl": float(kl.detach()), "acc": _accuracy(logits_nat, y),
                      "adv_acc": _accuracy(logits_adv, y)}


RECIPES: dict[str, type[Recipe]] = {
    "standard": StandardRecipe,
    "pgd_at": PGDATRecipe,
    "trades": TradesRecipe,
    "mart": MartRecipe,
}


def build_recipe(name: str, attack_cfg: Any = None, **recipe_args: Any) -> Recipe:
    """Build a recipe by name; unknown arguments raise :class:`ConfigError` listing valid ones."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    cls = RECIPES[name]
    params = [p for p in inspect.signature(cls.__init__).parameters
              if p not in ("self", "attack_cfg")]
    for key in recipe_args:
        if key not in params:
            raise ConfigError(f"unknown recipe_args key {key!r} for recipe {name}; valid keys: "
                              f"{', '.join(params)}")
    return cls(attack_cfg, **recipe_args)
