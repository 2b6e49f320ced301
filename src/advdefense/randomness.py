"""One shared mechanism for every stochastic part of a model (DESIGN.md, contract 2).

Every stochastic layer (an RNA normalization path, PNI/CNI noise, Gaussian input noise)
subclasses :class:`StochasticModule`. By default it draws **fresh randomness on every forward
call**. Callers control it from outside, for the whole model at once:

``freeze(model)``
    context manager: the next forward draws a state, and every later forward reuses it, until
    the context exits (a "fixed-path" attack runs inside it). ``freeze(model, states=...)``
    sets explicit states instead (e.g. one chosen RNA path).
``draw_groups(k)``
    context manager used by batched EOT and Monte-Carlo sampling: the batch is ``k`` stacked
    copies (rows ``[j*n:(j+1)*n]`` form copy ``j``) and each copy gets its *own* independent
    draw. Without it a forward call is one draw for the whole batch.
``seeded(seed)``
    context manager: forks the global torch RNG and seeds it, so a seeded attack or evaluation
    is reproducible and leaves the caller's RNG untouched. Stochastic layers draw from the
    global torch RNG, so ``torch.manual_seed`` seeds them too.
``is_stochastic(model)`` / ``stochastic_modules(model)``
    introspection (stochastic parts nested anywhere in the model count).
``replicated_forward(model, x, copies, body, ...)``
    the one place that evaluates ``copies`` independent draws of a model on a batch (batched
    EOT, repeated verdicts, Monte-Carlo votes): copies are stacked along dim 0 in chunks of at
    most ``max_batch`` rows, and draw ``j`` is seeded from (the call's seed, ``j``), so the
    draws do not depend on how rows are chunked: ``max_batch`` is only a memory setting. On
    the CPU a model whose layers pay per draw group (weight noise, RNA paths:
    ``groups_batch_cheaply`` is False) gets one draw per pass instead.
``SeededRandomness(model)``
    wraps a model that is random without :class:`StochasticModule` layers (it draws from the
    torch RNG on every call): each draw group becomes a separate, seeded forward call, so
    ``draw_groups``, ``freeze`` and ``seeded`` hold for it too.
``row_randn`` / ``row_randint``
    per-row randomness (input noise, a normalization type per example): inside seeded draw
    groups row ``r`` of draw ``j`` comes from (the draw's seed, the aligned block of
    :data:`ROW_BLOCK` examples that holds ``r``'s *global* index), so an example gets the same
    noise whichever chunk of a batch it lands in, and two examples never share it.

Subclasses implement two methods:

``sample_state(x, groups)``
    draw ``groups`` independent states for input ``x`` (``x.shape[0]`` is divisible by
    ``groups``); returns any object.
``forward_with_state(x, state)``
    the layer's computation under that state.

A frozen state drawn with one group is broadcast to all groups. When the caller gives one seed
per group (``draw_groups(k, seeds=...)``, as :func:`replicated_forward` does) each group's
state is drawn separately under its own seed (and the layer's call index in the pass) and the
states are joined by :meth:`StochasticModule.merge_states` (default: concatenate tensors along
dim 0, field by field for dataclasses); a layer whose state does not have the groups or the
rows first overrides it.
Nothing here changes train/eval mode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

_log = logging.getLogger(__name__)

__all__ = [
    "StochasticModule",
    "draw_groups",
    "current_groups",
    "freeze",
    "seeded",
    "is_stochastic",
    "stochastic_modules",
    "controlled_modules",
    "get_states",
    "current_seeds",
    "batched_draws_supported",
    "groups_batch_cheaply",
    "replicated_forward",
    "DrawOutputs",
    "learned_row_limit",
    "row_randn",
    "row_randint",
    "rng_devices",
    "current_row_start",
    "ROW_BLOCK",
    "SeededRandomness",
    "probe_randomness",
    "draw_seed",
    "fresh_seed",
    "seed_current",
]

_local = threading.local()
_UNSET = object()


def current_groups() -> int:
    """Number of independent draws requested for the current forward call (default 1)."""
    return getattr(_local, "groups", 1)


def current_seeds() -> Sequence[int] | None:
    """Per-group seeds of the current forward call, or ``None`` (draw from the global RNG)."""
    return getattr(_local, "seeds", None)


def _next_call_index() -> int:
    i = getattr(_local, "calls", 0)
    _local.calls = i + 1
    return i


_MASK = (1 << 63) - 1


def draw_seed(base: int, index: int, salt: int = 0) -> int:
    """A seed for draw ``index`` (and layer call ``salt``) of a call seeded with ``base``."""
    h = (int(base) * 6364136223846793005 + (int(index) + 1) * 1442695040888963407
         + (int(salt) + 1) * 2654435761) & _MASK
    h ^= h >> 29
    return (h * 0xBF58476D1CE4E5B9) & _MASK


def seed_current(seed: int, device: torch.device | str | None = None) -> None:
    """Seed the CPU generator and the generator of ``device`` (the device the draws are made
    on; a CUDA tensor on ``cuda:1`` draws from ``cuda:1``'s generator whatever the current
    device is). ``device=None`` seeds the current CUDA device's generator, if CUDA is in use.
    Only these two are touched, so a forked RNG that restores one device leaves the others
    untouched."""
    torch.default_generator.manual_seed(seed)
    dev = None if device is None else torch.device(device)
    if dev is None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.manual_seed(seed)
    elif dev.type == "cuda":
        with torch.cuda.device(dev):
            torch.cuda.manual_seed(seed)
    elif dev.type != "cpu":
        accel = getattr(torch, dev.type, None)
        if accel is not None and hasattr(accel, "manual_seed"):
            accel.manual_seed(seed)


def rng_devices(device: torch.device) -> list[int]:
    """The CUDA device indices :func:`torch.random.fork_rng` must save for draws on
    ``device`` (the device's own index, never the current device's by default)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return []
    return [dev.index if dev.index is not None else torch.cuda.current_device()]


def fresh_seed() -> int:
    """One integer drawn from the global torch RNG (so ``seeded`` makes it reproducible)."""
    return int(torch.randint(0, 2**62, (1,), generator=None).item())


def current_row_start() -> int:
    """Global index of the first example of the current pass (0 outside a chunked call)."""
    return getattr(_local, "row_start", 0)


@contextlib.contextmanager
def draw_groups(groups: int, seeds: Sequence[int] | None = None, *,
                row_start: int = 0) -> Iterator[None]:
    """Treat each batch as ``groups`` stacked copies that get independent randomness.

    ``seeds`` (one per group): each group's draw is made under its own seed, so a draw does
    not depend on which other groups share the forward pass. ``row_start``: the global index
    of the pass's first example (each copy holds the same examples), so per-row draws
    (:func:`row_randn`) do not depend on how a batch is split into example chunks.
    """
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    if seeds is not None and len(seeds) != groups:
        raise ValueError(f"got {len(seeds)} seeds for {groups} draw groups")
    previous = (current_groups(), current_seeds(), getattr(_local, "calls", 0),
                current_row_start())
    _local.groups, _local.seeds, _local.calls, _local.row_start = groups, seeds, 0, row_start
    try:
        yield
    finally:
        _local.groups, _local.seeds, _local.calls, _local.row_start = previous


#: Examples per block of per-row randomness: inside seeded draw groups the per-row draws of a
#: block of this many consecutive global example indices come from one seed, so they are the
#: same whichever example chunk (``max_batch``) the rows land in. Example chunks of
#: :func:`replicated_forward` are aligned to it where they are at least this long.
ROW_BLOCK = 32


@contextlib.contextmanager
def _row_context(seed: int | None, call: int, start: int) -> Iterator[None]:
    previous = getattr(_local, "row_ctx", None)
    _local.row_ctx = None if seed is None else (int(seed), int(call), int(start))
    try:
        yield
    finally:
        _local.row_ctx = previous


def _row_blocks(rows: int, draw: Callable[[torch.Generator, int], torch.Tensor],
                device: torch.device) -> torch.Tensor | None:
    """Rows ``[start, start + rows)`` of the per-row draw of the current seeded group, made
    block by block from (group seed, block index, layer call); ``None`` outside seeded
    groups. ``draw(generator, n)`` makes ``n`` rows."""
    ctx = getattr(_local, "row_ctx", None)
    if ctx is None:
        return None
    seed, call, start = ctx
    gen = torch.Generator(device=device)
    parts = []
    first, last = start // ROW_BLOCK, (start + rows - 1) // ROW_BLOCK
    for b in range(first, last + 1):      # a loop over blocks of examples, not examples
        gen.manual_seed(draw_seed(seed, b + 1, call))
        block = draw(gen, ROW_BLOCK)
        lo = max(start, b * ROW_BLOCK) - b * ROW_BLOCK
        hi = min(start + rows, (b + 1) * ROW_BLOCK) - b * ROW_BLOCK
        parts.append(block[lo:hi])
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def row_randn(shape: Sequence[int], *, device: torch.device | str, dtype: torch.dtype
              ) -> torch.Tensor:
    """``torch.randn(shape)`` with rows first. Inside a seeded draw group (a layer's
    :meth:`StochasticModule.sample_seeded`) row ``r`` is drawn by global example index (see
    :data:`ROW_BLOCK`), so it does not repeat across example chunks and does not depend on
    them; elsewhere it is a plain draw from the global RNG."""
    shape = tuple(int(d) for d in shape)
    dev = torch.device(device)
    out = _row_blocks(shape[0], lambda g, n: torch.randn((n, *shape[1:]), generator=g,
                                                         device=dev, dtype=dtype), dev)
    return torch.randn(shape, device=dev, dtype=dtype) if out is None else out


def row_randint(high: int, rows: int, *, device: torch.device | str) -> torch.Tensor:
    """``torch.randint(high, (rows,))``, per row as :func:`row_randn`."""
    dev = torch.device(device)
    out = _row_blocks(rows, lambda g, n: torch.randint(high, (n,), generator=g, device=dev),
                      dev)
    return torch.randint(high, (rows,), device=dev) if out is None else out


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Fork the global torch RNG (CPU and CUDA) and seed it; ``None`` leaves it unseeded."""
    if seed is None:
        yield
        return
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class StochasticModule(nn.Module):
    """Base class of layers whose forward pass is random (see the module docstring)."""

    #: True when draw groups in one pass cost what one group does (per-row randomness such as
    #: input noise); False when each group needs its own work (a noisy weight per group, a
    #: normalization type per group): on the CPU :func:`replicated_forward` then runs one draw
    #: per pass (see :func:`groups_batch_cheaply`)
    cheap_groups: bool = True

    def __init__(self) -> None:
        super().__init__()
        self._frozen = False
        self._frozen_state: Any = _UNSET
        self.last_state: Any = None

    # -- to implement -------------------------------------------------------------------
    def sample_state(self, x: torch.Tensor, groups: int) -> Any:  # pragma: no cover
        raise NotImplementedError

    def forward_with_state(self, x: torch.Tensor, state: Any) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def sample_seeded(self, x: torch.Tensor, seeds: Sequence[int], call: int) -> Any:
        """The state of ``len(seeds)`` draw groups, group ``j`` drawn under its own seed
        (and ``call``, this layer's position in the forward pass): one ``sample_state(rows,
        1)`` per group, joined by :meth:`merge_states`. Per-row parts of a state are drawn
        with :func:`row_randn` / :func:`row_randint`, which then key them by global example
        index. Layers whose draws are shared between layers override it."""
        rows = x.shape[0] // len(seeds)
        start = current_row_start()
        states = []
        for j, s in enumerate(seeds):
            seed_current(draw_seed(s, 0, call), x.device)
            with _row_context(s, call, start):
                states.append(self.sample_state(x[j * rows : (j + 1) * rows], 1))
        return states[0] if len(states) == 1 else self.merge_states(states)

    def merge_states(self, states: list[Any]) -> Any:
        """Join per-group states (each drawn with ``groups=1``) into one state of all groups.

        Default: tensors are concatenated along dim 0, dataclasses field by field (``None``
        and non-tensor fields are taken from the first state).
        """
        return _merge(states)

    # -- shared machinery ---------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._frozen:
            if self._frozen_state is _UNSET:
                self._frozen_state = self.sample_state(x, 1)
            state = self._frozen_state
        else:
            groups = current_groups()
            if x.shape[0] % groups != 0:
                raise ValueError(
                    f"batch of {x.shape[0]} rows cannot be split into {groups} draw groups"
                )
            seeds = current_seeds()
            if seeds is None:
                state = self.sample_state(x, groups)
            else:
                state = self.sample_seeded(x, seeds, _next_call_index())
        self.last_state = state
        return self.forward_with_state(x, state)

    @property
    def frozen(self) -> bool:
        return self._frozen


def _merge(states: list[Any]) -> Any:
    first = states[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(states, dim=0)
    if first is None:
        return None
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        values = {}
        for f in dataclasses.fields(first):
            parts = [getattr(s, f.name) for s in states]
            values[f.name] = (torch.cat(parts, dim=0) if isinstance(parts[0], torch.Tensor)
                              else parts[0])
        return dataclasses.replace(first, **values)
    if isinstance(first, (tuple, list)):
        return type(first)(_merge([s[i] for s in states]) for i in range(len(first)))
    raise TypeError(f"cannot merge draw states of type {type(first).__name__}; override "
                    "merge_states")


def controlled_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` whose randomness this mechanism controls, in module order.

    Like ``model.modules()``, except below a module that owns the randomness of its subtree:
    a module with a method ``controlled_children()`` contributes only the children it names
    (a :class:`~advdefense.defenses.smoothing.SmoothedClassifier` names its Monte-Carlo draw
    seeds, which replay every draw of its base, weight noise included), and a
    :class:`SeededRandomness` none (its seed replays the wrapped model's draws)."""
    out: list[nn.Module] = []
    seen: set[int] = set()

    def visit(m: nn.Module) -> None:
        if id(m) in seen:
            return
        seen.add(id(m))
        out.append(m)
        owned = getattr(m, "controlled_children", None)
        for child in (owned() if callable(owned) else m.children()):
            visit(child)

    visit(model)
    return out


def stochastic_modules(model: nn.Module) -> list[StochasticModule]:
    """The stochastic layers of ``model`` that :func:`freeze`, :func:`get_states` and the
    seeded draws act on (module order; see :func:`controlled_modules`)."""
    return [m for m in controlled_modules(model) if isinstance(m, StochasticModule)]


def _declares_random(module: nn.Module) -> bool:
    return (not isinstance(module, StochasticModule)
            and bool(getattr(module, "stochastic", False)))


def is_stochastic(model: nn.Module) -> bool:
    """True if ``model`` holds, anywhere, a stochastic layer that is not frozen, or a module
    that declares itself random with an attribute ``stochastic = True`` (for wrappers that
    are random without holding a :class:`StochasticModule`)."""
    for m in controlled_modules(model):
        if isinstance(m, StochasticModule):
            if not m.frozen:
                return True
        elif _declares_random(m) and not getattr(m, "frozen", False):
            return True
    return False


def batched_draws_supported(model: nn.Module) -> bool:
    """True if every random part of ``model`` honours :func:`draw_groups`: it is a
    :class:`StochasticModule`, or a module declaring ``stochastic = True`` also declares
    ``batched_draws = True`` (it splits the groups itself), or it sits inside a
    :class:`SeededRandomness` (which makes one seeded call per group). Otherwise independent
    draws need separate forward calls (:func:`replicated_forward` makes them)."""
    return not any(_declares_random(m) and not getattr(m, "batched_draws", False)
                   for m in controlled_modules(model))


def groups_batch_cheaply(model: nn.Module) -> bool:
    """True unless a stochastic layer of ``model`` pays per draw group
    (:attr:`StochasticModule.cheap_groups` is False, as for PNI/CNI weight noise and RNA
    paths drawn per call). Such a layer turns a pass of ``k`` stacked copies into ``k``
    sub-batch computations joined again (split, per-group kernel, concatenation, and their
    backward), which on the CPU costs more than the ``k`` separate passes it replaces:
    smallcnn, 2 threads, EOT-PGD over PNI-W at batch 128 x 8 draws ran at 0.81x of one draw
    per pass, and over RNA (BN/IN) at batch 8 x 8 draws at 0.74x."""
    return all(m.cheap_groups for m in stochastic_modules(model))


def get_states(model: nn.Module) -> list[Any]:
    """The state each stochastic layer used in its last forward call (module order)."""
    return [m.last_state for m in stochastic_modules(model)]


@contextlib.contextmanager
def freeze(model: nn.Module, states: list[Any] | None = None) -> Iterator[nn.Module]:
    """Freeze the randomness of every stochastic layer of ``model`` for the duration.

    Without ``states`` each layer draws once on its next forward and then reuses that draw.
    With ``states`` (one entry per stochastic layer, module order; ``None`` = draw lazily)
    each layer uses the given state. Previous frozen/unfrozen settings are restored on exit,
    so freezes nest.
    """
    modules = stochastic_modules(model)
    if states is not None and len(states) != len(modules):
        raise ValueError(f"got {len(states)} states for {len(modules)} stochastic layers")
    saved = [(m._frozen, m._frozen_state) for m in modules]
    try:
        for i, m in enumerate(modules):
            m._frozen = True
            given = None if states is None else states[i]
            m._frozen_state = _UNSET if given is None else given
        yield model
    finally:
        for m, (was_frozen, was_state) in zip(modules, saved, strict=True):
            m._frozen, m._frozen_state = was_frozen, was_state


# Rows per pass of replicated draws on CPU. ``max_batch`` is a memory budget; on a GPU filling
# it is fastest, but on CPU a larger working set only costs cache misses: for smallcnn + PNI,
# batch 128 x EOT 8 took 4.5 s with all 1,024 rows in one pass and 3.1 s with one draw per pass
# (1 thread); with Gaussian input noise (2 threads) passes of 128 rows ran at 1.23-1.35x of
# torchattacks' loop and passes of 256 rows at 0.94x. Small batches are still stacked up to
# this many rows. Set to None to batch up to ``max_batch`` on CPU too.
CPU_ROWS: int | None = 128


def _is_out_of_memory(err: BaseException) -> bool:
    """A device allocation failure: ``torch.OutOfMemoryError``, or a cuDNN/cuBLAS/CUDA error
    raised when their workspace could not be allocated."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    if not isinstance(err, RuntimeError):
        return False
    text = str(err)
    return ("ALLOC_FAILED" in text or "CUDA out of memory" in text
            or "CUBLAS_STATUS_NOT_INITIALIZED" in text)


# The largest pass (in rows) that ran out of memory, halved, per model (keyed by its first
# module with parameters, which wrappers such as a noisy view share): later chunks and later
# calls on the same model start there instead of running out of memory again.
_row_limits: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _limit_key(model: nn.Module) -> nn.Module:
    return next((m for m in model.modules()
                 if next(m.parameters(recurse=False), None) is not None), model)


def learned_row_limit(model: nn.Module) -> int | None:
    """Rows per pass that :func:`replicated_forward` learned to fit for ``model`` after an
    out-of-memory error (``None``: none yet)."""
    return _row_limits.get(_limit_key(model))


def _plan(start: int, m: int, k0: int, kc: int, rows: int, batched: bool
          ) -> list[tuple[int, int, int, int]]:
    """Passes (start, examples, first draw, draws) covering ``m`` examples from ``start``
    and draws ``k0..k0+kc``, at most ``rows`` rows each; example splits fall on multiples of
    :data:`ROW_BLOCK` where a pass holds at least one block."""
    if m > rows:
        step = rows if rows < ROW_BLOCK else rows - rows % ROW_BLOCK
        out = []
        for s0 in range(start, start + m, step):
            out += _plan(s0, min(step, start + m - s0), k0, kc, rows, batched)
        return out
    per_pass = max(1, rows // m) if batched else 1
    return [(start, m, j, min(per_pass, k0 + kc - j)) for j in range(k0, k0 + kc, per_pass)]


def replicated_forward(
    model: nn.Module,
    x: torch.Tensor,
    copies: int,
    body: Callable[[torch.Tensor, int, int, int], Any],
    *,
    max_batch: int = 4096,
    seed: int | None = None,
) -> None:
    """Evaluate ``copies`` independent draws of ``model``'s randomness on ``x``, chunked.

    For every chunk, ``body(x_rep, start, k0, kc)`` is called with ``x_rep`` = rows
    ``x[start:start+m]`` stacked ``kc`` times (copy ``j`` of the chunk is draw ``k0 + j``),
    inside ``draw_groups(kc, seeds, row_start=...)``; ``body`` runs the model (and any
    backward pass) itself, so memory is bounded by ``max_batch`` rows (and :data:`CPU_ROWS`
    on CPU). A chunk that runs out of device memory (:func:`_is_out_of_memory`) is halved and
    retried with the same draws, and the halved size is kept for the rest of the call and for
    later calls on the same model (:func:`learned_row_limit`). ``body`` must therefore
    accumulate its results only after its last allocation, and by index (``start``, ``k0``):
    chunks of one call need not have the same shape (:class:`DrawOutputs` collects them).

    Draw ``j`` is seeded from (``seed``, ``j``); ``seed=None`` takes one integer from the
    global RNG, so consecutive calls get fresh draws and a seeded caller is reproducible.
    Per-row randomness is keyed by global example index (:func:`row_randn`; a call made
    inside another pass continues that pass's index), so it repeats across no two examples and
    the draws do not depend on the chunking: ``max_batch`` is only a memory setting. A model
    whose randomness does not honour ``draw_groups`` (:func:`batched_draws_supported` is
    False) gets one forward call per draw inside ``body`` (``kc = 1`` chunks), seeded the same
    way. The generators of the CPU and of ``x``'s device are restored after each chunk, so
    chunking never shifts the caller's random stream.
    """
    n = x.shape[0]
    k = max(1, int(copies))
    if n == 0:
        return
    base = fresh_seed() if seed is None else int(seed)
    offset = current_row_start()
    rows = max(1, int(max_batch))
    if x.device.type == "cpu" and CPU_ROWS is not None:
        rows = min(rows, max(CPU_ROWS, min(n, rows)))  # a pass holds all its examples once
    key = _limit_key(model)
    learned = _row_limits.get(key)
    if learned is not None:
        rows = min(rows, learned)
    batched = batched_draws_supported(model)
    if x.device.type == "cpu" and not groups_batch_cheaply(model):
        batched = False  # one draw per pass: the per-group kernels cost more than they save
    devices = rng_devices(x.device)
    step = min(n, max(1, int(max_batch)), rows)
    if step < n and step >= ROW_BLOCK:
        step -= step % ROW_BLOCK   # example chunks on block boundaries
    work = []
    for start in range(0, n, step):
        work += _plan(start, min(step, n - start), 0, k, rows, batched)
    work.reverse()
    while work:
        start, m, k0, kc = work.pop()
        xs = x[start : start + m]
        seeds = [draw_seed(base, k0 + j) for j in range(kc)]
        xr = xs.repeat(kc, *([1] * (x.dim() - 1))) if kc > 1 else xs
        try:
            with (torch.random.fork_rng(devices=devices),
                  draw_groups(kc, seeds, row_start=offset + start)):
                seed_current(seeds[0], x.device)
                body(xr, start, k0, kc)
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not _is_out_of_memory(err) or kc * m == 1:
                raise
            del xr
            if x.device.type == "cuda":
                torch.cuda.empty_cache()
            rows = max(1, (kc * m) // 2)
            _row_limits[key] = min(rows, _row_limits.get(key, rows))
            _log.warning("out of memory at %d rows: passes of at most %d rows from now on",
                         kc * m, rows)
            # the same draws and examples, re-planned at the new size, in order
            remaining = [item for w in reversed(work) for item in
                         (_plan(*w, rows, batched) if w[1] * w[3] > rows else [w])]
            work = list(reversed(_plan(start, m, k0, kc, rows, batched) + remaining))


class DrawOutputs:
    """Per-draw outputs of a :func:`replicated_forward` call, collected by index into one
    ``(copies, n, ...)`` tensor, whatever the shapes of the chunks (out-of-memory halving can
    change them in the middle of a call)."""

    def __init__(self, copies: int, n: int) -> None:
        self.copies, self.n = max(1, int(copies)), int(n)
        self.value: torch.Tensor | None = None

    def put(self, out: torch.Tensor, start: int, k0: int, kc: int) -> None:
        """Store ``out`` (``kc * m`` rows, copy-major) as draws ``k0..k0+kc`` of examples
        ``start..start+m``."""
        m = out.shape[0] // kc
        if self.value is None:
            self.value = out.new_empty((self.copies, self.n, *out.shape[1:]))
        self.value[k0 : k0 + kc, start : start + m] = out.reshape(kc, m, *out.shape[1:])


class SeededRandomness(StochasticModule):
    """A model that is random without :class:`StochasticModule` layers, made controllable.

    The wrapped model draws from the global torch RNG on every call. A draw is a seed: draw
    group ``j`` of a batch is run as its own forward call after seeding with ``seed_j`` (and
    the global index of the pass's first example), so ``draw_groups`` gives real independent
    draws (one forward call per group), ``freeze`` replays one draw, and ``seeded`` makes it
    reproducible. How the wrapped model maps its draws to rows is its own, so its draws are
    keyed by example chunk rather than by example: the same whenever a batch is one chunk
    (``max_batch`` at least the batch, the default), different (never repeated) otherwise.
    Randomness from other generators (NumPy, Python's ``random``) is not controlled:
    :func:`probe_randomness` reports it.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def controlled_children(self) -> list[nn.Module]:
        """None: this wrapper's seed replays every draw of the wrapped model."""
        return []

    def sample_state(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        return torch.randint(0, 2**62, (groups,))

    def forward_with_state(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        g = state.numel()
        parts = x.split(x.shape[0] // g) if g > 1 else (x,)
        start = current_row_start()
        outs = []
        devices = rng_devices(x.device)
        for part, s in zip(parts, state.tolist(), strict=True):
            with torch.random.fork_rng(devices=devices), draw_groups(1, row_start=start):
                # keyed by the pass's first example too: two example chunks of one draw
                # never replay the same per-row noise
                seed_current(draw_seed(int(s), start) if start else int(s), x.device)
                outs.append(self.model(part))
        return outs[0] if g == 1 else torch.cat(outs, dim=0)


def probe_randomness(model: nn.Module, x: torch.Tensor, *, forwards: int = 2) -> str:
    """Classify ``model`` by two (or ``forwards``) forward passes of the same input ``x``
    under :func:`freeze`, in the model's current mode and without gradients:

    ``"deterministic"``  the outputs agree and nothing declares randomness;
    ``"declared"``       every random part is a :class:`StochasticModule` or declares
                         ``batched_draws``, and freezing makes the outputs agree;
    ``"undeclared"``     the outputs differ under freeze (randomness outside the mechanism,
                         or a module declaring ``stochastic = True`` without batched draws):
                         wrap the model in :class:`SeededRandomness`.
    """
    with torch.inference_mode(), freeze(model):
        outs = [model(x) for _ in range(max(2, forwards))]
    differ = any(not torch.allclose(outs[0], o, rtol=1e-5, atol=1e-6) for o in outs[1:])
    if differ or not batched_draws_supported(model):
        return "undeclared"
    return "declared" if is_stochastic(model) else "deterministic"
