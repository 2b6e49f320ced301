"""Presets for ``advdefense demo`` and ``advdefense reproduce``: configs + evaluation plans.

The CPU presets use the offline ``mnist5k`` data (L-inf eps 0.3, the MNIST convention):
``smallcnn`` for the demo, standard training, PGD-AT, RNA and PNI; ``resnet_mini`` (a small
ResNet whose last stage has two blocks, as ResNet-18's) for the CAS study, where CAS sits
after both blocks of the last stage as in the paper, beside AT / TRADES / MART on the same
network. Budgets are sized from measurements on 2 CPU cores.

``reproduce`` presets (:data:`PRESETS`, :func:`preset_settings`):

``mnist5k``
    the converged, faithful run: every entry trains on ``fit`` (train minus val) until its
    robust accuracy on the whole ``val`` split (PGD-10) stops rising (early stopping, patience
    2 epochs, min_delta 0.5 points, cap 20 epochs; the best val epoch is evaluated), PGD-AT
    and the seed defenses (CAS, RNA, PNI/smoothing) with two training seeds, CNI-W +
    smoothing with one; 200 test images. 16 entries; measured at 322 compute-minutes on
    2 CPU cores, so about 2 h 40 min of wall time from scratch with ``--jobs 2`` (the report
    records both; a run resumes from every finished epoch and evaluation).
``mnist5k-quick``
    the same entries for trying things: seed 0 only, at most 2 epochs on 1,500 training
    images, 100 test images, small attack budgets; estimated at about 20 minutes with
    ``--jobs 2``.
"""

from __future__ import annotations

import copy
from typing import Any

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
# report's attack labels.
CPU_BUDGET = {"n_targets": 3, "square_queries": 500, "eot": 4, "repeats": 10,
              "rand_square_queries": 200}
FULL_BUDGET = {"n_targets": 9, "square_queries": 5000, "eot": 20, "repeats": 10,
               "rand_square_queries": 5000}


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


def paper_attack_specs(eps: float, seed: int) -> list:
    """What the AT, TRADES, MART, CAS and PNI papers ran: FGSM, PGD-20 and CW-L-inf.

    APGD is not part of their protocols; it runs in the adaptive cascade beside them, so the
    paper-protocol column shows what the papers would have reported.
    """
    from .evaluation.harness import standard_attack_specs

    return [s for s in standard_attack_specs(eps, seed=seed) if s.name in PAPER_ATTACKS]


PAPER_ATTACKS = ("fgsm", "pgd", "cw")


def _suite_table(model, x, y, attacks, *, title: str, budget: dict, seed: int,
                 eps: float, probes: bool = False):
    from .evaluation.suite import run_suite

    # the probing checks (unbounded eps, eps sweep, more iterations) already ran with the
    # paper-protocol evaluation of the same model; the suite adds the cheap trace checks
    result = run_suite(model, (x, y), suite="custom", eps=eps, attacks=attacks,
                       repeats=budget["repeats"], eot_samples=budget["eot"], seed=seed,
                       checks=CheckSettings(probes=probes))
    return table_from_result(result, title=title), checks_from_result(result), result


def _flags(mask) -> list[bool]:
    return [bool(v) for v in mask.flatten().tolist()]


def verdict_record(name: str, paper, worst, *, paper_label: str) -> dict[str, Any]:
    """A JSON-able per-example verdict of one defense: its paper-protocol worst case and its
    worst case over everything run (both per example, for paired McNemar tests)."""
    return {"name": name, "paper_label": paper_label, "paper": _flags(paper),
            "worst": _flags(worst)}


def make_evaluator(kind: str, budget: dict):
    """The evaluation of one preset entry: ``kind`` in deterministic | cas | rna | smoothing.

    Every section also holds ``verdicts`` (per-example paper-protocol and overall worst cases,
    see :func:`verdict_record`) for the paired statistics of the report. ``plan.extra``
    options: ``eps``; ``light_checks`` (skip the probing attack-failure checks, e.g. for a
    second training seed whose first seed ran them).
    """

    def run(model, x, y, plan: Plan) -> dict[str, Any]:
        from .attacks import PGD, HeadsObjective, build_attack
        from .evaluation.harness import AttackSpec, evaluate

        seed = plan.config["seed"]
        eps = plan.extra.get("eps", EPS)
        checks_set = CheckSettings(probes=not plan.extra.get("light_checks"))
        tables, checks, markdown, verdicts = [], [], [], []
        name = plan.extra.get("verdict_name", plan.title)
        extra: dict[str, Any] = {}
        if kind == "deterministic":
            paper = evaluate(model, (x, y), paper_attack_specs(eps, seed), seed=seed,
                             checks=checks_set)
            tables.append(table_from_result(paper, title="Paper protocol: FGSM, PGD-20, "
                                            "CW-L-inf (white-box)"))
            checks += checks_from_result(paper)
            t, c, suite = _suite_table(model, x, y, standard_suite_attacks(budget, seed, eps),
                                       title="Adaptive: AutoAttack-style cascade",
                                       budget=budget, seed=seed, eps=eps)
            tables.append(t)
            checks += c
            verdicts.append(verdict_record(name, paper.worst.all, paper.worst.all
                                           & suite.worst.all,
                                           paper_label="FGSM / PGD-20 / CW-L-inf"))
        elif kind == "cas":
            from .analysis.channels import cas_site_markdown, cas_site_stats

            beta = plan.config["train"]["recipe_args"].get("aux_weight", 2.0)
            adaptive_pgd = PGD(eps=eps, steps=20, step_size=eps / 4, seed=seed,
                               loss=HeadsObjective("ce", aux_weight=beta))
            specs = [
                AttackSpec("fgsm", build_attack("fgsm", eps=eps, seed=seed)),
                AttackSpec("pgd-20 main+β·aux (reference)", adaptive_pgd),
                AttackSpec("cw main+β·aux (reference)",
                           PGD(eps=eps, steps=20, step_size=eps / 4, seed=seed,
                               loss=HeadsObjective("margin", aux_weight=beta))),
                AttackSpec("pgd-20 main only",
                           PGD(eps=eps, steps=20, step_size=eps / 4, seed=seed)),
            ]
            res = evaluate(model, (x, y), specs, seed=seed, checks=checks_set)
            tables.append(table_from_result(
                res, title=f"Paper protocol (the CAS code's adaptive loss main + {beta:g}·aux) "
                           "beside PGD-20 on the main logits only"))
            checks += checks_from_result(res)
            t, c, suite = _suite_table(model, x, y, standard_suite_attacks(budget, seed, eps),
                                       title="Adaptive: AutoAttack-style cascade",
                                       budget=budget, seed=seed, eps=eps)
            tables.append(t)
            checks += c
            paper_mask = res.clean.verdict.all
            for e in res.entries.values():
                if e.name != "pgd-20 main only":  # not in the paper's protocol
                    paper_mask = paper_mask & e.verdict.all
            verdicts.append(verdict_record(name, paper_mask, res.worst.all & suite.worst.all,
                                           paper_label="FGSM / PGD-20 / CW, main + β·aux loss"))
            sites = cas_site_stats(model, x, y, attack=PGD(
                eps=eps, steps=20, step_size=eps / 4, seed=seed,
                loss=HeadsObjective("ce", aux_weight=beta)))
            extra["cas_sites"] = sites
            if sites["sites"]:
                markdown.append(
                    "CAS sites at test time (predicted-class masks; adversarial = PGD-20 on "
                    f"main + {beta:g}·aux): each auxiliary head's accuracy and how often the "
                    "main prediction equals that head's argmax (for the first site: how "
                    "often the main prediction follows the first head's mask), %:\n\n"
                    + cas_site_markdown(sites))
        elif kind == "rna":
            from .analysis.rna_report import rna_report

            # the three-way table keeps FGSM / PGD-20 / CW; APGD (the RNA paper also ran
            # AutoAttack, without EOT) runs with EOT in the cascade below
            rep = rna_report(model, x, y, eps=eps, eot_samples=budget["eot"],
                             repeats=budget["repeats"], seed=seed, attacks=PAPER_ATTACKS)
            markdown.append("Paper protocol (attack on path A, a new frozen path per batch; "
                            "classified once on a fresh path B, as the authors did, and on all "
                            f"{budget['repeats']} fresh paths) beside fixed-path white-box and "
                            "EOT over paths (correct on all "
                            f"{budget['repeats']} fresh predictions):\n\n" + rep.to_markdown())
            checks += checks_from_result(rep.result)
            t, c, suite = _suite_table(model, x, y, rand_suite_attacks(budget, seed, eps),
                                       title="Adaptive: rand cascade (batched EOT over paths)",
                                       budget=budget, seed=seed, eps=eps,
                                       probes=not plan.extra.get("light_checks"))
            tables.append(t)
            checks += c
            verdicts.append(verdict_record(
                name, rep.result.worst_over("paper").single, rep.result.worst.all
                & suite.worst.all,
                paper_label="attack on path A, classify once on a fresh path B"))
        elif kind == "smoothing":
            from .analysis.smoothing_sweeps import attack_table, table_markdown

            sm = plan.extra["smoothing"]
            sigma, m, how = _choose_smoothing_on_val(model, plan, sm, eps=eps, seed=seed,
                                                     samples=budget["eot"])
            table = attack_table(model, x, y, sigma=sigma, m=m, eps=eps,
                                 attack_samples=budget["eot"], repeats=3, seed=seed,
                                 nattack=sm.get("nattack"))
            flags = table.pop("flags")
            markdown.append(
                f"Smoothed inference over the noisy model (σ = {sigma:g}, m = {m}, {how}). "
                "Columns: PGD with one noise draw per step (the SIAM paper's protocol), EPGD "
                f"and SmoothAdv with {budget['eot']} draws (adaptive)"
                + (", NAttack (black-box)" if sm.get("nattack") else "") + "; robust = correct "
                "on all 3 fresh m-sample votes:\n\n"
                + table_markdown(table))
            paper = evaluate(model, (x, y), paper_attack_specs(eps, seed),
                             repeats=budget["repeats"], seed=seed, checks=checks_set)
            tables.append(table_from_result(paper, title="Base PNI model, no smoothing: "
                                            "attacks with one noise draw per step (PNI paper)"))
            checks += checks_from_result(paper)
            t, c, suite = _suite_table(model, x, y, rand_suite_attacks(budget, seed, eps),
                                       title="Base PNI model: rand cascade (batched EOT over "
                                             "noise)", budget=budget, seed=seed, eps=eps)
            tables.append(t)
            checks += c
            import torch

            base_rows = flags["base"]
            verdicts.append(verdict_record(
                plan.extra.get("base_verdict_name", name + ": base model"), paper.worst.all,
                paper.worst.all.cpu() & suite.worst.all.cpu()
                & torch.tensor(base_rows["worst"], dtype=torch.bool),
                paper_label="FGSM / PGD-20 / CW, one noise draw per step"))
            vote = "smoothed/prediction"
            if vote in flags:
                smoothed = flags[vote]
                paper_mask = (torch.tensor(smoothed["clean"], dtype=torch.bool)
                              & torch.tensor(smoothed["pgd"], dtype=torch.bool))
                verdicts.append(verdict_record(
                    plan.extra.get("smoothed_verdict_name", name + ": smoothed"), paper_mask,
                    torch.tensor(smoothed["worst"], dtype=torch.bool),
                    paper_label="PGD, one noise draw per step, prediction vote"))
            extra["smoothing_choice"] = {"sigma": sigma, "m": m, "how": how}
        return {"tables": tables, "checks": checks, "markdown": markdown,
                "verdicts": verdicts, **extra}

    return run


def _choose_smoothing_on_val(model, plan: Plan, sm: dict, *, eps: float, seed: int,
                             samples: int) -> tuple[float, int, str]:
    """(sigma, m, description): fixed by the preset, or chosen on the ``val`` split (never on
    test) as the best EPGD-10 accuracy over ``sm["sigmas"] x sm["ms"]`` (any vote)."""
    if "sigmas" not in sm:
        return sm["sigma"], sm["m"], "fixed before looking at the test set"
    from .analysis.smoothing_sweeps import choose, sweep
    from .data import as_tensors, load_split

    data = plan.config["data"]
    xv, yv = as_tensors(load_split(data["name"], "val", root=data.get("root", "data"),
                                   limit=sm["n_val"]))
    best = choose(sweep(model, xv, yv, sigmas=sm["sigmas"], ms=sm["ms"], attack="epgd",
                        eps=eps, steps=10, attack_samples=samples, seed=seed))
    return best.sigma, best.m, (
        f"chosen on {sm['n_val']} val images from σ ∈ {{{', '.join(map(str, sm['sigmas']))}}}, "
        f"m ∈ {{{', '.join(map(str, sm['ms']))}}} by EPGD-10 accuracy ({samples} draws): "
        f"{100 * best.clean:.1f}% clean, {100 * best.attacked:.1f}% attacked, "
        f"{best.vote} vote")


# The early-stopping rule of every reproduction entry (train.early_stopping): stop once the
# PGD-10 accuracy on val has not risen by more than 0.5 points for 2 epochs; evaluate the best
# val epoch. The standard model's robust accuracy is 0 by construction, so it stops on clean
# val accuracy with the same patience and min_delta.
EARLY_STOPPING = {"metric": "monitor_pgd_acc", "patience": 2, "min_delta": 0.005}

# Entries trained with every seed of ``seeds`` (the others with the first seed only): PGD-AT
# on both networks and the three seed papers' defenses.
MULTI_SEED = ("pgd_at", "pgd_at_rn", "at_cas", "rna_at", "pni_at")


def mnist5k_plans(seed: int = 0, *, budget: dict | None = None, epochs: int = 20,
                  seeds: list[int] | tuple[int, ...] | None = None, monitor_size: int = 500,
                  limit: int | None = None, n_val_smoothing: int = 100) -> list[Plan]:
    """The mnist5k study: standard and PGD-AT, RNA (AT), PNI-W (AT) + smoothing and CNI-W (AT)
    + smoothing on ``smallcnn``; PGD-AT, TRADES, MART and each of them + CAS on
    ``resnet_mini`` (CAS after both blocks of its last stage, the paper's ResNet-18
    placement).

    Every entry trains on ``fit`` with :data:`EARLY_STOPPING` on the ``val`` split
    (``monitor_size`` images), ``epochs`` being the cap. ``seeds`` (default: ``[seed]``):
    the entries in :data:`MULTI_SEED` are trained once per seed (keys ``<entry>_s<seed>``
    after the first), the others with the first seed. ``plan.extra`` records the entry's
    ``group`` (key without the seed), ``seed``, ``arch`` and ``baselines`` (the groups its
    verdict is compared with, per example, in the report).
    """
    budget = budget or CPU_BUDGET
    seeds = list(seeds) if seeds else [seed]
    first = seeds[0]
    det, cas = make_evaluator("deterministic", budget), make_evaluator("cas", budget)
    cas_def = {"cas": {"placement": "default"}}
    plans: list[Plan] = []

    def add(group: str, title: str, arch: str, evaluator, *, cost: float = 1.0,
            baselines: tuple[str, ...] = (), extra: dict | None = None, notes: str = "",
            **cfg: Any) -> None:
        for s in seeds if group in MULTI_SEED else [first]:
            key = group if s == first else f"{group}_s{s}"
            es = dict(EARLY_STOPPING)
            if cfg.get("recipe", "standard") == "standard":
                es["metric"] = "monitor_clean_acc"
            config = mnist5k_config(key, seed=s, epochs=epochs, model=arch,
                                    early_stopping=es, monitor_size=monitor_size, limit=limit,
                                    **cfg)
            info = {**(extra or {}), "group": group, "seed": s, "arch": arch,
                    "baselines": list(baselines), "verdict_name": title}
            if s != first:
                # the first seed's entry plots the eps curve and runs the probing checks
                info.update(light_checks=True, skip_curve=True)
            plans.append(Plan(key, title + ("" if s == first else f" (seed {s})"), config,
                              evaluator, notes=notes, cost=cost, extra=info))

    at = {"recipe": "pgd_at"}
    add("standard", "Standard training (smallcnn)", "smallcnn", det, cost=0.3,
        notes="Stops on clean val accuracy (its robust accuracy is 0 by construction).")
    add("pgd_at", "PGD-AT (Madry et al. 2018), smallcnn", "smallcnn", det, cost=1.5, **at)
    add("rna_at", "RNA (BN+IN, PGD-AT with black-box paths as the reference), smallcnn",
        "smallcnn", make_evaluator("rna", budget), cost=3.0, baselines=("pgd_at",),
        defense={"rna": {"space": ["bn", "in"], "granularity": "call"}},
        recipe_args={"draw": "independent"},
        extra={"curve": {"eot_samples": budget["eot"], "repeats": budget["repeats"]}}, **at)
    add("pni_at", "PNI-W (layer-wise, PGD-AT 0.5 clean + 0.5 adv) + smoothing, smallcnn",
        "smallcnn", make_evaluator("smoothing", budget), cost=2.5, baselines=("pgd_at",),
        defense={"noise": {"kind": "pni", "where": "weights", "mode": "layerwise"}},
        recipe_args={"clean_weight": 0.5, "attack_label": "predicted"},
        extra={"smoothing": {"sigmas": [0.0, 0.1], "ms": [4, 16], "n_val": n_val_smoothing},
               "curve": {"eot_samples": budget["eot"], "repeats": budget["repeats"]},
               "base_verdict_name": "PNI-W (no smoothing), smallcnn",
               "smoothed_verdict_name": "PNI-W + smoothing (prediction vote), smallcnn"},
        **at)
    add("cni_at", "CNI-W (rank 5, PGD-AT 0.5 clean + 0.5 adv) + smoothing, smallcnn",
        "smallcnn", make_evaluator("smoothing", budget), cost=2.5, baselines=("pgd_at",),
        defense={"noise": {"kind": "cni", "where": "weights", "rank": 5, "alpha_init": 0.035,
                           "factor_init": 0.001}},
        recipe_args={"clean_weight": 0.5, "attack_label": "predicted"},
        optimizer={"noise_lr_scale": 0.01},
        extra={"smoothing": {"sigmas": [0.0, 0.1], "ms": [4, 16], "n_val": n_val_smoothing},
               "skip_curve": True,
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


QUICK_BUDGET = {"n_targets": 1, "square_queries": 20, "eot": 2, "repeats": 2,
                "rand_square_queries": 10}
# mnist5k-quick: small, but every attack still does something
TRIAL_BUDGET = {"n_targets": 1, "square_queries": 100, "eot": 2, "repeats": 4,
                "rand_square_queries": 50}

# ``advdefense reproduce --preset NAME`` defaults (the CLI's --n, --seeds, budget flags and
# --no-curve override them). ``seeds: 2`` = the base seed and the next one.
PRESETS: dict[str, dict[str, Any]] = {
    "mnist5k": {"n": 200, "seeds": 2, "budget": CPU_BUDGET, "curve_eps": CURVE_EPS,
                "epochs": 20, "monitor_size": 500, "limit": None, "n_val_smoothing": 100},
    "mnist5k-quick": {"n": 100, "seeds": 1, "budget": TRIAL_BUDGET, "curve_eps": [0.0, 0.3],
                      "epochs": 2, "monitor_size": 200, "limit": 1500,
                      "n_val_smoothing": 50},
    "cifar10": {"n": 1000, "seeds": 1, "budget": FULL_BUDGET, "curve_eps": CURVE_EPS},
}


def preset_settings(preset: str) -> dict[str, Any]:
    """The defaults of a ``reproduce`` preset (a copy): ``n`` test images, ``seeds`` (number of
    training seeds of the multi-seed entries), ``budget``, ``curve_eps`` and, for the mnist5k
    presets, the epoch cap, monitor size and training-set limit."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[preset])


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
    else:
        plans = cifar10_plans(seeds[0], budget=budget, quick=quick)
    if quick:
        for p in plans:
            p.config["train"]["epochs"] = 1
            p.config["data"]["limit"] = 300
            p.config["data"]["monitor_size"] = 50
    return plans


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
    2/255); ResNet-20 for PNI-W (160 epochs, x0.1 at 80 and 120, wd 3e-4)."""
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
