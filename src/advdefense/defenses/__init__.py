"""Defenses, applied to a built model by name from a config's ``defense:`` section.

Each entry maps a name to ``"module:function"``; the function is
``apply(model, options: dict, info: DatasetInfo) -> nn.Module`` and returns the defended model
(converted in place or wrapped). Lazy imports keep each defense in its own module.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..errors import ConfigError, unknown_name

DEFENSES: dict[str, str] = {
    "rna": "advdefense.defenses.rna:apply",
    "cas": "advdefense.defenses.cas:apply",
    "noise": "advdefense.defenses.noise:apply",
}

# Order in which defenses are applied when a config names several.
ORDER = ("rna", "noise", "cas")


def apply_defenses(model: nn.Module, spec: Mapping[str, Any] | None, info) -> nn.Module:
    """Apply every defense named in ``spec`` (``{name: options}``) in :data:`ORDER`."""
    if not spec:
        return model
    for name in spec:
        if name not in DEFENSES:
            raise unknown_name("defense", name, DEFENSES)
    for name in ORDER:
        if name in spec and spec[name] is not None:
            options = spec[name]
            if options is True:
                options = {}
            if not isinstance(options, Mapping):
                raise ConfigError(f"defense.{name} must be a mapping of options, got {options!r}")
            module_name, func = DEFENSES[name].split(":")
            model = getattr(importlib.import_module(module_name), func)(model, dict(options), info)
    return model
