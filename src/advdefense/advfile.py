"""Saved adversarial examples: write them once, re-check them on any model (transfer).

A file written by :func:`save_adversarial` (``advdefense evaluate --save-adv FILE``) is a
``torch.save`` dict of plain tensors, strings and numbers, so ``torch.load(weights_only=True)``
reads it::

    {"format": "advdefense-adversarial", "version": 1,
     "x_adv": float tensor (n, C, H, W),  # worst-case input per example (clean x if unbroken)
     "y": long tensor (n,),               # true labels
     "source": [str] * n,                 # label of the attack whose output was kept, or "clean"
     "indices": long tensor (n,),         # positions in the dataset split
     "dataset": str, "split": str, "eps": float, "norm": "linf" | "l2",
     "model": str}                        # what was attacked (for the record)

:func:`load_adversarial` validates such a file; :func:`check_matches` refuses a file made for
other data (another dataset, image shape, labels, or examples farther than ``eps`` from the
clean ones) with one line; :func:`recheck` classifies the examples again on the same model or
another one (a transfer evaluation), after the same randomness probe as every evaluation, so
a stochastic model, declared or not, gets repeated predictions.

The inputs come from the evaluation core (``evaluate(..., keep_adv=True)`` /
``run_suite(..., keep_adv=True)``: ``result.adv`` and ``result.adv_source``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_torch_save
from .errors import AdvDefenseError, CheckpointError

__all__ = ["FORMAT", "check_matches", "load_adversarial", "recheck", "save_adversarial"]

FORMAT = "advdefense-adversarial"
VERSION = 1


def save_adversarial(path: str | os.PathLike, *, x_adv: torch.Tensor, y: torch.Tensor,
                     source: Sequence[str], indices: torch.Tensor, dataset: str, split: str,
                     eps: float, norm: str, model: str = "") -> Path:
    """Write the adversarial-example file atomically (see the module docstring)."""
    n = int(x_adv.shape[0])
    if y.shape != (n,) or len(source) != n or indices.shape != (n,):
        raise AdvDefenseError(f"x_adv has {n} rows but y {tuple(y.shape)}, source "
                              f"{len(source)}, indices {tuple(indices.shape)}")
    payload = {"format": FORMAT, "version": VERSION,
               "x_adv": x_adv.detach().to("cpu", torch.float32).contiguous(),
               "y": y.detach().cpu().long(), "source": [str(s) for s in source],
               "indices": indices.detach().cpu().long(), "dataset": str(dataset),
               "split": str(split), "eps": float(eps), "norm": str(norm), "model": str(model)}
    return atomic_torch_save(payload, path)


def load_adversarial(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a file written by :func:`save_adversarial` (``weights_only``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"adversarial-example file {path} not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for foreign files
        msg = " ".join(str(exc).split())[:120]
        raise CheckpointError(f"{path} is not a readable adversarial-example file ({msg}); "
                              "pass a file written by advdefense evaluate --save-adv") from None
    if not isinstance(data, Mapping) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an advdefense adversarial-example file; pass a "
                              "file written by advdefense evaluate --save-adv")
    if data.get("version") != VERSION:
        raise CheckpointError(f"{path} has version {data.get('version')}; this advdefense "
                              f"reads version {VERSION}")
    x, y = data.get("x_adv"), data.get("y")
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or x.dim() != 4 \
            or y.shape != (x.shape[0],) or len(data.get("source", [])) != x.shape[0]:
        raise CheckpointError(f"{path} is damaged: x_adv, y and source do not line up")
    return dict(data)


def check_matches(adv: Mapping[str, Any], *, dataset: str, x_clean: torch.Tensor | None = None,
                  y_clean: torch.Tensor | None = None, tol: float = 1e-4) -> float | None:
    """Refuse (one :class:`AdvDefenseError` line) a file made for other data than ``dataset``.

    Checks the dataset name, the image shape, and, given the clean examples at the file's
    ``indices`` (``x_clean``, ``y_clean``), the labels and that every example lies within the
    file's ``eps`` (its ``norm``) of its clean image. Returns the largest perturbation found
    (``None`` without clean data).
    """
    from .data import dataset_info

    info = dataset_info(dataset)
    if adv["dataset"] != dataset:
        raise AdvDefenseError(f"the adversarial examples were made for {adv['dataset']}, the "
                              f"model is evaluated on {dataset}; pass --dataset "
                              f"{adv['dataset']} or a file made for {dataset}")
    shape = tuple(adv["x_adv"].shape[1:])
    want = (info.in_channels, info.image_size, info.image_size)
    if shape != want:
        raise AdvDefenseError(f"the adversarial examples have shape {shape}, {dataset} images "
                              f"{want}; the file is for other data")
    if x_clean is None or y_clean is None:
        return None
    if not torch.equal(y_clean.cpu().long(), adv["y"]):
        raise AdvDefenseError(f"the labels in the file differ from {dataset}/{adv['split']} at "
                              "its indices; the file is for other data")
    delta = (adv["x_adv"] - x_clean.cpu().float()).flatten(1)
    dist = delta.abs().amax(1) if adv["norm"] == "linf" else delta.norm(dim=1)
    worst = float(dist.max()) if dist.numel() else 0.0
    if worst > float(adv["eps"]) + tol:
        raise AdvDefenseError(f"an example in the file lies {worst:.4g} ({adv['norm']}) from its "
                              f"clean image, beyond the file's eps {adv['eps']:.4g}; the file is "
                              "for other data or was altered")
    return worst


def recheck(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, repeats: int = 10,
            batch_size: int = 250, max_batch: int = 4096, seed: int = 0):
    """Classify saved examples again: the :class:`~advdefense.evaluation.protocols.Verdict`
    (all / majority / single draw).

    The model's randomness is probed first (:func:`~advdefense.evaluation.harness.
    prepare_model`), as in every evaluation: a model random without declaring it is wrapped so
    that its ``repeats`` predictions are separate seeded forward calls, and every stochastic
    model gets ``repeats`` predictions per example. Each batch's verdict is seeded from
    (``seed``, the position of its first example), whatever the caller's RNG."""
    from .attacks.base import eval_mode
    from .evaluation.harness import model_device, prepare_model
    from .evaluation.protocols import Verdict, verdict, verdict_seed

    if int(batch_size) < 1 or int(repeats) < 1:
        raise AdvDefenseError("batch_size and repeats must be >= 1")
    device = model_device(model)
    model, _ = prepare_model(model, x[:8].to(device))
    parts = []
    with eval_mode(model):
        for s in range(0, x.shape[0], int(batch_size)):
            parts.append(verdict(model, x[s:s + batch_size].to(device),
                                 y[s:s + batch_size].to(device), repeats=repeats,
                                 max_batch=max_batch, seed=verdict_seed(seed, "recheck", s)))
    return Verdict.cat(parts)
