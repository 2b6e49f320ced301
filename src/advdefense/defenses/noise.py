"""Noise injection: PNI (He et al. 2019) and CNI (Zheltonozhskii et al. 2020), plus Gaussian
input noise, as :class:`~advdefense.randomness.StochasticModule` layers.

PNI — Parametric Noise Injection (He, Rakin & Fan, CVPR 2019, eq. 2-3)
    ``W~ = W + alpha * eta``, ``eta ~ N(0, std(W)^2)``, i.e. ``W + alpha * std(W) * N(0, 1)``,
    with ``std(W)`` taken over the whole layer and **detached** (the reference uses
    ``.item()``). ``alpha`` is learned jointly with the weights; ``layerwise`` (one scalar,
    the paper's setting), ``channelwise`` (one per output channel) or ``elementwise``; init
    0.25; excluded from weight decay (``param._no_weight_decay = True``, as the reference
    excludes it in its optimizer groups). SIAM's port (elementwise alpha, std not detached,
    alpha weight-decayed) is *not* followed: we follow the PNI paper/code.
CNI — Colored Noise Injection (Zheltonozhskii, Baskin, et al., "Colored Noise Injection for
Training Adversarially Robust Neural Networks", arXiv 2003.02188, Sec. 3)
    noise ``~ N(0, Sigma)`` with ``Sigma = diag(|std * alpha_d|) + F F^T`` (rank ``r = 5``),
    sampled by reparametrisation ``sqrt(|std * alpha_d|) * eps1 + F eps2``,
    ``eps1 ~ N(0, I_N)``, ``eps2 ~ N(0, I_r)``. For weights (CNI-W) ``N`` is the number of
    weights and ``std = std(W)`` (detached). For layer inputs (CNI-I) the covariance is over
    the **channels** (``N = C`` for conv inputs, ``in_features`` for linear inputs), drawn
    independently at every spatial position. ``input_sample`` says how a batch shares it:
    ``per_batch`` (default for CNI, the SIAM code's behaviour): one noise tensor of one
    example's shape, added to every example of the batch (of each draw group) and scaled by
    the detached std of the whole batch; ``per_example``: an independent draw for every example,
    scaled by that example's std (each example sees noise independent of the rest of the batch,
    so its prediction does not depend on which batch it is in). Init ``alpha_d = 0.25^2``,
    ``F ~ 0.01 * N(0, 1)``.
    Departures from the SIAM code: (a) it initialises ``F`` to the constant 0.01. That is not a
    trap (each column's gradient ``g * eps2_j`` carries its own ``eps2_j``, so the columns
    separate after the first steps), but it starts the low-rank part at ``r * 0.01^2 * 1 1^T``,
    one noise component shared with the same weight by every weight of the layer; the random
    init starts from a generic low-rank covariance of the same scale (``E[F F^T] = r * 0.01^2 *
    I``). Not measured to matter either way; (b) its input noise covariance spans the full
    activation shape, which needs the image size at construction; a per-channel covariance
    works for any model and input size; (c) its FC layer always gets white PNI noise — here
    every wrapped layer gets the noise kind you ask for.
Gaussian input noise
    :class:`GaussianInput` adds ``sigma * N(0, I)`` in [0, 1] pixel space (Cohen et al. 2019;
    the Gaussian fine-tuning of the smoothing paper). SIAM adds it to the *normalised*
    tensor, so its sigma is in normalised units (``sigma_pixel ~ 0.25 * sigma`` on CIFAR-10).
    With ``train_only=True`` (``defense.noise.input_sigma``) the noise is on while the module
    trains **and inside** :func:`training_noise`, the context every training recipe runs its
    loss in: the inner attack (which runs in eval mode) sees the noise too, as in SIAM, whose
    forward always adds it. The smoothing paper's EPGD (eq. 24) is an expectation over input
    and weight noise, so an EPGD fine-tuning attack averages over both.

Randomness (DESIGN.md contract 2): every layer draws fresh standard-normal variates on every
forward; the state is those raw variates (so gradients reach alpha/F through the
reparametrisation), with a leading group axis. Under ``draw_groups(k)`` copy ``j`` of the
batch uses weight draw ``j``: each copy runs through the plain kernel with its own noisy
weight (a loop over the ``k`` draws, never over examples).

``inject(model, kind=..., where=...)`` replaces **every** ``nn.Conv2d`` and ``nn.Linear`` of
the model (including the first conv and the final linear layer, as the PNI reference does for
ResNet-20) by a :class:`NoisyLayer` wrapping it; :func:`noisy_layers` lists them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError
from ..layout import match_layout
from ..randomness import StochasticModule, row_randn

log = logging.getLogger(__name__)

KINDS = ("pni", "cni")
WHERES = ("weights", "inputs", "both")
MODES = ("layerwise", "channelwise", "elementwise")
SAMPLES = ("per_batch", "per_example")

__all__ = [
    "NoisyLayer", "GaussianInput", "WithInputNoise", "NoiseState", "inject", "apply",
    "noisy_layers", "select_group", "training_noise", "training_noise_active", "KINDS",
    "WHERES", "MODES", "SAMPLES",
]

_phase = threading.local()


@contextmanager
def training_noise() -> Iterator[None]:
    """Inside this context, train-time input noise (``GaussianInput(train_only=True)``) is on
    whatever the module's mode: training recipes compute their loss, inner attack included,
    inside it (per thread; nests)."""
    depth = getattr(_phase, "depth", 0)
    _phase.depth = depth + 1
    try:
        yield
    finally:
        _phase.depth = depth


def training_noise_active() -> bool:
    """True inside :func:`training_noise`."""
    return getattr(_phase, "depth", 0) > 0


def _param(t: torch.Tensor) -> nn.Parameter:
    """A noise parameter: trainable, excluded from weight decay (``_no_weight_decay``), with
    its own learning rate under ``optimizer.noise_lr_scale`` (``_noise_param``)."""
    p = nn.Parameter(t)
    p._no_weight_decay = True  # type: ignore[attr-defined]
    p._noise_param = True  # type: ignore[attr-defined]
    return p


@dataclass
class NoiseState:
    """Raw standard-normal variates of one :class:`NoisyLayer` draw.

    ``w1``: (g, *weight.shape) white part of the weight noise (or ``None``);
    ``w2``: (g, rank) low-rank part of CNI weight noise (or ``None``);
    ``i1``/``i2``: input-noise variates with the batch's rows first (or ``None``).
    ``g`` is the number of draw groups.
    """

    w1: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    i1: torch.Tensor | None = None
    i2: torch.Tensor | None = None

    @property
    def groups(self) -> int:
        return 1 if self.w1 is None else self.w1.shape[0]


def select_group(state: NoiseState | torch.Tensor, j: int, groups: int
                 ) -> NoiseState | torch.Tensor:
    """The state of draw group ``j`` out of ``groups`` (for tests and per-draw replays) of a
    :class:`NoisyLayer` (a :class:`NoiseState`) or a :class:`GaussianInput` (a tensor)."""
    def rows(t):
        if t is None:
            return None
        n = t.shape[0] // groups
        return t[j * n : (j + 1) * n]
    if isinstance(state, torch.Tensor):
        return rows(state)
    return NoiseState(
        None if state.w1 is None else state.w1[j : j + 1],
        None if state.w2 is None else state.w2[j : j + 1],
        rows(state.i1), rows(state.i2))


class NoisyLayer(StochasticModule):
    """A ``Conv2d`` or ``Linear`` with PNI/CNI noise on its weights and/or its input.

    Keyword-only: ``kind`` (``"pni"``/``"cni"``), ``weight_noise``, ``input_noise`` (bools),
    ``mode`` (PNI alpha shape: ``layerwise``/``channelwise``/``elementwise``), ``rank``
    (CNI), ``alpha_init`` (PNI alpha, and ``alpha_init^2`` for CNI's ``alpha_d``),
    ``factor_init`` (CNI: ``F ~ factor_init * N(0, 1)``; 0.01 is the SIAM code's scale),
    ``input_sample`` (``per_batch``/``per_example``: how a batch shares the input noise, see
    the module docstring; default ``per_batch`` for CNI, as SIAM, and ``per_example`` for PNI).
    """

    def __init__(self, layer: nn.Module, *, kind: str = "pni", weight_noise: bool = True,
                 input_noise: bool = False, mode: str = "layerwise", rank: int = 5,
                 alpha_init: float = 0.25, factor_init: float = 0.01,
                 input_sample: str | None = None) -> None:
        super().__init__()
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise ConfigError(f"noise can wrap Conv2d or Linear layers, got {type(layer).__name__}")
        _check_choice("kind", kind, KINDS)
        _check_choice("mode", mode, MODES)
        if input_sample is None:
            input_sample = "per_batch" if kind == "cni" else "per_example"
        _check_choice("input_sample", input_sample, SAMPLES)
        self.input_sample = input_sample
        if int(rank) < 0:
            raise ConfigError(f"noise rank must be >= 0, got {rank}")
        self.layer = layer
        self.kind, self.mode, self.rank = kind, mode, int(rank)
        self.weight_noise, self.input_noise = bool(weight_noise), bool(input_noise)
        w = layer.weight
        out_ch = w.shape[0]
        in_ch = w.shape[1] * (layer.groups if isinstance(layer, nn.Conv2d) else 1)
        like = {"dtype": w.dtype, "device": w.device}
        if self.weight_noise:
            if kind == "pni":
                shape = {"layerwise": (1,), "elementwise": tuple(w.shape),
                         "channelwise": (out_ch,) + (1,) * (w.dim() - 1)}[mode]
                self.alpha_w = _param(torch.full(shape, float(alpha_init), **like))
            else:
                self.alpha_w = _param(torch.full((w.numel(),), alpha_init**2, **like))
                self.factor_w = _param(factor_init * torch.randn(w.numel(), self.rank, **like))
        if self.input_noise:
            if kind == "pni":
                self.alpha_i = _param(torch.full((1,), float(alpha_init), **like))
            else:
                self.alpha_i = _param(torch.full((in_ch,), alpha_init**2, **like))
                self.factor_i = _param(factor_init * torch.randn(in_ch, self.rank, **like))

    def extra_repr(self) -> str:
        where = "+".join(n for n, on in (("weights", self.weight_noise),
                                         ("inputs", self.input_noise)) if on)
        extra = f", input_sample={self.input_sample}" if self.input_noise else ""
        return f"kind={self.kind}, where={where}, mode={self.mode}, rank={self.rank}{extra}"

    @property
    def cheap_groups(self) -> bool:  # type: ignore[override]
        """Weight noise needs one kernel per draw group; input noise alone batches freely."""
        return not self.weight_noise

    # -- randomness ---------------------------------------------------------------------
    def sample_state(self, x: torch.Tensor, groups: int) -> NoiseState:
        w = self.layer.weight
        st = NoiseState()
        if self.weight_noise:
            st.w1 = torch.randn((groups, *w.shape), device=w.device, dtype=w.dtype)
            if self.kind == "cni":
                st.w2 = torch.randn(groups, self.rank, device=w.device, dtype=w.dtype)
        if self.input_noise:
            # per_batch: one row per draw group, shared by the group's examples
            # per_example: one row per example, keyed by its global index (row_randn)
            like = {"device": x.device, "dtype": x.dtype}
            draw = torch.randn if self.input_sample == "per_batch" else row_randn
            rows = groups if self.input_sample == "per_batch" else x.shape[0]
            st.i1 = draw((rows, *x.shape[1:]), **like)
            if self.kind == "cni":
                spatial = x.shape[2:] if x.dim() > 2 else ()
                st.i2 = draw((rows, *spatial, self.rank), **like)
        return st

    def weight_noise_tensor(self, state: NoiseState) -> torch.Tensor:
        """(g, *weight.shape) additive weight noise for the state's g draws."""
        w = self.layer.weight
        std = w.detach().std()
        if self.kind == "pni":
            return self.alpha_w * std * state.w1
        g = state.w1.shape[0]
        white = torch.sqrt((std * self.alpha_w).abs()) * state.w1.reshape(g, -1)
        colored = state.w2 @ self.factor_w.t()
        return (white + colored).view(g, *w.shape)

    def _input_noise(self, x: torch.Tensor, state: NoiseState) -> torch.Tensor:
        if self.input_sample == "per_batch":
            # row j of the state serves the j-th block of rows (draw group j); the scale is the
            # std of that block as a whole
            g = state.i1.shape[0]
            if x.shape[0] % g:
                raise ValueError(f"batch of {x.shape[0]} rows cannot be split into {g} draw "
                                 "groups")
            reps = x.shape[0] // g
            i1 = state.i1.repeat_interleave(reps, dim=0)
            i2 = None if state.i2 is None else state.i2.repeat_interleave(reps, dim=0)
            std = x.detach().reshape(g, -1).std(dim=1).repeat_interleave(reps)
        else:
            i1 = _broadcast_rows(state.i1, x.shape[0])
            i2 = None if state.i2 is None else _broadcast_rows(state.i2, x.shape[0])
            std = x.detach().flatten(1).std(dim=1)
        std = std.view(-1, *([1] * (x.dim() - 1)))
        if self.kind == "pni":
            return x + self.alpha_i * std * i1
        # channels last for the per-channel covariance
        xc = x.movedim(1, -1) if x.dim() > 2 else x
        e1 = i1.movedim(1, -1) if x.dim() > 2 else i1
        stdc = std.view(-1, *([1] * (xc.dim() - 1)))
        noise = torch.sqrt((stdc * self.alpha_i).abs()) * e1 + i2 @ self.factor_i.t()
        out = xc + noise
        return out.movedim(-1, 1) if x.dim() > 2 else out

    def forward_with_state(self, x: torch.Tensor, state: NoiseState) -> torch.Tensor:
        if self.input_noise:
            x = self._input_noise(x, state)
        if not self.weight_noise:
            return self.layer(x)
        g = state.groups
        if g == 1:
            return self._noisy_weight_forward(x, state)
        if x.shape[0] % g:
            raise ValueError(f"batch of {x.shape[0]} rows cannot be split into {g} draw groups")
        # One ordinary conv/linear per draw group (a loop over the g <= k draws, never over
        # examples): each draw's noisy weight is built and freed in turn instead of g at once
        # for a grouped kernel. Measured on CPU, one thread, smallcnn + PNI, batch 128, k = 8:
        # 8.0 s -> 6.2-6.8 s per forward+backward.
        parts = x.split(x.shape[0] // g)  # split, not slicing: one gradient concat backward
        return torch.cat([self._noisy_weight_forward(part, select_group(state, j, g))
                          for j, part in enumerate(parts)])

    def _noisy_weight_forward(self, x: torch.Tensor, state: NoiseState) -> torch.Tensor:
        """The wrapped layer with the weight noise of a one-group ``state``."""
        layer = self.layer
        # a grey-scale stem's channels_last weight is contiguous in both layouts: keep its
        # exact strides, or the convolution (and those after it) would run in NCHW
        weight = match_layout(layer.weight + self.weight_noise_tensor(state)[0], layer.weight)
        if isinstance(layer, nn.Linear):
            return F.linear(x, weight, layer.bias)
        return layer._conv_forward(x, weight, layer.bias)


def _broadcast_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """A frozen input-noise draw made for fewer rows is tiled to the current batch."""
    if t.shape[0] == rows:
        return t
    if rows % t.shape[0]:
        raise ValueError(f"frozen input noise for {t.shape[0]} rows cannot cover {rows} rows;"
                         " freeze with the batch size you attack with")
    return t.repeat(rows // t.shape[0], *([1] * (t.dim() - 1)))


class GaussianInput(StochasticModule):
    """``x + sigma * N(0, I)`` in [0, 1] pixel space (Cohen et al. 2019, Sec. 3), no clipping.

    ``train_only=True`` adds the noise only while the module is in training mode or inside
    :func:`training_noise` (so the training recipes' inner attacks, which run in eval mode,
    see it too); this is Gaussian data augmentation for fine-tuning, and at test time the
    :class:`SmoothedClassifier` adds its own noise. The state is the raw ``N(0, I)`` tensor,
    one row per example, so draw groups are automatically independent.
    """

    def __init__(self, sigma: float, *, train_only: bool = False) -> None:
        super().__init__()
        if not sigma >= 0:
            raise ConfigError(f"input noise sigma must be >= 0, got {sigma}")
        self.sigma = float(sigma)
        self.train_only = bool(train_only)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, train_only={self.train_only}"

    def sample_state(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        # in x's logical order whatever its memory layout, one row per example keyed by its
        # global index: the same seed, the same noise, whatever the layout or the chunking
        return row_randn(x.shape, dtype=x.dtype, device=x.device)

    def forward_with_state(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        if self.sigma == 0 or (self.train_only and not self.training
                               and not training_noise_active()):
            return x
        return x + self.sigma * _broadcast_rows(state, x.shape[0])


class WithInputNoise(nn.Module):
    """``model(noise(x))``; delegates ``forward_with_aux`` when the inner model has it."""

    def __init__(self, model: nn.Module, noise: GaussianInput) -> None:
        super().__init__()
        self.noise = noise
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.noise(x))

    def forward_with_aux(self, x: torch.Tensor, y: torch.Tensor | None = None):
        from ..models.heads import forward_with_aux
        return forward_with_aux(self.model, self.noise(x), y)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(
            f"noise {name} {value!r} is not valid; choose one of: {', '.join(choices)}")


def inject(model: nn.Module, *, kind: str = "pni", where: str = "weights",
           mode: str = "layerwise", rank: int = 5, alpha_init: float = 0.25,
           factor_init: float = 0.01, input_sample: str | None = None) -> nn.Module:
    """Wrap every ``Conv2d`` and ``Linear`` of ``model`` (in place) in a :class:`NoisyLayer`.

    Every such layer is wrapped: the first conv and the last linear layer included (the PNI
    reference does the same for ResNet-20). Layers already wrapped are left alone. Returns
    ``model``; ``noisy_layers(model)`` lists the wrapped layers.
    """
    _check_choice("kind", kind, KINDS)
    _check_choice("where", where, WHERES)
    _check_choice("mode", mode, MODES)
    if input_sample is not None:
        _check_choice("input_sample", input_sample, SAMPLES)
    if not float(alpha_init) >= 0 or not float(factor_init) >= 0:
        raise ConfigError(f"noise alpha_init and factor_init must be >= 0, got {alpha_init} "
                          f"and {factor_init}")
    wrapped = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            full = f"{prefix}{name}"
            if isinstance(child, NoisyLayer):
                continue
            if isinstance(child, (nn.Conv2d, nn.Linear)):
                setattr(parent, name, NoisyLayer(
                    child, kind=kind, weight_noise=where in ("weights", "both"),
                    input_noise=where in ("inputs", "both"), mode=mode, rank=rank,
                    alpha_init=alpha_init, factor_init=factor_init,
                    input_sample=input_sample))
                wrapped.append(full)
            else:
                visit(child, full + ".")

    visit(model, "")
    if not wrapped:
        raise ConfigError("noise injection found no Conv2d/Linear layer to wrap in this model")
    log.info("%s noise on %s of %d layers: %s", kind, where, len(wrapped), ", ".join(wrapped))
    return model


def noisy_layers(model: nn.Module) -> dict[str, NoisyLayer]:
    """The :class:`NoisyLayer` modules of ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, NoisyLayer)}


_OPTIONS = ("kind", "where", "mode", "rank", "alpha_init", "factor_init", "input_sample",
            "input_sigma")


def apply(model: nn.Module, options: Mapping[str, Any], info=None) -> nn.Module:
    """Defense-registry entry (``defense: {noise: {...}}``).

    Options: ``kind`` (pni|cni, default pni), ``where`` (weights|inputs|both, default
    weights), ``mode`` (PNI alpha: layerwise|channelwise|elementwise), ``rank`` (CNI, 5),
    ``alpha_init`` (0.25), ``factor_init`` (CNI low-rank factor scale, 0.01), ``input_sample``
    (``per_batch``/``per_example``: how a batch shares the layer-input noise; default
    ``per_batch`` for CNI as the SIAM code, ``per_example`` for PNI), ``input_sigma``
    (Gaussian pixel noise added while training only, training attacks included — the
    smoothing paper's Gaussian / EPGD fine-tuning; default 0 = none).
    """
    options = dict(options or {})
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown defense.noise option(s) {', '.join(unknown)}; valid: "
                          f"{', '.join(_OPTIONS)}")
    sigma = options.pop("input_sigma", 0.0) or 0.0
    try:
        sigma = float(sigma)
        rank = int(options.get("rank", 5))
        alpha_init = float(options.get("alpha_init", 0.25))
        factor_init = float(options.get("factor_init", 0.01))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"defense.noise: numeric option is not a number ({exc})") from None
    model = inject(model, kind=options.get("kind", "pni"), where=options.get("where", "weights"),
                   mode=options.get("mode", "layerwise"), rank=rank, alpha_init=alpha_init,
                   factor_init=factor_init, input_sample=options.get("input_sample"))
    if sigma < 0:
        raise ConfigError(f"defense.noise.input_sigma must be >= 0, got {sigma}")
    if sigma > 0:
        model = WithInputNoise(model, GaussianInput(sigma, train_only=True))
    return model
