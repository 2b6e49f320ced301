"""Presets for ``advdefense demo`` and ``advdefense reproduce``: configs + evaluation plans.

The mnist5k presets use the offline ``mnist5k`` data (L-inf eps 0.3, the MNIST convention):
``smallcnn`` for the demo, standard training, PGD-AT, RNA and PNI; ``resnet_mini`` (a small
ResNet whose last stage has two blocks, as ResNet-18's) for the CAS study, where CAS sits
after both blocks of the last stage as in the paper, beside AT / TRADES / MART on the same
network. Budgets are sized from measurements on 2 CPU cores.

``reproduce`` presets (:data:`PRESETS`, :func:`preset_settings`):

``mnist5k``
    the converged, faithful run: every entry trains on ``fit`` (train minus val) until its
    robust accuracy on the whole ``val`` split stops rising (early stopping, patience 2
    epochs, min_delta 0.5 points, cap 20 epochs; the best val epoch is evaluated; the monitor
    is PGD-10 with EOT and repeated predictions for random models and main + beta·aux for CAS
    models), every entry with two training seeds (a third where two differ by more than 5
    points); 200 test images. Every model that gets a figure faces an adaptive cascade over
    all of its randomness (the smoothed classifiers included), CAS models also APGD on
    main + beta·aux, RNA also the exact expectation over its paths; the rules of the verdicts
    are in docs/verdicts.md. 22 entries plus the added third seeds: estimated from the
    measured cost of each part at 650-700 compute-minutes on 2 CPU cores from scratch, so
    5.5-6 h of wall time with ``--jobs 2``. The report records both times; a run resumes from
    every finished epoch and evaluation and reuses every entry whose training and evaluation
    did not change.
``mnist5k-quick``
    the same entries for trying things: seed 0 only (so the report marks every verdict as
    short of seeds), at most 2 epochs on 1,500 training images, 100 test images, small attack
    budgets; estimated at about 30 minutes with ``--jobs 2``.
``cifar10-jpeg``
    the same study on CIFAR-10 (JPEG copy) (:func:`cifar10_jpeg_plans`): 10 entries on
    ``resnet10_narrow`` (standard, PGD-AT, TRADES, MART, RNA, PGD-AT / TRADES / MART + CAS,
    PNI-W and CNI-W with and without smoothing), two training seeds each (a third where two
    differ by more than 5 points), eps 8/255, the same early-stopping rule and monitors,
    evaluators, budget (:data:`C10_BUDGET` = mnist5k's) and verdicts. Sizes: training on the
    4,500 ``fit`` images with PGD-5 (step 2/255) in the recipes, early stopping on all 500
    ``val`` images (patience 4, min_delta 1 point), the learning rate (SGD 0.1) dropping
    10x at each of the rule's first two plateaus and the run stopping at the third, with a
    cap of 40 epochs; 200 test images; eps curves at 0, 2, 4, 8, 12/255.
``cifar10-jpeg-quick``
    standard, PGD-AT, RNA and PNI-W + smoothing, seed 0, at most 2 epochs on 800 ``fit``
    images, 100 test images, a tiny budget (:data:`C10_QUICK_BUDGET`, m = 8, no probing
    checks); under 20 minutes on 2 CPU cores.
``cifar10``
    the papers' CIFAR-10 settings for a GPU (:func:`cifar10_plans`).

Cost of ``cifar10-jpeg`` (docs/datasets.md has the measurements): on one H200 with
``--jobs 10`` its 20 trainings and 18 of its evaluations took 7.4 minutes; on the 2-core CPU
with ``--jobs 2`` it is estimated from measured epochs and evaluations at about 4 hours.
``cifar10-jpeg-quick``: about 2 minutes from scratch on the 2-core CPU (measured).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .attacks.base import Objective
from .evaluation.checks import CheckSettings
from .reproduction import Plan, checks_from_result, table_from_result

EPS = 0.3
CURVE_EPS = [0.0, 0.1, 0.2, 0.3, 0.4]


def mnist5k_config(name: str, *, recipe: str = "standard", epochs: int = 4, seed: int = 0,
                   attack: dict | None = None, recipe_args: dict | None = None,
                   defense: dict | None = None, lr: float = 1e-3, model: str = "smallcnn",
                   early_stopping: dict | None = None, monitor_size: int = 200,
                   limit: int | None = None, optimizer: dict | None = None) -> dict[str, Any]:
    """An mnist5k experiment config (Adam, batch 100) as a plain dict.

    With ``early_stopping`` (a ``train.early_stopping`` mapping) the model trains on ``fit``
    and is monitored on ``val`` (``monitor_size`` examples); ``epochs`` is then the cap.
    Otherwise it trains on all of ``train`` and monitors ``monitor_size`` test images (the
    demo). ``optimizer`` adds options to the Adam settings (e.g. ``noise_lr_scale``).
    """
    data: dict[str, Any] = {"name": "mnist5k", "batch_size": 100, "monitor_size": monitor_size}
    if early_stopping is not None:
        data.update(train_split="fit", monitor_split="val")
    if limit is not None:
        data["limit"] = int(limit)
    cfg = {
        "name": name, "seed": seed,
        "data": data,
        "model": {"name": model, "norm": "bn"},
        "defense": copy.deepcopy(defense or {}),
        "train": {
            "recipe": recipe, "epochs": epochs,
            "optimizer": {"name": "adam", "lr": lr, "weight_decay": 0.0, **(optimizer or {})},
            "schedule": {"name": "none"},
            "recipe_args": copy.deepcopy(recipe_args or {}),
            "attack": attack or {"eps": EPS, "steps": 7, "step_size": 0.1, "norm": "linf",
                                 "random_start": True},
            "monitor_attack": {"eps": EPS, "steps": 10, "step_size": EPS / 4},
        },
    }
    if early_stopping is not None:
        cfg["train"]["early_stopping"] = dict(early_stopping)
    return cfg


def evaluate_deterministic(model, x, y, plan: Plan) -> dict[str, Any]:
    """Clean, FGSM, PGD-20, CW-L-inf and APGD-CE at eps 0.3, plus the failure checks."""
    from .evaluation.harness import evaluate, standard_attack_specs

    result = evaluate(model, (x, y), standard_attack_specs(EPS, seed=plan.config["seed"]),
                      seed=plan.config["seed"])
    return {"tables": [table_from_result(result, title=f"eps = {EPS} (L-inf), {len(y)} "
                                         "mnist5k test images")],
            "checks": checks_from_result(result)}


def demo_plans(seed: int = 0) -> list[Plan]:
    """The demo: a standard and a PGD-AT smallcnn (PGD-7, step 0.1, eps 0.3)."""
    return [
        Plan("standard", "Standard training (4 epochs)",
             mnist5k_config("demo_standard", epochs=4, seed=seed), evaluate_deterministic,
             notes="Cross-entropy on clean images, Adam 1e-3, batch 100."),
        Plan("pgd_at", "PGD adversarial training (Madry et al. 2018, 4 epochs)",
             mnist5k_config("demo_pgd_at", recipe="pgd_at", epochs=4, seed=seed),
             evaluate_deterministic,
             notes="Cross-entropy on PGD-7 examples (eps 0.3, step 0.1, random start), after "
                   "the same Adam 1e-3, batch 100."),
    ]


# --------------------------------------------------------------------------------------------
# ``advdefense reproduce --preset mnist5k``: every defense, paper protocol beside adaptive.
# --------------------------------------------------------------------------------------------

# CPU budgets of the adaptive suites (the reference settings are in ``suite_plan``; on 2 CPU
# cores 8 models x reference AutoAttack would take hours). Every reduction is named in the
# report's attack labels. ``path_pairs``: draws of RNA's paper protocol (a path pair per batch
# of 128); ``exact_iters``: APGD iterations of the attack on the expectation over every RNA
# path; ``smooth_eot`` / ``smooth_iters``: EOT draws of the smoothed classifier itself (each
# draw is its whole m-sample vote) and APGD iterations of the attacks on it.
CPU_BUDGET = {"n_targets": 3, "square_queries": 500, "eot": 4, "repeats": 10,
              "rand_square_queries": 200, "path_pairs": 5, "exact_iters": 100,
              "smooth_eot": 2, "smooth_iters": 20}
FULL_BUDGET = {"n_targets": 9, "square_queries": 5000, "eot": 20, "repeats": 10,
               "rand_square_queries": 5000, "path_pairs": 10, "exact_iters": 100,
               "smooth_eot": 4, "smooth_iters": 100}
# what a budget without the newer keys (e.g. one given on the command line) uses
BUDGET_DEFAULTS = {"path_pairs": 5, "exact_iters": 100, "smooth_eot": 2, "smooth_iters": 20}

# RNA's paper protocol (reference ``evaluate.py``): one path pair per test batch of 128
RNA_PAPER_BATCH = 128
# the exact attack on RNA (expectation over every path) runs where the path space is this small
EXACT_PATHS_MAX = 256

# The smoothing paper's noise levels (Nemcovsky et al., Sec. 5.2 and its ablation table: no
# noise, CNI-W 0.11 and 0.24, CNI-I+W 0.37), in the units of its code: the normalised input.
# Our smoothing adds noise in pixel space, so the preset multiplies them by the dataset's std.
PAPER_SIGMAS = (0.0, 0.11, 0.24, 0.37)
# Monte-Carlo samples per vote chosen from on val. The paper votes over 256-512 samples; the
# adaptive attack on the smoothed classifier costs m x EOT forward-backward passes per step,
# so 2 CPU cores afford 16-32 (the chosen m is in the report).
SMOOTHING_MS = (16, 32)


def budget_value(budget: dict, key: str) -> int:
    """``budget[key]``, or :data:`BUDGET_DEFAULTS` for the keys a budget may lack."""
    return int(budget.get(key, BUDGET_DEFAULTS.get(key, 0)))


def paper_sigmas(dataset: str = "mnist5k") -> list[float]:
    """:data:`PAPER_SIGMAS` in pixel units of ``dataset`` (times its mean channel std)."""
    from .data import dataset_info

    std = dataset_info(dataset).std
    s = sum(std) / len(std) if isinstance(std, (list, tuple)) else float(std)
    return [round(v * s, 3) for v in PAPER_SIGMAS]


def standard_suite_attacks(budget: dict, seed: int, eps: float = EPS) -> list:
    """AutoAttack's standard cascade (APGD-CE, APGD-T, FAB-T, Square) at a budget."""
    from .attacks import build_attack

    t, q = budget["n_targets"], budget["square_queries"]
    return [
        ("apgd-ce", build_attack("apgd-ce", eps=eps, seed=seed)),
        (f"apgd-t ({t} targets)", build_attack("apgd-t", eps=eps, n_target_classes=t, seed=seed)),
        (f"fab-t ({t} targets)", build_attack("fab-t", eps=eps, n_target_classes=t, seed=seed)),
        (f"square ({q} q)", build_attack("square", eps=eps, n_queries=q, seed=seed)),
    ]


def rand_suite_attacks(budget: dict, seed: int, eps: float = EPS) -> list:
    """The ``rand`` cascade: APGD-CE/DLR with batched EOT, Square on the EOT-averaged loss,
    APGD-CE on a frozen draw classified on fresh ones (never weaker than that transfer)."""
    from .attacks import build_attack

    k, q = budget["eot"], budget["rand_square_queries"]
    return [
        (f"apgd-ce+eot{k}", build_attack("apgd-ce", eps=eps, eot_samples=k, seed=seed)),
        (f"apgd-dlr+eot{k}", build_attack("apgd-dlr", eps=eps, eot_samples=k, seed=seed)),
        (f"square+eot{min(k, 4)} ({q} q)",
         build_attack("square", eps=eps, n_queries=q, eot_samples=min(k, 4), seed=seed)),
        ("apgd-ce on a frozen draw", build_attack("apgd-ce", eps=eps, seed=seed), "paper"),
    ]


def smoothed_suite_attacks(budget: dict, seed: int, eps: float = EPS, *,
                           base: nn.Module | None = None, sigma: float = 0.0) -> list:
    """The cascade of the smoothed classifier itself (:class:`SmoothedLogits`), every attack
    with EOT over all of its randomness (each EOT draw is a whole m-sample vote over fresh
    input and weight noise): PGD-20 (step eps/4), then APGD-CE and APGD-DLR; last, the
    transfer from its base model (:func:`base_transfer`, given ``base``).

    PGD comes first because a hard vote's loss is piecewise constant in the input: APGD's
    step-size rule and best-iterate choice read loss values and stall on it (on an untrained
    width-4 smallcnn smoothed with m = 4, 32 images: APGD-CE left 19% and APGD-DLR 100% where
    PGD-20 with the same gradients left 0%), while PGD's fixed signed steps follow the
    smoothed classifier's gradient. The transfer comes last, so that the
    ``blackbox_beats_whitebox`` check says when it breaks points the attacks on the vote
    itself missed (their gradients through the hard votes then mislead them).
    """
    from .attacks import PGD, build_attack

    k = max(2, budget_value(budget, "smooth_eot"))
    it = budget_value(budget, "smooth_iters")
    attacks = [
        (f"pgd-20+eot{k}", PGD(eps=eps, steps=20, step_size=eps / 4, eot_samples=k, seed=seed)),
        (f"apgd-ce+eot{k} ({it} it)",
         build_attack("apgd-ce", eps=eps, eot_samples=k, n_iter=it, seed=seed)),
        (f"apgd-dlr+eot{k} ({it} it)",
         build_attack("apgd-dlr", eps=eps, eot_samples=k, n_iter=it, seed=seed)),
    ]
    if base is not None:
        attacks.append(base_transfer(budget, seed, eps, base=base, sigma=sigma))
    return attacks


def base_transfer(budget: dict, seed: int, eps: float, *, base: nn.Module | None,
                  sigma: float) -> tuple[str, Any]:
    """``(label, attack)``: APGD-CE with EOT (``budget["eot"]`` draws) over the base model's
    noise and the smoothing's input noise ``sigma``, whose points the smoothed classifier then
    classifies: the expectation over one draw is the smooth surrogate of the m-sample vote
    (BPDA's idea, Athalye et al. 2018). On the mnist5k PNI-W smallcnns (``zoo:mnist5k/pni_at-s0``
    and ``-s1``, 200 test images, eps 0.3, smoothed with σ = 0, m = 16) the attacks on the
    vote itself left 75.0% and 76.0% robust, this transfer 46.5% and 59.0%. ``base=None``
    gives the description only (for the evaluation's digest)."""
    from .attacks import TransferAttack, build_attack
    from .defenses.noise import GaussianInput, WithInputNoise

    eot = budget_value(budget, "eot")
    inner = build_attack("apgd-ce", eps=eps, eot_samples=eot, seed=seed)
    label = f"apgd-ce+eot{eot} on the base model{f' + noise σ {sigma:g}' if sigma else ''}"
    if base is None:
        return label, f"TransferAttack(substitute=base model, sigma={sigma:g}, attack={inner!r})"
    substitute = WithInputNoise(base, GaussianInput(sigma)).eval() if sigma else base
    return label, TransferAttack(substitute=substitute, attack=inner, seed=seed)


def paper_attack_specs(eps: float, seed: int) -> list:
    """What the AT, TRADES, MART, CAS and PNI papers ran: FGSM, PGD-20 and CW-L-inf.

    APGD is not part of their protocols; it runs in the adaptive cascade beside them, so the
    paper-protocol column shows what the papers would have reported.
    """
    from .evaluation.harness import standard_attack_specs

    return [s for s in standard_attack_specs(eps, seed=seed) if s.name in PAPER_ATTACKS]


PAPER_ATTACKS = ("fgsm", "pgd", "cw")


class SmoothedLogits(nn.Module):
    """A smoothed classifier (:class:`~advdefense.defenses.smoothing.SmoothedClassifier`) as a
    model that returns logits: ``log((1 - mix) g(x) + mix / C)``, the log of its vote scores
    mixed with ``mix`` (0.1%) of the uniform distribution.

    The mixing is monotone, so the predictions are the smoothed classifier's. It keeps every
    class finite: cross-entropy on these logits is then ``-log`` of the (mixed) vote of the
    true class, whose gradient is ``-(1 - mix) / v_y`` times the smoothed classifier's
    gradient of that vote (straight-through for the hard votes: the SmoothAdv direction,
    Salman et al. 2019), and DLR reaches the runner-up classes. On the raw vote fractions a
    unanimous vote would give both losses an exactly zero gradient.
    """

    def __init__(self, smoothed: nn.Module, *, mix: float = 1e-3) -> None:
        super().__init__()
        self.smoothed = smoothed
        self.mix = float(mix)

    def forward(self, x):
        scores = self.smoothed(x)
        return torch.log((1 - self.mix) * scores + self.mix / scores.shape[1])


class ExactPaths(Objective):
    """The exact expectation over every RNA path (Dong et al. 2022 draw one path uniformly
    per inference): ``mean_p loss(model_p(x))`` over ``paths``, each pass on one frozen path
    (:func:`~advdefense.defenses.rna.path_states`). The returned logits are ``log`` of the
    mean softmax over paths (the expected prediction), which decides success."""

    def __init__(self, paths, loss: str = "ce") -> None:
        super().__init__(loss)
        self.paths = [tuple(p) for p in paths]
        self.name = f"{self.name} over all {len(self.paths)} paths"

    def __call__(self, model, x, y, target):
        from .defenses.rna import path_states
        from .randomness import freeze

        total, probs = None, None
        for p in self.paths:
            with freeze(model, states=path_states(model, p)):
                logits = model(x)
            loss = self.loss_fn(logits, y, target)
            total = loss if total is None else total + loss
            soft = logits.softmax(1)
            probs = soft if probs is None else probs + soft
        k = len(self.paths)
        return total / k, (probs / k).clamp_min(1e-12).log()


def _suite_table(model, x, y, attacks, *, title: str, budget: dict, seed: int,
                 eps: float, probes: bool = False, batch_size: int = 250):
    from .evaluation.suite import run_suite

    # ``probes``: the probing checks (unbounded eps, eps sweep, more iterations) run here,
    # with the cascade's EOT, and ``more_iterations`` judges the cascade's worst case; the
    # paper-protocol evaluations run the trace checks only (docs/verdicts.md, rule 4)
    result = run_suite(model, (x, y), suite="custom", eps=eps, attacks=attacks,
                       repeats=budget["repeats"], eot_samples=budget["eot"], seed=seed,
                       checks=CheckSettings(probes=probes), batch_size=batch_size)
    return table_from_result(result, title=title), checks_from_result(result), result


def _flags(mask) -> list[bool]:
    return [bool(v) for v in mask.flatten().tolist()]


def failed_checks(checks: list[dict[str, Any]]) -> list[str]:
    """Names of the attack-failure checks that failed (sorted, without repeats)."""
    return sorted({str(c["name"]) for c in checks if c.get("passed") is False})


def verdict_record(name: str, paper, worst, *, paper_label: str,
                   checks: list[str] | None = None, adaptive: list[str] | None = None,
                   paper_checks: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    """A JSON-able per-example verdict of one model: its paper-protocol worst case and its
    worst case over everything run (both per example, for paired tests), the attack-failure
    checks that failed in the adaptive evaluation of this model (``checks``: its worst case is
    then an upper bound), those that failed in its paper-protocol evaluation
    (``paper_checks``: only the paper figure is then an upper bound), the adaptive attacks run
    on this very model (``adaptive``) and optional ``clusters`` (examples that shared a random
    draw) and ``paper_draws`` (the paper protocol redrawn)."""
    out = {"name": name, "paper_label": paper_label, "paper": _flags(paper),
           "worst": _flags(worst)}
    if checks is not None:
        out["checks"] = list(checks)
    if paper_checks is not None:
        out["paper_checks"] = list(paper_checks)
    if adaptive is not None:
        out["adaptive"] = list(adaptive)
    out.update(extra)
    return out


def _labels(attacks) -> list[str]:
    return [str(a[0]) for a in attacks]


class Evaluator:
    """The evaluation of one kind of preset entry: ``deterministic`` | ``cas`` | ``rna`` |
    ``smoothing``; called as ``evaluator(model, x, y, plan) -> section``.

    Every section holds ``verdicts`` (:func:`verdict_record`) for the paired statistics of the
    report; every model that gets a verdict faces an adaptive cascade over all of its
    randomness beside its paper protocol. ``plan.extra`` options: ``eps``; ``light_checks``
    (skip the probing attack-failure checks). :meth:`describe` is what a cached evaluation
    depends on (the reproduction pipeline re-evaluates an entry when it changes).
    """

    KINDS = ("deterministic", "cas", "rna", "smoothing")
    # the budget keys each kind's evaluation reads
    BUDGET_KEYS = {"deterministic": ("n_targets", "square_queries"),
                   "cas": ("n_targets", "square_queries"),
                   "rna": ("eot", "repeats", "rand_square_queries", "path_pairs", "exact_iters"),
                   "smoothing": ("eot", "repeats", "rand_square_queries", "smooth_eot",
                                 "smooth_iters")}
    # bumped when a kind's evaluation changes; version 1 = unchanged since sections recorded
    # no description (such cached sections stay valid, see ``describe``). deterministic 2,
    # cas 3, rna 3, smoothing 3: the probing checks run with the adaptive cascade, and the
    # paper protocol's checks are kept apart (``paper_checks``)
    VERSIONS = {"deterministic": 2, "cas": 3, "rna": 3, "smoothing": 4}

    def __init__(self, kind: str, budget: dict) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"unknown evaluator kind {kind!r}; choose one of: "
                             f"{', '.join(self.KINDS)}")
        self.kind, self.budget = kind, dict(budget)

    def __repr__(self) -> str:
        return f"Evaluator({self.kind!r})"

    def __call__(self, model, x, y, plan: Plan) -> dict[str, Any]:
        return getattr(self, f"_{self.kind}")(model, x, y, plan)

    # -- what the evaluation depends on ---------------------------------------------------
    def _attack_lists(self, plan: Plan) -> dict[str, list[str]]:
        seed, eps = plan.config["seed"], plan.extra.get("eps", EPS)
        b = self.budget
        out = {"paper": [repr(s.attack) for s in paper_attack_specs(eps, seed)]}
        if self.kind == "deterministic":
            out["adaptive"] = [repr(a[1]) for a in standard_suite_attacks(b, seed, eps)]
        elif self.kind == "cas":
            from .evaluation.cas_specs import cas_adaptive_attacks

            beta = _aux_weight(plan)
            out["adaptive"] = [repr(a[1]) for a in standard_suite_attacks(b, seed, eps)
                               + cas_adaptive_attacks(eps, aux_weight=beta, seed=seed)]
        elif self.kind == "rna":
            out["adaptive"] = [repr(a[1]) for a in rand_suite_attacks(b, seed, eps)]
            out["rna"] = [f"paper batch {RNA_PAPER_BATCH}",
                          f"path pairs {budget_value(b, 'path_pairs')}",
                          f"exact apgd-ce {budget_value(b, 'exact_iters')} it, "
                          f"<= {EXACT_PATHS_MAX} paths"]
        else:
            out["adaptive"] = [repr(a[1]) for a in rand_suite_attacks(b, seed, eps)]
            out["smoothed"] = [repr(a[1]) for a in smoothed_suite_attacks(b, seed, eps)]
            out["smoothed"].append(base_transfer(b, seed, eps, base=None, sigma=0.0)[1])
        return out

    def describe(self, plan: Plan) -> dict[str, Any]:
        """The kind, its version, the budget it reads and every attack (``repr`` lists each
        setting).

        ``legacy``: a section cached before sections recorded this description may be reused
        (the deterministic evaluation, unchanged since, at a preset's own budget: the legacy
        digest did not cover the budget, so only the budget the preset runs by default is
        trusted).
        """
        used = {k: (budget_value(self.budget, k) if k in BUDGET_DEFAULTS else self.budget[k])
                for k in self.BUDGET_KEYS[self.kind]}
        legacy = self.kind == "deterministic" and any(
            all(self.budget.get(k) == ref.get(k) for k in ("n_targets", "square_queries"))
            for ref in (CPU_BUDGET, TRIAL_BUDGET))
        return {"kind": self.kind, "version": self.VERSIONS[self.kind], "budget": used,
                "attacks": self._attack_lists(plan), "legacy": legacy}

    # -- the kinds ------------------------------------------------------------------------
    def _common(self, plan: Plan):
        """``(seed, eps, checks of the paper protocol, verdict name)``: the paper protocol,
        weak by design, runs the trace checks only; the probes run with the cascade
        (:meth:`_probes`)."""
        return (plan.config["seed"], plan.extra.get("eps", EPS), CheckSettings(probes=False),
                plan.extra.get("verdict_name", plan.title))

    @staticmethod
    def _probes(plan: Plan) -> bool:
        """Whether the base model's cascade runs the probing checks (not ``light_checks``)."""
        return not plan.extra.get("light_checks")

    def _deterministic(self, model, x, y, plan: Plan) -> dict[str, Any]:
        from .evaluation.harness import evaluate

        seed, eps, checks_set, name = self._common(plan)
        paper = evaluate(model, (x, y), paper_attack_specs(eps, seed), seed=seed,
                         checks=checks_set)
        paper_checks = checks_from_result(paper)
        attacks = standard_suite_attacks(self.budget, seed, eps)
        t, checks, suite = _suite_table(model, x, y, attacks,
                                        title="Adaptive: AutoAttack-style cascade",
                                        budget=self.budget, seed=seed, eps=eps,
                                        probes=self._probes(plan))
        verdict = verdict_record(name, paper.worst.all, paper.worst.all & suite.worst.all,
                                 paper_label="FGSM / PGD-20 / CW-L-inf",
                                 checks=failed_checks(checks), adaptive=_labels(attacks),
                                 paper_checks=failed_checks(paper_checks))
        return {"tables": [table_from_result(paper, title="Paper protocol: FGSM, PGD-20, "
                                             "CW-L-inf (white-box)"), t],
                "checks": checks, "paper_checks": paper_checks, "markdown": [],
                "verdicts": [verdict]}

    def _cas(self, model, x, y, plan: Plan) -> dict[str, Any]:
        from .analysis.channels import cas_site_markdown, cas_site_stats
        from .attacks import PGD, HeadsObjective, build_attack
        from .evaluation.cas_specs import cas_adaptive_attacks
        from .evaluation.harness import AttackSpec, evaluate

        seed, eps, checks_set, name = self._common(plan)
        beta = _aux_weight(plan)
        specs = [
            AttackSpec("fgsm", build_attack("fgsm", eps=eps, seed=seed)),
            AttackSpec("pgd-20 main+β·aux (reference)",
                       PGD(eps=eps, steps=20, step_size=eps / 4, seed=seed,
                           loss=HeadsObjective("ce", aux_weight=beta))),
            AttackSpec("cw main+β·aux (reference)",
                       PGD(eps=eps, steps=20, step_size=eps / 4, seed=seed,
                           loss=HeadsObjective("margin", aux_weight=beta))),
            AttackSpec("pgd-20 main only", PGD(eps=eps, steps=20, step_size=eps / 4, seed=seed)),
        ]
        res = evaluate(model, (x, y), specs, seed=seed, checks=checks_set)
        paper_checks = checks_from_result(res)
        # the adaptive loss of the CAS code joins the cascade: it counts in the worst case
        attacks = (standard_suite_attacks(self.budget, seed, eps)
                   + cas_adaptive_attacks(eps, aux_weight=beta, seed=seed))
        t, checks, suite = _suite_table(
            model, x, y, attacks, title="Adaptive: AutoAttack-style cascade, then APGD-CE and "
            f"APGD-DLR on main + {beta:g}·aux", budget=self.budget, seed=seed, eps=eps,
            probes=self._probes(plan))
        paper_mask = res.clean.verdict.all
        for e in res.entries.values():
            if e.name != "pgd-20 main only":  # not in the paper's protocol
                paper_mask = paper_mask & e.verdict.all
        verdict = verdict_record(name, paper_mask, res.worst.all & suite.worst.all,
                                 paper_label="FGSM / PGD-20 / CW, main + β·aux loss",
                                 checks=failed_checks(checks), adaptive=_labels(attacks),
                                 paper_checks=failed_checks(paper_checks))
        markdown = []
        sites = cas_site_stats(model, x, y, attack=PGD(
            eps=eps, steps=20, step_size=eps / 4, seed=seed,
            loss=HeadsObjective("ce", aux_weight=beta)))
        if sites["sites"]:
            markdown.append(
                "CAS sites at test time (predicted-class masks; adversarial = PGD-20 on "
                f"main + {beta:g}·aux): each auxiliary head's accuracy and how often the "
                "main prediction equals that head's argmax (for the first site: how "
                "often the main prediction follows the first head's mask), %:\n\n"
                + cas_site_markdown(sites))
        return {"tables": [table_from_result(
                    res, title=f"Paper protocol (the CAS code's adaptive loss main + "
                               f"{beta:g}·aux) beside PGD-20 on the main logits only"), t],
                "checks": checks, "paper_checks": paper_checks, "markdown": markdown,
                "verdicts": [verdict], "cas_sites": sites}

    def _rna(self, model, x, y, plan: Plan) -> dict[str, Any]:
        from .analysis.rna_report import rna_report
        from .attacks import build_attack
        from .defenses import rna
        from .evaluation.harness import AttackSpec, evaluate

        seed, eps, checks_set, name = self._common(plan)
        b = self.budget
        # the three-way table keeps FGSM / PGD-20 / CW; APGD (the RNA paper also ran
        # AutoAttack, without EOT) runs with EOT in the cascade below. The paper protocol
        # draws one path pair per batch of 128, as the reference's test loader.
        rep = rna_report(model, x, y, eps=eps, eot_samples=b["eot"], repeats=b["repeats"],
                         seed=seed, attacks=PAPER_ATTACKS, batch_size=RNA_PAPER_BATCH)
        draws = [rep.result.worst_over("paper").single]
        worst = rep.result.worst.all
        for r in range(1, budget_value(b, "path_pairs")):
            again = rna_report(model, x, y, eps=eps, repeats=b["repeats"],
                               seed=seed + 7919 * r, attacks=PAPER_ATTACKS,
                               protocols=("paper",), batch_size=RNA_PAPER_BATCH)
            draws.append(again.result.worst_over("paper").single)
            worst = worst & again.result.worst.all
        figures = [100 * float(d.float().mean()) for d in draws]
        markdown = [
            f"Paper protocol (attack on path A, a new frozen path per batch of "
            f"{RNA_PAPER_BATCH}; classified once on a fresh path B, as the authors did, and on "
            f"all {b['repeats']} fresh paths) beside fixed-path white-box and EOT over paths "
            f"(correct on all {b['repeats']} fresh predictions):\n\n" + rep.to_markdown(),
            f"The paper protocol over {len(draws)} draws of its path pairs (one pair per batch "
            f"of {RNA_PAPER_BATCH}): " + ", ".join(f"{f:.1f}" for f in figures)
            + f" % (range {min(figures):.1f}-{max(figures):.1f}); every draw counts in the "
            "worst case."]
        tables = []
        # the paper / fixed / EOT table is the paper-protocol evaluation; the rand cascade
        # below (with the probes) is the adaptive one
        paper_checks = checks_from_result(rep.result)
        attacks = rand_suite_attacks(b, seed, eps)
        adaptive = _labels(attacks)
        paths = rna.num_paths(model)
        if paths <= EXACT_PATHS_MAX:
            it = budget_value(b, "exact_iters")
            label = f"apgd-ce over all {paths} paths ({it} it)"
            exact = evaluate(model, (x, y), [AttackSpec(label, build_attack(
                "apgd-ce", eps=eps, n_iter=it, seed=seed,
                loss=ExactPaths(rna.enumerate_paths(model, limit=None))))],
                repeats=b["repeats"], seed=seed, checks=False)
            tables.append(table_from_result(exact, title="Exact: APGD-CE on the expectation "
                                            f"over every one of the {paths} paths"))
            worst = worst & exact.worst.all
            adaptive.append(label)
        t, checks, suite = _suite_table(
            model, x, y, attacks, title="Adaptive: rand cascade (batched EOT over paths)",
            budget=b, seed=seed, eps=eps, probes=self._probes(plan))
        tables.insert(0, t)
        n = len(y)
        verdict = verdict_record(
            name, draws[0], worst & suite.worst.all,
            paper_label=f"attack on path A, classify once on a fresh path B (a pair per batch "
                        f"of {RNA_PAPER_BATCH})",
            checks=failed_checks(checks), adaptive=adaptive,
            paper_checks=failed_checks(paper_checks),
            clusters=[i // RNA_PAPER_BATCH for i in range(n)],
            paper_draws=[_flags(d) for d in draws])
        return {"tables": tables, "checks": checks, "paper_checks": paper_checks,
                "markdown": markdown, "verdicts": [verdict]}

    def _smoothing(self, model, x, y, plan: Plan) -> dict[str, Any]:

        from .analysis.smoothing_sweeps import attack_table, table_markdown
        from .defenses.smoothing import SmoothedClassifier
        from .evaluation.harness import evaluate

        seed, eps, checks_set, name = self._common(plan)
        b = self.budget
        sm = plan.extra["smoothing"]
        sigma, m, how, records = _choose_smoothing_on_val(model, plan, sm, eps=eps, seed=seed,
                                                          samples=b["eot"])
        table = attack_table(model, x, y, sigma=sigma, m=m, eps=eps, attack_samples=b["eot"],
                             repeats=3, seed=seed, nattack=sm.get("nattack"))
        flags = table.pop("flags")
        markdown = [_smoothing_choice_markdown(sigma, m, how, records),
                    f"Smoothed inference over the noisy model (σ = {sigma:g}, m = {m}). "
                    "Columns: PGD with one noise draw per step (the SIAM paper's protocol), "
                    f"EPGD and SmoothAdv with {b['eot']} draws (adaptive)"
                    + (", NAttack (black-box)" if sm.get("nattack") else "") + "; robust = "
                    "correct on all 3 fresh m-sample votes:\n\n" + table_markdown(table)]
        paper = evaluate(model, (x, y), paper_attack_specs(eps, seed), repeats=b["repeats"],
                         seed=seed, checks=checks_set)
        paper_checks = checks_from_result(paper)
        attacks = rand_suite_attacks(b, seed, eps)
        t, base_checks, suite = _suite_table(model, x, y, attacks,
                                             title="Base PNI model: rand cascade (batched EOT "
                                                   "over noise)", budget=b, seed=seed, eps=eps,
                                             probes=self._probes(plan))
        tables = [table_from_result(paper, title="Base PNI model, no smoothing: attacks with "
                                    "one noise draw per step (PNI paper)"), t]
        verdicts = [verdict_record(
            plan.extra.get("base_verdict_name", name + ": base model"), paper.worst.all,
            paper.worst.all.cpu() & suite.worst.all.cpu()
            & torch.tensor(flags["base"]["worst"], dtype=torch.bool),
            paper_label="FGSM / PGD-20 / CW, one noise draw per step",
            checks=failed_checks(base_checks), adaptive=_labels(attacks),
            paper_checks=failed_checks(paper_checks))]
        # the deployed smoothed classifier itself faces PGD and APGD with EOT over all of its
        # randomness (each EOT draw is a whole m-sample vote over fresh noise)
        smoothed = SmoothedLogits(SmoothedClassifier(model, sigma=sigma, m=m,
                                                     vote="prediction"))
        s_attacks = smoothed_suite_attacks(b, seed, eps, base=model, sigma=sigma)
        # no probes here: they would attack m-sample votes x EOT over hundreds of steps (too
        # expensive); the base model's cascade ran them
        t, s_checks, s_suite = _suite_table(
            smoothed, x, y, s_attacks, title=f"Smoothed classifier (σ = {sigma:g}, m = {m}, "
            "prediction vote): PGD and APGD with EOT over its votes and noise", budget=b,
            seed=seed, eps=eps)
        tables.append(t)
        vote = "smoothed/prediction"
        if vote in flags:
            smoothed_flags = flags[vote]
            paper_mask = (torch.tensor(smoothed_flags["clean"], dtype=torch.bool)
                          & torch.tensor(smoothed_flags["pgd"], dtype=torch.bool))
            verdicts.append(verdict_record(
                plan.extra.get("smoothed_verdict_name", name + ": smoothed"), paper_mask,
                torch.tensor(smoothed_flags["worst"], dtype=torch.bool)
                & s_suite.worst.all.cpu(),
                paper_label="PGD, one noise draw per step, prediction vote",
                # the smoothed model's white-box points come from its base, whose adaptive
                # checks count; its paper figure (PGD with one draw per step, unchecked on its
                # own) is marked by its base's paper-protocol checks
                checks=failed_checks(base_checks + s_checks), adaptive=_labels(s_attacks),
                paper_checks=failed_checks(paper_checks)))
        return {"tables": tables, "checks": base_checks + s_checks,
                "paper_checks": paper_checks, "markdown": markdown,
                "verdicts": verdicts,
                "smoothing_choice": {"sigma": sigma, "m": m, "how": how, "val": records,
                                     "paper_noise_lost": sigma == 0}}


def make_evaluator(kind: str, budget: dict) -> Evaluator:
    """The evaluation of one preset entry (:class:`Evaluator`)."""
    return Evaluator(kind, budget)


def _aux_weight(plan: Plan) -> float:
    return float(plan.config["train"]["recipe_args"].get("aux_weight", 2.0))


def _smoothing_choice_markdown(sigma: float, m: int, how: str,
                               records: list[dict[str, Any]]) -> str:
    """The choice of (sigma, m) on val, its grid, and whether the paper's noise lost."""
    lines = [f"Smoothing settings: σ = {sigma:g}, m = {m}, {how}."]
    if records:
        lines += ["", "| σ (pixels) | m | val clean % | val EPGD-10 % |", "|---|---|---|---|"]
        for r in records:
            mark = " **(chosen)**" if (r["sigma"], r["m"]) == (sigma, m) else ""
            lines.append(f"| {r['sigma']:g}{mark} | {r['m']} | {100 * r['clean']:.1f} | "
                         f"{100 * r['attacked']:.1f} |")
    if sigma == 0:
        lines += ["", "σ = 0 won on val: **the paper's headline configuration (Gaussian "
                  "noise on top of the noisy model, σ > 0) lost here**; the smoothed figures "
                  "below vote over the model's own weight noise only."]
    return "\n".join(lines)


def _choose_smoothing_on_val(model, plan: Plan, sm: dict, *, eps: float, seed: int,
                             samples: int) -> tuple[float, int, str, list[dict[str, Any]]]:
    """``(sigma, m, description, val records)``: fixed by the preset, or chosen on the ``val``
    split (never on test) as the best EPGD-10 accuracy of the prediction vote (the vote the
    report's verdicts use) over ``sm["sigmas"] x sm["ms"]``."""
    if "sigmas" not in sm:
        return sm["sigma"], sm["m"], "fixed before looking at the test set", []
    from .analysis.smoothing_sweeps import choose, sweep
    from .data import as_tensors, load_split

    data = plan.config["data"]
    xv, yv = as_tensors(load_split(data["name"], "val", root=data.get("root", "data"),
                                   limit=sm["n_val"]))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    xv, yv = xv.to(device), yv.to(device)          # the sweep runs where the model lives
    records = sweep(model, xv, yv, sigmas=sm["sigmas"], ms=sm["ms"], votes=["prediction"],
                    attack="epgd", eps=eps, steps=10, attack_samples=samples, seed=seed)
    best = choose(records)
    table = [{"sigma": r.sigma, "m": r.m, "clean": r.clean, "attacked": r.attacked}
             for r in records]
    return best.sigma, best.m, (
        f"chosen on {sm['n_val']} val images from σ ∈ {{{', '.join(map(str, sm['sigmas']))}}}, "
        f"m ∈ {{{', '.join(map(str, sm['ms']))}}} by EPGD-10 accuracy ({samples} draws) of "
        f"the prediction vote: {100 * best.clean:.1f}% clean, {100 * best.attacked:.1f}% "
        "attacked"), table


# The early-stopping rule of every reproduction entry (train.early_stopping): stop once the
# monitored robust accuracy on val has not risen by more than 0.5 points for 2 epochs; evaluate
# the best val epoch. The monitor is PGD-10, with EOT and repeated predictions for a stochastic
# model and the CAS loss for a CAS model (advdefense.training.early_stopping.monitor_plan).
# The standard model's robust accuracy is 0 by construction, so it stops on clean val
# accuracy with the same patience and min_delta.
EARLY_STOPPING = {"metric": "monitor_pgd_acc", "patience": 2, "min_delta": 0.005}



def stopping_rule(recipe: str, *, patience: int | None = None,
                  min_delta: float | None = None) -> dict[str, Any]:
    """:data:`EARLY_STOPPING` for an entry trained with ``recipe`` (the standard model stops on
    clean val accuracy, its robust accuracy being 0 by construction); ``patience`` and
    ``min_delta`` override the preset-wide defaults."""
    rule = dict(EARLY_STOPPING)
    if patience is not None:
        rule["patience"] = int(patience)
    if min_delta is not None:
        rule["min_delta"] = float(min_delta)
    if recipe == "standard":
        rule["metric"] = "monitor_clean_acc"
    return rule


def seeded_plans(group: str, title: str, config_of: Callable[[str, int], dict[str, Any]],
                 evaluator, *, seeds: list[int], multi_seed: tuple[str, ...] | set[str],
                 arch: str, cost: float = 1.0, baselines: tuple[str, ...] = (),
                 extra: dict | None = None, notes: str = "") -> list[Plan]:
    """The plans of one preset entry: one per training seed when ``group`` is in
    ``multi_seed``, else the first seed only. The first seed's key is ``group``, the others'
    ``<group>_s<seed>`` (:func:`~advdefense.reproduction.seed_variant` names a third seed the
    same way); ``config_of(key, seed)`` gives each config. ``plan.extra`` records ``group``,
    ``seed``, ``arch``, ``baselines`` and ``verdict_name``; only the first seed plots the eps
    curve."""
    first = seeds[0]
    out = []
    for s in seeds if group in multi_seed else [first]:
        key = group if s == first else f"{group}_s{s}"
        info = {**(extra or {}), "group": group, "seed": s, "arch": arch,
                "baselines": list(baselines), "verdict_name": title}
        if s != first:
            info["skip_curve"] = True
        out.append(Plan(key, title + ("" if s == first else f" (seed {s})"), config_of(key, s),
                        evaluator, notes=notes, cost=cost, extra=info))
    return out


# Every entry is trained with every seed of ``seeds``: a verdict needs at least two training
# seeds (and the pipeline adds a third where two of them differ by more than 5 points).
MULTI_SEED = ("standard", "pgd_at", "rna_at", "pni_at", "cni_at", "pgd_at_rn", "trades_rn",
              "mart_rn", "at_cas", "trades_cas", "mart_cas")


def mnist5k_plans(seed: int = 0, *, budget: dict | None = None, epochs: int = 20,
                  seeds: list[int] | tuple[int, ...] | None = None, monitor_size: int = 500,
                  limit: int | None = None, n_val_smoothing: int = 100) -> list[Plan]:
    """The mnist5k study: standard and PGD-AT, RNA (AT), PNI-W (AT) + smoothing and CNI-W (AT)
    + smoothing on ``smallcnn``; PGD-AT, TRADES, MART and each of them + CAS on
    ``resnet_mini`` (CAS after both blocks of its last stage, the paper's ResNet-18
    placement).

    Every entry trains on ``fit`` with :data:`EARLY_STOPPING` on the ``val`` split
    (``monitor_size`` images), ``epochs`` being the cap. ``seeds`` (default: ``[seed]``):
    every entry of :data:`MULTI_SEED` is trained once per seed (keys ``<entry>_s<seed>``
    after the first). ``plan.extra`` records the entry's ``group`` (key without the seed),
    ``seed``, ``arch`` and ``baselines`` (the groups its verdict is compared with, per
    example, in the report). The smoothing entries choose σ from the paper's range
    (:func:`paper_sigmas`) and m from :data:`SMOOTHING_MS` on val.
    """
    budget = budget or CPU_BUDGET
    seeds = list(seeds) if seeds else [seed]
    det, cas = make_evaluator("deterministic", budget), make_evaluator("cas", budget)
    cas_def = {"cas": {"placement": "default"}}
    sigmas = paper_sigmas("mnist5k")
    plans: list[Plan] = []

    def add(group: str, title: str, arch: str, evaluator, *, cost: float = 1.0,
            baselines: tuple[str, ...] = (), extra: dict | None = None, notes: str = "",
            **cfg: Any) -> None:
        def config_of(key: str, s: int) -> dict[str, Any]:
            return mnist5k_config(key, seed=s, epochs=epochs, model=arch,
                                  early_stopping=stopping_rule(cfg.get("recipe", "standard")),
                                  monitor_size=monitor_size, limit=limit, **cfg)

        plans.extend(seeded_plans(group, title, config_of, evaluator, seeds=seeds,
                                  multi_seed=MULTI_SEED, arch=arch, cost=cost,
                                  baselines=baselines, extra=extra, notes=notes))

    smoothing = {"sigmas": sigmas, "ms": list(SMOOTHING_MS), "n_val": n_val_smoothing}
    at = {"recipe": "pgd_at"}
    add("standard", "Standard training (smallcnn)", "smallcnn", det, cost=0.3,
        notes="Stops on clean val accuracy (its robust accuracy is 0 by construction).")
    add("pgd_at", "PGD-AT (Madry et al. 2018), smallcnn", "smallcnn", det, cost=1.5, **at)
    add("rna_at", "RNA (BN+IN, PGD-AT with black-box paths as the reference), smallcnn",
        "smallcnn", make_evaluator("rna", budget), cost=3.5, baselines=("pgd_at",),
        defense={"rna": {"space": ["bn", "in"], "granularity": "call"}},
        recipe_args={"draw": "independent"},
        extra={"curve": {"eot_samples": budget["eot"], "repeats": budget["repeats"]}}, **at)
    add("pni_at", "PNI-W (layer-wise, PGD-AT 0.5 clean + 0.5 adv) + smoothing, smallcnn",
        "smallcnn", make_evaluator("smoothing", budget), cost=4.0, baselines=("pgd_at",),
        defense={"noise": {"kind": "pni", "where": "weights", "mode": "layerwise"}},
        recipe_args={"clean_weight": 0.5, "attack_label": "predicted"},
        extra={"smoothing": dict(smoothing),
               "curve": {"eot_samples": budget["eot"], "repeats": budget["repeats"]},
               "base_verdict_name": "PNI-W (no smoothing), smallcnn",
               "smoothed_verdict_name": "PNI-W + smoothing (prediction vote), smallcnn"},
        **at)
    add("cni_at", "CNI-W (rank 5, PGD-AT 0.5 clean + 0.5 adv) + smoothing, smallcnn",
        "smallcnn", make_evaluator("smoothing", budget), cost=4.0, baselines=("pgd_at",),
        defense={"noise": {"kind": "cni", "where": "weights", "rank": 5, "alpha_init": 0.035,
                           "factor_init": 0.001}},
        recipe_args={"clean_weight": 0.5, "attack_label": "predicted"},
        optimizer={"noise_lr_scale": 0.01},
        extra={"smoothing": dict(smoothing), "skip_curve": True,
               "base_verdict_name": "CNI-W (no smoothing), smallcnn",
               "smoothed_verdict_name": "CNI-W + smoothing (prediction vote), smallcnn"},
        notes="The smoothing paper's base model (SIAM): CNI-W noise init and noise-parameter "
              "learning rate as configs/cni_w_at_mnist5k.yaml; trained like the PNI-W entry.",
        **at)
    add("pgd_at_rn", "PGD-AT, resnet_mini", "resnet_mini", det, cost=1.4, **at)
    add("trades_rn", "TRADES (β = 6), resnet_mini", "resnet_mini", det, cost=1.4,
        baselines=("pgd_at_rn",), recipe="trades", recipe_args={"beta": 6.0})
    add("mart_rn", "MART (β = 6), resnet_mini", "resnet_mini", det, cost=1.3,
        baselines=("pgd_at_rn",), recipe="mart", recipe_args={"beta": 6.0})
    add("at_cas", "PGD-AT + CAS (β = 2), resnet_mini", "resnet_mini", cas, cost=1.4,
        baselines=("pgd_at_rn",), defense=cas_def, recipe_args={"aux_weight": 2.0}, **at)
    add("trades_cas", "TRADES + CAS (β_TRADES = 6, β_CAS = 2), resnet_mini", "resnet_mini",
        cas, cost=1.4, baselines=("pgd_at_rn", "trades_rn"), defense=cas_def,
        recipe="trades", recipe_args={"beta": 6.0, "aux_weight": 2.0})
    add("mart_cas", "MART + CAS (β_MART = 6, β_CAS = 2), resnet_mini", "resnet_mini", cas,
        cost=1.3, baselines=("pgd_at_rn", "mart_rn"), defense=cas_def, recipe="mart",
        recipe_args={"beta": 6.0, "aux_weight": 2.0})
    return plans


# --------------------------------------------------------------------------------------------
# ``advdefense reproduce --preset cifar10-jpeg``: the same study on natural images.
# --------------------------------------------------------------------------------------------

C10_EPS = 8 / 255
C10_STEP = 2 / 255
C10_CURVE_EPS = [0.0, 2 / 255, 4 / 255, 8 / 255, 12 / 255]
# PGD steps of the training recipes' inner maximization (the papers train with PGD-10; see
# :func:`cifar10_jpeg_plans` for why 5) and of the early-stopping monitor
C10_TRAIN_STEPS = 5
C10_MONITOR_STEPS = 10
# every entry of the cifar10-jpeg study (all on resnet10_narrow), each trained with every seed
C10_ENTRIES = ("standard", "pgd_at", "trades", "mart", "rna", "at_cas", "trades_cas",
               "mart_cas", "pni_w", "cni_w")
C10_QUICK_ENTRIES = ("standard", "pgd_at", "rna", "pni_w")
# the adaptive suites' budget of the full preset: mnist5k's CPU budget (named in every label)
C10_BUDGET = dict(CPU_BUDGET)
# cifar10-jpeg-quick: every attack still does something
C10_QUICK_BUDGET = {"n_targets": 1, "square_queries": 50, "eot": 2, "repeats": 4,
                    "rand_square_queries": 20, "path_pairs": 2, "exact_iters": 5,
                    "smooth_eot": 2, "smooth_iters": 5}
DATA_NOTE = {
    "cifar10-jpeg": (
        "Data: CIFAR-10 (JPEG copy), the subset shipped with the package (fit 4,500 / val 500 "
        "/ test 1,000 images, class-balanced): quality-75 JPEG files of CIFAR-10 images, whose "
        "pixels differ from CIFAR-10's by about an 8/255 perturbation. These are "
        "natural-image results on that copy, **not CIFAR-10 results**: do not set them beside "
        "published CIFAR-10 figures."),
}


def cifar10_jpeg_config(name: str, *, recipe: str = "standard", epochs: int = 8, seed: int = 0,
                        recipe_args: dict | None = None, defense: dict | None = None,
                        monitor_size: int = 250, limit: int | None = None,
                        train_steps: int = C10_TRAIN_STEPS, patience: int | None = None,
                        min_delta: float | None = None, lr_decays: int = 0,
                        optimizer: dict | None = None) -> dict[str, Any]:
    """A ``cifar10-jpeg`` entry's config as a plain dict: ``resnet10_narrow``, the papers'
    optimizer (SGD 0.1, momentum 0.9, weight decay 5e-4, batch 128, random crop and flip),
    L-inf eps 8/255; PGD-``train_steps`` of step 2/255 (random start) inside the training
    recipes; trained on ``fit`` with :func:`stopping_rule` (``patience``, ``min_delta``) on
    the first ``monitor_size`` ``val`` images, monitored by PGD-10 (step 2/255); ``epochs``
    is the cap. With ``lr_decays`` the learning rate drops 10x at each of the rule's first
    ``lr_decays`` plateaus (the ``plateau`` schedule) and the run stops at the next one;
    without, it stays constant. ``limit`` keeps the first (class-balanced) ``fit`` images;
    ``optimizer`` adds options to the SGD settings (e.g. ``noise_lr_scale``)."""
    data: dict[str, Any] = {"name": "cifar10-jpeg", "batch_size": 128, "augment": True,
                            "monitor_size": monitor_size, "train_split": "fit",
                            "monitor_split": "val"}
    if limit is not None:
        data["limit"] = int(limit)
    return {
        "name": name, "seed": seed, "data": data,
        "model": {"name": "resnet10_narrow", "norm": "bn"},
        "defense": copy.deepcopy(defense or {}),
        "train": {
            "recipe": recipe, "epochs": epochs,
            "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
                          **(optimizer or {})},
            "schedule": ({"name": "plateau", "gamma": 0.1, "decays": int(lr_decays)}
                         if lr_decays else {"name": "none"}),
            "recipe_args": copy.deepcopy(recipe_args or {}),
            "attack": {"eps": C10_EPS, "steps": int(train_steps), "step_size": C10_STEP,
                       "norm": "linf", "random_start": True},
            "monitor_attack": {"eps": C10_EPS, "steps": C10_MONITOR_STEPS,
                               "step_size": C10_STEP},
            "early_stopping": stopping_rule(recipe, patience=patience, min_delta=min_delta),
        },
    }


def cifar10_jpeg_plans(seed: int = 0, *, budget: dict | None = None, epochs: int = 8,
                       seeds: list[int] | tuple[int, ...] | None = None,
                       monitor_size: int = 250, limit: int | None = None,
                       n_val_smoothing: int = 100, ms: list[int] | tuple[int, ...] = SMOOTHING_MS,
                       entries: list[str] | tuple[str, ...] | None = None,
                       train_steps: int = C10_TRAIN_STEPS, light_checks: bool = False,
                       patience: int | None = None, min_delta: float | None = None,
                       lr_decays: int = 0) -> list[Plan]:
    """The mnist5k study on CIFAR-10 (JPEG copy), every entry on ``resnet10_narrow``:
    standard training, PGD-AT, TRADES, MART, RNA, PGD-AT / TRADES / MART + CAS, PNI-W and
    CNI-W, each of the last two with and without smoothing (two verdicts per entry).

    Every entry of ``entries`` (default :data:`C10_ENTRIES`) is trained with every seed of
    ``seeds`` and compared per example with PGD-AT (and CAS with its recipe without CAS) at
    eps 8/255. The rules (early stopping, monitors, seeds, evaluators) are mnist5k's
    (:func:`mnist5k_plans`); σ comes from the paper's grid in this dataset's pixel units
    (:func:`paper_sigmas`), m from ``ms``.

    Training uses PGD-``train_steps`` (default 5) of step 2/255 where the papers use PGD-10:
    five steps from a random start reach any point of the 8/255 ball (5 x 2/255 > 8/255), and
    at half the cost per epoch the CPU budget buys twice the epochs, which these models,
    trained from scratch on 4,500 images, need more than a stronger inner maximization.
    Every test attack is the papers' (PGD-20, CW-20, FGSM) or stronger.
    """
    budget = budget or C10_BUDGET
    seeds = list(seeds) if seeds else [seed]
    wanted = list(entries) if entries else list(C10_ENTRIES)
    unknown = sorted(set(wanted) - set(C10_ENTRIES))
    if unknown:
        raise ValueError(f"unknown cifar10-jpeg entries {unknown}; choose from "
                         f"{', '.join(C10_ENTRIES)}")
    arch = "resnet10_narrow"
    det, cas = make_evaluator("deterministic", budget), make_evaluator("cas", budget)
    cas_def = {"cas": {"placement": "default"}}
    curve = {"eot_samples": budget["eot"], "repeats": budget["repeats"]}
    smoothing = {"sigmas": paper_sigmas("cifar10-jpeg"), "ms": [int(m) for m in ms],
                 "n_val": n_val_smoothing}
    base_extra: dict[str, Any] = {"eps": C10_EPS}
    if light_checks:
        base_extra["light_checks"] = True
    plans: list[Plan] = []

    def add(group: str, title: str, evaluator, *, cost: float = 1.0,
            baselines: tuple[str, ...] = (), extra: dict | None = None, notes: str = "",
            **cfg: Any) -> None:
        if group not in wanted:
            return

        def config_of(key: str, s: int) -> dict[str, Any]:
            return cifar10_jpeg_config(key, seed=s, epochs=epochs, monitor_size=monitor_size,
                                       limit=limit, train_steps=train_steps,
                                       patience=patience, min_delta=min_delta,
                                       lr_decays=lr_decays, **cfg)

        plans.extend(seeded_plans(
            group, f"{title}, {arch}", config_of, evaluator, seeds=seeds,
            multi_seed=C10_ENTRIES, arch=arch, cost=cost,
            baselines=tuple(b for b in baselines if b in wanted),
            extra={**base_extra, **(extra or {})}, notes=notes))

    at = {"recipe": "pgd_at"}
    noise_args = {"clean_weight": 0.5, "attack_label": "predicted"}
    add("standard", "Standard training", det, cost=0.3,
        notes="Stops on clean val accuracy (its robust accuracy is 0 by construction).")
    add("pgd_at", "PGD-AT (Madry et al. 2018)", det, cost=1.0, **at)
    add("trades", "TRADES (β = 6)", det, cost=1.2, baselines=("pgd_at",), recipe="trades",
        recipe_args={"beta": 6.0})
    add("mart", "MART (β = 6)", det, cost=1.2, baselines=("pgd_at",), recipe="mart",
        recipe_args={"beta": 6.0})
    add("rna", "RNA (BN+IN, PGD-AT with black-box paths as the reference)",
        make_evaluator("rna", budget), cost=1.6, baselines=("pgd_at",),
        defense={"rna": {"space": ["bn", "in"], "granularity": "call"}},
        recipe_args={"draw": "independent"}, extra={"curve": dict(curve)}, **at)
    add("at_cas", "PGD-AT + CAS (β = 2)", cas, cost=1.1, baselines=("pgd_at",),
        defense=cas_def, recipe_args={"aux_weight": 2.0}, **at)
    add("trades_cas", "TRADES + CAS (β_TRADES = 6, β_CAS = 2)", cas, cost=1.3,
        baselines=("pgd_at", "trades"), defense=cas_def, recipe="trades",
        recipe_args={"beta": 6.0, "aux_weight": 2.0})
    add("mart_cas", "MART + CAS (β_MART = 6, β_CAS = 2)", cas, cost=1.3,
        baselines=("pgd_at", "mart"), defense=cas_def, recipe="mart",
        recipe_args={"beta": 6.0, "aux_weight": 2.0})
    add("pni_w", "PNI-W (layer-wise, PGD-AT 0.5 clean + 0.5 adv) + smoothing",
        make_evaluator("smoothing", budget), cost=2.5, baselines=("pgd_at",),
        defense={"noise": {"kind": "pni", "where": "weights", "mode": "layerwise"}},
        recipe_args=dict(noise_args),
        extra={"smoothing": dict(smoothing), "curve": dict(curve),
               "base_verdict_name": f"PNI-W (no smoothing), {arch}",
               "smoothed_verdict_name": f"PNI-W + smoothing (prediction vote), {arch}"}, **at)
    add("cni_w", "CNI-W (rank 5, PGD-AT 0.5 clean + 0.5 adv) + smoothing",
        make_evaluator("smoothing", budget), cost=2.5, baselines=("pgd_at",),
        defense={"noise": {"kind": "cni", "where": "weights", "rank": 5, "alpha_init": 0.035,
                           "factor_init": 0.001}},
        recipe_args=dict(noise_args), optimizer={"noise_lr_scale": 0.01},
        extra={"smoothing": dict(smoothing), "skip_curve": True,
               "base_verdict_name": f"CNI-W (no smoothing), {arch}",
               "smoothed_verdict_name": f"CNI-W + smoothing (prediction vote), {arch}"},
        notes="The smoothing paper's base model (SIAM): CNI-W noise of rank 5, trained like "
              "the PNI-W entry, with mnist5k's noise scales (alpha_d = 0.035², F = 0.001 N(0, "
              "1)) and noise-parameter learning rate (x 0.01): at the SIAM code's (alpha_d = "
              "0.25², F = 0.01 N(0, 1), the weights' rate) both seeds stayed at chance (10% "
              "train accuracy for 18-20 epochs).", **at)
    return plans


QUICK_BUDGET = {"n_targets": 1, "square_queries": 20, "eot": 2, "repeats": 2,
                "rand_square_queries": 10, "path_pairs": 2, "exact_iters": 5,
                "smooth_eot": 2, "smooth_iters": 5}
# mnist5k-quick: small, but every attack still does something
TRIAL_BUDGET = {"n_targets": 1, "square_queries": 100, "eot": 2, "repeats": 4,
                "rand_square_queries": 50, "path_pairs": 2, "exact_iters": 20,
                "smooth_eot": 2, "smooth_iters": 10}

# ``advdefense reproduce --preset NAME`` defaults (the CLI's --n, --seeds, budget flags and
# --no-curve override them). ``seeds: 2`` = the base seed and the next one.
PRESETS: dict[str, dict[str, Any]] = {
    "mnist5k": {"n": 200, "seeds": 2, "budget": CPU_BUDGET, "curve_eps": CURVE_EPS,
                "epochs": 20, "monitor_size": 500, "limit": None, "n_val_smoothing": 100,
                "eps": EPS, "dataset": "mnist5k"},
    "mnist5k-quick": {"n": 100, "seeds": 1, "budget": TRIAL_BUDGET, "curve_eps": [0.0, 0.3],
                      "epochs": 2, "monitor_size": 200, "limit": 1500,
                      "n_val_smoothing": 50, "eps": EPS, "dataset": "mnist5k"},
    # patience 4, min_delta 1 point on all 500 val images: with a cap of 8, patience 2 and 250
    # monitor images the rule stopped PGD-AT at its 3rd-5th epoch (27-34.5% clean) on changes
    # within the monitor's noise. At a constant learning rate of 0.1 PGD-AT then stopped at
    # 33-35% clean (docs/datasets.md): the rate drops 10x at each of the rule's first two
    # plateaus (the plateau schedule) and the run stops at the third; cap 40 epochs
    "cifar10-jpeg": {"n": 200, "seeds": 2, "budget": C10_BUDGET, "curve_eps": C10_CURVE_EPS,
                     "epochs": 40, "monitor_size": 500, "patience": 4, "min_delta": 0.01,
                     "lr_decays": 2,
                     "limit": None, "n_val_smoothing": 100,
                     "ms": list(SMOOTHING_MS), "entries": list(C10_ENTRIES),
                     "train_steps": C10_TRAIN_STEPS, "light_checks": False, "eps": C10_EPS,
                     "dataset": "cifar10-jpeg"},
    "cifar10-jpeg-quick": {"n": 100, "seeds": 1, "budget": C10_QUICK_BUDGET,
                           "curve_eps": [0.0, C10_EPS], "epochs": 2, "monitor_size": 50,
                           "limit": 800, "n_val_smoothing": 32, "ms": [8],
                           "entries": list(C10_QUICK_ENTRIES), "train_steps": C10_TRAIN_STEPS,
                           "light_checks": True, "eps": C10_EPS, "dataset": "cifar10-jpeg"},
    "cifar10": {"n": 1000, "seeds": 1, "budget": FULL_BUDGET, "curve_eps": C10_CURVE_EPS,
                "eps": C10_EPS, "dataset": "cifar10"},
}


def preset_settings(preset: str) -> dict[str, Any]:
    """The defaults of a ``reproduce`` preset (a copy): ``n`` test images, ``seeds`` (number of
    training seeds of the multi-seed entries), ``budget``, ``curve_eps``, ``eps`` and
    ``dataset``; for the CPU presets also the epoch cap, monitor size, training-set limit and
    val images of the smoothing choice; for the cifar10-jpeg presets the entries, the
    smoothing m grid (``ms``), the training PGD steps and ``light_checks`` (skip the probing
    attack-failure checks)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[preset])


def preset_intro(preset: str, budget: dict) -> str:
    """The opening paragraph of a preset's report: :data:`REPRODUCE_INTRO` and what the data
    is (:data:`DATA_NOTE`)."""
    intro = REPRODUCE_INTRO.format(budget=budget)
    note = DATA_NOTE.get(str(PRESETS.get(preset, {}).get("dataset")))
    return intro + ("\n\n" + note if note else "")


def preset_title(preset: str) -> str:
    """The title of a preset's report; it names the data."""
    data = {"cifar10-jpeg": "CIFAR-10 (JPEG copy)", "mnist5k": "mnist5k (MNIST digits)",
            "cifar10": "CIFAR-10"}.get(str(PRESETS.get(preset, {}).get("dataset")), "")
    return f"advdefense reproduction report: {preset}" + (f", {data}" if data else "")


def build_plans(preset: str, *, seed: int = 0, budget: dict | None = None,
                quick: bool = False, seeds: list[int] | tuple[int, ...] | None = None
                ) -> list[Plan]:
    """The entries of ``advdefense reproduce --preset`` (:data:`PRESETS`).

    ``seeds`` overrides the preset's training seeds (default: ``seed``, ``seed + 1``, ... as
    many as the preset asks for). ``quick`` is a smoke run: 1 epoch on 300 training images. A
    module-level function, so ``functools.partial(build_plans, ...)`` can rebuild the plans in
    worker processes.
    """
    settings = preset_settings(preset)
    if seeds is None:
        seeds = [seed + i for i in range(int(settings.get("seeds", 1)))]
    if preset in ("mnist5k", "mnist5k-quick"):
        plans = mnist5k_plans(seeds[0], budget=budget or settings["budget"],
                              epochs=settings["epochs"], seeds=seeds,
                              monitor_size=settings["monitor_size"], limit=settings["limit"],
                              n_val_smoothing=settings["n_val_smoothing"])
    elif preset in ("cifar10-jpeg", "cifar10-jpeg-quick"):
        plans = cifar10_jpeg_plans(seeds[0], budget=budget or settings["budget"],
                                   epochs=settings["epochs"], seeds=seeds,
                                   monitor_size=settings["monitor_size"],
                                   limit=settings["limit"],
                                   n_val_smoothing=settings["n_val_smoothing"],
                                   ms=settings["ms"], entries=settings["entries"],
                                   train_steps=settings["train_steps"],
                                   light_checks=settings["light_checks"],
                                   patience=settings.get("patience"),
                                   min_delta=settings.get("min_delta"),
                                   lr_decays=settings.get("lr_decays", 0))
    else:
        plans = cifar10_plans(seeds[0], budget=budget, quick=quick)
    if quick:
        for p in plans:
            p.config["train"]["epochs"] = 1
            p.config["data"]["limit"] = 300
            p.config["data"]["monitor_size"] = 50
    return plans


def preset_configs(preset: str, *, seed: int = 0,
                   seeds: list[int] | tuple[int, ...] | None = None) -> dict[str, dict]:
    """Every entry's resolved config (what ``advdefense train --config`` reads), by entry key.

    ``output_dir`` is the entry's folder under ``runs/reproduce_<preset>`` (the default output
    of ``advdefense reproduce``), so training an entry from its file trains exactly the model
    the pipeline trains and reuses.
    """
    from .config import config_from_dict, to_dict

    out = {}
    for plan in build_plans(preset, seed=seed, seeds=seeds):
        cfg = copy.deepcopy(plan.config)
        cfg["output_dir"] = f"runs/reproduce_{preset}/{plan.key}"
        out[plan.key] = to_dict(config_from_dict(cfg))
    return out


def write_preset_configs(preset: str, folder: str | Path) -> list[Path]:
    """Write every entry's resolved config to ``folder/<entry>.yaml`` (see
    :func:`preset_configs`) and remove YAML files there that are no entry of the preset.

    The committed ``configs/<preset>/`` files are generated by ``advdefense reproduce --preset
    <preset> --write-configs configs/<preset>``; a test keeps them equal to the preset.
    """
    import yaml

    from .atomic import atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    titles = {p.key: p.title for p in build_plans(preset)}
    written = []
    for key, cfg in preset_configs(preset).items():
        header = (f"# {titles[key]}: entry {key!r} of `advdefense reproduce --preset {preset}`."
                  f"\n# Generated by `advdefense reproduce --preset {preset} --write-configs "
                  f"{folder.as_posix()}`;\n# do not edit: the preset (advdefense.presets) is "
                  "the source, and a test keeps this file equal to it.\n")
        path = folder / f"{key}.yaml"
        atomic_write_text(path, header + yaml.safe_dump(cfg, sort_keys=False,
                                                        allow_unicode=True))
        written.append(path)
    for stale in folder.glob("*.yaml"):
        if stale not in written:
            stale.unlink()
    return written


REPRODUCE_INTRO = (
    "Every model is evaluated under its paper's own protocol **and** under adaptive attacks, "
    "side by side. Accuracies carry 95% Clopper-Pearson intervals; for randomized models an "
    "example counts as robust only if all repeated stochastic predictions are correct. "
    "Attack budgets (CPU): {budget}; labels in the tables name every reduction from the "
    "reference AutoAttack settings.")


def cifar10_plans(seed: int = 0, *, budget: dict | None = None, quick: bool = False
                  ) -> list[Plan]:
    """The same study with the papers' CIFAR-10 settings (for a GPU): ResNet-18 for AT, TRADES,
    MART, CAS and RNA (SGD 0.1, momentum 0.9, wd 5e-4, batch 128, eps 8/255, PGD-10 step
    2/255); ResNet-20 for PNI-W (160 epochs, x0.1 at 80 and 120, wd 3e-4).

    Expected device time (an estimate from the measured PGD-AT step of ResNet-18 on one
    H200, fp32 1,476 img/s: 34 s per 50,000-image epoch): about 10.5-13 h for the eight
    entries one after another, evaluation included; docs/datasets.md ("Presets") has the
    arithmetic."""
    budget = budget or FULL_BUDGET
    eps = 8 / 255

    def cfg(name, recipe, *, epochs=200, milestones=(100, 150), model="resnet18", wd=5e-4,
            defense=None, recipe_args=None):
        return {
            "name": name, "seed": seed,
            "data": {"name": "cifar10", "batch_size": 128, "augment": True,
                     "monitor_size": 1000},
            "model": {"name": model, "norm": "bn"}, "defense": defense or {},
            "train": {"recipe": recipe, "epochs": 2 if quick else epochs,
                      "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9,
                                    "weight_decay": wd},
                      "schedule": {"name": "step", "milestones": list(milestones),
                                   "gamma": 0.1},
                      "recipe_args": recipe_args or {},
                      "attack": {"eps": eps, "steps": 10, "step_size": 2 / 255,
                                 "random_start": True},
                      "monitor_attack": {"eps": eps, "steps": 20, "step_size": 2 / 255}},
        }

    ex = {"eps": eps}
    det, cas = make_evaluator("deterministic", budget), make_evaluator("cas", budget)
    cas_def = {"cas": {"placement": "default"}}
    return [
        Plan("standard", "Standard training", cfg("standard", "standard"), det, extra=ex),
        Plan("pgd_at", "PGD-AT", cfg("pgd_at", "pgd_at"), det, extra=ex),
        Plan("trades", "TRADES (β = 6)", cfg("trades", "trades", epochs=100,
             milestones=(75, 90), recipe_args={"beta": 6.0}), det, extra=ex),
        Plan("mart", "MART (β = 6)", cfg("mart", "mart", epochs=120, milestones=(75, 90),
             wd=2e-4, recipe_args={"beta": 6.0}), det, extra=ex),
        Plan("at_cas", "PGD-AT + CAS", cfg("at_cas", "pgd_at", epochs=120, milestones=(75, 90),
             wd=1e-4, defense=cas_def, recipe_args={"aux_weight": 2.0}), cas, extra=ex),
        Plan("trades_cas", "TRADES + CAS", cfg("trades_cas", "trades", epochs=100,
             milestones=(75, 90), defense=cas_def,
             recipe_args={"beta": 6.0, "aux_weight": 2.0}), cas, extra=ex),
        Plan("rna_at", "RNA (BN+IN, black-box AT)", cfg(
            "rna_at", "pgd_at", defense={"rna": {"space": ["bn", "in"]}},
            recipe_args={"draw": "independent"}), make_evaluator("rna", budget),
            extra={**ex, "curve": {"eot_samples": budget["eot"]}}),
        Plan("pni_at", "PNI-W (ResNet-20) + smoothing", cfg(
            "pni_at", "pgd_at", epochs=160, milestones=(80, 120), model="resnet20", wd=3e-4,
            defense={"noise": {"kind": "pni", "where": "weights", "mode": "layerwise"}},
            recipe_args={"clean_weight": 0.5, "attack_label": "predicted"}),
            make_evaluator("smoothing", budget),
            extra={**ex, "smoothing": {"sigma": 0.06, "m": 512, "nattack": {"steps": 500}},
                   "curve": {"eot_samples": budget["eot"]}}),
    ]
