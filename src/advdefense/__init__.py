"""advdefense: RNA, CAS and smoothed noise-injected models, with honest adaptive evaluation.

The public API, imported lazily (``advdefense --help`` does not pay for torch)::

    import advdefense as ad
    model = ad.load_model("my_models.py:Net", weights="net.pt")
    result = ad.run_suite(model, ad.load_split("mnist5k", "test", limit=200), eps=0.3)
    print(result.summary())

=====================  ===============================================================
``evaluate``           per-example evaluation under attack specs (``evaluation.harness``)
``run_suite``          AutoAttack-style cascades ``standard`` / ``rand`` / ``full``
``AttackSpec``         an attack under a protocol, for ``evaluate``
``build_attack``       an attack by registry name (``attacks``)
``load_model``         anyone's model: factory, state dict, RobustBench, TorchScript, export
``load_split``         a dataset split (``data``)
``summary``            headline numbers of an evaluation result
``rna`` ``cas``        the defense modules (``ad.rna.convert``, ``ad.cas.attach_cas``,
``noise`` ``smoothing`` ``ad.noise.inject``, ``ad.smoothing.SmoothedClassifier``)
``rna_convert``        RNA: every BatchNorm becomes a random normalization (``defenses.rna``)
``cas_attach``         CAS: channel-wise activation suppressing heads (``defenses.cas``)
``noise_inject``       PNI / CNI noise injection (``defenses.noise``)
``SmoothedClassifier`` smoothed inference with three votes (``defenses.smoothing``)
``certify``            Cohen et al. certification (``defenses.smoothing``)
``StochasticModule``   base class of every stochastic layer (``randomness``)
``freeze``/``seeded``  control the randomness of a model (``randomness``)
=====================  ===============================================================

The modules themselves (``advdefense.defenses.rna``, ...) stay importable as before.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, tuple[str, str | None]] = {
    "rna": ("advdefense.defenses.rna", None),
    "cas": ("advdefense.defenses.cas", None),
    "noise": ("advdefense.defenses.noise", None),
    "smoothing": ("advdefense.defenses.smoothing", None),
    "evaluate": ("advdefense.evaluation.harness", "evaluate"),
    "AttackSpec": ("advdefense.evaluation.harness", "AttackSpec"),
    "EvalResult": ("advdefense.evaluation", "EvalResult"),
    "run_suite": ("advdefense.evaluation.suite", "run_suite"),
    "summary": ("advdefense.evaluation.report", "summary"),
    "write_report": ("advdefense.evaluation.report", "write_report"),
    "build_attack": ("advdefense.attacks", "build_attack"),
    "load_model": ("advdefense.loading", "load_model"),
    "load_split": ("advdefense.data", "load_split"),
    "rna_convert": ("advdefense.defenses.rna", "convert"),
    "cas_attach": ("advdefense.defenses.cas", "attach_cas"),
    "noise_inject": ("advdefense.defenses.noise", "inject"),
    "SmoothedClassifier": ("advdefense.defenses.smoothing", "SmoothedClassifier"),
    "certify": ("advdefense.defenses.smoothing", "certify"),
    "StochasticModule": ("advdefense.randomness", "StochasticModule"),
    "freeze": ("advdefense.randomness", "freeze"),
    "seeded": ("advdefense.randomness", "seeded"),
    "AdvDefenseError": ("advdefense.errors", "AdvDefenseError"),
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        mod = importlib.import_module(module)
        value = mod if attr is None else getattr(mod, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'advdefense' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
