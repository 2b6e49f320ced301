"""Units of work: numbered items handed out through a shared counter, each written to a file
of its own, so a result does not depend on how many processes computed it.

A :class:`UnitJob` is a folder of item files (``<name>.json``, written atomically) plus
``job.json`` (what the job is). Every process of a ``torchrun`` job (or the one process
without it) runs the same loop: take the next number from the counter ``<job>/next`` of the
job's store (:func:`advdefense.distributed.job_store`; ``store.add`` is atomic, so every
item goes to exactly one process), skip it if its file exists (finished in an earlier run),
else compute it and write its file; then add one to ``<job>/done``. The process whose
addition brings ``done`` to the number of items finished the job last: :meth:`UnitJob.run`
returns ``True`` there, and that process merges the files. No process waits for another: a
process that dies loses only the item it held, the others finish theirs and exit, and
nobody merges; running the same command again computes the missing items (and merges, even
when none is missing).

An item of an evaluation is a *unit*: the examples ``[start, stop)`` of a fixed partition of
the data (:func:`unit_bounds`), evaluated whole (every attack, every suite stage, every
verdict) with seeds derived from the seed, the attack and the global index of the batch's
first example, never from a rank. Its file holds the per-example :class:`~.results.EvalResult`
with the attacks' traces (:func:`result_to_json`); :func:`merge_results` concatenates the units
by index into the result of the whole set, on which the failure checks then run once.

``ADVDEFENSE_EXIT_AFTER_UNITS=RANK:K`` makes process ``RANK`` (``*``: every process) exit
abruptly after writing its ``K``-th item: the tests' stand-in for a lost process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..atomic import atomic_write_json
from ..distributed import claim, env_rank, job_store
from ..errors import AdvDefenseError
from .protocols import Verdict
from .results import (
    EntryResult,
    EvalResult,
    RunRecord,
    TraceSummary,
    tensor_from_json,
    tensor_to_json,
)

log = logging.getLogger(__name__)

__all__ = ["EXIT_AFTER_ENV", "UnitJob", "merge_results", "result_from_json", "result_to_json",
           "unit_bounds"]

FORMAT = "advdefense-unit"
VERSION = 1
EXIT_AFTER_ENV = "ADVDEFENSE_EXIT_AFTER_UNITS"

#: runs of each job in this thread: a second run of the same job (every process runs the
#: same commands, so they agree on the count) gets counters of its own
_runs = threading.local()


def unit_bounds(n: int, unit: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]``: ``range(n)`` cut into units of ``unit`` examples."""
    if int(unit) < 1:
        raise AdvDefenseError(f"the unit must hold >= 1 examples, got {unit}")
    return [(s, min(s + int(unit), n)) for s in range(0, n, int(unit))]


def _exit_hook(written: int) -> None:
    spec = os.environ.get(EXIT_AFTER_ENV)
    if not spec:
        return
    rank, _, count = spec.partition(":")
    if (rank == "*" or int(rank) == env_rank()) and written >= int(count or 1):
        log.warning("%s=%s: exiting after %d items", EXIT_AFTER_ENV, spec, written)
        os._exit(17)


class UnitJob:
    """Items ``names`` of one job (identified by ``fingerprint``), their files in ``folder``.

    ``store``: what hands out the items (default :func:`~advdefense.distributed.job_store`);
    ``meta``: what ``job.json`` says about the job besides its fingerprint and items.
    """

    def __init__(self, folder: str | os.PathLike, fingerprint: str, names: Sequence[str], *,
                 store=None, meta: dict[str, Any] | None = None) -> None:
        self.folder = Path(folder)
        self.fingerprint = str(fingerprint)
        self.names = [str(n) for n in names]
        if not self.names:
            raise AdvDefenseError("a job needs at least one item")
        self.store = store
        self.meta = dict(meta or {})
        self.ran: list[int] = []
        #: compute seconds of every item read back by :meth:`load`
        self.seconds: dict[int, float] = {}

    def __len__(self) -> int:
        return len(self.names)

    def path(self, i: int) -> Path:
        """The result file of item ``i``."""
        return self.folder / f"{self.names[i]}.json"

    def state_path(self, i: int) -> Path:
        """Where the work on item ``i`` may keep its partial state (deleted once it is done)."""
        return self.folder / f"{self.names[i]}.state.json"

    def missing(self) -> list[int]:
        """Items without a result file."""
        return [i for i in range(len(self)) if not self.path(i).exists()]

    def run(self, work: Callable[[int, Path], Any], *, progress: bool = False,
            desc: str = "units") -> bool:
        """Compute the items this process claims: ``work(i, state_path)`` returns the JSON-able
        content of item ``i``'s file. Returns ``True`` in the one process that completed the
        job's last item (it merges), ``False`` in the others."""
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.folder / "job.json",
                          {"format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint,
                           "items": len(self), **self.meta})
        store = job_store() if self.store is None else self.store
        job = f"{self.meta.get('kind', 'job')}/{self.fingerprint}"
        counts = _runs.__dict__.setdefault("counts", {})
        counts[job] = counts.get(job, -1) + 1
        key = f"{job}/{counts[job]}"
        last = False
        with tqdm(total=len(self), desc=desc, disable=not progress, leave=False) as bar:
            while True:
                i = claim(store, f"{key}/next")
                if i >= len(self):
                    break
                if not self.path(i).exists():
                    t0 = time.perf_counter()
                    data = work(i, self.state_path(i))
                    atomic_write_json(self.path(i), {
                        "format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint,
                        "item": self.names[i], "index": i,
                        "seconds": time.perf_counter() - t0, "data": data}, indent=None)
                    self.state_path(i).unlink(missing_ok=True)
                    self.ran.append(i)
                    _exit_hook(len(self.ran))
                done = int(store.add(f"{key}/done", 1))
                bar.n = done
                bar.refresh()
                last |= done == len(self)
        return last

    def load(self, i: int, *, wait: float = 60.0) -> Any:
        """The content ``work`` returned for item ``i``. A file not (yet) visible is waited
        for up to ``wait`` seconds (a shared file system may show another node's file late)."""
        path = self.path(i)
        deadline = time.monotonic() + wait
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise AdvDefenseError(f"unit file {path} is missing; run the same command again "
                                  "to compute it") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise AdvDefenseError(f"unit file {path} is unreadable ({exc}); delete it and run "
                                  "the same command again") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT \
                or data.get("version") != VERSION:
            raise AdvDefenseError(f"{path} is not an advdefense unit file of this version; "
                                  "delete it and run the same command again")
        if data.get("fingerprint") != self.fingerprint or data.get("item") != self.names[i]:
            raise AdvDefenseError(f"unit file {path} belongs to another job; delete it and run "
                                  "the same command again")
        self.seconds[i] = float(data.get("seconds", 0.0))
        return data["data"]

    def load_all(self) -> list[Any]:
        return [self.load(i) for i in range(len(self))]


# -- an EvalResult in a unit file ------------------------------------------------------------
def _verdict(v: Verdict | None) -> dict[str, Any] | None:
    return None if v is None else {k: tensor_to_json(v.get(k)) for k in Verdict.KINDS}


def _verdict_back(d: dict[str, Any] | None) -> Verdict | None:
    return None if d is None else Verdict(*(tensor_from_json(d[k]) for k in Verdict.KINDS))


def _entry(e: EntryResult) -> dict[str, Any]:
    return {"label": e.label, "name": e.name, "protocol": e.protocol,
            "verdict": _verdict(e.verdict), "seconds": e.seconds, "attack": e.attack,
            "trace": None if e.trace is None else e.trace.to_json(),
            "ran": tensor_to_json(e.ran), "cumulative": _verdict(e.cumulative)}


def _entry_back(d: dict[str, Any]) -> EntryResult:
    return EntryResult(d["label"], d["name"], d["protocol"], _verdict_back(d["verdict"]),
                       float(d["seconds"]), d["attack"],
                       None if d["trace"] is None else TraceSummary.from_json(d["trace"]),
                       tensor_from_json(d["ran"]), _verdict_back(d["cumulative"]))


def result_to_json(result: EvalResult) -> dict[str, Any]:
    """Everything of ``result`` but the checks and frozen draws, JSON-able (traces included,
    so the checks can run on merged results)."""
    return {"n": result.n, "stochastic": result.stochastic, "repeats": result.repeats,
            "kind": result.kind, "seconds": result.seconds, "config": result.config,
            "labels": tensor_to_json(result.labels), "clean": _entry(result.clean),
            "entries": [_entry(e) for e in result.entries.values()],
            "worst": _verdict(result.worst), "adv": tensor_to_json(result.adv),
            "adv_source": result.adv_source}


def result_from_json(d: dict[str, Any]) -> EvalResult:
    """The inverse of :func:`result_to_json`."""
    try:
        entries = [_entry_back(e) for e in d["entries"]]
        return EvalResult(int(d["n"]), bool(d["stochastic"]), int(d["repeats"]),
                          _entry_back(d["clean"]), {e.label: e for e in entries},
                          _verdict_back(d["worst"]), tensor_from_json(d["labels"]),
                          float(d["seconds"]), dict(d["config"]), kind=d["kind"],
                          adv=tensor_from_json(d.get("adv")), adv_source=d.get("adv_source"))
    except (KeyError, TypeError, ValueError) as exc:
        raise AdvDefenseError(f"a unit file holds a damaged result ({exc}); delete it and run "
                              "the same command again") from None


def _cat_verdicts(parts: list[Verdict | None]) -> Verdict | None:
    return None if any(p is None for p in parts) else Verdict.cat(parts)


def _merge_traces(parts: list[TraceSummary | None], starts: list[int], sizes: list[int],
                  n: int) -> TraceSummary | None:
    kept, positions = [], []
    for t, start, size in zip(parts, starts, sizes, strict=True):
        if t is None:  # the attack ran on no example of this unit
            continue
        kept.append(dataclasses.replace(
            t, runs=[RunRecord(r.idx + start, r.losses) for r in t.runs]))
        positions.append(torch.arange(start, start + size))
    return TraceSummary.merge(kept, n, positions)


def _merge_entries(entries: list[EntryResult], starts: list[int], sizes: list[int],
                   n: int) -> EntryResult:
    first = entries[0]
    ran = None if any(e.ran is None for e in entries) else torch.cat([e.ran for e in entries])
    return EntryResult(first.label, first.name, first.protocol,
                       Verdict.cat([e.verdict for e in entries]),
                       sum(e.seconds for e in entries), first.attack,
                       _merge_traces([e.trace for e in entries], starts, sizes, n), ran,
                       _cat_verdicts([e.cumulative for e in entries]))


def _not_run(entry: EntryResult, unit: EvalResult) -> EntryResult:
    """``entry``'s stage in a unit where it did not run: every example keeps its verdict."""
    return EntryResult(entry.label, entry.name, entry.protocol, Verdict.full(unit.n), 0.0,
                       entry.attack, None, torch.zeros(unit.n, dtype=torch.bool),
                       unit.worst)


def _merge_escalations(parts: Sequence[tuple[int, EvalResult]]) -> dict[str, Any]:
    """A fast suite's escalation over units: escalated where any unit escalated, with the
    reasons of each such unit (named by its first example)."""
    done = [(s, r.config["escalation"]) for s, r in parts if r.config["escalation"]["escalated"]]
    stages = parts[0][1].config["escalation"]["stages"]
    ran = {lab for _, e in done for lab in e.get("ran", e["stages"])}
    return {"escalated": bool(done),
            "reasons": [f"examples from {s}: " + "; ".join(e["reasons"]) for s, e in done],
            "stages": stages, "ran": [lab for lab in stages if lab in ran],
            "units_escalated": len(done), "units": len(parts)}


def merge_results(parts: Sequence[tuple[int, EvalResult]]) -> EvalResult:
    """One result from the results of consecutive units ``(start, result)``: per-example
    verdicts, ``ran`` masks, cascades, labels and kept inputs concatenated by index, traces
    joined in the indices of the whole set, seconds and passes summed."""
    parts = sorted(parts, key=lambda p: p[0])
    starts = [s for s, _ in parts]
    results = [r for _, r in parts]
    sizes = [r.n for r in results]
    for (s, r), nxt in zip(parts, starts[1:] + [None], strict=True):
        if nxt is not None and s + r.n != nxt:
            raise AdvDefenseError(f"units do not tile the examples: the unit at {s} holds "
                                  f"{r.n} examples but the next starts at {nxt}")
    n = sum(sizes)
    head = max(results, key=lambda r: len(r.entries))
    labels = list(head.entries)
    for r in results:
        ran = list(r.entries)
        # a fast suite's unit stops before its escalation stages without a warning sign, or
        # after their gradient stages on a transfer's sign
        partial = "escalation" in r.config
        if ran != labels and not (partial and ran == labels[:len(ran)]):
            raise AdvDefenseError("units ran different attacks; delete the unit folder and "
                                  "run again")
    clean = _merge_entries([r.clean for r in results], starts, sizes, n)
    entries = {lab: _merge_entries([r.entries.get(lab) or _not_run(head.entries[lab], r)
                                    for r in results], starts, sizes, n)
               for lab in labels}
    config = {k: v for k, v in head.config.items() if k != "state_path"}
    config["n"] = n
    if "escalation" in config:
        config["escalation"] = _merge_escalations(parts)
    if "specs" in config:
        config["specs"] = [dict(s, **({"passes": entries[s["label"]].passes}
                                      if s.get("label") in entries else {}))
                           for s in config["specs"]]
    adv = None
    if all(r.adv is not None for r in results):
        adv = torch.cat([r.adv for r in results])
    return EvalResult(n, head.stochastic, head.repeats, clean, entries,
                      Verdict.cat([r.worst for r in results]),
                      torch.cat([r.labels for r in results]),
                      sum(r.seconds for r in results), config, kind=head.kind, adv=adv,
                      adv_source=None if adv is None else
                      [s for r in results for s in r.adv_source])
