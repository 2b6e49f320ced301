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

No host synchronization on accelerators: the path is drawn on the input's device (from the
global torch RNG of that device, or from :func:`set_path_generator`'s generator). On CUDA (any
device but the CPU) and while ``torch.compile`` traces, the forward never reads the draw back
on the host (no ``.item()``, ``.tolist()``, ``nonzero()``, ``.cpu()``): every type of the
layer's space is computed for the whole batch and ``torch.where`` keeps, row by row, the output
of the type that row drew. That costs ``|space|`` normalizations per layer instead of one and
keeps CUDA streams and compiled graphs unbroken. On the CPU, where reading a tensor is free,
only the drawn types are computed, each on its rows (``index_select``/``index_copy``). Both
forwards give the same outputs, gradients and statistics (``layer.sync_free = True/False``
forces one). In both:

* every type's parameters take part in every forward; the types a row did not draw get zero
  gradients (so weight decay and momentum keep acting on them, and DistributedDataParallel sees
  no unused parameters);
* the outputs of the types are cast to the input's dtype before they are merged (under CUDA
  autocast BatchNorm returns fp16 while GroupNorm returns fp32).

Training-mode BatchNorm on a subset: when rows of a batch take different types (several draw
groups, or ``granularity="sample"``), a BN in train mode normalizes with *that subset's* batch
statistics (sync-free: masked sums), and only a BN that some row used updates its running
statistics (sync-free: a masked ``torch.where``; a BN nobody drew keeps its statistics).
Synchronized BatchNorm (``train.sync_bn``): after :func:`set_sync_batchnorm` (or when the
``bn`` entry is an ``nn.SyncBatchNorm``), in train mode with more than one process, the batch
statistics (masked or not) are summed over the processes with a differentiable all-reduce, so
BN normalizes with the statistics of the global batch. Every process computes every type, so
the collectives match even when processes drew different paths (share the path generator,
:func:`set_path_generator`, to make them draw the same). This works on CPU (gloo) too, where
DistributedDataParallel refuses ``nn.SyncBatchNorm``.

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
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import AdvDefenseError, ConfigError
from ..randomness import (
    StochasticModule,
    draw_seed,
    freeze,
    row_randint,
    seed_current,
    stochastic_modules,
)

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
    "set_path_generator",
    "set_sync_batchnorm",
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
        if (layer is self.leader or self.draw is None or self.draw.numel() != count
                or self.draw.device != device):
            self.draw = layer._randint(count, device)
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
        self.generator: torch.Generator | None = None  # None: the device's global RNG
        self.sync_batchnorm = False  # sum BN batch statistics over processes (train mode)
        # None: automatic (no host reads on accelerators and under torch.compile; on CPU,
        # where reading the draw costs nothing, only the drawn types are computed)
        self.sync_free: bool | None = None
        self.process_group: Any = None  # with sync_batchnorm; None = the default group

    def extra_repr(self) -> str:
        mixed = "" if self.controller is None else ", mixed=False"
        return f"{self.channels}, space={self.space}, granularity={self.granularity!r}{mixed}"

    @property
    def cheap_groups(self) -> bool:  # type: ignore[override]
        """Per-call paths give each draw group its own normalization (a pass per type);
        per-sample paths cost the same whatever the groups."""
        return self.granularity == "sample" or len(self.space) == 1

    def norm(self, kind: str) -> nn.Module:
        """The normalization layer of one type (e.g. ``layer.norm("bn")``)."""
        return self.norms[self.index(kind)]

    def index(self, kind: str) -> int:
        if kind not in self.space:
            raise AdvDefenseError(f"RNA type {kind!r} is not in this layer's space {self.space}")
        return self.space.index(kind)

    # -- StochasticModule ---------------------------------------------------------------
    def _randint(self, count: int, device: torch.device) -> torch.Tensor:
        gen = self.generator
        if gen is not None and gen.device.type != torch.device(device).type:
            raise AdvDefenseError(
                f"the RNA path generator is on {gen.device} but the input is on {device}; "
                "create the generator on the model's device")
        if gen is None and self.granularity == "sample":
            return row_randint(len(self.space), count, device=device)  # keyed by example
        return torch.randint(len(self.space), (count,), device=device, generator=gen)

    def sample_state(self, x: torch.Tensor, groups: int) -> RNAState:
        per_sample = self.granularity == "sample"
        count = x.shape[0] if per_sample else groups
        if self.controller is not None:
            types = self.controller.choose(self, count, len(self.space), x.device)
        else:
            types = self._randint(count, x.device)
        return RNAState(types, per_sample)

    def sample_seeded(self, x: torch.Tensor, seeds, call: int) -> RNAState:
        """Seeded draw groups (:func:`~advdefense.randomness.replicated_forward`). With a
        shared path (``mixed=False``) the leader draws one type per group under the group's
        seed and the layers after it reuse that draw, as :class:`PathController` does."""
        ctl = self.controller
        if ctl is None or self.granularity == "sample":
            return super().sample_seeded(x, seeds, call)
        if (self is ctl.leader or ctl.draw is None or ctl.draw.numel() != len(seeds)
                or ctl.draw.device != x.device):
            draws = []
            for s in seeds:
                seed_current(draw_seed(s, 0, call), x.device)
                draws.append(self._randint(1, x.device))
            ctl.draw = torch.cat(draws)
        return RNAState(ctl.draw, False)

    def _home(self) -> torch.device:
        ref = next(itertools.chain(self.norms.parameters(), self.norms.buffers()), None)
        return torch.device("cpu") if ref is None else ref.device

    def make_state(self, value: Any) -> RNAState:
        """Turn a type name, an index, a sequence of them, or an :class:`RNAState` into a state
        (on the layer's device, so a frozen explicit path costs no copy per forward)."""
        if isinstance(value, RNAState):
            return value
        if isinstance(value, (str, int)):
            value = [value]
        if isinstance(value, torch.Tensor):
            types = value.long().flatten()
            if types.device.type == "cpu" and types.numel() and (
                    int(types.min()) < 0 or int(types.max()) >= len(self.space)):
                raise AdvDefenseError(
                    f"RNA type index out of range for space {self.space}: {types.tolist()}")
            return RNAState(types.to(self._home()))
        idx = [self.index(v) if isinstance(v, str) else int(v) for v in value]
        if any(i < 0 or i >= len(self.space) for i in idx):
            raise AdvDefenseError(f"RNA type index out of range for space {self.space}: {idx}")
        return RNAState(torch.tensor(idx, dtype=torch.long).to(self._home()))

    def forward_with_state(self, x: torch.Tensor, state: Any) -> torch.Tensor:
        state = self.make_state(state)
        types = state.types
        if types.device != x.device:
            types = types.to(x.device)
        n, g = x.shape[0], types.numel()
        if g == 0 or n % g:
            raise AdvDefenseError(
                f"an RNA state with {g} entries cannot be applied to a batch of {n} rows")
        rows = None
        if g > 1:
            rows = types.repeat(n // g) if state.per_sample else types.repeat_interleave(n // g)
        groups = [self._sync_group(m) if isinstance(m, _BatchNorm) else None
                  for m in self.norms]
        if self._sync_free(x) or any(gr is not None for gr in groups):
            return self._merged(x, types, rows, groups)
        return self._selective(x, types, rows)

    def _sync_free(self, x: torch.Tensor) -> bool:
        if self.sync_free is not None:
            return self.sync_free
        return x.device.type != "cpu" or torch.compiler.is_compiling()

    def _merged(self, x: torch.Tensor, types: torch.Tensor, rows: torch.Tensor | None,
                groups: list[Any]) -> torch.Tensor:
        """Every type on every row, merged with ``torch.where``: no host synchronization."""
        if rows is None:  # one type for the whole batch: 0-d conditions
            conds = [types[0] == t for t in range(len(self.norms))]
        else:
            conds = [(rows == t).view(-1, *([1] * (x.dim() - 1)))
                     for t in range(len(self.norms))]
        out: torch.Tensor | None = None
        for t, norm in enumerate(self.norms):  # |space| iterations, never a loop over samples
            if isinstance(norm, _BatchNorm) and (norm.training or norm.running_mean is None):
                y = _batch_norm_batch_stats(norm, x, None if rows is None else rows == t,
                                            conds[t] if rows is None else None, groups[t])
            else:
                y = norm(x)
            y = y.to(x.dtype)
            out = y if out is None else torch.where(conds[t], y, out)
        assert out is not None
        return out

    def _selective(self, x: torch.Tensor, types: torch.Tensor, rows: torch.Tensor | None
                   ) -> torch.Tensor:
        """Only the drawn types, on their rows (reads the draw on the host: CPU only)."""
        if rows is None:
            used = [int(types[0])]
        else:
            used = torch.unique(rows).tolist()
        if len(used) == 1:
            out = _cpu_norm(self.norms[used[0]], x).to(x.dtype)
        else:
            out = x.new_empty(x.shape)
            for t in used:  # at most |space| sub-batches, never a loop over samples
                sel = (rows == t).nonzero().squeeze(1)
                out = out.index_copy(0, sel,
                                     _cpu_norm(self.norms[t], x.index_select(0, sel)).to(x.dtype))
        # in training, the types nobody drew take part with a zero gradient, as in the merged
        # forward (same optimizer behaviour; no unused parameters under DDP)
        idle = [p for t, m in enumerate(self.norms) if t not in used for p in m.parameters()
                if p.requires_grad] if self.training and torch.is_grad_enabled() else []
        if idle:
            out = out + 0.0 * torch.stack([p.sum() for p in idle]).sum().to(out.dtype)
        return out

    def _sync_group(self, bn: _BatchNorm) -> Any:
        """The process group the BN entry's statistics are summed over, or ``None``."""
        if isinstance(bn, nn.SyncBatchNorm):
            group = bn.process_group
        elif self.sync_batchnorm:
            group = self.process_group
        else:
            return None
        if not (bn.training and dist.is_available() and dist.is_initialized()):
            return None
        group = dist.group.WORLD if group is None else group
        return group if dist.get_world_size(group) > 1 else None


def _cpu_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` on the CPU. GroupNorm's CPU kernel is slow on channels_last inputs (smallcnn
    activations, 8 x 32 x 28 x 28, forward + backward: 1.40 ms against 0.84 ms through a
    contiguous copy, 2 threads), so such an input goes through a contiguous copy and comes
    back in channels_last."""
    if (isinstance(norm, nn.GroupNorm) and x.dim() == 4 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)):
        return norm(x.contiguous()).contiguous(memory_format=torch.channels_last)
    return norm(x)


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient of every process's input is the sum of the incoming
    gradients (each process's loss depends on the global sum)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def _all_reduce(t: torch.Tensor, group: Any) -> torch.Tensor:
    return _AllReduceSum.apply(t, group)


def _batch_norm_batch_stats(bn: _BatchNorm, x: torch.Tensor, mask: torch.Tensor | None,
                            selected: torch.Tensor | None, group: Any = None) -> torch.Tensor:
    """A BatchNorm that normalizes with batch statistics, without host synchronization.

    ``mask`` (rows, bool): the statistics are those of the masked rows only (the other rows'
    outputs are discarded by the caller). ``selected`` (0-d bool): the whole batch drew this
    BN or not. The running statistics (train mode) move only when the BN was used, through a
    masked ``torch.where``. With a process ``group`` the statistics are summed over it.
    """
    track = bn.training and bn.track_running_stats and bn.running_mean is not None
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if mask is None and group is None and (bn.momentum is not None or not track):
        # the common case: the fused kernel; running statistics on copies, merged afterwards
        rm = bn.running_mean.clone() if track else None
        rv = bn.running_var.clone() if track else None
        y = F.batch_norm(x, rm, rv, bn.weight, bn.bias, True,
                         bn.momentum if bn.momentum is not None else 0.0, bn.eps)
        if track:
            assert rm is not None and rv is not None and selected is not None
            with torch.no_grad():
                bn.running_mean.copy_(torch.where(selected, rm, bn.running_mean))
                bn.running_var.copy_(torch.where(selected, rv, bn.running_var))
                bn.num_batches_tracked.add_(selected.long())
        return y
    x32 = x.float()
    dims = [0, *range(2, x.dim())]
    per_row = x32[0].numel() // x32.shape[1]
    if mask is None:
        m = None
        count = x32.new_full((1,), float(x32.shape[0] * per_row))
        s1 = x32.sum(dims)
    else:
        m = mask.to(x32.dtype).view(-1, *([1] * (x.dim() - 1)))
        count = (m.sum() * per_row).view(1)
        s1 = (x32 * m).sum(dims)
    if group is not None:
        both = _all_reduce(torch.cat([s1, count]), group)
        s1, count = both[:-1], both[-1:].detach()
    safe = count.clamp_min(1.0)
    mean = s1 / safe
    d = x32 - mean.view(shape)
    sq = (d * d).sum(dims) if m is None else (d * d * m).sum(dims)
    if group is not None:
        sq = _all_reduce(sq, group)
    var = sq / safe
    y = d * torch.rsqrt(var + bn.eps).view(shape)
    if bn.weight is not None:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    if track:
        with torch.no_grad():
            used = count[0] > 0
            if selected is not None:
                used = used & selected
            unbiased = var * (count / (count - 1).clamp_min(1.0))
            if bn.momentum is None:  # cumulative moving average
                factor = 1.0 / (bn.num_batches_tracked + 1).to(x32.dtype)
            else:
                factor = x32.new_full((), float(bn.momentum))
            rm = bn.running_mean + factor * (mean.detach() - bn.running_mean)
            rv = bn.running_var + factor * (unbiased.detach() - bn.running_var)
            bn.running_mean.copy_(torch.where(used, rm, bn.running_mean))
            bn.running_var.copy_(torch.where(used, rv, bn.running_var))
            bn.num_batches_tracked.add_(used.long())
    return y


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


_OPTIONS = ("space", "granularity", "mixed", "sync_free")


def apply(model: nn.Module, options: Mapping[str, Any], info: Any = None) -> nn.Module:
    """Defense-registry entry: ``defense: {rna: {space: [bn, in], granularity: call,
    mixed: true, sync_free: null}}`` (``sync_free``: ``null`` = automatic, ``true`` = the
    merged forward everywhere, ``false`` = drawn types only, reading the draw on the host)."""
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ConfigError(
            f"unknown defense.rna option(s) {', '.join(unknown)}; valid: {', '.join(_OPTIONS)}")
    mixed = options.get("mixed", True)
    if not isinstance(mixed, bool):
        raise ConfigError(f"defense.rna.mixed must be true or false, got {mixed!r}")
    sync_free = options.get("sync_free")
    if sync_free is not None and not isinstance(sync_free, bool):
        raise ConfigError(f"defense.rna.sync_free must be null, true or false, got {sync_free!r}")
    model = convert(model, space=options.get("space", DEFAULT_SPACE),
                    granularity=str(options.get("granularity", "call")), mixed=mixed)
    for la in rna_layers(model):
        la.sync_free = sync_free
    return model


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


def set_path_generator(model: nn.Module, generator: torch.Generator | None) -> int:
    """Draw every RNA path of ``model`` from ``generator`` (``None``: back to the global RNG of
    the input's device); returns the number of RNA layers.

    Multi-process training with ``train.sync_bn`` gives every process one generator on its
    device and seeds it identically before each step, so all processes draw the same path and
    the synchronized BatchNorm statistics belong to that one path (as in one-process training
    with the global batch). The generator must live on the device of the inputs.
    """
    layers = rna_layers(model)
    for la in layers:
        la.generator = generator
    return len(layers)


def set_sync_batchnorm(model: nn.Module, enabled: bool = True, process_group: Any = None) -> int:
    """Make the ``bn`` entries of every RNA layer normalize with statistics summed over the
    processes of ``process_group`` (default: all) in train mode (see the module docstring);
    returns the number of RNA layers. Outside RNA use ``nn.SyncBatchNorm``."""
    layers = rna_layers(model)
    for la in layers:
        la.sync_batchnorm = bool(enabled)
        la.process_group = process_group
    return len(layers)
