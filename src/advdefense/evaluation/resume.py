"""Resumable batch loops: per-batch results saved atomically after every batch.

``BatchStore(path, fingerprint)`` holds JSON-able results under string keys (e.g.
``"pgd/fresh:250"`` = the verdict of the batch starting at example 250). A long evaluation or
certification puts each batch's result as soon as it is done; rerun with the same file, it
reads them back instead of recomputing. The fingerprint (data, settings, model) must match,
else the file is refused with one line, so results of another run are never mixed in. Since
every batch is seeded from its first example, a resumed run gives the uninterrupted result.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_write_json
from ..errors import AdvDefenseError

__all__ = ["BatchStore", "model_fingerprint", "run_fingerprint"]

FORMAT = "advdefense-batches"


def model_fingerprint(model: nn.Module) -> str:
    """Hash of a model's architecture (module types and parameter/buffer names and shapes)
    and of every weight and buffer value."""
    h = hashlib.sha256()
    for name, module in model.named_modules():
        h.update(f"{name}:{type(module).__name__};".encode())
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(f"{name}{tuple(t.shape)}{t.dtype};".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


def run_fingerprint(x: torch.Tensor, y: torch.Tensor, settings: dict[str, Any],
                    model_hash: str) -> str:
    """Hash of the examples, the settings (JSON) and a model hash."""
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(model_hash.encode())
    h.update(y.detach().cpu().numpy().tobytes())
    h.update(x.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()[:20]


class BatchStore:
    """Per-batch results of one run in a JSON file (or in memory when ``path`` is None)."""

    def __init__(self, path: str | os.PathLike | None, fingerprint: str) -> None:
        self.path = None if path is None else Path(path)
        self.fingerprint = fingerprint
        self.results: dict[str, Any] = {}
        if self.path is not None and self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise AdvDefenseError(f"state file {self.path} is unreadable ({exc}); delete "
                                      "it") from None
            if data.get("format") != FORMAT or data.get("fingerprint") != fingerprint:
                raise AdvDefenseError(
                    f"state file {self.path} belongs to another run (model, data or settings "
                    "differ); delete it or pass another state path")
            self.results = dict(data.get("results", {}))

    def __contains__(self, key: str) -> bool:
        return key in self.results

    def get(self, key: str) -> Any:
        return self.results.get(key)

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key`` and save the file atomically."""
        self.results[key] = value
        if self.path is not None:
            atomic_write_json(self.path, {"format": FORMAT, "fingerprint": self.fingerprint,
                                          "results": self.results}, indent=None)
