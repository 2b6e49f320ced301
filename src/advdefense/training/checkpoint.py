"""Atomic, ``weights_only``-loadable checkpoints (DESIGN.md, contract 5).

A checkpoint is a dict::

    {"format": "advdefense-checkpoint", "version": 1,
     "config": <plain dict of the ExperimentConfig>,
     "model": state_dict, "optimizer": state_dict | None, "scheduler": state_dict | None,
     "epoch": <completed epochs>, "rng": {...}, "metrics": {...}, "extra": {...}}

Everything in it is a tensor, a number, a string, ``None`` or a list/dict of those, so
``torch.load(path, weights_only=True)`` reads it without executing pickled code. RNG states
(torch CPU/CUDA, numpy, Python ``random``) are converted to tensors and lists for that reason
(:func:`capture_rng` / :func:`restore_rng`).

:func:`save_checkpoint` writes through :mod:`advdefense.atomic` (a temporary file in the
destination directory, fsync, ``os.replace``), so a crash mid-save leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import logging
import pickle
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_torch_save
from ..errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

FORMAT = "advdefense-checkpoint"
VERSION = 1

__all__ = [
    "FORMAT",
    "VERSION",
    "capture_rng",
    "restore_rng",
    "make_checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "load_model_from_checkpoint",
    "unwrap_model",
]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


# --------------------------------------------------------------------------------------------
# RNG states as weights_only-safe values


def capture_rng(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """All random states: torch CPU (+ every CUDA device), numpy, Python, and named generators."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {
            "kind": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": int(py_version), "internal": [int(v) for v in py_internal],
                   "gauss_next": py_gauss},
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    return state


def restore_rng(state: Mapping[str, Any],
                generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Inverse of :func:`capture_rng` (CUDA states are restored when the device count matches)."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([t.cpu() for t in cuda])
        else:
            log.warning("checkpoint has %d CUDA RNG states, this machine %d devices; "
                        "CUDA randomness will differ from the original run",
                        len(cuda), torch.cuda.device_count())
    npst = state["numpy"]
    keys = npst["keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state((npst["kind"], keys, int(npst["pos"]), int(npst["has_gauss"]),
                         float(npst["cached_gaussian"])))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    saved = state.get("generators", {})
    for name, gen in (generators or {}).items():
        if name in saved:
            gen.set_state(saved[name].cpu())


# --------------------------------------------------------------------------------------------
# save / load


def make_checkpoint(
    *,
    config: Mapping[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    epoch: int = 0,
    rng: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble a checkpoint dict (the model is unwrapped from DDP / compile first)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "config": dict(config),
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": int(epoch),
        "rng": dict(rng) if rng is not None else capture_rng(),
        "metrics": dict(metrics or {}),
        "extra": dict(extra or {}),
    }


def save_checkpoint(checkpoint: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``checkpoint`` to ``path`` atomically (:func:`advdefense.atomic.atomic_torch_save`:
    tmp file in the same dir, fsync, replace)."""
    return atomic_torch_save(dict(checkpoint), path)


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; :class:`CheckpointError` if it is missing,
    corrupt, unsafe or not an advdefense checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; pass the path of a .pt file "
                              "written by advdefense train")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        text = " ".join(str(exc).split())
        if "global" in text.lower():  # a pickled class/function: refused by weights_only
            detail = text[text.lower().find("unsupported global"):][:160] or text[:160]
            raise CheckpointError(f"checkpoint {path} holds pickled code that weights_only "
                                  f"loading refuses ({detail}); only load files you trust "
                                  "with torch.load(weights_only=False)") from None
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({text[:160]}); "
                              "re-train or use another checkpoint") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for damaged files
        msg = " ".join(str(exc).split())[:160]
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({msg}); "
                              "re-train or use another checkpoint") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an advdefense checkpoint (no format="
                              f"{FORMAT!r}); pass a file written by advdefense train")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has version {ckpt.get('version')}, this "
                              f"advdefense reads version {VERSION}; upgrade advdefense")
    for key in ("config", "model", "epoch"):
        if key not in ckpt:
            raise CheckpointError(f"checkpoint {path} lacks {key!r}; it is incomplete")
    return ckpt


def load_model_from_checkpoint(path: str | Path, map_location: Any = "cpu"):
    """Rebuild the model a checkpoint was trained with and load its weights.

    Returns ``(model, cfg)``: the model (on ``map_location``, in eval mode) and the
    :class:`~advdefense.config.ExperimentConfig` stored in the checkpoint.
    """
    from ..config import build_from_config, config_from_dict

    ckpt = load_checkpoint(path, map_location=map_location)
    try:
        cfg = config_from_dict(ckpt["config"])
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {path} holds an invalid config: {exc}") from None
    model, _info = build_from_config(cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        msg = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"checkpoint {path} weights do not fit the model of its config "
                              f"({msg})") from None
    if map_location is not None and not callable(map_location) and not isinstance(
            map_location, dict):
        model.to(map_location)
    model.eval()
    return model, cfg
