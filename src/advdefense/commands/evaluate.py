"""``advdefense evaluate``: evaluate a model honestly — an advdefense checkpoint or anyone's.

The model is an advdefense checkpoint (``--checkpoint``: model, config and dataset come from
it) or any model :func:`advdefense.loading.load_model` reads (``--model``: a factory
``pkg.module:factory`` or ``file.py:factory`` with ``--weights`` / ``--model-args``, a
RobustBench checkpoint ``robustbench:wrn-28-10 --weights F``, a TorchScript or
``torch.export`` archive), evaluated on ``--dataset``. It then runs either named attacks
(``--attacks``, default: the demo set of :func:`advdefense.evaluation.standard_attack_specs`)
under the chosen protocols at every eps of ``--eps-sweep`` (plus ``--eps``), or an
AutoAttack-style suite (``--suite``) at ``--eps``; then the attack-failure checks. Prints the
Markdown table and the checks and writes ``report.json`` (with a ``robustbench`` block in
RobustBench's field names), ``report.md`` and ``accuracy_vs_eps.png`` into ``--output``.

``--eps`` / ``--norm`` default to the checkpoint's config (``eval.eps``/``eval.norm``, else
the training attack of an adversarial recipe), else to the dataset's usual budget (L-inf:
0.3 for MNIST-like data, 8/255 for CIFAR/SVHN; L2: 2.0 and 0.5); the report says where each
came from (``eps_source``, ``norm_source``).

``--save-adv FILE`` keeps the worst-case input of every example (:mod:`advdefense.advfile`);
``--adv-file FILE`` re-checks such a file on the given model (a transfer evaluation when the
model differs) and prints the accuracy with its 95% interval, instead of attacking.

Example::

    advdefense evaluate --checkpoint runs/pgd_at/last.pt --eps 0.3 --eps-sweep 0.1,0.2,0.3 \\
        --protocols fresh,paper,fixed --n 500 --output runs/pgd_at/eval
    advdefense evaluate --model my_models.py:Net --weights net.pt --dataset cifar10 \\
        --suite standard --n 1000 --save-adv adv.pt --output runs/net
    advdefense evaluate --model robustbench:wrn-28-10 --weights Carmon2019Unlabeled.pt \\
        --dataset cifar10 --suite standard
    advdefense evaluate --model other.py:Net --weights other.pt --dataset cifar10 --adv-file adv.pt
    torchrun --nproc_per_node=2 -m advdefense evaluate --checkpoint runs/pgd_at/last.pt ...

The examples are evaluated in units of ``--unit`` consecutive examples (default: the batch
size), each written to its own file under ``--units`` (default ``OUTPUT/units``), and merged
by index (:mod:`advdefense.evaluation.distributed`). Under ``torchrun`` the processes take
units from a counter in torchrun's store; the process that finishes the last unit runs the
failure checks on the merged results and writes the report. The results do not depend on the
number of processes; running the same command again computes only the missing units (after a
lost process or node) and writes the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import time
from pathlib import Path
from typing import Any

from ..errors import AdvDefenseError, CheckpointError

#: ``--suite`` choices (:data:`advdefense.evaluation.suite.SUITES`, named here so that the
#: parser is built without importing torch)
SUITE_NAMES = ("fast", "rand-fast", "standard", "rand", "full")

MNIST_LIKE = ("mnist", "mnist5k", "digits")


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}") from None
    return values


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({exc})") \
            from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"width\": 2}}', "
                                         f"got {text!r}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser, *, dataset: bool = True) -> None:
    """The model options shared by evaluate, certify and analyze (one of --checkpoint or
    --model; see :mod:`advdefense.loading`)."""
    group = parser.add_argument_group("model (one of --checkpoint or --model)")
    group.add_argument("--checkpoint", default=None, help="checkpoint written by train")
    group.add_argument("--model", default=None,
                       help="pkg.module:factory, path/to/file.py:factory, robustbench:ARCH "
                            "(wrn-28-10, wrn-34-10, resnet-18, ...), a TorchScript or "
                            "torch.export (.pt2) file, or an advdefense checkpoint")
    group.add_argument("--model-args", type=_json_object, default=None,
                       help="JSON keyword arguments of the factory, e.g. '{\"width\": 2}'")
    group.add_argument("--weights", default=None,
                       help="state dict file for --model (read with weights_only=True; "
                            "module./model. prefixes and state_dict/model nesting are undone)")
    group.add_argument("--mean", type=_floats, default=None,
                       help="per-channel mean the model expects, e.g. 0.4914,0.4822,0.4465 "
                            "(inputs stay in [0,1]; normalization is put in front)")
    group.add_argument("--std", type=_floats, default=None, help="per-channel std (see --mean)")
    if dataset:
        group.add_argument("--dataset", default=None,
                           help="data to evaluate on (default: the checkpoint's; needed with "
                                "--model)")
    group.add_argument("--data-root", default=None,
                       help="folder of torchvision datasets (default: the checkpoint's, else data)")
    group.add_argument("--device", default=None,
                       help="cpu, cuda, cuda:N (default: cuda:LOCAL_RANK when CUDA is "
                            "available, else cpu)")


def open_from_args(args: argparse.Namespace, device=None):
    """The :class:`~advdefense.loading.LoadedModel` of the model options (one clear line on
    any problem)."""
    from ..loading import open_model

    if args.checkpoint is None and args.model is None:
        raise AdvDefenseError("give --checkpoint FILE (advdefense train) or --model SPEC "
                              "(pkg.module:factory, file.py:factory, robustbench:ARCH, ...)")
    if args.checkpoint is not None and args.model is not None:
        raise AdvDefenseError("give --checkpoint or --model, not both")
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        raise CheckpointError(f"checkpoint {args.checkpoint} not found; pass the .pt file "
                              "written by `advdefense train`")
    return open_model(args.model, checkpoint=args.checkpoint, weights=args.weights,
                      model_args=args.model_args, mean=args.mean, std=args.std,
                      device=args.device if device is None else device)


def model_label(args: argparse.Namespace) -> str:
    """The model as given on the command line, relative to the working folder."""
    from ..provenance import relative_path

    label = str(args.checkpoint if args.checkpoint is not None else args.model)
    return relative_path(label) if ":" not in label else label


def default_output(args: argparse.Namespace, folder: str, loaded=None) -> Path:
    """``<checkpoint folder>/<folder>`` or ``runs/<folder>_<model name>``."""
    if args.checkpoint is not None:
        return Path(args.checkpoint).parent / folder
    if loaded is not None and loaded.kind == "checkpoint":
        return Path(str(args.model)).parent / folder
    stem = re.sub(r"[^0-9A-Za-z_.-]+", "_", Path(str(args.model)).name.replace(":", "_"))
    return Path("runs") / f"{folder}_{stem.strip('_.') or 'model'}"


def resolve_dataset(args: argparse.Namespace, loaded, fallback: str | None = None
                    ) -> tuple[str, str]:
    """``(dataset, where it came from)``: --dataset, the checkpoint's config, or ``fallback``
    (e.g. the dataset of an adversarial-example file)."""
    from ..data import dataset_info

    if getattr(args, "dataset", None):
        dataset_info(args.dataset)
        return args.dataset, "command line"
    if loaded.dataset is not None:
        return loaded.dataset, "checkpoint config"
    if fallback is not None:
        return fallback, "adversarial-example file"
    raise AdvDefenseError("--model needs --dataset NAME (the data to evaluate on: mnist5k, "
                          "digits, mnist, cifar10, cifar100, svhn)")


def data_root(args: argparse.Namespace, loaded) -> str:
    if args.data_root is not None:
        return args.data_root
    return getattr(loaded.config.data, "root", "data") if loaded.config is not None else "data"


def dataset_default_eps(dataset: str, norm: str) -> float:
    """The usual budget of a dataset: L-inf 0.3 (MNIST-like) or 8/255; L2 2.0 or 0.5."""
    mnist = dataset in MNIST_LIKE
    if norm == "linf":
        return 0.3 if mnist else 8 / 255
    return 2.0 if mnist else 0.5


def resolve_budget(eps: float | None, norm: str | None, cfg, dataset: str
                   ) -> tuple[float, str, dict[str, str]]:
    """``(eps, norm, sources)``: the command line wins; then the checkpoint's config
    (``eval.eps``/``eval.norm``, else ``train.attack`` of an adversarial recipe); then the
    dataset's default. ``sources`` = ``{"eps_source": ..., "norm_source": ...}`` with values
    ``command line``, ``checkpoint config`` or ``dataset default``."""
    from_cfg: dict[str, Any] = {}
    if cfg is not None:
        ev = getattr(cfg, "eval", None)
        if cfg.train.recipe != "standard":
            from_cfg = {"eps": cfg.train.attack.eps, "norm": cfg.train.attack.norm}
        from_cfg.update({k: getattr(ev, k) for k in ("eps", "norm")
                         if getattr(ev, k, None) is not None})
    sources = {}
    if norm is not None:
        sources["norm_source"] = "command line"
    elif "norm" in from_cfg:
        norm, sources["norm_source"] = str(from_cfg["norm"]), "checkpoint config"
    else:
        norm, sources["norm_source"] = "linf", "dataset default"
    if norm not in ("linf", "l2"):
        raise AdvDefenseError(f"unknown norm {norm!r}; choose linf or l2")
    if eps is not None:
        sources["eps_source"] = "command line"
    elif "eps" in from_cfg and (sources["norm_source"] != "command line"
                                 or norm == from_cfg.get("norm")):
        eps, sources["eps_source"] = float(from_cfg["eps"]), "checkpoint config"
    else:
        eps, sources["eps_source"] = dataset_default_eps(dataset, norm), "dataset default"
    return float(eps), norm, sources


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--attacks", type=_names, default=None,
                        help="comma-separated registry names (default: fgsm,pgd,cw[,apgd-ce])")
    parser.add_argument("--eps", type=float, default=None,
                        help="attack radius (default: the checkpoint's, else the dataset's: "
                             "0.3 MNIST-like, 8/255 CIFAR/SVHN for linf; 2.0 / 0.5 for l2)")
    parser.add_argument("--eps-sweep", type=_floats, default=None,
                        help="comma-separated radii for the accuracy-vs-eps curve")
    parser.add_argument("--suite", choices=SUITE_NAMES, default=None,
                        help="run an AutoAttack-style cascade instead of --attacks: fast (a "
                             "quick first look; rand-fast on a random model), standard, rand, "
                             "full (before publishing a number, or when a check fails)")
    parser.add_argument("--norm", choices=("linf", "l2"), default=None,
                        help="threat model (default: the checkpoint's, else linf)")
    parser.add_argument("--protocols", type=_names, default=None,
                        help="fresh,paper,fixed (stochastic models; default fresh)")
    parser.add_argument("--steps", type=int, default=None, help="PGD/CW iterations (default 20)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="stochastic predictions per verdict (default 10)")
    parser.add_argument("--eot", type=int, default=None,
                        help="EOT samples (default: 20 for stochastic models, else 1)")
    parser.add_argument("--n", "--examples", dest="n", type=int, default=None,
                        help="number of test examples (default 1000; --examples under "
                             "torchrun, whose own options make --n ambiguous)")
    parser.add_argument("--split", default=None, help="data split (default test)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 250")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="evaluation config (YAML: an `eval:` section, or its keys): "
                             "every option not given here; default: the checkpoint's eval "
                             "section. The resolved section is written to eval_config.yaml")
    parser.add_argument("--output", default=None,
                        help="output folder (default: <checkpoint folder>/eval, or "
                             "runs/eval_<model> for --model)")
    parser.add_argument("--unit", type=int, default=None, metavar="N",
                        help="examples per unit of work (default: --batch-size); units are "
                             "handed out to the processes and seeded by their examples, so "
                             "the results do not depend on the number of processes")
    parser.add_argument("--units", "--state", dest="units", default=None, metavar="DIR",
                        help="folder of the per-unit result files (default: OUTPUT/units); "
                             "run the same command again to compute the missing units")
    parser.add_argument("--save-adv", default=None, metavar="FILE",
                        help="write the worst-case adversarial input of every example to FILE "
                             "(.pt, loadable with weights_only=True)")
    parser.add_argument("--adv-file", default=None, metavar="FILE",
                        help="re-check the adversarial examples of FILE (--save-adv) on this "
                             "model instead of attacking: transfer / re-verification")
    parser.add_argument("--seed", type=int, default=None, help="default 0")
    parser.add_argument("--max-batch", type=int, default=None,
                        help="rows per forward/backward pass, a memory budget (default: from "
                             "the free GPU memory, 4096 on CPU); an out-of-memory pass is "
                             "halved and retried")
    parser.add_argument("--attack-precision", choices=("fp32", "bf16"), default=None,
                        help="bf16: attacks under bf16 autocast (faster on CPUs with "
                             "avx512_bf16 and on GPUs), verdicts in fp32 (default fp32)")
    parser.add_argument("--no-checks", action="store_true", help="skip the failure checks")
    parser.add_argument("--no-check-probes", action="store_true",
                        help="skip the checks that run attacks of their own (unbounded "
                             "attack, eps sweep, more iterations); the others still run")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


EVAL_OPTIONS = ("eps", "norm", "attacks", "eps_sweep", "suite", "protocols", "steps",
                "repeats", "eot", "n", "split", "batch_size", "seed", "attack_precision")


def read_eval_config(path: str):
    """The :class:`~advdefense.config.EvalConfig` of a YAML file (an ``eval:`` section, a
    whole experiment config, or the section's keys alone)."""
    import yaml

    from ..config import EvalConfig, _build
    from ..errors import ConfigError

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"evaluation config {path} not found") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"evaluation config {path} is unreadable: "
                          f"{' '.join(str(exc).split())}") from None
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"evaluation config {path} must be a mapping")
    if "eval" in raw:
        raw = raw["eval"] or {}
    return _build(EvalConfig, raw, "eval")


def resolve_eval_options(args: argparse.Namespace, cfg) -> tuple[Any, dict[str, str]]:
    """Fill every evaluation option not given on the command line from ``--config``, else the
    checkpoint's ``eval`` section, else the defaults. Returns the resolved
    :class:`~advdefense.config.EvalConfig` and, for eps and norm, where a value set there came
    from (eps/norm left unset are resolved later from the training attack or the dataset)."""
    import dataclasses

    from ..config import EvalConfig

    if args.config is not None:
        base, where = read_eval_config(args.config), "evaluation config"
    else:
        base, where = getattr(cfg, "eval", None) or EvalConfig(), "checkpoint config"
    values = dataclasses.asdict(base)
    sources: dict[str, str] = {}
    for key in EVAL_OPTIONS:
        given = getattr(args, key, None)
        if given is not None:
            values[key] = given
            continue
        value = values[key]
        if key in ("attacks", "eps_sweep") and not value:
            value = None                      # the command's own default set
        setattr(args, key, value)
        if key in ("eps", "norm") and value is not None:
            sources[f"{key}_source"] = where
    if not values["checks"]:
        args.no_checks = True
    values["checks"] = not args.no_checks
    return EvalConfig(**values), sources


def _validate(args: argparse.Namespace) -> None:
    from ..attacks import ATTACKS
    from ..errors import unknown_name
    from ..evaluation.protocols import check_protocol

    for e in (args.eps_sweep or []) + ([args.eps] if args.eps is not None else []):
        if not math.isfinite(e) or e < 0:
            raise AdvDefenseError(f"eps must be a finite number >= 0, got {e}")
    for p in args.protocols or []:
        check_protocol(p)
    for name in args.attacks or []:
        if name not in ATTACKS:
            raise unknown_name("attack", name, ATTACKS)
    for key in ("repeats", "n", "batch_size", "steps", "unit"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise AdvDefenseError(f"--{key.replace('_', '-')} must be >= 1")
    if getattr(args, "max_batch", None) is not None and args.max_batch < 1:
        raise AdvDefenseError("--max-batch must be >= 1")
    if args.eot is not None and args.eot < 1:
        raise AdvDefenseError("--eot must be >= 1")
    if args.adv_file is not None and args.save_adv is not None:
        raise AdvDefenseError("--adv-file re-checks saved examples; it cannot be combined "
                              "with --save-adv")
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        raise CheckpointError(f"checkpoint {args.checkpoint} not found; pass the .pt file "
                              "written by `advdefense train`")


def _specs(args, eps: float, norm: str, eot: int, max_batch: int):
    from ..attacks import build_attack
    from ..evaluation import AttackSpec, standard_attack_specs

    if not args.attacks:
        return standard_attack_specs(eps, norm=norm, steps=args.steps, eot_samples=eot,
                                     seed=args.seed, protocols=tuple(args.protocols),
                                     max_batch=max_batch)
    specs = []
    for name in args.attacks:
        kw = dict(eps=eps, norm=norm, eot_samples=eot, seed=args.seed, max_batch=max_batch)
        if name in ("pgd", "cw"):
            kw.update(steps=args.steps, step_size=eps / 4)
        try:
            attack = build_attack(name, **kw)
        except TypeError as exc:
            raise AdvDefenseError(f"attack {name!r} cannot be built from the CLI: {exc}") from None
        specs += [AttackSpec(name, attack, p) for p in args.protocols]
    return specs


def _recheck(args, loaded, device) -> int:
    """``--adv-file``: classify saved adversarial examples again on this model."""
    import torch

    from ..advfile import check_matches, load_adversarial, recheck
    from ..atomic import atomic_write_json
    from ..data import as_tensors, load_split
    from ..errors import DataError
    from ..evaluation.harness import prepare_model
    from ..evaluation.stats import accuracy
    from ..loading import check_logits
    from ..randomness import is_stochastic

    adv = load_adversarial(args.adv_file)
    dataset, _ = resolve_dataset(args, loaded, fallback=adv["dataset"])
    check_matches(adv, dataset=dataset)
    x_adv, y = adv["x_adv"], adv["y"]
    n_classes = check_logits(loaded.model, x_adv[:2].to(device), what=f"the {dataset} file")
    # the randomness probe of every evaluation: undeclared randomness is wrapped, so that the
    # verdicts below repeat real draws (recheck probes again; a wrapped model stays as it is)
    model, randomness = prepare_model(loaded.model, x_adv[:8].to(device))
    if int(y.max()) >= n_classes:
        raise AdvDefenseError(f"the file has label {int(y.max())} but the model returns "
                              f"{n_classes} classes; the file is for other data")
    clean = None
    try:
        ds = load_split(dataset, adv["split"], root=data_root(args, loaded))
        idx = adv["indices"]
        if int(idx.max()) >= len(ds):  # type: ignore[arg-type]
            raise AdvDefenseError(f"the file refers to example {int(idx.max())} of {dataset}/"
                                  f"{adv['split']}, which has {len(ds)}; it is for other data")
        xs, ys = as_tensors(torch.utils.data.Subset(ds, idx.tolist()))
        distance = check_matches(adv, dataset=dataset, x_clean=xs, y_clean=ys)
        clean = recheck(model, xs, ys, repeats=args.repeats,
                        batch_size=args.batch_size, seed=args.seed)
    except DataError as exc:
        distance = None
        print(f"note: clean {dataset} data not available ({exc}); the perturbation size and "
              "labels are not re-checked")
    verdict = recheck(model, x_adv, y, repeats=args.repeats,
                      batch_size=args.batch_size, seed=args.seed)
    acc = accuracy(verdict.all)
    stochastic = is_stochastic(model)
    name = model_label(args)
    broke = sorted({s for s in adv["source"] if s != "clean"})
    print(f"{len(y)} adversarial examples from {args.adv_file} ({adv['dataset']}/"
          f"{adv['split']}, {adv['norm']} eps={adv['eps']:g}, made on {adv['model'] or '?'}"
          f"{'; attacks kept: ' + ', '.join(broke) if broke else ''})")
    if distance is not None:
        print(f"largest perturbation {distance:.4g} ({adv['norm']}) <= eps {adv['eps']:g}")
    if clean is not None:
        print(f"{name}: clean accuracy {accuracy(clean.all)}")
    what = f"all {args.repeats} stochastic predictions correct" if stochastic else "one prediction"
    print(f"{name}: accuracy on the adversarial examples {acc} ({what})")
    if args.output is not None:
        payload = {"adv_file": str(args.adv_file), "model": name,
                   "model_source": loaded.source, "dataset": dataset, "split": adv["split"],
                   "eps": adv["eps"], "norm": adv["norm"], "made_on": adv["model"],
                   "n": len(y), "stochastic": stochastic, "randomness": randomness,
                   "repeats": args.repeats if stochastic else 1, "max_perturbation": distance,
                   "accuracy": acc.as_dict(), "majority": accuracy(verdict.majority).as_dict(),
                   "clean": None if clean is None else accuracy(clean.all).as_dict(),
                   "per_example_correct": verdict.all.tolist()}
        path = atomic_write_json(Path(args.output) / "adv_check.json", payload)
        print(f"wrote {path}")
    return 0


def _settings(args, eps_list, specs, eps: float, norm: str, eot: int) -> dict[str, Any]:
    """Every option that shapes the per-example results (the units' fingerprint; not the
    memory settings, which may differ between processes)."""
    from ..evaluation.harness import attack_identity

    return {"suite": args.suite, "eps": eps, "norm": norm, "eps_list": eps_list,
            "eot": eot, "repeats": args.repeats, "seed": args.seed,
            "batch_size": args.batch_size, "attack_precision": args.attack_precision,
            "save_adv": args.save_adv is not None,
            "specs": None if specs is None else {
                f"{e!r}": [(s.label, s.protocol, attack_identity(s.attack)) for s in sp]
                for e, sp in specs.items()}}


def run(args: argparse.Namespace) -> int:
    _validate(args)
    import torch

    from .. import distributed as D
    from ..data import dataset_info, load_split
    from ..evaluation import evaluate, format_checks, run_checks
    from ..evaluation.checks import CheckSettings, MonotoneSettings
    from ..evaluation.distributed import evaluate_units
    from ..evaluation.harness import default_max_batch, load_data, prepare_model
    from ..evaluation.report import robustbench_fields, to_markdown, write_report
    from ..evaluation.suite import run_suite
    from ..loading import check_logits, default_device
    from ..provenance import relative_path, relative_value
    from ..randomness import is_stochastic

    D.use_local_device()
    rank, world = D.env_rank(), D.env_world_size()
    device = args.device if args.device is not None else default_device()
    loaded = open_from_args(args, device=device)
    model, cfg = loaded.model, loaded.config
    eval_cfg, eval_sources = resolve_eval_options(args, cfg)
    _validate(args)
    if args.adv_file is not None:
        return _recheck(args, loaded, next((p.device for p in model.parameters()),
                                           torch.device("cpu"))) if rank == 0 else 0
    dataset, dataset_source = resolve_dataset(args, loaded)
    info = dataset_info(dataset)
    eps, norm, sources = resolve_budget(args.eps, args.norm, cfg, dataset)
    sources.update(eval_sources)
    eval_cfg.eps, eval_cfg.norm = eps, norm
    eps_list = [eps] if args.suite else sorted(set((args.eps_sweep or []) + [eps]))
    data = load_split(dataset, args.split, root=data_root(args, loaded), limit=args.n)
    x_all, y_all = load_data(data, args.n)
    n_total = x_all.shape[0]
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    check_logits(model, x_all[:2].to(dev), num_classes=info.num_classes,
                 what=f"{dataset} images")
    model, _ = prepare_model(model, x_all[:8].to(dev))  # undeclared randomness: wrapped
    stochastic = is_stochastic(model)
    max_batch = args.max_batch or default_max_batch(model, x_all[:16].to(dev))
    eot = args.eot if args.eot is not None else (20 if stochastic else 1)
    out = Path(args.output) if args.output else default_output(args, "eval", loaded)
    units_dir = Path(args.units) if args.units else out / "units"
    unit = args.unit or args.batch_size
    progress = not args.no_progress and rank == 0
    checks = None if args.no_checks else CheckSettings(seed=args.seed,
                                                       probes=not args.no_check_probes)
    save = args.save_adv is not None
    specs = None if args.suite else {e: _specs(args, e, norm, eot, max_batch)
                                     for e in eps_list}

    def run_unit(x, y, first, state_path):
        """Every attack (or the whole suite) at every eps on one unit of examples; a unit
        resumes from its state file (not with --save-adv: kept inputs are not saved there)."""
        if save:
            state_path = None
        common = dict(repeats=args.repeats, batch_size=args.batch_size, seed=args.seed,
                      checks=None, index_offset=first, max_batch=max_batch,
                      attack_precision=args.attack_precision)
        if args.suite:
            return {f"{eps!r}": run_suite(model, (x, y), suite=args.suite, norm=norm, eps=eps,
                                          eot_samples=eot, keep_adv=save,
                                          state_path=state_path, **common)}
        states = {e: None if state_path is None else
                  state_path.with_name(f"{state_path.stem}.eps{e:g}.json") for e in eps_list}
        out = {f"{e!r}": evaluate(model, (x, y), specs[e], keep_adv=save and e == eps,
                                  state_path=states[e], **common) for e in eps_list}
        for path in states.values():
            if path is not None:
                path.unlink(missing_ok=True)
        return out

    merged, job = evaluate_units(
        model, (x_all, y_all), run_unit, unit=unit, folder=units_dir,
        settings=_settings(args, eps_list, specs, eps, norm, eot),
        progress=progress)
    if merged is None:  # the process that finishes the last unit writes the report
        return 0
    sweep = {e: merged[f"{e!r}"] for e in eps_list}
    result = sweep[eps]
    if args.suite:
        result.config["suite"] = args.suite
        sweep = None
    if checks is not None:
        if sweep is not None:
            accs = (tuple((e, r.accuracy("worst").value) for e, r in sweep.items())
                    if len(sweep) > 2 else None)
            checks = checks.with_(eps=eps, norm=norm, monotone=MonotoneSettings(accuracies=accs))
        t_checks = time.perf_counter()
        result.checks = run_checks(model, (x_all, y_all), result, checks)
        result.config["checks_seconds"] = time.perf_counter() - t_checks
    name = relative_path(model_label(args))
    rb = robustbench_fields(result, dataset=dataset, eps=eps, norm=norm, model=name)
    extra = {"checkpoint": args.checkpoint and relative_path(args.checkpoint),
             "model": relative_value(loaded.source), "dataset": dataset,
             "dataset_source": dataset_source, "split": args.split, "eps": eps,
             "norm": norm, **sources, "processes": world,
             "units": {"size": unit, "count": len(job), "folder": relative_path(job.folder)},
             "robustbench": rb, "eval_config": dataclasses.asdict(eval_cfg),
             "command": {k: relative_value(v) for k, v in vars(args).items()
                         if not k.startswith("_")}}
    title = f"Evaluation of {name}"
    if save:
        from ..advfile import save_adversarial

        save_adversarial(args.save_adv, x_adv=result.adv, y=result.labels,
                         source=[str(s) for s in result.adv_source],
                         indices=torch.arange(n_total), dataset=dataset, split=args.split,
                         eps=eps, norm=norm, model=name)
        extra["adversarial_examples"] = relative_path(args.save_adv)
    paths = write_report(result, out, sweep=sweep, extra=extra, title=title)
    import yaml

    from ..atomic import atomic_write_text

    paths["eval_config"] = atomic_write_text(
        out / "eval_config.yaml", yaml.safe_dump({"eval": dataclasses.asdict(eval_cfg)},
                                                 sort_keys=False))
    print(f"eps {eps:g} ({sources['eps_source']}), norm {norm} ({sources['norm_source']}), "
          f"{dataset} ({dataset_source})")
    print(to_markdown(result, title=title, sweep=sweep))
    if result.checks:
        print(format_checks(result.checks))
    written = [str(p) for p in paths.values()]
    if save:
        written.append(str(args.save_adv))
    print(f"wrote {', '.join(written)}")
    return 0
