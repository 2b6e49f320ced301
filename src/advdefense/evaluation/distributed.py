"""Evaluation over units of examples: the same per-example results from one process or many.

``torchrun --nproc_per_node=N -m advdefense evaluate ...`` (or one process without torchrun)
runs :func:`evaluate_units`: the examples are cut into units of ``unit`` consecutive indices
(:func:`~.units.unit_bounds`; the partition depends on ``unit`` only, never on the number of
processes), the processes take units from a shared counter (:class:`~.units.UnitJob`), and
each unit is evaluated whole by ``run_unit`` (every attack or suite stage with its verdicts;
batch seeds come from the global index of the batch's first example, ``index_offset`` of
:func:`~.harness.evaluate` and :func:`~.suite.run_suite`) and written atomically to its own file
in ``folder/<kind>-<fingerprint>/``. The process that completes the last unit merges the
files by index (:func:`~.units.merge_results`) and gets the result of the whole set; the
others get ``None``. No collective sits on this path: a lost process costs its unit, and
running the same command again computes the missing units and merges.

The fingerprint covers the examples, ``settings`` (every option that shapes a result), the
unit size and the model (:func:`~.resume.model_fingerprint`), so units of another job are
never mixed in: another job gets a folder of its own.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .harness import load_data
from .results import EvalResult
from .resume import model_fingerprint, run_fingerprint
from .units import UnitJob, merge_results, result_from_json, result_to_json, unit_bounds

__all__ = ["evaluate_units"]

RunUnit = Callable[[torch.Tensor, torch.Tensor, int, Path], dict[str, EvalResult]]


def evaluate_units(model: nn.Module, data, run_unit: RunUnit, *, unit: int,
                   folder: str | os.PathLike, settings: dict[str, Any], kind: str = "evaluate",
                   store=None, progress: bool = False
                   ) -> tuple[dict[str, EvalResult] | None, UnitJob]:
    """Evaluate ``data`` unit by unit; see the module docstring.

    ``run_unit(x, y, first, state_path)`` evaluates the examples of one unit (``first``: the
    global index of its first example, to pass on as ``index_offset``; ``state_path``: a
    file it may resume from) and returns ``{key: EvalResult}`` (e.g. one per eps). Returns
    ``(merged results or None, job)``.
    """
    x, y = load_data(data)
    bounds = unit_bounds(x.shape[0], unit)
    fingerprint = run_fingerprint(x, y, {**settings, "unit": int(unit)},
                                  model_fingerprint(model))
    job = UnitJob(Path(folder) / f"{kind}-{fingerprint}", fingerprint,
                  [f"unit-{i:06d}" for i in range(len(bounds))], store=store,
                  meta={"kind": kind, "n": x.shape[0], "unit": int(unit),
                        "units": len(bounds)})

    def work(i: int, state_path: Path) -> dict[str, Any]:
        a, b = bounds[i]
        out = run_unit(x[a:b], y[a:b], a, state_path)
        return {key: result_to_json(r) for key, r in out.items()}

    if not job.run(work, progress=progress, desc=kind):
        return None, job
    files = job.load_all()
    merged = {key: merge_results([(bounds[i][0], result_from_json(f[key]))
                                  for i, f in enumerate(files)]) for key in files[0]}
    for r in merged.values():
        r.config.update(unit=int(unit), units=len(bounds))
    return merged, job
