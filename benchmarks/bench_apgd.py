"""APGD-CE and the standard suite vs torchattacks APGD / AutoAttack, in one run.

* ``APGD-CE``: ``advdefense`` ``apgd-ce`` vs ``torchattacks.APGD(loss="ce")``, both L-inf,
  eps 8/255, 100 iterations, 1 restart, rho 0.75.
* ``suite``: ``advdefense.evaluation.suite.run_suite(suite="standard", checks=False)``
  (APGD-CE, APGD-T, FAB-T, Square 5,000 queries, each on the points still robust) vs
  torchattacks' ``MultiAttack`` of APGD / APGDT / FAB(multi_targeted) / Square, which is what
  ``torchattacks.AutoAttack(version="standard")`` builds, with 100 iterations set explicitly
  (AutoAttack in torchattacks 3.5.1 leaves its components at their default 10), on
  smallcnn at ``--suite-eps`` (default 2/255, so that some points survive APGD-CE and the
  later attacks have work to do). The robust accuracy each side reaches is stored in the
  row (``ours_robust``, ``ref_robust``) to show that the work done was comparable.
* Layouts: ours runs with its defaults (channels_last weights for the duration of each call
  on the CPU, :mod:`advdefense.layout`); torchattacks runs on the same model object, whose
  weights ours leaves contiguous. Each comparison is timed twice against torchattacks: with
  the model as it is (``ta``, default against default: ours channels_last / torchattacks
  contiguous) and with the model's weights converted for each call exactly as ours converts
  them (``ta_cl``, both channels_last). The goal is judged on the same-layout row.
* ``failure checks``: the same suite once more with every attack-failure check on; the
  checks' own seconds against the suite's (goal: at most 30% on top).

The models have random weights, so the labels are the model's own clean predictions: every
example starts correctly classified and both implementations attack the whole batch (both
skip examples that are already misclassified). Images/s = batch / seconds per call.

Run: ``python benchmarks/bench_apgd.py``
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch
import torchattacks

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from advdefense.attacks import build_attack  # noqa: E402
from advdefense.evaluation.checks import CheckSettings  # noqa: E402
from advdefense.evaluation.suite import run_suite, suite_plan  # noqa: E402

EPS = 8 / 255


def suite_row(args) -> list[dict]:
    name, n, eps, steps, queries = (args.suite_model, args.suite_batch, args.suite_eps,
                                    args.suite_steps, args.suite_queries)
    model = common.build(name)
    x, _ = common.batch(name, n)
    with torch.no_grad():
        y = model(x).argmax(1)
    robust = {}
    settings = {"n_iter": steps, "n_queries": queries}
    plan = [(label, build_attack(reg, eps=eps, **{k: settings.get(k, v) for k, v in kw.items()}))
            for label, reg, kw in suite_plan("standard", eps=eps, stochastic=False)]

    def ours():
        res = run_suite(model, (x, y), suite="standard", eps=eps, seed=0, checks=False,
                        batch_size=n, attacks=plan)
        robust["ours"] = res.accuracy("worst").value

    # torchattacks.AutoAttack(version="standard") builds exactly this cascade, but with the
    # library's default 10 iterations for APGD/APGD-T/FAB; here the iterations are set.
    common_kw = dict(eps=eps, norm="Linf", seed=0, n_restarts=1)
    cascade = torchattacks.MultiAttack([
        torchattacks.APGD(model, loss="ce", steps=steps, **common_kw),
        torchattacks.APGDT(model, n_classes=10, steps=steps, **common_kw),
        torchattacks.FAB(model, multi_targeted=True, n_classes=10, steps=steps, **common_kw),
        torchattacks.Square(model, n_queries=queries, **common_kw),
    ])

    def ta(key="ta"):
        x_adv = cascade(x, y)
        with torch.no_grad():
            robust[key] = (model(x_adv).argmax(1) == y).float().mean().item()

    fns = {"ours": ours, "ta": ta,
           "ta_cl": partial(common.ref_in_layout, "channels_last", model, partial(ta, "ta_cl"))}
    layouts = {"ours": common.weights_layout(model), "ta": common.current_layout(model),
               "ta_cl": common.weights_layout(model, "channels_last")}
    # no warm-up round (one call takes minutes); the APGD rows above warmed the kernels
    times = common.interleaved(fns, warmup=0, repeats=args.suite_repeats)
    # the attack-failure checks' own cost, beside the suite time of the same call
    checked = run_suite(model, (x, y), suite="standard", eps=eps, seed=0,
                        checks=CheckSettings(), batch_size=n, attacks=plan)
    spent = checked.config["checks_seconds"]
    checks_row = common.row(
        benchmark="failure checks", model=name, setting=f"all checks after the suite above "
        f"(batch {n})", metric="s", ours=spent, reference="the suite's own seconds",
        ref_value=checked.seconds, ratio=spent / checked.seconds, goal=0.3,
        higher_is_better=False)
    setting = (f"batch {n}, eps {eps * 255:.3g}/255, APGD-CE/APGD-T/FAB-T {steps} it, "
               f"Square {queries} q")
    # the goal row first: both sides in channels_last; then default against default
    return [common.compare(
        times, "ours", ref, n=n, benchmark="standard suite", model=name, metric="img/s",
        reference="torchattacks MultiAttack (AutoAttack standard)", seconds=times,
        ours_robust=robust["ours"], ref_robust=robust[ref],
        **common.layout_fields(layouts, "ours", ref, setting, goal=1.0, defaults=ref == "ta"))
        for ref in ("ta_cl", "ta")] + [checks_row]


def main(argv=None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--suite-model", default="smallcnn")
    p.add_argument("--suite-batch", type=int, default=32)
    p.add_argument("--suite-eps", type=float, default=2 / 255)
    p.add_argument("--suite-repeats", type=int, default=2)
    p.add_argument("--suite-steps", type=int, default=100)
    p.add_argument("--suite-queries", type=int, default=5000)
    p.add_argument("--no-suite", action="store_true")
    p.set_defaults(repeats=3)
    args = p.parse_args(argv)
    common.setup(args)
    if args.quick:
        args.batch, args.steps, args.suite_batch, args.suite_repeats = 4, 3, 2, 1
        args.suite_steps, args.suite_queries = 2, 10
    rows = []
    for name in args.models.split(","):
        model = common.build(name)
        x, _ = common.batch(name, args.batch)
        with torch.no_grad():
            y = model(x).argmax(1)
        ours = build_attack("apgd-ce", eps=EPS, n_iter=args.steps, seed=0)
        ta = torchattacks.APGD(model, norm="Linf", eps=EPS, steps=args.steps, n_restarts=1,
                               seed=0, loss="ce", rho=0.75)
        fns = {"ours": partial(ours, model, x, y), "ta": partial(ta, x, y),
               "ta_cl": partial(common.ref_in_layout, "channels_last", model,
                                partial(ta, x, y))}
        layouts = {"ours": common.weights_layout(model), "ta": common.current_layout(model),
                   "ta_cl": common.weights_layout(model, "channels_last")}
        times = common.interleaved(fns, warmup=args.warmup, repeats=args.repeats)
        setting = f"batch {args.batch}, eps 8/255, 1 restart"
        rows += [common.compare(  # the goal row (both channels_last), then default vs default
            times, "ours", ref, n=args.batch, benchmark=f"APGD-CE {args.steps} it", model=name,
            metric="img/s", reference="torchattacks.APGD", seconds=times,
            **common.layout_fields(layouts, "ours", ref, setting, goal=1.0, defaults=ref == "ta"))
            for ref in ("ta_cl", "ta")]
    if not args.no_suite:
        rows += suite_row(args)
    common.write("apgd", args, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
