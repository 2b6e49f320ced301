"""Channel-wise Activation Suppressing (CAS): Bai et al., "Improving Adversarial Robustness via
Channel-wise Activation Suppressing", ICLR 2021 (arXiv 2103.08307), Sec. 4.

What it does. For an intermediate feature map ``f`` (N, K, H, W) of layer ``l``, CAS computes
the global average pool ``f̂ = GAP(f)`` (N, K), an auxiliary linear head
``p̂ = softmax(f̂ M)`` with ``M ∈ R^{K×C}`` (``C`` = number of classes), and re-weights the
channels by one column of ``M``::

    f̃ = f ⊗ M_y      in training   (y = true class)
    f̃ = f ⊗ M_ŷ      at evaluation (ŷ = argmax of the auxiliary head)

The auxiliary heads add ``L_CAS^s = CE(p̂^s, y)`` to the training loss of any defense::

    L = L_def + (β / S) Σ_s L_CAS^s,   β = 2 (the paper's and the code's default)

In this package the sum is not a new recipe: every training recipe (``standard``, ``pgd_at``,
``trades``, ``mart``) computes its terms on the main logits *and* on each auxiliary head
(reached through :func:`advdefense.models.heads.forward_with_aux`) and combines them as
``main + aux_weight · mean over heads``. A config turns CAS on with::

    defense: {cas: {placement: default, mask: signed}}
    train:   {recipe_args: {aux_weight: 2.0}}     # = CAS β; 0 gives the plain recipe

Shipped configs set ``aux_weight`` explicitly. As a safety net the :class:`CASModel` also
carries ``recipe_defaults = {"aux_weight": 2.0}``, which the Trainer merges *under*
``train.recipe_args`` (an explicit value always wins), so a config that forgets the weight
still trains the auxiliary heads with the paper's β instead of silently leaving them to the
main loss alone.

``aux_weight: 0`` means the plain recipe on the plain network: a config with ``defense.cas``
and ``train.recipe_args.aux_weight: 0`` builds the model *without* CAS sites
(:func:`disabled_by`, applied by :func:`advdefense.config.build_from_config`), so no mask acts
in training or at test time and the run is the plain recipe's, weight for weight. (Keeping
the sites with a zero loss weight would not be the plain recipe: the training-mode mask
``M_y`` still multiplies the features by a label-dependent row, and at test time the
predicted-class mask of an untrained head would still act.)

so AT+CAS is ``CE(main) + β·mean_s CE(aux_s)``, TRADES+CAS gives every head its own CE + KL
terms and MART+CAS every head its own MART terms, as in the reference code. Attacks reach the
heads through :class:`advdefense.attacks.HeadsObjective` (``main + β·aux``, the reference's
adaptive attack loss).

API.

* :class:`CASModule` -- GAP -> auxiliary linear head -> channel mask (one CAS site);
* :func:`attach_cas` -- put CAS modules after (or before) named submodules of *any* model and
  return a :class:`CASModel`, whose ``model(x)`` gives the main logits and whose
  ``forward_with_aux(x, y=None)`` gives ``(logits, [aux_logits per CAS module])``;
* :func:`default_placement` -- the paper's sites for resnet18 / wrn34_10 (and resnet_mini,
  smallcnn);
* :func:`apply` -- the defense-registry entry point (``defense: {cas: {...}}``);
* the attacks to evaluate it with are built by
  :func:`advdefense.evaluation.cas_specs.cas_attack_specs`.

Placement syntax: a module path as in ``model.named_modules()`` (``"stages.3.0"``) puts CAS on
that module's *output*; the suffix ``":in"`` (``"linear:in"``) puts it on the module's first
*input*. Paper placements (S = 2 everywhere):

* ResNet-18: after both blocks of the last stage, ``["stages.3.0", "stages.3.1"]`` (the code's
  ``CASBlock`` masks after the block's final ReLU). Other ResNets: the last two blocks of the
  last stage.
* WRN-34-10: (1) inside the last block of the third stage, on the pre-activation
  ``relu(bn1(x))`` that feeds ``conv1`` while the identity shortcut keeps the unmasked ``x``
  (``"stages.2.4.conv1:in"``: exactly the code's ``BasicBlock_CAS``), and (2) after the final
  BN/ReLU. (2) is placed at ``"linear:in"``, the input of the classifier after global average
  pooling: a per-channel mask commutes with GAP (``GAP(f ⊗ m) = GAP(f) ⊗ m`` and
  ``GAP(GAP(f)) = GAP(f)``), so this is the same function and needs no change to
  ``models/wrn.py``.
* ``resnet_mini`` (the CPU-sized network of the mnist5k reproduction): like ResNet-18, after
  both blocks of its last stage (``["stages.2.0", "stages.2.1"]``); the first auxiliary head
  reads 64 channels at 7x7, one block before the main head's GAP + linear.
* smallcnn (ours, no paper setting): after the ReLU of the last conv block and after the ReLU
  of the 200-unit hidden layer (``["features.13", "classifier.2"]``), the analogue of the WRN
  placement (last block + final activation). Why not the last two conv blocks (the literal
  analogue of ResNet-18's placement)? Training with the *true-class* mask lets everything
  downstream read the label from the mask, so at test time the main prediction follows the
  *first* CAS head's prediction; a GAP head on ``features.10`` is a weak classifier. Measured
  (standard training + CAS, 2 epochs on 1,500 mnist5k images, 500 test images): sites
  ``features.10, features.13`` gave 21% test accuracy (first head 41%), ``features.13,
  classifier.2`` 80% (first head 88%). Even the default's first head (GAP + linear on a
  64-channel 14x14 map) is much weaker than smallcnn's own 3136-200-10 classifier, so
  smallcnn is not a setting the paper used; ``resnet_mini`` is.
  Put the first CAS site where a linear head on pooled features is already accurate;
  :func:`advdefense.analysis.channels.cas_site_stats` measures it (per-site head accuracy and
  how often the main prediction follows the first head).

Departures from the reference code (``bymavis/CAS_ICLR2021``), on purpose:

* No mode switching in ``forward``: the code's ``forward(x, y, _eval)`` calls
  ``self.train()``/``self.eval()`` (which also flips BatchNorm). Here the mask rule follows the
  module's own ``training`` flag, set by whoever owns the model (Trainer, attacks).
* Labels reach the CAS modules through :meth:`CASModel.forward_with_aux` (a per-thread call
  frame, popped when the call returns), never through global state that outlives a call.
  In training mode without labels (a plain ``model(x)``) the predicted class is used, and a
  debug message is logged; the code crashes (``fc.weight[None]`` has the wrong shape) or, for
  a batch of 10, silently mis-reshapes.
* ``num_classes`` comes from the dataset (the code hard-codes 10); CAS works after any module
  with a (N, K, ...) output, and on (N, K) vectors.
* ``mask="nonnegative"`` (not in the paper): ``relu(M_c)``, a suppress-only mask in the spirit
  of CIFS, in addition to the reference's signed, unnormalised raw weights (default). The mask
  is never detached (as in the code): the main loss also trains the head's weights.
* Loss composition: for MART the code weights the auxiliary heads' KL term with the *main*
  head's natural probabilities (``mart_reg.py`` L82); here each head gets its own MART terms,
  computed with its own probabilities (a quirk we do not reproduce). TRADES: the code's
  default TRADES β is 4; our CIFAR configs use the TRADES paper's 6 and record 4 in a comment.
* Attacks used for evaluation: the CW loss is per example (the code applies ReLU to the
  batch-summed margin), and every attack is run with the main-logit loss *and* with the
  adaptive ``main + β·aux`` loss, plus APGD-DLR; the code only uses the adaptive one. The
  code's AT training attack before July 2022 maximised only the auxiliary loss (``loss = 0.``
  in ``reg_attack.py``); ours maximises the recipe's own attack loss.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import AdvDefenseError, ConfigError
from ..randomness import seeded

log = logging.getLogger(__name__)

MASKS = ("signed", "nonnegative")
OPTIONS = ("placement", "mask")
IN_SUFFIX = ":in"


class CASModule(nn.Module):
    """One CAS site: ``GAP -> Linear(channels, num_classes) -> f ⊗ M_c`` (Bai et al. 2021, Sec. 4).

    ``forward(f, y=None) -> (f_masked, aux_logits)`` with ``f`` of shape (N, channels, ...)
    (any number of spatial dimensions, including none). The mask is the auxiliary head's
    weight row ``fc.weight[c]`` of class ``c`` = the true label ``y`` when ``self.training`` and
    ``y`` is given; the head's predicted class ``argmax(aux_logits)`` otherwise (evaluation, or
    training without labels). ``mask="signed"`` uses the raw row (reference); ``"nonnegative"``
    uses ``relu`` of it. The module never changes its own mode.
    """

    def __init__(self, channels: int, num_classes: int, *, mask: str = "signed") -> None:
        super().__init__()
        if int(channels) < 1 or int(num_classes) < 2:
            raise AdvDefenseError(
                f"CAS needs channels >= 1 and num_classes >= 2, got {channels} and {num_classes}")
        if mask not in MASKS:
            raise AdvDefenseError(f"unknown CAS mask {mask!r}; choose one of: {', '.join(MASKS)}")
        self.channels = int(channels)
        self.num_classes = int(num_classes)
        self.mask_kind = mask
        self.fc = nn.Linear(self.channels, self.num_classes)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_classes={self.num_classes}, mask={self.mask_kind}"

    def mask_class(self, aux_logits: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The class whose weight row masks each example: ``y`` in training, else the argmax."""
        if self.training and y is not None:
            return y
        return aux_logits.argmax(dim=1)

    def channel_mask(self, cls: torch.Tensor) -> torch.Tensor:
        """The (N, channels) mask of the given classes (not detached)."""
        rows = self.fc.weight[cls]
        return F.relu(rows) if self.mask_kind == "nonnegative" else rows

    def forward(
        self, f: torch.Tensor, y: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if f.dim() < 2 or f.shape[1] != self.channels:
            raise AdvDefenseError(
                f"CAS expects features (N, {self.channels}, ...), got {tuple(f.shape)}")
        pooled = f.flatten(2).mean(dim=2) if f.dim() > 2 else f
        aux_logits = self.fc(pooled)
        if y is not None and (y.dim() != 1 or y.shape[0] != f.shape[0]):
            raise AdvDefenseError(
                f"CAS labels must have shape ({f.shape[0]},), got {tuple(y.shape)}")
        mask = self.channel_mask(self.mask_class(aux_logits, y))
        mask = mask.view(*mask.shape, *([1] * (f.dim() - 2)))
        return f * mask, aux_logits


# --- call frames: how labels reach the CAS modules for one forward_with_aux call ----------------

@dataclass(eq=False)
class _Frame:
    members: frozenset[int]
    labels: torch.Tensor | None
    aux: dict[int, list[torch.Tensor]] = field(default_factory=dict)


_local = threading.local()


def _frames() -> list[_Frame]:
    stack = getattr(_local, "frames", None)
    if stack is None:
        stack = _local.frames = []
    return stack


@contextmanager
def _frame(members: frozenset[int], labels: torch.Tensor | None) -> Iterator[_Frame]:
    frame = _Frame(members, labels)
    stack = _frames()
    stack.append(frame)
    try:
        yield frame
    finally:
        stack.remove(frame)


def _find_frame(cas: CASModule) -> _Frame | None:
    for frame in reversed(_frames()):
        if id(cas) in frame.members:
            return frame
    return None


class CASSite(nn.Module):
    """A wrapped submodule whose output (``where="out"``) or first input (``where="in"``) passes
    through a :class:`CASModule`. Labels and the collected auxiliary logits go through the
    enclosing :class:`CASModel` call frame."""

    def __init__(self, module: nn.Module, cas: CASModule, *, where: str = "out") -> None:
        super().__init__()
        if where not in ("out", "in"):
            raise AdvDefenseError(f"CAS site must be 'out' or 'in', got {where!r}")
        self.module = module
        self.cas = cas
        self.where = where

    def extra_repr(self) -> str:
        return f"where={self.where}"

    def _apply_cas(self, f: torch.Tensor) -> torch.Tensor:
        frame = _find_frame(self.cas)
        labels = frame.labels if frame is not None else None
        if self.cas.training and labels is None:
            log.debug("CAS in training mode without labels: masking with the predicted class")
        masked, aux = self.cas(f, labels)
        if frame is not None:
            frame.aux.setdefault(id(self.cas), []).append(aux)
        return masked

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.where == "in":
            if not args or not torch.is_tensor(args[0]):
                raise AdvDefenseError("a CAS ':in' site needs a tensor as the module's first input")
            return self.module(self._apply_cas(args[0]), *args[1:], **kwargs)
        out = self.module(*args, **kwargs)
        if not torch.is_tensor(out):
            raise AdvDefenseError(
                f"CAS can only follow a module returning a tensor, got {type(out).__name__}")
        return self._apply_cas(out)


class CASModel(nn.Module):
    """A model with CAS sites. ``model(x)`` returns the main logits (in both modes);
    ``forward_with_aux(x, y=None)`` returns ``(logits, [aux_logits of each site])`` in the order
    of :attr:`placements`, using ``y`` for the training-mode masks."""

    def __init__(self, model: nn.Module, placements: Sequence[str], *,
                 aux_weight: float = 2.0) -> None:
        super().__init__()
        self.model = model
        self.placements = list(placements)
        # The Trainer merges this under train.recipe_args (explicit values win), so a config
        # that forgets aux_weight still trains the heads with the paper's beta = 2.
        self.recipe_defaults = {"aux_weight": float(aux_weight)}

    def sites(self) -> list[CASSite]:
        """The CAS sites in placement order."""
        out = []
        for p in self.placements:
            path = p[: -len(IN_SUFFIX)] if p.endswith(IN_SUFFIX) else p
            out.append(self.model.get_submodule(path))
        return out

    def cas_modules(self) -> list[CASModule]:
        return [s.cas for s in self.sites()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def forward_with_aux(
        self, x: torch.Tensor, y: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        mods = self.cas_modules()
        with _frame(frozenset(id(m) for m in mods), y) as frame:
            logits = self.model(x)
        aux = []
        for place, m in zip(self.placements, mods, strict=True):
            got = frame.aux.get(id(m), [])
            if len(got) != 1:
                raise AdvDefenseError(
                    f"CAS site {place!r} ran {len(got)} times in one forward pass (expected 1); "
                    "place CAS on a module that the forward pass calls exactly once")
            aux.append(got[0])
        return logits, aux


def _split_place(place: str) -> tuple[str, str]:
    if place.endswith(IN_SUFFIX):
        return place[: -len(IN_SUFFIX)], "in"
    return place, "out"


def _probe_channels(
    model: nn.Module, paths: Sequence[tuple[str, str]], example: torch.Tensor
) -> list[int]:
    """Channel count at each site, from one forward pass in eval mode (modes restored, RNG
    forked so the caller's random stream is untouched)."""
    shapes: dict[int, torch.Size] = {}
    handles = []
    for i, (path, where) in enumerate(paths):
        mod = model.get_submodule(path)
        if where == "out":
            def hook(_m, _inp, out, i=i):
                shapes[i] = out.shape if torch.is_tensor(out) else None
            handles.append(mod.register_forward_hook(hook))
        else:
            def pre(_m, inp, i=i):
                shapes[i] = inp[0].shape if inp and torch.is_tensor(inp[0]) else None
            handles.append(mod.register_forward_pre_hook(pre))
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad(), seeded(0):
            model(example)
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags:
            m.training = flag
    channels = []
    for i, (path, where) in enumerate(paths):
        shape = shapes.get(i)
        label = path + (IN_SUFFIX if where == "in" else "")
        if shape is None or len(shape) < 2:
            raise AdvDefenseError(
                f"CAS site {label!r} is not reached by the forward pass or gives no (N, K, ...) "
                "tensor; choose another module path")
        channels.append(int(shape[1]))
    return channels


def attach_cas(
    model: nn.Module,
    after: Sequence[str],
    *,
    num_classes: int,
    mask: str = "signed",
    input_shape: Sequence[int] | None = None,
    channels: Sequence[int] | None = None,
) -> CASModel:
    """Wrap the named submodules of ``model`` so their outputs (or, with ``":in"``, their first
    inputs) pass through a :class:`CASModule`, and return a :class:`CASModel`.

    ``after`` lists module paths (``model.named_modules()`` names). The channel count of every
    site is given by ``channels`` or found by one probing forward pass on zeros of shape
    ``(2, *input_shape)`` (``input_shape`` = (C, H, W) of one image). ``model`` is modified in
    place (its submodules are replaced) and becomes ``result.model``.
    """
    if isinstance(model, CASModel):
        raise AdvDefenseError("the model already has CAS; attach all sites in one call")
    if not after:
        raise AdvDefenseError("attach_cas needs at least one module path in `after`")
    if len(set(after)) != len(after):
        raise AdvDefenseError(f"CAS placements must be distinct, got {list(after)}")
    names = dict(model.named_modules())
    sites = [_split_place(str(p)) for p in after]
    for path, _ in sites:
        if not path or path not in names:
            known = [n for n in names if n][:12]
            raise AdvDefenseError(
                f"no submodule {path!r} for CAS; module paths look like: {', '.join(known)}")
    if channels is None:
        if input_shape is None:
            raise AdvDefenseError("attach_cas needs input_shape=(C, H, W) or channels=[...]")
        param = next(model.parameters(), None)
        example = torch.zeros(2, *input_shape,
                              device=param.device if param is not None else None)
        channels = _probe_channels(model, sites, example)
    if len(channels) != len(sites):
        raise AdvDefenseError(f"got {len(channels)} channel counts for {len(sites)} CAS sites")
    param = next(model.parameters(), None)
    for (path, where), k in zip(sites, channels, strict=True):
        cas = CASModule(int(k), num_classes, mask=mask)
        if param is not None:
            cas.to(device=param.device, dtype=param.dtype)
        site = CASSite(model.get_submodule(path), cas, where=where)
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, attr, site)
    return CASModel(model, [str(p) for p in after])


def default_placement(model: nn.Module) -> list[str]:
    """The paper's CAS sites for the package's architectures (see the module docstring)."""
    from ..models.resnet import ResNet
    from ..models.smallcnn import SmallCNN
    from ..models.wrn import WideResNet

    if isinstance(model, WideResNet):
        last = len(model.stages) - 1
        block = len(model.stages[last]) - 1
        return [f"stages.{last}.{block}.conv1{IN_SUFFIX}", f"linear{IN_SUFFIX}"]
    if isinstance(model, ResNet):
        last = len(model.stages) - 1
        n = len(model.stages[last])
        return [f"stages.{last}.{j}" for j in range(max(0, n - 2), n)]
    if isinstance(model, SmallCNN):
        conv = [i for i, m in enumerate(model.features) if isinstance(m, nn.ReLU)]
        fc = [i for i, m in enumerate(model.classifier) if isinstance(m, nn.ReLU)]
        return [f"features.{conv[-1]}", f"classifier.{fc[-1]}"]
    raise ConfigError(
        f"no default CAS placement for {type(model).__name__}; set defense.cas.placement to a "
        "list of module paths")


def check_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate ``defense.cas`` options; returns them as a dict (``placement`` unresolved)."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        hint = " (the CAS loss weight beta is train.recipe_args.aux_weight)" if (
            {"beta", "aux_weight", "cr_beta"} & set(unknown)) else ""
        raise ConfigError(
            f"unknown defense.cas option(s) {', '.join(unknown)}; "
            f"valid: {', '.join(OPTIONS)}{hint}")
    mask = options.get("mask", "signed")
    if mask not in MASKS:
        raise ConfigError(f"defense.cas.mask must be one of {', '.join(MASKS)}, got {mask!r}")
    placement = options.get("placement", "default")
    if isinstance(placement, str) or placement is None:
        pass
    elif not isinstance(placement, (list, tuple)) or not all(isinstance(p, str)
                                                             for p in placement):
        raise ConfigError(
            f"defense.cas.placement must be 'default' or a list of module paths, got {placement!r}")
    return options


def disabled_by(recipe_args: Mapping[str, Any] | None) -> bool:
    """True when the recipe arguments set the CAS loss weight ``aux_weight`` to exactly 0:
    the plain recipe, so the model is built without CAS sites (see the module docstring).
    A missing ``aux_weight`` keeps CAS (the model asks for β = 2)."""
    if not recipe_args or "aux_weight" not in recipe_args:
        return False
    try:
        return float(recipe_args["aux_weight"]) == 0.0
    except (TypeError, ValueError):
        return False  # the recipe reports the bad value


def apply(model: nn.Module, options: Mapping[str, Any], info) -> CASModel:
    """Defense-registry entry point: ``defense: {cas: {placement: default | [paths],
    mask: signed | nonnegative}}``. The CAS loss weight β is the recipe's ``aux_weight``
    (``train.recipe_args.aux_weight``, 2.0 in the paper); it is not an option here."""
    options = check_options(options)
    mask = options.get("mask", "signed")
    placement = options.get("placement", "default")
    if placement == "default" or placement is None:
        placement = default_placement(model)
    elif isinstance(placement, str):
        placement = [placement]
    return attach_cas(model, list(placement), num_classes=info.num_classes, mask=mask,
                      input_shape=(info.in_channels, info.image_size, info.image_size))


__all__ = ["CASModel", "CASModule", "CASSite", "MASKS", "apply", "attach_cas", "check_options",
           "default_placement", "disabled_by"]
