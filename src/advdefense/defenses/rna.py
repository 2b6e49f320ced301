"""Random Normalization Aggregation (RNA).

Paper: Dong, Chen, Wang, Yang, Xu, "Random Normalization Aggregation for Adversarial
Defense", NeurIPS 2022 (reference code: github.com/UniSerj/Random-Norm-Aggregation, commit
e4a6aa5; MindSpore port in mindspore-ai/models research/cv/RNA).

What it implements
------------------
Every ``BatchNorm2d`` of a network becomes a :class:`RandomNormalization` layer that holds one
*independent* normalization per type of its random space ``space`` (each with its own affine
``gamma``/``beta``; the BN entry with its own running statistics) and, at each draw, applies
one of them, chosen uniformly at random. The network then is an ensemble of
``|space| ** n_layers`` paths (the paper's random space, Sec. 4); the paper's motivation is
that adversarial examples transfer poorly between paths that differ in normalization type
(see :mod:`advdefense.analysis.transfer`). Types:

``bn``
    ``nn.BatchNorm2d(C)`` (batch statistics in train mode, running statistics in eval mode).
``in``
    instance norm with a per-channel affine, ``GroupNorm(C, C)``: the reference's ``gnr_1``,
    which is what its released config (``--random_type bn --gn_type gnr
    --num_group_schedule 0 0``) calls; so the released random space is ``("bn", "in")``.
``ln``
    ``GroupNorm(1, C)``.
``gn_k``
    ``GroupNorm(k, C)`` (``k`` groups).
``gnr_k``
    ``GroupNorm(C // k, C)`` (``k`` channels per group).

Sampling and granularity (DESIGN.md contract 2)
-----------------------------------------------
The layer is an :class:`advdefense.randomness.StochasticModule`: the path is drawn **inside
forward**. ``granularity="call"`` (default) draws one type per layer per forward call (per draw
group under :func:`~advdefense.randomness.draw_groups`, so batched EOT gets an independent
path per copy); ``granularity="sample"`` draws one type per example. The default is "call"
because a fresh path on every forward is exactly the randomness a defender deploys and an
adaptive attacker faces: any attack that queries the model several times (PGD steps, EOT)
sees different paths, as it would against a served model; freezing is then an explicit,
visible choice of the evaluator rather than a hidden property of the model.

The reference instead stores the path as layer state set from outside (``set_norms``), once
per mini-batch, and keeps it for all PGD steps of an attack. In this package that is
``with randomness.freeze(model): attack(...)`` (one path per frozen region). The reference's
evaluation protocol ("attack path A, classify on fresh path B") is the ``paper`` protocol of
the evaluation harness / :func:`advdefense.analysis.rna_report.rna_report`; its "black-box
adversarial training" (craft PGD on a frozen path A, train on a fresh path B) is the
``pgd_at`` recipe with ``draw: independent``; ``draw: shared`` trains on the same frozen path
the attack used.

Every layer samples independently (the reference's ``--mixed``, the released setting).
``mixed=False`` gives one type for the whole network per draw: all layers created by one
:func:`convert` call share a :class:`PathController`; the first layer to run in a forward
draws, the others reuse that draw.

Training-mode BatchNorm on a subset: when rows of a batch take different types (several draw
groups, or ``granularity="sample"``), each type runs only on the rows that chose it (batched
``index_select``/``index_copy``, no loop over samples), so a BN in train mode normalizes with
*that subset's* batch statistics and only a BN that was used updates its running statistics.

Departures from the reference code, on purpose
----------------------------------------------
* No global ``nn.BatchNorm2d`` rebinding: :func:`convert` rewrites any built model.
* The path is sampled inside ``forward`` (reference: outside), so EOT attacks see the
  randomness; reference behaviour is recovered with ``freeze``.
* Per-call / per-sample granularity (reference: per batch only).
* ``in`` is instance norm *with* affine (the reference's ``'in'`` entry has none, but its
  released config uses ``gnr_1`` = affine IN; we follow the released config).
* The custom GroupBatchNorm (``gbn``), with its inverted momentum bug, is not provided.
* ``mixed=False`` works on any model (the reference needs DataParallel; the MindSpore
  port's version is a no-op).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import AdvDefenseError, ConfigError
from ..randomness import StochasticModule, freeze, stochastic_modules

log = logging.getLogger(__name__)

__all__ = [
    "RandomNormalization",
    "RNAState",
    "PathController",
    "GRANULARITIES",
    "DEFAULT_SPACE",
    "parse_space",
    "convert",
    "apply",
    "rna_layers",
    "num_paths",
    "enumerate_paths",
    "random_path",
    "path_states",
    "set_path",
    "current_path",
]

GRANULARITIES = ("call", "sample")
DEFAULT_SPACE = ("bn", "in")
_TYPE_RE = re.compile(r"^(bn|in|ln|gn_(\d+)|gnr_(\d+))$")


@dataclass(frozen=True)
class RNAState:
    """One draw of an RNA layer: ``types`` indexes ``layer.space``.

    ``per_sample=False``: the batch is ``len(types)`` contiguous blocks (draw groups), block
    ``j`` uses ``types[j]`` (length 1 = the whole batch). ``per_sample=True``: row ``r`` uses
    ``types[r % len(types)]`` (so a frozen per-sample draw also applies to stacked EOT copies).
    """

    types: torch.Tensor
    per_sample: bool = False


class PathController:
    """Shared choice of the layers of one network when ``mixed=False``.

    Not an ``nn.Module`` (no parameters): a plain object every layer of a :func:`convert` call
    references. The first layer to sample in a forward stores its draw; layers that follow in
    the same forward (same number of draws) reuse it. A layer marks the start of a new forward
    when it is the ``leader`` (the first RNA layer in module order, normally the stem).
    """

    def __init__(self) -> None:
        self.draw: torch.Tensor | None = None
        self.leader: RandomNormalization | None = None

    def choose(self, layer: RandomNormalization, count: int, n_types: int,
               device: torch.device) -> torch.Tensor:
        if layer is self.leader or self.draw is None or self.draw.numel() != count:
            self.draw = torch.randint(n_types, (count,)).to(device)
        return self.draw


def parse_space(space: str | Sequence[str]) -> tuple[str, ...]:
    """Validate a random space (``"bn,in"`` or ``["bn", "in"]``); one-line error otherwise."""
    items = [s.strip() for s in space.split(",")] if isinstance(space, str) else [
        str(s).strip() for s in space]
    items = [s for s in items if s]
    if not items:
        raise AdvDefenseError("RNA space is empty; give normalization types such as bn,in")
    for s in items:
        m = _TYPE_RE.match(s)
        if not m or int(m.group(2) or m.group(3) or 1) < 1:
            raise AdvDefenseError(
                f"unknown RNA normalization type {s!r}; use bn, in, ln, gn_<groups> or "
                "gnr_<channels per group>")
    if len(set(items)) != len(items):
        raise AdvDefenseError(f"RNA space {items} lists a type twice; list each type once")
    return tuple(items)


def _make_norm(kind: str, channels: int, *, eps: float, momentum: float | None) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels, eps=eps, momentum=momentum)
    if kind == "in":
        return nn.GroupNorm(channels, channels, eps=eps)
    if kind == "ln":
        return nn.GroupNorm(1, channels, eps=eps)
    k = int(kind.split("_")[1])
    if channels % k:
        raise AdvDefenseError(
            f"RNA type {kind!r} needs a channel count divisible by {k}, but a layer has "
            f"{channels} channels; choose another group size")
    groups = k if kind.startswith("gn_") else channels // k
    return nn.GroupNorm(groups, channels, eps=eps)


class RandomNormalization(StochasticModule):
    """RNA layer: one independent normalization per type; a random type per draw.

    ``RandomNormalization(channels, space=("bn", "in"), granularity="call")``; see the module
    docstring for the types, the granularity and the mapping to the reference. Input
    ``(N, C, H, W)``, output of the same shape.
    """

    def __init__(
        self,
        channels: int,
        space: str | Sequence[str] = DEFAULT_SPACE,
        *,
        granularity: str = "call",
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        controller: PathController | None = None,
    ) -> None:
        super().__init__()
        if granularity not in GRANULARITIES:
            raise AdvDefenseError(
                f"unknown RNA granularity {granularity!r}; choose one of: call, sample")
        self.channels = int(channels)
        self.space = parse_space(space)
        self.granularity = granularity
        self.norms = nn.ModuleList(
            [_make_norm(k, self.channels, eps=eps, momentum=momentum) for k in self.space])
        self.controller = controller

    def extra_repr(self) -> str:
        mixed = "" if self.controller is None else ", mixed=False"
        return f"{self.channels}, space={self.space}, granularity={self.granularity!r}{mixed}"

    def norm(self, kind: str) -> nn.Module:
        """The normalization layer of one type (e.g. ``layer.norm("bn")``)."""
        return self.norms[self.index(kind)]

    def index(self, kind: str) -> int:
        if kind not in self.space:
            raise AdvDefenseError(f"RNA type {kind!r} is not in this layer's space {self.space}")
        return self.space.index(kind)

    # -- StochasticModule ---------------------------------------------------------------
    def sample_state(self, x: torch.Tensor, groups: int) -> RNAState:
        per_sample = self.granularity == "sample"
        count = x.shape[0] if per_sample else groups
        if self.controller is not None:
            types = self.controller.choose(self, count, len(self.space), x.device)
        else:
            types = torch.randint(len(self.space), (count,)).to(x.device)
        return RNAState(types, per_sample)

    def make_state(self, value: Any) -> RNAState:
        """Turn a type name, an index, a sequence of them, or an :class:`RNAState` into a state."""
        if isinstance(value, RNAState):
            return value
        if isinstance(value, (str, int)):
            value = [value]
        if isinstance(value, torch.Tensor):
            return RNAState(value.long().flatten())
        idx = [self.index(v) if isinstance(v, str) else int(v) for v in value]
        if any(i < 0 or i >= len(self.space) for i in idx):
            raise AdvDefenseError(f"RNA type index out of range for space {self.space}: {idx}")
        return RNAState(torch.tensor(idx, dtype=torch.long))

    def forward_with_state(self, x: torch.Tensor, state: Any) -> torch.Tensor:
        state = self.make_state(state)
        types = state.types.to(x.device)
        n, g = x.shape[0], types.numel()
        if g == 1:
            return self.norms[int(types[0])](x)
        if n % g:
            raise AdvDefenseError(
                f"an RNA state with {g} entries cannot be applied to a batch of {n} rows")
        rows = types.repeat(n // g) if state.per_sample else types.repeat_interleave(n // g)
        used = torch.unique(rows).tolist()
        if len(used) == 1:
            return self.norms[used[0]](x)
        out = x.new_zeros(x.shape)
        for t in used:  # at most |space| iterations, never a loop over samples
            sel = (rows == t).nonzero().squeeze(1)
            out = out.index_copy(0, sel, self.norms[t](x.index_select(0, sel)))
        return out


# -- conversion --------------------------------------------------------------------------
def convert(
    model: nn.Module,
    *,
    space: str | Sequence[str] = DEFAULT_SPACE,
    granularity: str = "call",
    mixed: bool = True,
) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` of ``model`` (recursively, in place) by RNA.

    The BN's parameters and running statistics are copied into the new layer's ``bn`` entry
    (when ``"bn"`` is in ``space``); the other types start from the identity affine. Layers
    already converted are left alone. Returns ``model``. Raises if ``model`` has no BN.
    """
    space = parse_space(space)
    if granularity not in GRANULARITIES:
        raise AdvDefenseError(
            f"unknown RNA granularity {granularity!r}; choose one of: call, sample")
    controller = None if mixed else PathController()
    count = 0

    def visit(module: nn.Module) -> None:
        nonlocal count
        for name, child in list(module.named_children()):
            if isinstance(child, RandomNormalization):
                continue
            if isinstance(child, nn.BatchNorm2d):
                layer = RandomNormalization(
                    child.num_features, space, granularity=granularity, eps=child.eps,
                    momentum=child.momentum, controller=controller)
                if "bn" in space:
                    bn = layer.norm("bn")
                    if child.affine:
                        bn.weight.data.copy_(child.weight.data)
                        bn.bias.data.copy_(child.bias.data)
                    if child.track_running_stats and child.running_mean is not None:
                        bn.running_mean.copy_(child.running_mean)
                        bn.running_var.copy_(child.running_var)
                        bn.num_batches_tracked.copy_(child.num_batches_tracked)
                ref = next(iter(child.buffers()), None) if not child.affine else child.weight
                if ref is not None:
                    layer.to(device=ref.device, dtype=ref.dtype)
                layer.train(child.training)
                setattr(module, name, layer)
                count += 1
            else:
                visit(child)

    visit(model)
    if count == 0:
        raise AdvDefenseError(
            "RNA found no BatchNorm2d layer to convert; build the model with norm='bn'")
    if controller is not None:
        controller.leader = rna_layers(model)[0]
    log.info("RNA: converted %d BatchNorm2d layers (space=%s, granularity=%s, mixed=%s)",
             count, ",".join(space), granularity, mixed)
    return model


_OPTIONS = ("space", "granularity", "mixed")


def apply(model: nn.Module, options: Mapping[str, Any], info: Any = None) -> nn.Module:
    """Defense-registry entry: ``defense: {rna: {space: [bn, in], granularity: call,
    mixed: true}}``."""
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ConfigError(
            f"unknown defense.rna option(s) {', '.join(unknown)}; valid: {', '.join(_OPTIONS)}")
    mixed = options.get("mixed", True)
    if not isinstance(mixed, bool):
        raise ConfigError(f"defense.rna.mixed must be true or false, got {mixed!r}")
    return convert(model, space=options.get("space", DEFAULT_SPACE),
                   granularity=str(options.get("granularity", "call")), mixed=mixed)


# -- path control --------------------------------------------------------------------------
def rna_layers(model: nn.Module) -> list[RandomNormalization]:
    """Every RNA layer of ``model`` in module order."""
    return [m for m in model.modules() if isinstance(m, RandomNormalization)]


def _layers_or_raise(model: nn.Module) -> list[RandomNormalization]:
    layers = rna_layers(model)
    if not layers:
        raise AdvDefenseError("model has no RNA layer; convert it first (defenses.rna.convert)")
    return layers


def _is_shared(layers: list[RandomNormalization]) -> bool:
    return layers[0].controller is not None and all(
        la.controller is layers[0].controller for la in layers)


def num_paths(model: nn.Module) -> int:
    """Size of the random space: ``prod |space_l|`` (mixed) or ``|space|`` (``mixed=False``)."""
    layers = _layers_or_raise(model)
    if _is_shared(layers):
        return len(layers[0].space)
    total = 1
    for la in layers:
        total *= len(la.space)
    return total


def enumerate_paths(model: nn.Module, limit: int | None = 1000) -> list[tuple[str, ...]]:
    """Paths (one type name per RNA layer) in lexicographic order, at most ``limit``."""
    layers = _layers_or_raise(model)
    if _is_shared(layers):
        it: Iterator[tuple[str, ...]] = ((k,) * len(layers) for k in layers[0].space)
    else:
        it = itertools.product(*[la.space for la in layers])
    return list(itertools.islice(it, limit))


def random_path(model: nn.Module, generator: torch.Generator | None = None) -> tuple[str, ...]:
    """One uniformly drawn path (one type per layer; the same type if ``mixed=False``)."""
    layers = _layers_or_raise(model)
    if _is_shared(layers):
        k = int(torch.randint(len(layers[0].space), (1,), generator=generator))
        return (layers[0].space[k],) * len(layers)
    return tuple(la.space[int(torch.randint(len(la.space), (1,), generator=generator))]
                 for la in layers)


def _normalize_path(layers: list[RandomNormalization], types) -> list[Any]:
    if isinstance(types, str):
        types = [types] * len(layers)
    types = list(types)
    if len(types) != len(layers):
        raise AdvDefenseError(
            f"a path needs one type per RNA layer ({len(layers)}), got {len(types)}")
    return types


def path_states(model: nn.Module, types: str | Sequence[Any]) -> list[Any]:
    """States for ``randomness.freeze(model, states=...)`` that fix the RNA path to ``types``
    (one entry per RNA layer, or one name for all); other stochastic layers get ``None``
    (drawn once and then frozen too)."""
    layers = _layers_or_raise(model)
    types = _normalize_path(layers, types)
    by_layer = {id(la): la.make_state(t) for la, t in zip(layers, types, strict=True)}
    return [by_layer.get(id(m)) for m in stochastic_modules(model)]


@contextlib.contextmanager
def set_path(model: nn.Module, types: str | Sequence[Any]) -> Iterator[nn.Module]:
    """Context manager: every forward inside uses the RNA path ``types`` (``"bn"`` = all-BN);
    only RNA layers are frozen (other stochastic layers keep drawing fresh noise)."""
    layers = _layers_or_raise(model)
    types = _normalize_path(layers, types)
    with contextlib.ExitStack() as stack:
        for la, t in zip(layers, types, strict=True):
            stack.enter_context(freeze(la, states=[la.make_state(t)]))
        yield model


def current_path(model: nn.Module) -> list[list[str]]:
    """The types used by each RNA layer in its last forward (one list of names per layer)."""
    out = []
    for la in _layers_or_raise(model):
        st = la.last_state
        out.append([] if st is None else [la.space[int(i)] for i in la.make_state(st).types])
    return out
