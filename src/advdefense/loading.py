"""Load anyone's model: factories, plain state dicts, RobustBench checkpoints, TorchScript,
``torch.export`` archives and advdefense checkpoints, behind one call.

``load_model(spec, weights=..., model_args=..., mean=..., std=..., device=...)`` returns an
``nn.Module`` in eval mode on ``device`` that follows contract 1 (NCHW floats in [0, 1] in,
logits ``(N, classes)`` out). ``spec`` is one of:

``pkg.module:factory`` / ``path/to/file.py:factory``
    the model is ``factory(**model_args)``, imported from an importable module (the working
    folder is searched last) or from a ``.py`` file (its folder is put on ``sys.path`` so it
    can import its neighbours);
``robustbench:ARCH``
    a RobustBench-format checkpoint (``--weights``) for an architecture we have:
    ``wrn-28-10``, ``wrn-34-10``, ``wrn-34-20`` (any ``wrn-D-W`` of their TRADES-style
    WideResNet), ``resnet-18``, ``resnet-34``. Parameter names are mapped from their layout
    (``block1.layer.0.bn1`` -> ``stages.0.0.bn1``, ``bn1`` -> ``bn``, ``fc`` -> ``linear``,
    ``convShortcut`` -> ``shortcut``; ``layer1.0`` -> ``stages.0.0`` for ResNets); their
    CIFAR models take [0, 1] inputs without normalization, so the input normalization is the
    identity unless the checkpoint carries ``mu``/``sigma`` buffers or ``mean``/``std`` are
    given. The class count is read from the classifier's weights;
``FILE.pt2``
    a ``torch.export`` archive (``torch.export.load``); its module is wrapped so that
    ``eval()``/``train()`` only set flags (exported graphs are frozen in the mode they were
    exported in);
``FILE`` (any other suffix)
    a TorchScript archive (``torch.jit.load``) or an advdefense checkpoint (``advdefense
    train``'s ``last.pt``: the model is rebuilt from the config stored inside);
``zoo:<preset>/<entry>-s<seed>``
    a model of the zoo (:mod:`advdefense.zoo`, e.g. ``zoo:cifar10-jpeg/rna-s0``): its weights
    file, an advdefense checkpoint; also as ``checkpoint=``.

Weights (``weights=``) are read with ``torch.load(weights_only=True)`` (no pickled code runs):
a plain ``state_dict``, possibly nested under ``state_dict`` / ``model_state_dict`` /
``model`` / ``net`` keys, possibly with ``module.`` (DataParallel), ``_orig_mod.``
(``torch.compile``) or ``model.`` prefixes. A file that needs more than ``weights_only``
allows, weights that do not fit the model (missing / unexpected keys, shape mismatches) and a
factory that does not import each raise one :class:`~advdefense.errors.CheckpointError` /
:class:`~advdefense.errors.AdvDefenseError` line.

``mean``/``std`` wrap the model in :class:`NormalizedModel` (per-channel ``(x - mean) / std``
before the model), for models trained on normalized inputs. :func:`check_logits` probes a
model on a few real inputs and says in one line when its output is not ``(N, classes)``.

TorchScript and ``torch.export`` archives carry their own program (not arbitrary Python, but
code all the same): load only archives you trust.

Example::

    model = load_model("my_models.py:Net", weights="net.pt", model_args={"width": 2})
    model = load_model("robustbench:wrn-28-10", weights="Carmon2019Unlabeled.pt")
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import AdvDefenseError, CheckpointError

log = logging.getLogger(__name__)

__all__ = ["LoadedModel", "NormalizedModel", "ExportedModule", "ROBUSTBENCH_ARCHS",
           "check_logits", "default_device", "fit_state_dict", "load_model", "open_model",
           "read_state_dict", "resolve_device", "resolve_zoo_name", "robustbench_state_dict"]

ROBUSTBENCH_ARCHS = ("wrn-28-10", "wrn-34-10", "wrn-34-20", "wrn-D-W", "resnet-18", "resnet-34")
_NEST_KEYS = ("state_dict", "model_state_dict", "model", "net", "state")
_PREFIXES = ("module.", "_orig_mod.", "model.")
_SHOW = 3  # keys named per kind of misfit in an error line


# --------------------------------------------------------------------------------------------
# devices


def default_device() -> str:
    """``cuda:LOCAL_RANK`` when CUDA is available (``LOCAL_RANK`` from torchrun, else 0),
    otherwise ``cpu``."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0') or 0)}"
    return "cpu"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device`` (``None`` = :func:`default_device`); a CUDA device on
    a machine without CUDA is one clear error."""
    if device is None:
        device = default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise AdvDefenseError(f"unknown device {device!r} ({exc}); use cpu, cuda or "
                              "cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise AdvDefenseError(f"device {device} asked for, but CUDA is not available here; "
                                  "pass --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise AdvDefenseError(f"device {device} does not exist (this machine has "
                                  f"{torch.cuda.device_count()} CUDA devices)")
    return dev


# --------------------------------------------------------------------------------------------
# wrappers


class NormalizedModel(nn.Module):
    """``model((x - mean) / std)``: input normalization in front of a model that expects
    normalized inputs, so the whole takes [0, 1] pixels (contract 1)."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        from .models.layers import InputNormalization

        if any(float(s) <= 0 for s in std):
            raise AdvDefenseError(f"std values must be > 0, got {list(std)}")
        self.normalize = InputNormalization(list(mean), list(std))
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))

    def forward_with_aux(self, x: torch.Tensor, y: torch.Tensor | None = None):
        from .models.heads import forward_with_aux

        return forward_with_aux(self.model, self.normalize(x), y)


class ExportedModule(nn.Module):
    """A ``torch.export`` module: a graph frozen in the mode it was exported in. ``train()`` /
    ``eval()`` only set flags here (the exported module itself refuses them)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def train(self, mode: bool = True) -> ExportedModule:
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


# --------------------------------------------------------------------------------------------
# reading weights


def _torch_load(path: Path, map_location: Any, what: str) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{what} {path} not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        text = " ".join(str(exc).split())
        low = text.lower()
        if "global" in low:
            at = low.find("unsupported global")
            detail = (text[at:] if at >= 0 else text)[:120]
            raise CheckpointError(
                f"{what} {path} holds pickled Python objects that weights_only loading refuses "
                f"({detail}); if you trust it, re-save plain tensors: torch.save(torch.load(F, "
                "weights_only=False).state_dict(), 'weights.pt')") from None
        raise CheckpointError(f"{what} {path} is corrupt or not a torch file "
                              f"({text[:120]})") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for damaged files
        msg = " ".join(str(exc).split())[:120]
        raise CheckpointError(f"{what} {path} is corrupt or not a torch file ({msg})") from None


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _unnest(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    seen = []
    while isinstance(obj, Mapping) and not _is_tensor_dict(obj):
        if obj.get("format") == "advdefense-checkpoint" and "model" in obj:
            obj = obj["model"]
            continue
        key = next((k for k in _NEST_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            keys = ", ".join(str(k) for k in list(obj)[:8])
            raise CheckpointError(
                f"{path} holds no state dict of tensors (top-level keys: {keys or 'none'}"
                f"{', ...' if len(obj) > 8 else ''}); expected a state_dict, possibly under "
                f"one of: {', '.join(_NEST_KEYS)}")
        seen.append(key)
        obj = obj[key]
    if not _is_tensor_dict(obj):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict of "
                              "tensors; save model.state_dict()")
    if seen:
        log.info("weights %s: state dict found under %s", path, "/".join(seen))
    return dict(obj)


def _strip_prefixes(state: dict[str, torch.Tensor],
                    target_keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Drop ``module.`` / ``_orig_mod.`` / ``model.`` prefixes that every key carries (and the
    target's keys do not)."""
    changed = bool(state)
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in state) and not (
                    target_keys and all(k.startswith(prefix) for k in target_keys)):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def read_state_dict(path: str | os.PathLike, *, map_location: Any = "cpu",
                    target_keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """The state dict in a weights file (``weights_only`` load, unnested, prefixes dropped)."""
    path = Path(path)
    return _strip_prefixes(_unnest(_torch_load(path, map_location, "weights file"), path),
                           target_keys)


def _few(keys: Sequence[str]) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:_SHOW]) + (", ..." if len(keys) > _SHOW else "")


def _layout_hint(unexpected: Sequence[str]) -> str:
    if any(k.startswith("block1.layer.") for k in unexpected):
        return ("; it looks like a RobustBench WideResNet checkpoint: use --model "
                "robustbench:wrn-D-W")
    if any(re.match(r"layer\d\.\d+\.", k) for k in unexpected):
        return ("; it looks like a RobustBench ResNet checkpoint: use --model "
                "robustbench:resnet-18")
    return ""


def fit_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], *,
                   source: str = "weights") -> None:
    """Load ``state`` into ``model`` strictly, or raise one :class:`CheckpointError` line that
    names a few missing and unexpected keys and shape mismatches. BatchNorm's
    ``num_batches_tracked`` counters may be missing (older PyTorch did not save them)."""
    own = model.state_dict()
    state = dict(state)
    for k in own:
        if k not in state and k.endswith("num_batches_tracked"):
            state[k] = own[k]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_few(unexpected)})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape ({'; '.join(shapes[:_SHOW])}"
                         f"{'; ...' if len(shapes) > _SHOW else ''})")
        raise CheckpointError(f"{source} do not fit the model: keys {', '.join(parts)}"
                              f"{_layout_hint(unexpected)}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # e.g. dtype problems the checks above do not see
        msg = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"{source} do not fit the model ({msg})") from None


# --------------------------------------------------------------------------------------------
# RobustBench


def _parse_arch(arch: str) -> tuple[str, int, int]:
    a = arch.strip().lower().replace("_", "-")
    m = re.fullmatch(r"(?:wrn|wideresnet|wide-resnet)-?(\d+)-(\d+)", a)
    if m:
        depth, width = int(m.group(1)), int(m.group(2))
        if (depth - 4) % 6 or depth < 10 or width < 1:
            raise AdvDefenseError(f"WideResNet depth must be 6n+4 (>= 10) and width >= 1, got "
                                  f"{arch}")
        return "wrn", depth, width
    m = re.fullmatch(r"(?:resnet|rn)-?(18|34)", a)
    if m:
        return "resnet", int(m.group(1)), 1
    raise AdvDefenseError(f"unknown RobustBench architecture {arch!r}; choose one of: "
                          f"{', '.join(ROBUSTBENCH_ARCHS)} (their TRADES-style WideResNet or "
                          "ResNet; other RobustBench models: export them with torch.export)")


def _rb_key(family: str, key: str) -> str | None:
    """Our name for one RobustBench parameter name (``None``: drop it)."""
    if key == "mu":
        return "normalize.mean"
    if key == "sigma":
        return "normalize.std"
    if family == "wrn":
        if key.startswith("sub_block1."):  # defined but unused in their forward
            return None
        m = re.fullmatch(r"block(\d+)\.layer\.(\d+)\.(.+)", key)
        if m:
            rest = m.group(3).replace("convShortcut", "shortcut")
            return f"stages.{int(m.group(1)) - 1}.{m.group(2)}.{rest}"
        for theirs, ours in (("bn1.", "bn."), ("fc.", "linear.")):
            if key.startswith(theirs):
                return ours + key[len(theirs):]
        return key  # conv1.*
    m = re.fullmatch(r"layer(\d+)\.(\d+)\.(.+)", key)
    if m:
        return f"stages.{int(m.group(1)) - 1}.{m.group(2)}.{m.group(3)}"
    return key  # conv1.*, bn1.*, linear.*


def robustbench_state_dict(state: Mapping[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """A RobustBench-layout state dict renamed to our :class:`~advdefense.models.WideResNet`
    (``wrn-*``) or :class:`~advdefense.models.ResNet` (``resnet-*``) names.

    ``mu``/``sigma`` buffers become the input normalization; a classifier without bias
    (their ``bias_last=False``) gets a zero bias.
    """
    family, _, _ = _parse_arch(arch)
    out: dict[str, torch.Tensor] = {}
    for k, v in _strip_prefixes(dict(state)).items():
        new = _rb_key(family, k)
        if new is not None:
            out[new] = v.reshape(1, -1, 1, 1) if new.startswith("normalize.") else v
    if "linear.weight" in out and "linear.bias" not in out:
        out["linear.bias"] = torch.zeros(out["linear.weight"].shape[0],
                                         dtype=out["linear.weight"].dtype,
                                         device=out["linear.weight"].device)
    return out


def _build_robustbench(arch: str, state: dict[str, torch.Tensor], mean, std) -> nn.Module:
    from .models import ResNet, WideResNet

    family, depth, width = _parse_arch(arch)
    if "linear.weight" not in state:
        head = "fc" if family == "wrn" else "linear"
        raise CheckpointError(f"the weights have no classifier ({head}.weight) in RobustBench's "
                              f"{arch} layout; is it that architecture?")
    num_classes, in_channels = int(state["linear.weight"].shape[0]), 3
    if "conv1.weight" in state:
        in_channels = int(state["conv1.weight"].shape[1])
    user = mean is not None
    if user and "normalize.mean" in state:
        log.warning("the RobustBench checkpoint carries mu/sigma; --mean/--std replace them")
    mean = tuple(float(v) for v in mean) if user else (0.0,) * in_channels
    std = tuple(float(v) for v in std) if user else (1.0,) * in_channels
    kw = dict(num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)
    if family == "wrn":
        model: nn.Module = WideResNet(depth=depth, width=width, **kw)
    else:
        model = ResNet([2, 2, 2, 2] if depth == 18 else [3, 4, 6, 3], [64, 128, 256, 512], **kw)
    if user or "normalize.mean" not in state:  # their CIFAR models: [0, 1] inputs as they are
        own = model.state_dict()
        state["normalize.mean"] = own["normalize.mean"]
        state["normalize.std"] = own["normalize.std"]
    return model


# --------------------------------------------------------------------------------------------
# factories and archives


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise AdvDefenseError(f"model file {path} not found")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    name = f"advdefense_user_{re.sub(r'[^0-9a-zA-Z_]', '_', path.stem)}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)  # the file may import its neighbours
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise AdvDefenseError(f"cannot import {path} as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(name, None)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise AdvDefenseError(f"cannot import model file {path} ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:160]})") from None
    return module


def _import_module(name: str) -> Any:
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # the console script does not search the working folder
    try:
        return importlib.import_module(name)
    except BaseException as exc:
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise AdvDefenseError(
            f"cannot import module {name!r} for the model factory ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:160]}); check the name and PYTHONPATH, or pass "
            "path/to/file.py:factory") from None


def _call_factory(spec: str, model_args: Mapping[str, Any] | None) -> nn.Module:
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise AdvDefenseError(f"model {spec!r}: expected pkg.module:factory or file.py:factory")
    module = _import_file(Path(target)) if target.endswith(".py") else _import_module(target)
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            names = [n for n in dir(module) if not n.startswith("_")
                     and callable(getattr(module, n))]
            raise AdvDefenseError(f"{target} has no {attr!r}; callables there: "
                                  f"{', '.join(names[:10]) or 'none'}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise AdvDefenseError(f"{spec} is a {type(factory).__name__}, not a callable factory")
    try:
        model = factory(**dict(model_args or {}))
    except AdvDefenseError:
        raise
    except Exception as exc:  # noqa: BLE001 - user code
        raise AdvDefenseError(f"factory {spec}(**{json.dumps(dict(model_args or {}))}) failed "
                              f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]})") \
            from None
    if not isinstance(model, nn.Module):
        raise AdvDefenseError(f"factory {spec} returned a {type(model).__name__}, not a "
                              "torch.nn.Module")
    return model


def _archive_kind(path: Path) -> str:
    """``torchscript``, ``export``, ``pickle`` (a torch.save file) or ``unknown``."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return "unknown"
    if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
        return "torchscript"
    if any(n.endswith("models/model.json") or "serialized_exported_program" in n
           or n.endswith("archive_format") for n in names):
        return "export"
    if any(n.endswith("data.pkl") for n in names):
        return "pickle"
    return "unknown"


def _load_archive(path: Path, device: torch.device) -> tuple[nn.Module, str]:
    kind = "export" if path.suffix == ".pt2" else _archive_kind(path)
    if kind == "export":
        try:
            program = torch.export.load(str(path))
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{path} is not a readable torch.export archive ("
                                  f"{' '.join(str(exc).split())[:160]})") from None
        module = ExportedModule(program.module())
        try:
            module.to(device)
        except Exception as exc:  # noqa: BLE001
            raise AdvDefenseError(f"exported model {path} cannot move to {device} ({exc}); "
                                  "export it on that device") from None
        return module, "export"
    if kind == "torchscript":
        try:
            return torch.jit.load(str(path), map_location=device), "torchscript"
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{path} is not a readable TorchScript archive ("
                                  f"{' '.join(str(exc).split())[:160]})") from None
    raise CheckpointError(
        f"{path} is neither a TorchScript nor a torch.export archive nor an advdefense "
        "checkpoint; for a state dict pass --model pkg.module:factory (or file.py:factory, "
        "or robustbench:ARCH) with --weights FILE")


# --------------------------------------------------------------------------------------------
# the entry points


def resolve_zoo_name(name: str | os.PathLike) -> Path:
    """The weights file of a zoo entry ``zoo:<preset>/<entry>-s<seed>`` (under the zoo root of
    :func:`advdefense.zoo.default_root`); any other name is returned as a path."""
    text = str(name)
    if not text.startswith("zoo:"):
        return Path(text)
    from .zoo import resolve_name

    return resolve_name(text)


@dataclass
class LoadedModel:
    """A loaded model and where it came from.

    ``kind``: ``factory``, ``robustbench``, ``torchscript``, ``export`` or ``checkpoint``;
    ``config``: the :class:`~advdefense.config.ExperimentConfig` of an advdefense checkpoint
    (else ``None``); ``source``: JSON-ready description for reports.
    """

    model: nn.Module
    kind: str
    config: Any = None
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def dataset(self) -> str | None:
        return None if self.config is None else self.config.data.name


def _check_stats(mean, std) -> None:
    if (mean is None) != (std is None):
        raise AdvDefenseError("give both --mean and --std (or neither)")
    if mean is not None and len(mean) != len(std):
        raise AdvDefenseError(f"--mean has {len(mean)} values but --std {len(std)}")


def open_model(
    spec: str | os.PathLike | None = None,
    *,
    checkpoint: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    model_args: Mapping[str, Any] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    device: str | torch.device | None = "cpu",
) -> LoadedModel:
    """Load a model (see the module docstring) and describe where it came from.

    ``checkpoint`` is an advdefense checkpoint (the same as passing it as ``spec``).
    ``device=None`` picks :func:`default_device`. The model is in eval mode on ``device``.
    """
    dev = resolve_device(device)
    _check_stats(mean, std)
    if (spec is None) == (checkpoint is None):
        raise AdvDefenseError("give a model (--model) or an advdefense checkpoint "
                              "(--checkpoint), not both or neither")
    source: dict[str, Any] = {"model": str(spec if spec is not None else checkpoint),
                              "weights": None if weights is None else str(weights),
                              "model_args": dict(model_args or {}) or None,
                              "mean": None if mean is None else list(mean),
                              "std": None if std is None else list(std), "device": str(dev)}
    config = None
    if checkpoint is not None and str(checkpoint).startswith("zoo:"):
        checkpoint = resolve_zoo_name(checkpoint)
    elif spec is not None and str(spec).startswith("zoo:"):
        spec, checkpoint = None, resolve_zoo_name(spec)
    text = str(spec) if spec is not None else ""
    as_file = checkpoint is None and Path(text).is_file()
    if checkpoint is not None or (as_file and _archive_kind(Path(text)) == "pickle"):
        path = Path(checkpoint if checkpoint is not None else text)
        if weights is not None or model_args or mean is not None:
            raise AdvDefenseError(f"{path} is an advdefense checkpoint with its own weights "
                                  "and normalization; drop --weights / --model-args / --mean")
        from .training.checkpoint import load_model_from_checkpoint

        try:
            model, config = load_model_from_checkpoint(path, map_location=dev)
        except CheckpointError as exc:
            if checkpoint is None and "not an advdefense checkpoint" in str(exc):
                raise CheckpointError(
                    f"{path} is a torch.save file but not an advdefense checkpoint; for a "
                    "state dict pass --model pkg.module:factory (or file.py:factory, or "
                    "robustbench:ARCH) with --weights FILE") from None
            raise
        kind = "checkpoint"
    elif text.lower().startswith("robustbench:"):
        arch = text.split(":", 1)[1]
        _parse_arch(arch)
        if weights is None:
            raise AdvDefenseError(f"{text} needs --weights FILE (a RobustBench checkpoint)")
        if model_args:
            raise AdvDefenseError("--model-args do not apply to robustbench:ARCH models")
        state = robustbench_state_dict(read_state_dict(weights, map_location=dev), arch)
        model = _build_robustbench(arch, state, mean, std)
        fit_state_dict(model, state, source=f"weights {weights} (RobustBench {arch} layout)")
        kind, mean, std = "robustbench", None, None  # the normalization is inside the model
    elif ":" in text and not as_file:
        model = _call_factory(text, model_args)
        if weights is not None:
            state = read_state_dict(weights, map_location=dev,
                                    target_keys=list(model.state_dict()))
            fit_state_dict(model, state, source=f"weights {weights}")
        kind = "factory"
    else:
        path = Path(text)
        if not path.is_file():
            raise AdvDefenseError(f"model {text!r} is not a file; expected pkg.module:factory, "
                                  "file.py:factory, robustbench:ARCH, a TorchScript / "
                                  "torch.export archive or an advdefense checkpoint")
        if weights is not None or model_args:
            raise AdvDefenseError(f"{path} carries its own weights and arguments; drop "
                                  "--weights / --model-args")
        model, kind = _load_archive(path, dev)
    if mean is not None:
        model = NormalizedModel(model, mean, std)
    model = model.to(dev)
    model.eval()
    source["kind"] = kind
    return LoadedModel(model, kind, config, source)


def load_model(spec: str | os.PathLike, *, weights: str | os.PathLike | None = None,
               model_args: Mapping[str, Any] | None = None,
               mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
               device: str | torch.device | None = "cpu",
               dataset: str | None = None) -> nn.Module:
    """Load a model (see the module docstring); returns it in eval mode on ``device``.

    ``dataset`` (optional): probe the model on a batch of zeros of that dataset's shape and
    raise one line if it does not return ``(N, classes)`` logits for it.
    """
    model = open_model(spec, weights=weights, model_args=model_args, mean=mean, std=std,
                       device=device).model
    if dataset is not None:
        from .data import dataset_info

        info = dataset_info(dataset)
        x = torch.zeros(2, info.in_channels, info.image_size, info.image_size,
                        device=resolve_device(device))
        check_logits(model, x, num_classes=info.num_classes, what=f"a {dataset} batch")
    return model


def check_logits(model: nn.Module, x: torch.Tensor, *, num_classes: int | None = None,
                 what: str = "the data") -> int:
    """Run ``model`` on ``x`` (a few inputs) and return its number of classes; one
    :class:`AdvDefenseError` line if it fails or does not return ``(N, classes)`` logits with
    at least ``num_classes`` classes."""
    from .randomness import seeded

    shape = tuple(x.shape)
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), seeded(0):
            out = model(x)
    except Exception as exc:  # noqa: BLE001 - user code
        raise AdvDefenseError(f"the model fails on {what} of shape {shape} ("
                              f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]})") \
            from None
    finally:
        for m, flag in flags:
            m.training = flag
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        got = f"a {type(out).__name__} of {len(out)}"
    elif isinstance(out, torch.Tensor):
        got = f"shape {tuple(out.shape)}"
    else:
        got = type(out).__name__
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != shape[0] \
            or out.shape[1] < 2:
        raise AdvDefenseError(f"the model must return logits (N, classes) for inputs {shape}, "
                              f"got {got}; wrap it so forward returns one (N, classes) tensor")
    if num_classes is not None and out.shape[1] < num_classes:
        raise AdvDefenseError(f"the model returns {out.shape[1]} classes but {what} has "
                              f"{num_classes}; check --model-args / the dataset")
    if not torch.isfinite(out).all():
        raise AdvDefenseError(f"the model returns non-finite logits on {what}; check the "
                              "weights and --mean/--std")
    return int(out.shape[1])
