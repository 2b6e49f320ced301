"""Experiment configuration: YAML -> typed dataclasses (DESIGN.md, contract 6).

A config file has the sections ``name, seed, output_dir, data, model, defense, train, eval``::

    name: pgd_at_mnist5k
    seed: 0
    data: {name: mnist5k, batch_size: 100}
    model: {name: smallcnn, norm: bn}
    defense: {}                      # {rna|noise|cas: options}, validated by each defense
    train:
      recipe: pgd_at
      epochs: 8
      optimizer: {name: adam, lr: 0.001}
      attack: {eps: 0.3, steps: 10, step_size: 0.075}
    eval: {eps: 0.3, suite: rand}     # EvalConfig: what `advdefense evaluate` runs by default

Unknown keys are errors that list the valid keys; values are type-checked (an int is accepted
where a float is expected). ``load_config(path, ["train.epochs=3", "data.limit=500"])`` applies
``--set`` style overrides (values parsed with ``yaml.safe_load``) before validation.
``defense``, ``model.kwargs`` and ``train.recipe_args`` are free-form mappings,
validated by the component that consumes them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import AdvDefenseError, ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "DataConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ScheduleConfig",
    "AttackConfig",
    "MonitorAttackConfig",
    "EarlyStoppingConfig",
    "TrainConfig",
    "ExperimentConfig",
    "load_config",
    "config_from_dict",
    "apply_overrides",
    "to_dict",
    "save_config",
    "build_from_config",
]


@dataclass
class DataConfig:
    """Which data to train on and how to batch it.

    ``batch_size`` is the *global* batch: with ``N`` processes each one gets ``batch_size / N``.
    ``monitor_size`` examples of ``monitor_split`` are used for the per-epoch clean/PGD
    accuracy (0 disables the monitor); keep the monitor split out of ``train_split`` (train on
    ``fit`` and monitor on ``val``, or monitor on ``test``). ``limit`` keeps the first examples
    of the training split. Loader options (``null`` = automatic, see
    :func:`advdefense.data.loader_options`): ``num_workers`` (CIFAR/SVHN/MNIST: up to 8 worker
    processes; in-memory datasets: 0), ``pin_memory`` (on for CUDA), ``persistent_workers``
    (on with workers, off under ``train.deterministic``).
    """

    name: str = "mnist5k"
    root: str = "data"
    download: bool = False
    train_split: str = "train"
    monitor_split: str = "test"
    monitor_size: int = 500
    batch_size: int = 100
    augment: bool = False
    limit: int | None = None
    num_workers: int | None = None
    pin_memory: bool | None = None
    persistent_workers: bool | None = None

    def validate(self, where: str) -> None:
        from .data import INFO, SPLITS

        _choice(f"{where}.name", self.name, INFO)
        _choice(f"{where}.train_split", self.train_split, SPLITS)
        _choice(f"{where}.monitor_split", self.monitor_split, SPLITS)
        _at_least(f"{where}.batch_size", self.batch_size, 1)
        _at_least(f"{where}.monitor_size", self.monitor_size, 0)
        if self.num_workers is not None:
            _at_least(f"{where}.num_workers", self.num_workers, 0)
        if self.limit is not None:
            _at_least(f"{where}.limit", self.limit, 1)


@dataclass
class ModelConfig:
    """A registered model (``advdefense.models.MODELS``), its norm layer and extra kwargs."""

    name: str = "smallcnn"
    norm: str = "bn"
    kwargs: dict = field(default_factory=dict)

    def validate(self, where: str) -> None:
        from .models import MODELS

        _choice(f"{where}.name", self.name, MODELS)
        _choice(f"{where}.norm", self.norm, ("bn", "in", "ln", "gn"))


@dataclass
class OptimizerConfig:
    """``sgd`` (momentum, nesterov) or ``adam``; parameters marked ``_no_weight_decay`` get none."""

    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    noise_lr_scale: float = 1.0  # lr multiplier of PNI/CNI noise parameters

    def validate(self, where: str) -> None:
        _choice(f"{where}.name", self.name, ("sgd", "adam"))
        _positive(f"{where}.lr", self.lr)
        _positive(f"{where}.noise_lr_scale", self.noise_lr_scale)
        _at_least(f"{where}.momentum", self.momentum, 0.0)
        _at_least(f"{where}.weight_decay", self.weight_decay, 0.0)
        if self.nesterov and (self.name != "sgd" or self.momentum <= 0):
            raise ConfigError(f"{where}.nesterov needs name: sgd and momentum > 0")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: ``none``, ``step``, ``cosine`` (stepped at the end of every
    epoch) or ``plateau``: multiply the learning rate by ``gamma`` each time the early-stopping
    rule sees ``patience`` epochs without improvement, at most ``decays`` times; the run stops
    at the first plateau after the last decay (needs ``train.early_stopping``)."""

    name: str = "none"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    decays: int = 2

    def validate(self, where: str) -> None:
        _choice(f"{where}.name", self.name, ("none", "step", "cosine", "plateau"))
        _positive(f"{where}.gamma", self.gamma)
        _at_least(f"{where}.decays", self.decays, 0)
        if any(m < 1 for m in self.milestones) or list(self.milestones) != sorted(self.milestones):
            raise ConfigError(f"{where}.milestones must be increasing epochs >= 1, "
                              f"got {self.milestones}")


@dataclass
class AttackConfig:
    """The training recipe's inner maximization (PGD-style), in [0, 1] pixel units.

    ``step_size: null`` means ``eps / 4``. ``eot_samples > 1`` averages the loss over that many
    draws of the model's randomness (EPGD fine-tuning).
    """

    eps: float = 8 / 255
    steps: int = 10
    step_size: float | None = None
    norm: str = "linf"
    eot_samples: int = 1
    random_start: bool = True

    def validate(self, where: str) -> None:
        _at_least(f"{where}.eps", self.eps, 0.0)
        _at_least(f"{where}.steps", self.steps, 1)
        if self.step_size is not None:
            _positive(f"{where}.step_size", self.step_size)
        _choice(f"{where}.norm", self.norm, ("linf", "l2"))
        _at_least(f"{where}.eot_samples", self.eot_samples, 1)

    def resolved_step_size(self) -> float:
        return self.eps / 4 if self.step_size is None else float(self.step_size)


@dataclass
class MonitorAttackConfig:
    """PGD used for the per-epoch robust accuracy on the monitor split.

    ``eps: null`` takes ``train.attack.eps``; ``step_size: null`` means ``eps / 4``;
    ``steps: 0`` skips the robust monitor (clean accuracy only).
    """

    eps: float | None = None
    steps: int = 10
    step_size: float | None = None

    def validate(self, where: str) -> None:
        if self.eps is not None:
            _at_least(f"{where}.eps", self.eps, 0.0)
        _at_least(f"{where}.steps", self.steps, 0)
        if self.step_size is not None:
            _positive(f"{where}.step_size", self.step_size)


# The names of advdefense.training.recipes.RECIPES, kept here so that validating a config does
# not import the trainer (a lower layer never imports training); tests/test_layers.py checks
# that the two lists agree.
RECIPE_NAMES = ("standard", "pgd_at", "trades", "mart")


@dataclass
class EarlyStoppingConfig:
    """Stop training when the monitored accuracy stops rising (``train.early_stopping``).

    After every epoch the Trainer reads ``metric`` from its monitor (``monitor_pgd_acc``: the
    PGD accuracy of ``train.monitor_attack`` on the first ``data.monitor_size`` examples of
    ``data.monitor_split``; ``monitor_clean_acc``: their clean accuracy). An epoch *improves*
    when its value exceeds the best so far by more than ``min_delta``; training stops after
    ``patience`` epochs in a row without improvement, or at ``train.epochs`` (the cap). The
    checkpoint of the last improving epoch is kept as ``best.pt`` beside ``last.pt``. The rule
    is a function of the logged history (``advdefense.training.early_stopping``), so
    ``--resume`` stops exactly where an uninterrupted run would.
    """

    metric: str = "monitor_pgd_acc"
    patience: int = 2
    min_delta: float = 0.005

    def validate(self, where: str) -> None:
        _choice(f"{where}.metric", self.metric, ("monitor_pgd_acc", "monitor_clean_acc"))
        _at_least(f"{where}.patience", self.patience, 1)
        _at_least(f"{where}.min_delta", self.min_delta, 0.0)


@dataclass
class TrainConfig:
    """How to train: recipe + its arguments, epochs, optimizer, schedule and speed options.

    ``adv_start_epoch``: epochs before it use the ``standard`` recipe (PNI's ``epoch_delay``).
    ``amp``: ``null``, ``bf16`` (CPU or CUDA) or ``fp16`` (CUDA only, with a GradScaler).
    ``attack_precision``: how the recipe's inner maximization runs under ``amp``: ``fp32``
    (default; autocast is switched off around it, so fp16 input gradients cannot underflow) or
    ``amp`` (under the training autocast; ``bf16`` only, as fp16 gradients of the TRADES KL
    underflow to zero).
    ``channels_last``: ``auto`` (channels_last weights on the CPU for convolutional models,
    :mod:`advdefense.layout`), ``true`` (also on CUDA) or ``false``.
    ``compile``: ``false``, ``true`` (``torch.compile``, default backend) or a backend name
    (``inductor``, ``aot_eager``, ``eager``, ...); covers ``forward_with_aux`` too.
    ``sync_bn``: with several processes, BatchNorm uses statistics of the global batch
    (``nn.SyncBatchNorm``) and every process draws the same RNA path per step.
    ``deterministic``: ``true`` selects deterministic kernels (cuDNN autotuning off,
    ``torch.use_deterministic_algorithms`` with a warning for ops that have none,
    ``CUBLAS_WORKSPACE_CONFIG``) and non-persistent loader workers, so a resumed run reaches
    the weights of an uninterrupted one also on CUDA; ``strict`` raises instead of warning.
    ``grad_clip``: max global gradient L2 norm (``null`` = no clipping).
    ``init_from``: a checkpoint whose model weights initialise this run (fine-tuning, e.g. the
    smoothing paper's EPGD / Gaussian fine-tuning of a PGD-trained CNI-W model). Parameters
    present in both models are copied; new ones (e.g. added noise scales) keep their init.
    ``early_stopping``: ``null`` (train ``epochs`` epochs) or an :class:`EarlyStoppingConfig`
    (then ``epochs`` is the cap).
    """

    recipe: str = "standard"
    epochs: int = 10
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    recipe_args: dict = field(default_factory=dict)
    attack: AttackConfig = field(default_factory=AttackConfig)
    monitor_attack: MonitorAttackConfig = field(default_factory=MonitorAttackConfig)
    amp: str | None = None
    attack_precision: str = "fp32"
    channels_last: bool | str = "auto"
    compile: bool | str = False
    sync_bn: bool = False
    deterministic: bool | str = False
    grad_clip: float | None = None
    adv_start_epoch: int = 0
    init_from: str | None = None
    early_stopping: EarlyStoppingConfig | None = None

    def validate(self, where: str) -> None:
        _choice(f"{where}.recipe", self.recipe, RECIPE_NAMES)
        _at_least(f"{where}.epochs", self.epochs, 1)
        if self.amp is not None:
            _choice(f"{where}.amp", self.amp, ("bf16", "fp16"))
        _choice(f"{where}.attack_precision", self.attack_precision, ("fp32", "amp"))
        _choice(f"{where}.channels_last", self.channels_last, (True, False, "auto"))
        if self.attack_precision == "amp" and self.amp == "fp16":
            raise ConfigError(f"{where}.attack_precision=amp with amp=fp16: fp16 input "
                              "gradients of the inner attack underflow to zero; use fp32 or "
                              "amp=bf16")
        if isinstance(self.deterministic, str):
            _choice(f"{where}.deterministic", self.deterministic, (False, True, "strict"))
        if isinstance(self.compile, str) and not self.compile.strip():
            raise ConfigError(f"{where}.compile must be true, false or a backend name")
        if self.grad_clip is not None:
            _positive(f"{where}.grad_clip", self.grad_clip)
        _at_least(f"{where}.adv_start_epoch", self.adv_start_epoch, 0)
        if self.schedule.milestones and self.schedule.name != "step":
            raise ConfigError(f"{where}.schedule.milestones only apply to name: step")
        if self.schedule.name == "plateau" and self.early_stopping is None:
            raise ConfigError(f"{where}.schedule.name=plateau decays on the plateaus of "
                              f"{where}.early_stopping, which is not set")


@dataclass
class EvalConfig:
    """How an experiment's model is evaluated: ``advdefense evaluate`` takes every option it is
    not given on the command line from here (the checkpoint's ``eval`` section, or a file
    passed with ``--config``), and records the resolved section in its report, so an
    evaluation is reproduced from a file as training is. ``None`` means the command's own
    default (``eps``/``norm``: from the training attack, else the dataset's)."""

    eps: float | None = None
    norm: str | None = None
    attacks: list[str] = field(default_factory=list)   # registry names; empty: the demo set
    eps_sweep: list[float] = field(default_factory=list)
    suite: str | None = None                             # standard | rand | full
    protocols: list[str] = field(default_factory=lambda: ["fresh"])
    steps: int = 20
    repeats: int = 10
    eot: int | None = None                               # None: 20 if stochastic, else 1
    n: int = 1000
    split: str = "test"
    batch_size: int = 250
    seed: int = 0
    checks: bool = True
    attack_precision: str = "fp32"                       # fp32 | bf16 (advdefense.precision)

    def validate(self, where: str) -> None:
        _choice(f"{where}.attack_precision", self.attack_precision, ("fp32", "bf16"))
        if self.eps is not None and not (math.isfinite(self.eps) and self.eps >= 0):
            raise ConfigError(f"{where}.eps must be a finite number >= 0, got {self.eps}")
        if self.norm not in (None, "linf", "l2"):
            raise ConfigError(f"{where}.norm must be linf or l2, got {self.norm!r}")
        if self.suite not in (None, "standard", "rand", "full"):
            raise ConfigError(f"{where}.suite must be standard, rand or full, got "
                              f"{self.suite!r}")
        for p in self.protocols:
            if p not in ("fresh", "paper", "fixed"):
                raise ConfigError(f"{where}.protocols: unknown protocol {p!r}; choose fresh, "
                                  "paper or fixed")
        for key in ("steps", "repeats", "n", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{where}.{key} must be >= 1, got {getattr(self, key)}")
        if self.eot is not None and self.eot < 1:
            raise ConfigError(f"{where}.eot must be >= 1, got {self.eot}")


@dataclass
class ExperimentConfig:
    """A whole experiment. ``output_dir`` defaults to ``runs/<name>``."""

    name: str = "experiment"
    seed: int = 0
    output_dir: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    defense: dict = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.output_dir is None:
            self.output_dir = str(Path("runs") / self.name)

    def validate(self, where: str = "") -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"name must be a non-empty string without '/', got {self.name!r}")
        es = self.train.early_stopping
        if es is not None:
            if self.data.monitor_size < 1:
                raise ConfigError("train.early_stopping needs the monitor: set data.monitor_size "
                                  ">= 1")
            if es.metric == "monitor_pgd_acc" and self.train.monitor_attack.steps < 1:
                raise ConfigError("train.early_stopping.metric monitor_pgd_acc needs "
                                  "train.monitor_attack.steps >= 1")
            if self.data.monitor_split == "test":
                raise ConfigError("train.early_stopping selects epochs on data.monitor_split, "
                                  "which is test; use monitor_split: val (and train_split: fit)")


# --------------------------------------------------------------------------------------------
# validation helpers


def _choice(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not valid; choose one of: "
                          f"{', '.join(str(a) for a in allowed)}")


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{key} must be >= {low}, got {value}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key} must be > 0, got {value}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one YAML value against a (possibly optional/generic) annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        names = " or ".join(_type_name(a) for a in args if a is not type(None))
        raise ConfigError(f"{key} must be {names}" + (" or null" if type(None) in args else "")
                          + f", got {value!r}")
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if tp is dict or origin is dict:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if origin is list:
        (item,) = typing.get_args(tp)
        if value is None:
            return []
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")  # pragma: no cover


def _build(cls: type, raw: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            place = f"{where}." if where else ""
            raise ConfigError(f"unknown config key {place}{key}; valid keys"
                              f"{' of ' + where if where else ''}: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name in raw:
            kwargs[name] = _convert(raw[name], hints[name], f"{where}.{name}" if where else name)
    obj = cls(**kwargs)
    obj.validate(where)
    return obj


# --------------------------------------------------------------------------------------------
# public API


def config_from_dict(raw: Mapping[str, Any] | None) -> ExperimentConfig:
    """Validate a plain dict (parsed YAML) into an :class:`ExperimentConfig`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    return _build(ExperimentConfig, raw, "")


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides to a raw config dict (in place; also returned)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        path, text = item.split("=", 1)
        keys = [k.strip() for k in path.split(".")]
        if not all(keys):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({_first_line(exc)})"
                              ) from None
        node = raw
        for k in keys[:-1]:
            child = node.get(k)
            if not isinstance(child, dict):
                child = {}
                node[k] = child
            node = child
        node[keys[-1]] = value
    return raw


def _first_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML config, apply overrides and validate it.

    ``name`` defaults to the file's stem. Raises :class:`ConfigError` (one line) for a missing
    file, malformed YAML, unknown keys or invalid values.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass an existing YAML file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {_first_line(exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, "
                          f"got {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    apply_overrides(raw, overrides)
    try:
        return config_from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config as plain dicts/lists/scalars (YAML- and ``weights_only``-safe)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: ExperimentConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically) and return the path."""
    from .atomic import atomic_write_text

    return atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def build_from_config(cfg: ExperimentConfig):
    """Build the (defended) model a config describes; returns ``(model, dataset_info)``.

    The model is built with :func:`advdefense.models.build_model` for the dataset's shape and
    statistics, then :func:`advdefense.defenses.apply_defenses` applies ``cfg.defense``.
    A ``cas`` defense with ``train.recipe_args.aux_weight: 0`` is left out (the plain recipe on
    the plain network; :func:`advdefense.defenses.cas.disabled_by`).
    Parameter initialization draws from the global torch RNG (seed it first for reproducibility).
    """
    from .data import dataset_info
    from .defenses import apply_defenses
    from .models import build_model

    info = dataset_info(cfg.data.name)
    defense = cfg.defense
    if defense and defense.get("cas") is not None:
        from .defenses import cas

        if cas.disabled_by(cfg.train.recipe_args):
            # aux_weight 0 = the plain recipe on the plain network (no CAS site at all)
            opts = {} if defense["cas"] is True else defense["cas"]
            if not isinstance(opts, Mapping):
                raise ConfigError(f"defense.cas must be a mapping of options, got {opts!r}")
            cas.check_options(opts)
            log.info("train.recipe_args.aux_weight is 0: building the model without CAS")
            defense = {k: v for k, v in defense.items() if k != "cas"}
    try:
        model = build_model(cfg.model.name, num_classes=info.num_classes,
                            in_channels=info.in_channels, image_size=info.image_size,
                            mean=info.mean, std=info.std, norm=cfg.model.norm,
                            **cfg.model.kwargs)
    except TypeError as exc:
        raise ConfigError(f"model.kwargs {cfg.model.kwargs} rejected by {cfg.model.name}: "
                          f"{exc}") from None
    try:
        model = apply_defenses(model, defense, info)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, AdvDefenseError):
            raise
        raise ConfigError(f"defense {cfg.defense}: {exc}") from None
    return model, info
