"""Whole evaluation suites, ours against AutoAttack: passes and seconds on the same examples.

Both sides run on the same zoo models and examples, in one run.

What is compared (each side gives a per-example "still correctly classified" mask):

* ours: ``advdefense.evaluation.suite.run_suite(suite=S, checks=False)`` for S in ``fast``
  and ``standard`` (deterministic models) or ``rand-fast`` and ``rand`` (randomized ones;
  ``--all-suites`` adds ``standard`` on them; ``fast`` there runs ``rand-fast``'s plan and
  is skipped). A suite that :func:`suite_plan` does not know is skipped with a note. Robust =
  the worst-case verdict ``all`` (for a random model: every one of the verdict's repeated
  predictions correct). With ``checks=False`` a fast suite escalates only on its own stages'
  signs (a black-box or transfer stage breaking points); a failed check, which escalates it
  when the checks are on, is listed in the checks rows (``failed``) instead, and what a fast
  run did is in its passes row (``ours_run``: stages, escalation, and the passes its attack
  stages report themselves, a cross-check of the hooks' count).
* ``AutoAttack standard`` / ``AutoAttack rand``: AutoAttack's reference cascades built from
  torchattacks' components at the reference budget (``--ta-steps``, default 100 iterations
  for APGD / APGD-T / FAB-T, Square 5,000 queries; rand: APGD-CE and APGD-DLR with EOT 20),
  run as AutoAttack's ``run_standard_evaluation`` runs them: a clean pass first (counted),
  the cascade on the examples it classified correctly (each attack checks them once more, as
  AutoAttack's own attacks do). The passes goals are judged against these.
* ``torchattacks.AutoAttack`` as shipped (``version="standard"`` / ``"rand"``, seed 0):
  torchattacks 3.5.1 leaves APGD / APGD-T / FAB at their default 10 iterations; reported
  beside the reference, without a goal.
* ART's ``AutoAttack`` (its default attack list) when ``import art`` works; otherwise a note.

A reference's robust mask is ``model(x_adv).argmax(1) == y``: one forward pass (for a random
model, one draw, as AutoAttack itself judges), made after its passes were read (not counted).

Passes are counted the same way for every side: a forward hook on the root module of the
model passed in (every wrapper ours puts around it, e.g. ``prepare_model``'s
``SeededRandomness``, calls it) adds the output's rows to the forward count on every call;
when the output requires grad, a tensor hook on it adds its rows to the backward count each
time a gradient reaches it (so a ``backward(retain_graph=True)`` per class, as torchattacks'
FAB does, counts once per class). Reported per example: forward rows, backward rows, and
their sum ("passes"). EOT rows count one each (a batch of 20 draws of 200 images is 4,000).

Rows per model: for each of our suites against each reference, (a) passes per example and
their ratio (goals: ``fast`` at most 0.2 of AutoAttack standard, ``rand-fast`` at most 1/3 of
AutoAttack rand), (b) seconds per example and their ratio in the same interleaved run (both
sides with the same weight layout), (c) robust accuracy of both sides, the ratio being the
share of examples robust under ours but broken by the reference (goal: at most 1 in 500);
(c) also against our own full suite (``fast`` vs ``standard``, ``rand-fast`` vs ``rand``);
(d) the attack-failure checks (``run_checks`` with default settings, after each of our
suites; ``--quick``: after the first only): their passes and seconds, each as its own row
beside the suite's.

Models: zoo entries (``--models``, ``preset/entry``; default three deterministic and three
randomized ``cifar10-jpeg`` entries, and the same of ``mnist5k`` where the zoo holds them),
the first ``--n`` test images of their dataset, eps from their config (8/255 for
cifar10-jpeg, 0.3 for mnist5k). A name of :data:`common.SHAPES` (``smallcnn``, optionally
``smallcnn+noise``) is a random-weight model on random images whose labels are its own clean
predictions. Any name takes a variant: ``+noise`` adds Gaussian input noise (sigma 0.05, a
declared randomized model), ``+undeclared`` the same noise drawn inside the model's ``forward``,
outside the library's draw mechanism. Where both ``B+noise`` and ``B+undeclared``
ran, rows give the undeclared model's seconds over the declared one's for each suite (goal: at
most 2). ``--quick``: 2 examples of ``smallcnn``, ``smallcnn+noise`` and
``smallcnn+undeclared``, only to check that every path runs (the numbers mean nothing).

Run: ``OMP_NUM_THREADS=2 python benchmarks/bench_suites.py --threads 2 --n 200 --batch 200``
"""

from __future__ import annotations

import importlib.util
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torchattacks
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from advdefense.errors import AdvDefenseError  # noqa: E402
from advdefense.evaluation.checks import CheckSettings, run_checks  # noqa: E402
from advdefense.evaluation.harness import load_data, prepare_model  # noqa: E402
from advdefense.evaluation.suite import run_suite, suite_plan  # noqa: E402
from advdefense.randomness import probe_randomness  # noqa: E402

DET_ENTRIES = ("standard-s0", "pgd_at-s0", "trades-s0")
RAND_ENTRIES = ("rna-s0", "pni_w-s0", "cni_w-s0")
PRESETS = ("cifar10-jpeg", "mnist5k")
# our suites, per family, cheapest first; the last one is our full suite of the family
FAMILIES = {"standard": ("fast", "standard"), "rand": ("rand-fast", "rand")}
PASS_GOALS = {"fast": 0.2, "rand-fast": 1 / 3}  # of the AutoAttack reference's passes
DIFF_GOAL = 1 / 500  # examples robust under ours but broken by a reference, per example
UNDECLARED_GOAL = 2.0  # seconds of an undeclared-random model over the declared one's


class UndeclaredInputNoise(nn.Module):
    """``model(x + sigma * N(0, I))`` drawn with ``torch.randn_like`` inside ``forward``: the
    same randomness as :class:`~advdefense.defenses.noise.GaussianInput`, outside the library's
    draw mechanism, so every EOT draw of an attack is a separate call of the model."""

    def __init__(self, model: nn.Module, sigma: float) -> None:
        super().__init__()
        self.model, self.sigma = model, float(sigma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x + self.sigma * torch.randn_like(x))


# -- counting passes ---------------------------------------------------------------------------
class PassCounter:
    """Rows through a model's root module: forward rows on every call; backward rows each
    time a gradient reaches the output of a call (a tensor hook on it)."""

    def __init__(self) -> None:
        self.forward = self.backward = 0

    def attach(self, model: nn.Module):
        return model.register_forward_hook(self._on_forward)

    def _on_forward(self, module, args, output) -> None:
        if not torch.is_tensor(output):
            return
        rows = output.shape[0] if output.dim() else 1
        self.forward += rows
        if output.requires_grad:
            output.register_hook(partial(self._on_backward, rows))

    def _on_backward(self, rows: int, grad: torch.Tensor) -> None:
        self.backward += rows

    def reset(self) -> None:
        self.forward = self.backward = 0

    def read(self) -> dict[str, int]:
        return {"forward": self.forward, "backward": self.backward,
                "passes": self.forward + self.backward}


# -- models and data ---------------------------------------------------------------------------
def default_models() -> str:
    from advdefense.zoo import WEIGHTS, default_root

    root = default_root()
    names = [f"{p}/{e}" for p in PRESETS for e in DET_ENTRIES + RAND_ENTRIES
             if (root / p / e / WEIGHTS).is_file()]
    return ",".join(names)


def load_zoo(name: str, n: int, device: str):
    """``(model, x, y, eps)`` of zoo entry ``preset/entry``: its dataset's first ``n`` test
    images and the eps the evaluation of its checkpoint uses."""
    from advdefense.commands.evaluate import resolve_budget
    from advdefense.data import load_split
    from advdefense.loading import open_model

    loaded = open_model(name if name.startswith("zoo:") else f"zoo:{name}", device=device)
    eps, norm, _ = resolve_budget(None, "linf", loaded.config, loaded.dataset)
    x, y = load_data(load_split(loaded.dataset, "test", limit=n))
    # decoded images come channels_last-strided; torchattacks' FAB reshapes input gradients
    # with ``view``, which needs contiguous inputs (ours takes either)
    return loaded.model.eval(), x.contiguous().to(device), y.to(device), eps


def load_built(name: str, n: int, device: str):
    """``(model, x, y, eps)`` of a random-weight :func:`common.build` model on random images
    labelled by its own clean predictions, so that every example starts correctly
    classified."""
    model = common.build(name).to(device)
    x, _ = common.batch(name, n)
    x = x.to(device)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y, 0.3 if common.SHAPES[name][0] == 1 else 8 / 255


def with_variant(model: nn.Module, variant: str) -> nn.Module:
    """``model`` with Gaussian input noise (sigma 0.05) declared (``noise``) or drawn in plain
    ``forward`` code (``undeclared``); ``""``: as it is."""
    from advdefense.defenses.noise import GaussianInput, WithInputNoise

    if variant == "noise":
        return WithInputNoise(model, GaussianInput(0.05)).eval()
    if variant == "undeclared":
        return UndeclaredInputNoise(model, 0.05).eval()
    if variant:
        raise SystemExit(f"unknown model variant {variant!r} (+noise or +undeclared)")
    return model


def eps_label(eps: float) -> str:
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else f"{eps:.4g}"


def load(name: str, n: int, device: str):
    """``(model, x, y, eps)`` of ``name``: a zoo entry or a built model, optionally with a
    ``+variant`` (:func:`with_variant`)."""
    base, _, variant = name.partition("+")
    model, x, y, eps = (load_zoo if "/" in base else load_built)(base, n, device)
    return with_variant(model, variant).to(device), x, y, eps


# -- the implementations -------------------------------------------------------------------------
def known_suites(names, eps: float, stochastic: bool, notes: list[str]) -> list[str]:
    """``names`` less the suites :func:`suite_plan` does not know and those that run the
    same plan as a suite listed after them (``fast`` on a randomized model is ``rand-fast``)."""
    plans = {}
    for suite in names:
        try:
            plans[suite] = suite_plan(suite, eps=eps, stochastic=stochastic)
        except AdvDefenseError:
            notes.append(f"suite {suite!r} is not known to suite_plan in this build: skipped")
    known, kept = list(plans), []
    for i, suite in enumerate(known):
        same = [t for t in known[i + 1:] if plans[t] == plans[suite]]
        if same:
            notes.append(f"suite {suite!r} runs the plan of {same[0]!r} here: skipped")
        else:
            kept.append(suite)
    return kept


def self_reported(result) -> dict[str, int]:
    """The rows the suite's attack stages say they pushed through the model (their traces;
    the clean pass and the verdicts are not in it): a cross-check of the hooks' count."""
    return {k: sum(e.passes[k] for e in result.entries.values()) for k in ("forward", "backward")}


def verdict_all(result) -> torch.Tensor:
    """The per-example worst-case verdict (every repeat correct) of an ``EvalResult``."""
    worst = getattr(result, "robust", None) or result.worst
    return worst.all.cpu()


def ours_entry(model, x, y, suite, eps, batch, counter, record):
    def run():
        counter.reset()
        res = run_suite(model, (x, y), suite=suite, eps=eps, batch_size=batch, seed=0,
                        checks=False)
        record[suite] = {"counts": counter.read(), "robust": verdict_all(res), "result": res,
                         "extra": {"stages": list(res.entries),
                                   "escalation": res.config.get("escalation"),
                                   "attacks_self_reported": self_reported(res)}}
    return run


def reference_cascade(model, family: str, eps: float, steps: int, n_classes: int):
    """AutoAttack's cascade of ``family`` at its reference budget, from torchattacks parts."""
    kw = dict(eps=eps, norm="Linf", seed=0, n_restarts=1, steps=steps)
    if family == "rand":
        return torchattacks.MultiAttack([torchattacks.APGD(model, loss=loss, eot_iter=20, **kw)
                                         for loss in ("ce", "dlr")])
    return torchattacks.MultiAttack([
        torchattacks.APGD(model, loss="ce", **kw),
        torchattacks.APGDT(model, n_classes=n_classes, **kw),
        torchattacks.FAB(model, multi_targeted=True, n_classes=n_classes, **kw),
        torchattacks.Square(model, eps=eps, norm="Linf", seed=0, n_restarts=1, n_queries=5000),
    ])


def clean_first(model, attack):
    """``attack`` run, as AutoAttack's ``run_standard_evaluation`` runs its cascade, only on
    the examples a first (counted) forward pass classified correctly; the others keep their
    clean image."""
    def run(x, y):
        with torch.no_grad():
            keep = model(x).argmax(1) == y
        x_adv = x.clone()
        if keep.any():
            x_adv[keep] = attack(x[keep], y[keep])
        return x_adv
    return run


def art_attack(model, x, eps: float, batch: int, n_classes: int):
    """ART's AutoAttack (its default attack list) on a ``PyTorchClassifier`` of ``model``."""
    import numpy as np
    from art.attacks.evasion import AutoAttack as ArtAutoAttack
    from art.estimators.classification import PyTorchClassifier

    clf = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(),
                            input_shape=tuple(x.shape[1:]), nb_classes=n_classes,
                            clip_values=(0.0, 1.0),
                            device_type="gpu" if x.is_cuda else "cpu")
    attack = ArtAutoAttack(estimator=clf, norm=np.inf, eps=eps, eps_step=eps / 4,
                           batch_size=batch)

    def run(xb, yb):
        adv = attack.generate(x=xb.cpu().numpy(), y=yb.cpu().numpy())
        return torch.as_tensor(adv, dtype=xb.dtype, device=xb.device)
    return run


def ref_entry(model, x, y, attack, batch, key, counter, record, layout_mode):
    """Run ``attack(x, y)`` batch by batch (in the weight layout ours uses) and record its
    passes and the one-draw robust mask (that judging pass comes after the count)."""
    def attack_all():
        return torch.cat([attack(xb, yb)
                          for xb, yb in zip(x.split(batch), y.split(batch), strict=True)])

    def run():
        counter.reset()
        torch.manual_seed(0)
        x_adv = common.ref_in_layout(layout_mode, model, attack_all)
        counts = counter.read()
        with torch.no_grad():
            robust = (model(x_adv).argmax(1) == y).cpu()
        record[key] = {"counts": counts, "robust": robust}
    return run


def references(model, x, eps, families, args, notes):
    """``{key: (label, family, attack)}`` of every reference of the model's families."""
    with torch.no_grad():
        n_classes = int(model(x[:1]).shape[1])
    refs = {}
    for fam in families:
        if args.ta_steps > 0:
            refs[f"aa-{fam}"] = (f"AutoAttack {fam} (torchattacks parts, {args.ta_steps} it)",
                                 fam, clean_first(model, reference_cascade(
                                     model, fam, eps, args.ta_steps, n_classes)))
        refs[f"ta-{fam}"] = (f"torchattacks.AutoAttack({fam}) as shipped", fam,
                             torchattacks.AutoAttack(model, norm="Linf", eps=eps, version=fam,
                                                     n_classes=n_classes, seed=0))
    if "standard" in families:
        if importlib.util.find_spec("art") is None:
            notes.append("ART not installed: no ART AutoAttack row")
        else:
            refs["art"] = ("ART AutoAttack (its default attacks)", "standard",
                           art_attack(model, x, eps, args.batch, n_classes))
    return refs


# -- rows --------------------------------------------------------------------------------------
def per_example(counts: dict[str, int], n: int) -> dict[str, float]:
    return {k: v / n for k, v in counts.items()}


def passes_row(base, n, ours, ref, rec, goal):
    a, b = per_example(rec[ours]["counts"], n), per_example(rec[ref]["counts"], n)
    return common.row(metric="fwd+bwd rows per example", ours=a["passes"],
                      ref_value=b["passes"], ratio=a["passes"] / b["passes"], goal=goal,
                      higher_is_better=False, ours_passes=a, ref_passes=b,
                      ours_run=rec[ours].get("extra"), **base)


def robust_row(base, n, ours, ref, rec):
    mine, theirs = rec[ours]["robust"], rec[ref]["robust"]
    only_ours = int((mine & ~theirs).sum())
    return common.row(metric="robust accuracy; ratio: share robust under ours, broken by ref",
                      ours=mine.float().mean().item(), ref_value=theirs.float().mean().item(),
                      ratio=only_ours / n, goal=DIFF_GOAL, higher_is_better=False,
                      robust_only_ours=only_ours, robust_only_ref=int((~mine & theirs).sum()),
                      allowed=n * DIFF_GOAL, **base)


def comparison_rows(model_name, setting, n, rec, times, suites, refs, baseline, layout_mode):
    rows = []
    for suite in suites:
        fam = next(f for f, members in FAMILIES.items() if suite in members)
        for key, (label, ref_fam, _) in refs.items():
            if ref_fam != fam:
                continue
            base = dict(benchmark=f"suite {suite}", model=model_name, reference=label,
                        setting=f"{setting}, {common.layout_label(layout_mode, layout_mode)}")
            goal = PASS_GOALS.get(suite) if key == f"aa-{fam}" else None
            rows += [passes_row(base, n, suite, key, rec, goal),
                     common.compare(times, suite, key, n=n, time_ratio=True,
                                    seconds={k: times[k] for k in (suite, key)},
                                    metric="s per example", goal=None, **base),
                     robust_row(base, n, suite, key, rec)]
        full = baseline.get(suite)
        if full and full in rec:
            base = dict(benchmark=f"suite {suite}", model=model_name, setting=setting,
                        reference=f"ours, suite {full}")
            rows += [passes_row(base, n, suite, full, rec, None),
                     robust_row(base, n, suite, full, rec)]
    return rows


def checks_rows(model_name, setting, n, model, x, y, suite, rec, times, counter):
    """The failure checks after ``suite``'s result: passes and seconds, beside the suite's."""
    prepared, _ = prepare_model(model, x[:8])
    counter.reset()
    t0 = time.perf_counter()
    found = run_checks(prepared, (x, y), rec[suite]["result"], CheckSettings())
    common.sync()
    seconds = time.perf_counter() - t0
    own = per_example(counter.read(), n)
    suite_passes = per_example(rec[suite]["counts"], n)["passes"]
    suite_s = common.median(times[suite])
    base = dict(benchmark=f"checks after {suite}", model=model_name, setting=setting,
                failed=[c.name for c in found if c.passed is False], checks_passes=own)
    return [common.row(metric="fwd+bwd rows per example", ours=own["passes"],
                       reference=f"suite {suite} itself", ref_value=suite_passes,
                       ratio=own["passes"] / suite_passes, goal=None, higher_is_better=False,
                       **base),
            common.row(metric="s", ours=seconds, reference=f"suite {suite} itself",
                       ref_value=suite_s, ratio=seconds / suite_s, goal=None,
                       higher_is_better=False, **base)]


def undeclared_rows(rows: list[dict]) -> list[dict]:
    """For every ``B+undeclared`` model run beside ``B+noise``: each suite's seconds per
    example on the undeclared model over those on the declared one (goal: at most 2)."""
    seconds = {(r["model"], r["benchmark"]): r["ours"] for r in rows
               if r["metric"] == "s per example"}
    out = []
    for (model, bench), undeclared in seconds.items():
        base, _, variant = model.partition("+")
        declared = seconds.get((f"{base}+noise", bench))
        if variant != "undeclared" or declared is None:
            continue
        out.append(common.row(benchmark=bench, model=model, setting="same examples and seed",
                              metric="s per example, undeclared over declared randomness",
                              ours=undeclared, reference=f"{base}+noise (declared)",
                              ref_value=declared, ratio=undeclared / declared,
                              goal=UNDECLARED_GOAL, higher_is_better=False))
    return out


def bench_model(name: str, args, notes: list[str]) -> list[dict]:
    model, x, y, eps = load(name, args.n, args.device)
    n = x.shape[0]
    # an undeclared-random model reads as deterministic to ``is_stochastic``: probe it
    stochastic = probe_randomness(model, x[:8]) != "deterministic"
    families = ["rand"] if stochastic else ["standard"]
    if stochastic and args.all_suites:
        families.insert(0, "standard")
    wanted = [s for fam in families for s in FAMILIES[fam] if s in args.suites]
    local: list[str] = []
    suites = known_suites(wanted, eps, stochastic, local)
    notes += [f"{name}: {note}" for note in local]
    if not suites:
        return []
    counter = PassCounter()
    handle = counter.attach(model)
    try:
        rec: dict[str, dict] = {}
        mode = common.weights_layout(model)
        refs = references(model, x, eps, sorted({f for f in families
                                                 if any(s in FAMILIES[f] for s in suites)}),
                          args, notes)
        fns = {s: ours_entry(model, x, y, s, eps, args.batch, counter, rec) for s in suites}
        fns.update({key: ref_entry(model, x, y, attack, args.batch, key, counter, rec, mode)
                    for key, (_, _, attack) in refs.items()})
        times = common.interleaved(fns, warmup=args.warmup, repeats=args.repeats)
        baseline = {members[0]: members[-1] for members in FAMILIES.values()}
        kind = "randomized: ref judged on one draw, ours on every repeat" if stochastic \
            else "deterministic"
        setting = f"n {n}, batch {args.batch}, eps {eps_label(eps)}, {kind}"
        rows = comparison_rows(name, setting, n, rec, times, suites, refs, baseline, mode)
        if not args.no_checks:  # --quick: after the first suite only (time)
            for suite in suites[:1] if args.quick else suites:
                rows += checks_rows(name, setting, n, model, x, y, suite, rec, times, counter)
    finally:
        handle.remove()
    return rows


def _pick(rows, **want):
    return next((r for r in rows if all(r.get(k) == v for k, v in want.items())), None)


def summary(paths: list[Path]) -> str:
    """One Markdown line per model and fast suite from result files of this script: passes,
    seconds and robust accuracy beside the AutoAttack reference of its family, the examples
    robust under ours but broken by a reference (AutoAttack from parts, as shipped, our own
    reference suite), whether the suite escalated, and what the checks cost."""
    import json

    head = ("| model | suite | fwd+bwd rows / example: ours, AutoAttack (ratio; goal) | "
            "s / example: ours, AutoAttack (ratio) | robust %: ours, AutoAttack, as shipped, "
            "our reference suite | robust under ours only (vs AutoAttack, as shipped, "
            "reference; allowed) | escalated | checks: rows / example (of the suite's) | "
            "run |")
    lines = [head, "|" + "---|" * 9]
    for path in paths:
        payload = json.loads(path.read_text())
        rows = payload["rows"]
        for suite, fam in (("fast", "standard"), ("rand-fast", "rand")):
            bench = f"suite {suite}"
            aa = [r for r in rows if r["benchmark"] == bench
                  and r["reference"].startswith(f"AutoAttack {fam}")]
            if not aa:
                continue
            model = aa[0]["model"]
            passes = _pick(aa, metric="fwd+bwd rows per example")
            secs = _pick(aa, metric="s per example")
            rob = next(r for r in aa if r["metric"].startswith("robust"))
            shipped = next((r for r in rows if r["benchmark"] == bench
                            and r["reference"].startswith("torchattacks.AutoAttack")
                            and r["metric"].startswith("robust")), None)
            own = next((r for r in rows if r["benchmark"] == bench
                        and r["reference"].startswith("ours, suite")
                        and r["metric"].startswith("robust")), None)
            checks = _pick(rows, benchmark=f"checks after {suite}",
                           metric="fwd+bwd rows per example")
            esc = passes.get("ours_run", {}).get("escalation") or {}
            pct = lambda r: "-" if r is None else f"{100 * r['ref_value']:.1f}"  # noqa: E731
            only = lambda r: "-" if r is None else str(r["robust_only_ours"])  # noqa: E731
            goal = "met" if passes["met"] else "missed"
            m = payload["machine"]
            lines.append(
                f"| {model} | {suite} | {passes['ours']:.0f}, {passes['ref_value']:.0f} "
                f"({passes['ratio']:.3f}; ≤ {passes['goal']:.3g}: {goal}) | "
                f"{secs['ours']:.3f}, {secs['ref_value']:.3f} ({secs['ratio']:.2f}) | "
                f"{100 * rob['ours']:.1f}, {pct(rob)}, {pct(shipped)}, {pct(own)} | "
                f"{rob['robust_only_ours']}, {only(shipped)}, {only(own)}; "
                f"{rob['allowed']:.1f} | "
                f"{', '.join(esc.get('ran') or []) or 'no'} | "
                + ("-" if checks is None else f"{checks['ours']:.0f} ({checks['ratio']:.2f})")
                + f" | commit {m['git_commit']}, load {m['load_avg_1min_at_start']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="test examples per model")
    p.add_argument("--batch", type=int, default=200, help="batch size of every side")
    p.add_argument("--suites", default="fast,standard,rand-fast,rand",
                   help="which of our suites to run (comma-separated)")
    p.add_argument("--all-suites", action="store_true",
                   help="randomized models get fast/standard (vs AutoAttack standard) too")
    p.add_argument("--ta-steps", type=int, default=100,
                   help="iterations of the AutoAttack reference cascades (0: leave them out)")
    p.add_argument("--no-checks", action="store_true", help="skip the failure-checks rows")
    p.add_argument("--device", default="cpu")
    p.add_argument("--summarize", type=Path, metavar="DIR",
                   help="only print the goals table of the result files in DIR")
    p.set_defaults(models=None, repeats=1, warmup=0)
    args = p.parse_args(argv)
    if args.summarize is not None:
        print(summary(sorted(args.summarize.glob("*.json"))))
        return 0
    common.setup(args)
    if args.quick:
        args.n = args.batch = 2
        args.models = args.models or "smallcnn,smallcnn+noise,smallcnn+undeclared"
    args.models = args.models or default_models()
    args.suites = [s for s in args.suites.split(",") if s]
    if not args.models:
        raise SystemExit("no models: the zoo holds none of the default entries; pass --models")
    notes: list[str] = []
    rows = []
    for name in args.models.split(","):
        rows += bench_model(name, args, notes)
    rows += undeclared_rows(rows)
    for note in dict.fromkeys(notes):
        print(f"note: {note}")
    common.write("suites", args, rows, {"notes": list(dict.fromkeys(notes)),
                                        "passes": "forward rows + backward rows per example"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
