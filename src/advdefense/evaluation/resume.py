"""Resumable batch loops: per-batch results saved atomically after every batch.

``BatchStore(path, fingerprint)`` holds JSON-able results under string keys (e.g.
``"pgd/fresh:250"`` = the verdict of the batch starting at example 250). A long evaluation or
certification puts each batch's result as soon as it is done; rerun with the same file, it
reads them back instead of recomputing. The fingerprint (data, settings, model) must match,
else the file is refused with one line, so results of another run are never mixed in. Since
every batch (its attack and its verdict) is seeded from its first example, a resumed run gives
the uninterrupted result.

:func:`model_fingerprint` covers what makes a model compute what it computes: for every
submodule its class, its ``extra_repr()`` and its public non-tensor attributes (numbers,
strings, flags, containers of them), plus the name, shape, dtype and value of every parameter
and buffer. Two smoothed classifiers with other sigma or m, or two noise layers with other
sigma, therefore never share a state file.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import re
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_write_json
from ..errors import AdvDefenseError

__all__ = ["BatchStore", "describe", "model_config", "model_fingerprint", "run_fingerprint"]

FORMAT = "advdefense-batches"
VERSION = 2

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
#: attributes that record what happened, not how the module is configured
_RUNTIME = frozenset({"training", "last_state"})


def describe(obj: Any) -> str:
    """``repr(obj)`` without memory addresses (stable across processes)."""
    return _ADDRESS.sub("", repr(obj))


def _plain(value: Any, depth: int = 0) -> str | None:
    """A stable text for a configuration value, ``None`` for tensors (hashed as weights) and
    for modules (hashed on their own)."""
    if isinstance(value, (torch.Tensor, nn.Module)):
        return None
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return repr(value)
    if isinstance(value, enum.Enum):
        return f"{type(value).__qualname__}.{value.name}"
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value) if isinstance(value, torch.dtype) else None
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, types.MethodType,
                          type)):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', '')}"
    if depth < 4 and isinstance(value, (tuple, list, set, frozenset)):
        items = [_plain(v, depth + 1) for v in value]
        items = ["tensor" if t is None else t for t in items]
        if isinstance(value, (set, frozenset)):
            items.sort()
        return f"{type(value).__name__}[{', '.join(items)}]"
    if depth < 4 and isinstance(value, dict):
        items = [f"{_plain(k, depth + 1)}: {_plain(v, depth + 1) or 'tensor'}"
                 for k, v in value.items()]
        return "{" + ", ".join(sorted(items)) + "}"
    return type(value).__qualname__  # another object: its type only


def model_config(model: nn.Module) -> list[str]:
    """One line per submodule: its name, class, ``extra_repr()`` and public non-tensor
    attributes (see the module docstring)."""
    lines = []
    for name, module in model.named_modules():
        cls = type(module)
        try:
            extra = _ADDRESS.sub("", module.extra_repr())
        except Exception:  # noqa: BLE001 - a foreign module's extra_repr may fail
            extra = ""
        attrs = []
        for key, value in sorted(vars(module).items()):
            if key.startswith("_") or key in _RUNTIME:
                continue
            text = _plain(value)
            if text is not None:
                attrs.append(f"{key}={text}")
        lines.append(f"{name}:{cls.__module__}.{cls.__qualname__}({extra})[{'; '.join(attrs)}]")
    return lines


def model_fingerprint(model: nn.Module) -> str:
    """Hash of a model's configuration (:func:`model_config`: every module's class,
    ``extra_repr`` and public non-tensor attributes), of its parameter and buffer names,
    shapes and dtypes, and of every weight and buffer value."""
    h = hashlib.sha256()
    for line in model_config(model):
        h.update(line.encode())
        h.update(b";")
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
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise AdvDefenseError(f"{self.path} is not an advdefense batch state file; "
                                      "pass another state path")
            if data.get("version") != VERSION:
                raise AdvDefenseError(f"state file {self.path} has another format version; "
                                      "delete it")
            if data.get("fingerprint") != fingerprint:
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
            atomic_write_json(self.path, {"format": FORMAT, "version": VERSION,
                                          "fingerprint": self.fingerprint,
                                          "results": self.results}, indent=None)
