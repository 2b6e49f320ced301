"""The Trainer: one loop for every recipe, defense and speed option (DESIGN.md, contract 5).

``Trainer(cfg).fit(resume=False) -> metrics`` trains ``cfg.train.epochs`` epochs and, after
every epoch,

* appends one JSON line to ``<output_dir>/metrics.jsonl``: ``epoch``, ``lr``, ``train_loss``,
  ``train_acc``, the recipe's other logs (``train_adv_acc``, ``train_kl``, ...),
  ``monitor_clean_acc`` and ``monitor_pgd_acc`` (accuracies on the first
  ``data.monitor_size`` examples of ``data.monitor_split``, PGD per ``train.monitor_attack``,
  with EOT and repeated predictions for a stochastic model and the CAS loss for a model with
  heads: :func:`.early_stopping.monitor_plan`, named in ``monitor``) and ``seconds``;
* atomically writes ``<output_dir>/last.pt`` (model, optimizer, schedule, every RNG state,
  config, epoch, metrics history); ``config.yaml`` is written next to it at the start.

With ``train.early_stopping`` (:mod:`.early_stopping`) ``train.epochs`` is a cap: training
stops once the monitored accuracy has not risen for ``patience`` epochs, each record also
holds ``best_epoch``, and the best epoch's checkpoint is kept as ``best.pt``.

``fit(resume=True)`` continues from ``last.pt``: every RNG (torch, numpy, Python, the loader's
generator, and per-rank states in multi-process runs) is saved and restored; the data order of
epoch ``e`` depends only on ``(seed, e)`` (``DistributedSampler.set_epoch``, also used with one
process); the monitor runs under a forked RNG, so it never shifts the training stream. A
resumed run reaches *exactly* the weights of an uninterrupted one on CPU with in-memory data,
and on CUDA with ``train.deterministic: true`` (deterministic kernels, non-persistent loader
workers whose seeds come from the saved loader generator). Without it, cuDNN autotuning, atomic
adds in backward kernels and persistent workers' augmentation streams make two runs (resumed or
not) differ by run-to-run noise.

Seeding: ``cfg.seed`` seeds Python, numpy and torch before the model is built (the same
initial weights in every process); the training stream is then seeded with ``seed + rank``
(different RNA/PNI draws and attack starts per process).

Defense hooks: recipe arguments a defense asks for (``model.recipe_defaults``, e.g. CAS's
``aux_weight``) are merged under ``cfg.train.recipe_args``.

Speed options (``train.amp``, ``train.channels_last``, ``train.compile``): ``channels_last``
(``auto`` by default: on the CPU for convolutional models, :mod:`advdefense.layout`) puts the
4-D weights in channels_last, which carries the convolutions' activations. ``amp: bf16`` runs
the recipe's outer loss under ``torch.autocast`` (CPU or CUDA); ``fp16`` adds a GradScaler and
needs CUDA. The inner maximization runs in fp32 unless ``train.attack_precision: amp`` (see
:mod:`advdefense.training.recipes`); on Ampere and later GPUs fp32 convolutions use TF32.
``compile`` applies ``torch.compile`` to a module that routes both ``model(x)`` and
``forward_with_aux`` (CAS heads) through the compiled graph; TRADES/MART need no double
backward here (their inner maximization differentiates with respect to the inputs only, via
``torch.autograd.grad``). If compilation fails at the first step the Trainer logs a warning
and continues eagerly. On CUDA without ``train.deterministic`` cuDNN autotuning is on.

Multi-process (torchrun): DDP with the global ``data.batch_size`` split over the processes;
``train.sync_bn`` converts BatchNorm to ``nn.SyncBatchNorm`` and draws RNA paths from a
generator that every process seeds with ``(seed, epoch, step)``, so the global batch takes one
path per step, as one process would. Without ``sync_bn`` every process normalizes its own
share and draws its own path.

``Trainer(cfg, train_set=...)`` trains on a given dataset instead of ``data.name``'s split
(synthetic data for benchmarks, a user's own data); :meth:`Trainer.train_step` runs one
optimizer step on a batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from ..attacks import eval_mode
from ..config import ExperimentConfig, build_from_config, save_config, to_dict
from ..data import as_tensors, load_split, loader_options
from ..defenses import rna
from ..errors import AdvDefenseError, CheckpointError, ConfigError
from ..layout import to_channels_last
from ..models.heads import forward_with_aux
from ..precision import warn_if_bf16_emulated
from ..provenance import machine_line
from ..randomness import seeded, stochastic_modules
from . import distributed as D
from .checkpoint import capture_rng, load_checkpoint, make_checkpoint, restore_rng, save_checkpoint
from .early_stopping import lr_decays, monitor_plan, stopping_state
from .optim import build_optimizer, build_schedule
from .recipes import Recipe, StandardRecipe, build_recipe, recipe_defaults

log = logging.getLogger(__name__)

__all__ = ["Trainer", "seed_everything", "TrainingError"]

CHECKPOINT_NAME = "last.pt"
BEST_NAME = "best.pt"
_LOADER_KEYS = ("num_workers", "pin_memory", "persistent_workers")
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.yaml"


class TrainingError(AdvDefenseError):
    """Training diverged or cannot continue."""


def seed_everything(seed: int) -> None:
    """Seed Python ``random``, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _AuxModule(nn.Module):
    """Lets DistributedDataParallel run ``forward_with_aux`` through its own forward, so the
    auxiliary heads' gradients are synchronized too."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x, y=None, with_aux: bool = False):
        if with_aux:
            return forward_with_aux(self.inner, x, y)
        return self.inner(x)

    def forward_with_aux(self, x, y=None):
        return forward_with_aux(self.inner, x, y)


class _AuxDDP(nn.parallel.DistributedDataParallel):
    def forward_with_aux(self, x, y=None):
        return self(x, y, with_aux=True)


class _CompiledAux(nn.Module):
    """``torch.compile`` of a model that also compiles its ``forward_with_aux``.

    ``torch.compile(model).forward_with_aux`` would be the eager method of the original model
    (so CAS heads would train uncompiled); here both entry points call one compiled
    :class:`_AuxModule` (``with_aux`` is a guarded constant: one graph per value).
    """

    def __init__(self, inner: nn.Module, backend: str | None = None) -> None:
        super().__init__()
        self.aux = _AuxModule(inner)
        kwargs = {} if backend is None else {"backend": backend}
        # not registered as a submodule: it wraps self.aux, whose parameters are already here
        object.__setattr__(self, "compiled", torch.compile(self.aux, **kwargs))

    def forward(self, x):
        return self.compiled(x)

    def forward_with_aux(self, x, y=None):
        return self.compiled(x, y, with_aux=True)


def set_deterministic(mode: bool | str) -> None:
    """Deterministic kernels for ``train.deterministic`` (``True`` warns about ops without a
    deterministic implementation, ``"strict"`` raises). Process-wide, as PyTorch's flags are."""
    if not mode:
        return
    # cuBLAS reads this when its handle is created (before the first CUDA matmul)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=mode != "strict")


def _overlapping_splits(train: str, monitor: str) -> bool:
    inside_train = ("train", "val", "fit")
    if train == monitor:
        return True
    return (train == "train" and monitor in inside_train) or (
        monitor == "train" and train in inside_train)


def init_from_checkpoint(model: nn.Module, path: str) -> None:
    """Copy every same-named, same-shaped tensor of a checkpoint's model into ``model``.

    A target name with leading wrapper components the checkpoint lacks (``model.features.1``
    for a model wrapped in ``WithInputNoise``, e.g. Gaussian fine-tuning of a CNI-W
    checkpoint) matches the checkpoint's ``features.1``.
    """
    from .checkpoint import load_checkpoint

    source = load_checkpoint(path)["model"]
    target = model.state_dict()
    copied = {}
    for k, t in target.items():
        parts = k.split(".")
        for i in range(len(parts)):
            name = ".".join(parts[i:])
            if name in source and source[name].shape == t.shape:
                copied[k] = source[name]
                break
    if not copied:
        raise ConfigError(f"train.init_from={path}: no tensor matches this model; is it a "
                          "checkpoint of the same architecture?")
    model.load_state_dict(copied, strict=False)
    new = sorted(set(target) - set(copied))
    log.info("initialised %d tensors from %s; %d kept their init%s", len(copied), path,
             len(new), f" ({', '.join(new[:5])}{'...' if len(new) > 5 else ''})" if new else "")


class Trainer:
    """Train the model a config describes (see the module docstring).

    ``device``: ``"cpu"``, ``"cuda"`` or ``None`` (CUDA if available). ``progress``: show tqdm
    bars (default: only when stderr is a terminal, on rank 0).
    """

    def __init__(self, cfg: ExperimentConfig, *, device: str | torch.device | None = None,
                 progress: bool | None = None, train_set: Dataset | None = None) -> None:
        self.cfg = cfg
        tc = cfg.train
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if tc.amp == "fp16" and self.device.type != "cuda":
            raise ConfigError("train.amp=fp16 needs a CUDA device (it uses a GradScaler); "
                              "use train.amp=bf16 on CPU")
        self.compile_backend = self._compile_backend(tc.compile)
        set_deterministic(tc.deterministic)
        if self.device.type == "cuda" and not tc.deterministic:
            torch.backends.cudnn.benchmark = True
        self.dist = D.init_from_env(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.is_main = self.dist.is_main
        self.progress = (sys.stderr.isatty() if progress is None else progress) and self.is_main
        self.output_dir = Path(cfg.output_dir or Path("runs") / cfg.name)

        seed_everything(cfg.seed)
        model, self.info = build_from_config(cfg)
        if tc.init_from:
            init_from_checkpoint(model, tc.init_from)
        self.model = model.to(self.device)
        to_channels_last(self.model, {True: "channels_last", False: "contiguous"}.get(
            tc.channels_last, tc.channels_last))
        self.path_generator: torch.Generator | None = None
        if tc.sync_bn:
            self._sync_batchnorm()

        args = {**recipe_defaults(self.model), **tc.recipe_args}
        self.recipe: Recipe = build_recipe(tc.recipe, tc.attack, **args)
        self.warmup_recipe: Recipe | None = None
        if tc.adv_start_epoch > 0 and self.recipe.adversarial:
            self.warmup_recipe = StandardRecipe(aux_weight=self.recipe.aux_weight,
                                                draw=self.recipe.draw)
        for r in (self.recipe, self.warmup_recipe):
            if r is not None:
                r.attack_autocast = tc.attack_precision == "amp"
        self.optimizer = build_optimizer(self.model, tc.optimizer)
        self.schedule = build_schedule(self.optimizer, tc.schedule, epochs=tc.epochs)
        self.scaler = torch.amp.GradScaler("cuda") if tc.amp == "fp16" else None

        self._setup_data(train_set)
        self.train_model = self._wrap(self.model, compile_=bool(tc.compile))
        self._compile_checked = not tc.compile
        # Training stream: one per process (RNA/PNI draws, attack starts differ by rank).
        seed_everything(cfg.seed + self.dist.rank)
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0

    # -- setup ----------------------------------------------------------------------------
    @staticmethod
    def _compile_backend(option: bool | str) -> str | None:
        if not isinstance(option, str):
            return None
        import torch._dynamo

        known = torch._dynamo.list_backends(exclude_tags=())
        if option not in known:
            raise ConfigError(f"train.compile: unknown backend {option!r}; use true or one of: "
                              f"{', '.join(sorted(known))}")
        return option

    def _sync_batchnorm(self) -> None:
        """``train.sync_bn``: global-batch BN statistics and one RNA path per step for all.

        RNA layers sum their BN statistics themselves (:func:`rna.set_sync_batchnorm`, which
        also works on CPU/gloo); other BatchNorm layers become ``nn.SyncBatchNorm`` (CUDA).
        """
        if not self.dist.enabled:
            log.info("train.sync_bn has no effect with one process")
            return
        layers = rna.rna_layers(self.model)
        inside_rna = {id(n) for la in layers for n in la.norms}
        plain = [m for m in self.model.modules()
                 if isinstance(m, _BatchNorm) and id(m) not in inside_rna]
        if plain and self.device.type != "cuda":
            raise ConfigError("train.sync_bn on CPU works only for BatchNorm inside RNA layers "
                              "(DistributedDataParallel accepts nn.SyncBatchNorm on GPUs only); "
                              "run on GPUs or drop sync_bn")

        def convert(module: nn.Module) -> None:
            for name, child in module.named_children():
                if isinstance(child, rna.RandomNormalization):
                    continue
                if isinstance(child, _BatchNorm):
                    setattr(module, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
                else:
                    convert(child)

        convert(self.model)
        if layers:
            rna.set_sync_batchnorm(self.model, True)
            self.path_generator = torch.Generator(device=self.device)
            rna.set_path_generator(self.model, self.path_generator)

    def _seed_paths(self, epoch: int, step: int) -> None:
        """The same RNA path seed on every process for step ``step`` of epoch ``epoch``."""
        if self.path_generator is not None:
            self.path_generator.manual_seed(
                (self.cfg.seed * 1_000_003 + epoch * 1_000_033 + step) % (2**63))

    def _setup_data(self, train_set: Dataset | None = None) -> None:
        dc = self.cfg.data
        world = self.dist.world_size
        if dc.batch_size % world:
            raise ConfigError(f"data.batch_size={dc.batch_size} (the global batch) must be "
                              f"divisible by the number of processes ({world})")
        if train_set is None:
            train_set = load_split(dc.name, dc.train_split, root=dc.root,
                                   download=dc.download, augment=dc.augment, limit=dc.limit)
            if dc.monitor_size > 0 and _overlapping_splits(dc.train_split, dc.monitor_split):
                log.warning("data.monitor_split=%s lies inside data.train_split=%s: the "
                            "monitor accuracies are training-set figures (train on fit and "
                            "monitor on val, or monitor on test)", dc.monitor_split,
                            dc.train_split)
        self.train_set = train_set
        # The order of epoch e depends only on (seed, e); one process is world size 1.
        self.sampler = DistributedSampler(self.train_set, num_replicas=world,
                                          rank=self.dist.rank, shuffle=True,
                                          seed=self.cfg.seed, drop_last=False)
        self.loader_generator = torch.Generator().manual_seed(self.cfg.seed)
        persistent = dc.persistent_workers
        if self.cfg.train.deterministic and persistent is None:
            persistent = False
        self.loader_options = loader_options(
            dc.name, self.device.type, num_workers=dc.num_workers, pin_memory=dc.pin_memory,
            persistent_workers=persistent)
        self.loader = DataLoader(self.train_set, batch_size=dc.batch_size // world,
                                 sampler=self.sampler, generator=self.loader_generator,
                                 **self.loader_options)
        self.monitor_x = self.monitor_y = None
        if dc.monitor_size > 0:
            mon = load_split(dc.name, dc.monitor_split, root=dc.root, download=dc.download,
                             augment=False, limit=dc.monitor_size)
            self.monitor_x, self.monitor_y = as_tensors(mon)

    def _wrap(self, model: nn.Module, *, compile_: bool) -> nn.Module:
        train_model: nn.Module = model
        if compile_:
            try:
                train_model = _CompiledAux(model, self.compile_backend)
            except Exception as exc:  # noqa: BLE001 - any backend failure -> eager
                log.warning("torch.compile failed (%s); training eagerly", exc)
                train_model = model
        if self.dist.enabled:
            # RNA layers use every parameter in every forward (all types are computed); other
            # stochastic layers (a user's own) and auxiliary heads may leave some unused
            find_unused = hasattr(model, "forward_with_aux") or any(
                not isinstance(m, rna.RandomNormalization) for m in stochastic_modules(model))
            ids = [self.device.index] if self.device.type == "cuda" else None
            train_model = _AuxDDP(_AuxModule(train_model), device_ids=ids,
                                  find_unused_parameters=find_unused)
        return train_model

    def _rng_generators(self) -> dict[str, torch.Generator]:
        return {"loader": self.loader_generator}

    # -- one epoch ------------------------------------------------------------------------
    def _autocast(self):
        amp = self.cfg.train.amp
        if amp is None:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        if amp == "bf16":
            warn_if_bf16_emulated(self.device)
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _step(self, recipe: Recipe, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        tc = self.cfg.train
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss, logs = recipe.loss(self.train_model, x, y)
        if not torch.isfinite(loss.detach()):
            raise TrainingError(f"the training loss became {float(loss)}; lower "
                                "train.optimizer.lr or set train.grad_clip")
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if tc.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if tc.grad_clip is not None:
                nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
            self.optimizer.step()
        return logs

    def train_step(self, x: torch.Tensor, y: torch.Tensor, *, recipe: Recipe | None = None
                   ) -> dict[str, float]:
        """One optimizer step of ``recipe`` (default: the configured one) on a batch; the model
        must be in train mode (``fit`` sets it). Returns the recipe's logs."""
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        step = self._step if self._compile_checked else self._first_step
        return step(self.recipe if recipe is None else recipe, x, y)

    def _first_step(self, recipe: Recipe, x, y) -> dict[str, float]:
        """First step with ``compile``: fall back to eager if compilation fails."""
        self._compile_checked = True
        try:
            return self._step(recipe, x, y)
        except AdvDefenseError:
            raise
        except Exception as exc:  # noqa: BLE001 - compiler/backend errors vary widely
            log.warning("torch.compile failed at the first step (%s: %s); training eagerly",
                        type(exc).__name__, " ".join(str(exc).split())[:200])
            self.train_model = self._wrap(self.model, compile_=False)
            return self._step(recipe, x, y)

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        recipe = (self.warmup_recipe if self.warmup_recipe is not None
                  and epoch < self.cfg.train.adv_start_epoch else self.recipe)
        self.model.train()
        self.train_model.train()
        self.sampler.set_epoch(epoch)
        sums: dict[str, float] = defaultdict(float)
        count = 0
        bar = tqdm(self.loader, desc=f"epoch {epoch + 1}/{self.cfg.train.epochs}",
                   disable=not self.progress, leave=False, dynamic_ncols=True)
        for i, (x, y) in enumerate(bar):
            self._seed_paths(epoch, i)
            logs = self.train_step(x, y, recipe=recipe)
            b = int(y.shape[0])
            count += b
            for k, v in logs.items():
                sums[k] += float(v) * b
            if self.progress:
                bar.set_postfix(loss=f"{logs.get('loss', float('nan')):.3f}",
                                acc=f"{logs.get('acc', float('nan')):.3f}")
        bar.close()
        keys = sorted(sums)
        totals = torch.tensor([sums[k] for k in keys] + [float(count)], dtype=torch.float64,
                              device=self.device)
        D.all_reduce_sum(totals)
        n = max(float(totals[-1]), 1.0)
        return {f"train_{k}": float(totals[i]) / n for i, k in enumerate(keys)}

    @torch.no_grad()
    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).argmax(1)

    def monitor(self, epoch: int) -> dict[str, Any]:
        """Clean and PGD accuracy on the monitor examples (sharded over processes).

        Runs under a forked RNG (seeded by seed, epoch and rank), so it never changes the
        training stream. What it runs is :func:`.early_stopping.monitor_plan`: EOT and
        repeated predictions for a stochastic model, the CAS loss for a model with heads;
        the record's ``monitor`` names it.
        """
        if self.monitor_x is None:
            return {}
        from ..evaluation.protocols import verdict

        cfg, tc = self.cfg, self.cfg.train
        idx = D.shard_indices(len(self.monitor_y))
        xs, ys = self.monitor_x[idx], self.monitor_y[idx]
        eps = tc.attack.eps if tc.monitor_attack.eps is None else tc.monitor_attack.eps
        plan = monitor_plan(self.model, tc.monitor_attack, eps=eps,
                            aux_weight=self.recipe.aux_weight)

        def correct(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            if plan.repeats == 1:
                return (self._predict(x) == y).sum()
            return verdict(self.model, x, y, repeats=plan.repeats).all.to(self.device).sum()

        bs = self.cfg.data.batch_size
        clean = torch.zeros((), dtype=torch.float64, device=self.device)
        robust = torch.zeros((), dtype=torch.float64, device=self.device)
        with seeded(cfg.seed * 1_000_003 + 7919 * (epoch + 1) + self.dist.rank), \
                eval_mode(self.model):
            for i in range(0, len(ys), bs):
                xb = xs[i:i + bs].to(self.device)
                yb = ys[i:i + bs].to(self.device)
                clean += correct(xb, yb)
                if plan.attack is not None:
                    with torch.enable_grad():
                        xa = plan.attack(self.model, xb, yb)
                    robust += correct(xa, yb)
        totals = D.all_reduce_sum(torch.stack([clean, robust]))
        n = len(self.monitor_y)
        out: dict[str, Any] = {"monitor_clean_acc": float(totals[0]) / n}
        if plan.attack is not None:
            out["monitor_pgd_acc"] = float(totals[1]) / n
            out["monitor_eps"] = float(eps)
        out["monitor"] = plan.label
        return out

    # -- files ----------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.output_dir / CHECKPOINT_NAME

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / METRICS_NAME

    def _write_metrics_file(self) -> None:
        text = "".join(json.dumps(rec) + "\n" for rec in self.history)
        self.metrics_path.write_text(text)

    def _append_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def _save(self, epoch: int, *, best: bool = False) -> None:
        rng = capture_rng(self._rng_generators())
        extra: dict[str, Any] = {"world_size": self.dist.world_size,
                                 "machine": machine_line(self.device)}
        if self.dist.enabled:
            import torch.distributed as dist

            states: list[Any] = [None] * self.dist.world_size
            dist.all_gather_object(states, rng)
            extra["rng_ranks"] = states
        if self.scaler is not None:
            extra["grad_scaler"] = self.scaler.state_dict()
        if not self.is_main:
            return
        ckpt = make_checkpoint(config=to_dict(self.cfg), model=self.model,
                               optimizer=self.optimizer, scheduler=self.schedule, epoch=epoch,
                               rng=rng, metrics={"last": self.history[-1] if self.history
                                                 else {}, "history": self.history},
                               extra=extra)
        save_checkpoint(ckpt, self.checkpoint_path)
        if best:  # early stopping: the last improving epoch's checkpoint
            save_checkpoint(ckpt, self.output_dir / BEST_NAME)

    def _resume(self) -> None:
        path = self.checkpoint_path
        if not path.is_file():
            raise CheckpointError(f"cannot resume: {path} not found; train without --resume "
                                  "or pass the --output of the interrupted run")
        ckpt = load_checkpoint(path, map_location="cpu")  # RNG states must stay on CPU
        saved = dict(ckpt["config"])
        mine = to_dict(self.cfg)

        def comparable(section: str, value: Any) -> Any:
            if section == "data" and isinstance(value, dict):  # loader options: speed only
                return {k: v for k, v in value.items() if k not in _LOADER_KEYS}
            return value

        changed = [k for k in mine if k not in ("train", "output_dir", "eval", "name")
                   and comparable(k, saved.get(k)) != comparable(k, mine[k])]
        if changed:
            raise CheckpointError(f"cannot resume {path}: config sections {', '.join(changed)} "
                                  "differ from the checkpoint's; use the saved config.yaml")
        try:
            self.model.load_state_dict(ckpt["model"])
            if ckpt.get("optimizer") is not None:
                self.optimizer.load_state_dict(ckpt["optimizer"])
            if ckpt.get("scheduler") is not None:
                self.schedule.load_state_dict(ckpt["scheduler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"cannot resume {path}: its state does not fit this config "
                                  f"({' '.join(str(exc).split())[:160]})") from None
        extra = ckpt.get("extra") or {}
        if self.scaler is not None and "grad_scaler" in extra:
            self.scaler.load_state_dict(extra["grad_scaler"])
        rng = ckpt["rng"]
        ranks = extra.get("rng_ranks")
        if self.dist.enabled:
            if ranks and len(ranks) == self.dist.world_size:
                rng = ranks[self.dist.rank]
            else:
                log.warning("checkpoint was written by %s processes, resuming with %d: "
                            "per-process randomness will differ from an uninterrupted run",
                            extra.get("world_size", 1), self.dist.world_size)
        restore_rng(rng, self._rng_generators())
        self.start_epoch = int(ckpt["epoch"])
        self.history = list((ckpt.get("metrics") or {}).get("history", []))
        log.info("resuming %s at epoch %d", path, self.start_epoch)

    # -- main loop ------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train to ``cfg.train.epochs`` (continuing from ``last.pt`` with ``resume=True``) and
        return the last epoch's metrics."""
        cfg = self.cfg
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        D.barrier()
        if resume:
            self._resume()
        elif self.is_main and self.checkpoint_path.exists():
            log.warning("%s exists and will be overwritten (pass --resume to continue it)",
                        self.checkpoint_path)
        if self.is_main:
            save_config(cfg, self.output_dir / CONFIG_NAME)
            self._write_metrics_file()
        rule = cfg.train.early_stopping
        decays = lr_decays(cfg)
        if rule is not None:
            state = stopping_state(self.history, rule, decays=decays)
            if state.stop:
                log.info("early stopping had already stopped this run at epoch %d",
                         len(self.history))
                return dict(self.history[-1]) if self.history else {}
            if decays:  # the plateau schedule's rate follows the logged history
                self.schedule.set_decays(state.decays)
        for epoch in range(self.start_epoch, cfg.train.epochs):
            t0 = time.perf_counter()
            lr = self.schedule.get_last_lr()[0]
            train_logs = self._train_epoch(epoch)
            self.schedule.step()
            train_seconds = time.perf_counter() - t0
            mon = self.monitor(epoch)
            record: dict[str, Any] = {"epoch": epoch + 1, "lr": lr}
            record.update(train_logs)
            record.update(mon)
            record["seconds"] = round(time.perf_counter() - t0, 3)
            record["train_seconds"] = round(train_seconds, 3)
            state = None
            if rule is not None:
                state = stopping_state([*self.history, record], rule, decays=decays)
                record["best_epoch"] = state.best_epoch
                if decays:
                    record["lr_decays"] = state.decays
                    self.schedule.set_decays(state.decays)
            self.history.append(record)
            self._save(epoch + 1, best=state is not None and state.best_epoch == epoch + 1)
            if self.is_main:
                self._append_metrics(record)
            log.info("epoch %d/%d %s", epoch + 1, cfg.train.epochs,
                     " ".join(f"{k}={v:.4g}" for k, v in record.items()
                              if isinstance(v, float) and not math.isnan(v)))
            D.barrier()
            if state is not None and state.stop:
                log.info("early stopping after epoch %d: %s did not rise by more than %g for "
                         "%d epochs; best epoch %d (%s)", epoch + 1, rule.metric,
                         rule.min_delta, rule.patience, state.best_epoch, BEST_NAME)
                break
        return dict(self.history[-1]) if self.history else {}

    def close(self) -> None:
        """Release the DistributedDataParallel wrapper, then leave the process group if this
        Trainer joined it. A DDP wrapper keeps the process group's backend alive; left to
        the garbage collector it can be destroyed during interpreter shutdown, while gloo's
        worker threads still hold tensors, which aborts the process ("terminate called
        without an active exception")."""
        self.train_model = self.model
        D.cleanup(self.dist)
