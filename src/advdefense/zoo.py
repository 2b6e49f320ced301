"""The model zoo: finished reproduction entries kept as weights and results, by name.

Layout (one folder per preset entry and training seed)::

    zoo/<preset>/<entry>-s<seed>/
        model.pt          the weights: a minimal advdefense checkpoint (format, version,
                          config, model state dict, evaluated epoch; no optimizer, scheduler
                          or RNG state), so ``torch.load(weights_only=True)`` and
                          ``advdefense evaluate --checkpoint`` read it as they read ``last.pt``
        config.yaml       the entry's resolved config (what ``advdefense train`` would train)
        evaluation.json   the entry's report section (tables, checks, verdicts with their
                          per-example results, training summary) and a ``zoo`` block: preset,
                          entry, seed, the config digest, the weights' SHA-256 and dtype

Floating-point weights are stored in float16 when the round trip float32 -> float16 ->
float32 leaves every prediction of the model unchanged on the probe images (the evaluated
test images, clean and moved to a random corner of the eps-ball, under the same random draws
for a stochastic model), otherwise in float32; ``evaluation.json`` records which, with the
largest logit change. Loading always gives float32 weights.

``evaluation.json`` is written last: an entry counts only if it is there and the weights' hash
matches it, so a copy stopped half-way is ignored rather than half-used.

Names: ``zoo:<preset>/<entry>-s<seed>`` (e.g. ``zoo:cifar10-jpeg/rna-s0``) is resolved under
the zoo root, which is ``$ADVDEFENSE_ZOO``, else ``zoo/`` in the working folder, else the
``zoo/`` folder of the source checkout the package runs from.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError

log = logging.getLogger(__name__)

__all__ = ["ENV", "WEIGHTS", "CONFIG", "RESULT", "PREFIX", "Zoo", "ZooEntry", "default_root",
           "entry_name", "parse_name", "resolve_name", "list_entries", "summary_row",
           "compact_state"]

ENV = "ADVDEFENSE_ZOO"
WEIGHTS, CONFIG, RESULT = "model.pt", "config.yaml", "evaluation.json"
PREFIX = "zoo:"
# fields of a report section that describe the run, not the entry (set again on reuse)
RUN_FIELDS = ("title", "notes", "key", "group", "seed", "arch", "baselines")


def default_root() -> Path:
    """``$ADVDEFENSE_ZOO``, else ``zoo`` in the working folder when it exists, else the
    ``zoo`` folder of the source checkout (when there is one), else ``zoo``."""
    env = os.environ.get(ENV)
    if env:
        return Path(env).expanduser()
    here = Path("zoo")
    if here.is_dir():
        return here
    checkout = Path(__file__).resolve().parents[2] / "zoo"
    return checkout if checkout.is_dir() else here


def entry_name(group: str, seed: int) -> str:
    """The folder name of an entry at a training seed: ``<group>-s<seed>``."""
    return f"{group}-s{int(seed)}"


def parse_name(name: str) -> tuple[str, str]:
    """``(preset, entry)`` of ``zoo:<preset>/<entry>-s<seed>`` (the prefix is optional)."""
    text = name[len(PREFIX):] if name.startswith(PREFIX) else name
    preset, _, entry = text.strip("/").partition("/")
    if not preset or not entry or "/" in entry or entry.startswith("."):
        raise CheckpointError(f"zoo name {name!r} is not zoo:<preset>/<entry>-s<seed> "
                              "(e.g. zoo:cifar10-jpeg/rna-s0); `advdefense zoo` lists them")
    return preset, entry


def resolve_name(name: str, root: str | os.PathLike | None = None) -> Path:
    """The weights file of a zoo entry named ``zoo:<preset>/<entry>-s<seed>``; one
    :class:`CheckpointError` line naming what the zoo holds when it is not there."""
    preset, entry = parse_name(name)
    base = Path(root) if root is not None else default_root()
    path = base / preset / entry / WEIGHTS
    if path.is_file() and (path.parent / RESULT).is_file():
        return path
    held = [f"zoo:{e.preset}/{e.entry}" for e in list_entries(base)]
    raise CheckpointError(f"no zoo entry {name!r} under {base} (it holds: "
                          f"{', '.join(held) if held else 'nothing'}); `advdefense zoo` lists "
                          f"the entries, set ${ENV} for another zoo")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class ZooEntry:
    """One entry folder and its ``evaluation.json``."""

    folder: Path
    record: dict[str, Any] = field(repr=False)

    @property
    def meta(self) -> dict[str, Any]:
        return self.record.get("zoo") or {}

    @property
    def preset(self) -> str:
        return str(self.meta.get("preset", self.folder.parent.name))

    @property
    def entry(self) -> str:
        return self.folder.name

    @property
    def weights(self) -> Path:
        return self.folder / WEIGHTS

    @property
    def section(self) -> dict[str, Any]:
        """The report section (without the ``zoo`` block)."""
        return {k: v for k, v in self.record.items() if k != "zoo"}

    @property
    def training(self) -> dict[str, Any]:
        return dict(self.record.get("training") or {})

    @property
    def train_seconds(self) -> float | None:
        return self.record.get("train_seconds")

    def valid(self) -> bool:
        """Its weights are there and are the ones the record was written for."""
        return self.weights.is_file() and self.meta.get("sha256") == _sha256(self.weights)

    def load_model(self, device: str | torch.device | None = "cpu"):
        """``(model, cfg)`` in eval mode, float32 weights (:func:`load_model_from_checkpoint`)."""
        from .training.checkpoint import load_model_from_checkpoint

        return load_model_from_checkpoint(self.weights, map_location=device or "cpu")


def _read(folder: Path) -> ZooEntry | None:
    path = folder / RESULT
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        log.warning("zoo entry %s: %s cannot be read; ignored", folder, RESULT)
        return None
    return ZooEntry(folder, record) if isinstance(record, dict) else None


def list_entries(root: str | os.PathLike | None = None, preset: str | None = None
                 ) -> list[ZooEntry]:
    """Every entry under the zoo ``root`` (default :func:`default_root`), sorted by preset and
    name; ``preset`` keeps one preset's."""
    base = Path(root) if root is not None else default_root()
    if not base.is_dir():
        return []
    out = []
    for folder in sorted(base.glob("*/*")):
        if folder.is_dir() and (preset is None or folder.parent.name == preset):
            found = _read(folder)
            if found is not None:
                out.append(found)
    return out


def compact_state(model: nn.Module, probes: torch.Tensor, *, seed: int = 0
                  ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The model's state dict in float16 when that round trip changes no prediction on
    ``probes`` (each forward pass under the same seed, so a stochastic model draws the same
    randomness), else in float32; and a record of the check."""
    from .randomness import seeded

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    half = {k: v.half() if v.dtype == torch.float32 else v for k, v in state.items()}
    twin = copy.deepcopy(model).cpu().eval()
    twin.load_state_dict({k: v.float() if v.dtype == torch.float16 else v
                          for k, v in half.items()})
    original = copy.deepcopy(model).cpu().eval()
    x = probes.detach().cpu().float()
    with torch.no_grad():
        with seeded(seed):
            a = original(x)
        with seeded(seed):
            b = twin(x)
    same = bool(torch.equal(a.argmax(1), b.argmax(1)))
    check = {"probes": int(x.shape[0]), "identical_predictions": same,
             "max_abs_logit_change": float((a - b).abs().max()) if a.numel() else 0.0}
    if same:
        return half, {"dtype": "float16", **check}
    return state, {"dtype": "float32", **check}


def probe_images(x: torch.Tensor, eps: float, *, seed: int = 0) -> torch.Tensor:
    """The round-trip probes: ``x`` and ``x`` moved to a random corner of its eps-ball."""
    g = torch.Generator().manual_seed(int(seed))
    x = x.detach().cpu().float()
    sign = torch.randint(0, 2, x.shape, generator=g).float() * 2 - 1
    return torch.cat([x, (x + float(eps) * sign).clamp(0, 1)])


@dataclass(frozen=True)
class Zoo:
    """The zoo folder of one preset: ``root/<preset>/<entry>-s<seed>/``. ``write``: whether
    finished entries are copied into it (reading is always allowed: digests decide)."""

    root: Path
    preset: str
    write: bool = True

    def folder(self, group: str, seed: int) -> Path:
        return Path(self.root) / self.preset / entry_name(group, seed)

    def find(self, group: str, seed: int, config_digest: str) -> ZooEntry | None:
        """The entry of ``group`` at ``seed`` if its config digest is ``config_digest`` and its
        weights are intact; else ``None``."""
        found = _read(self.folder(group, seed))
        if found is None:
            return None
        meta = found.meta
        if (meta.get("preset") != self.preset or meta.get("group") != group
                or meta.get("seed") != int(seed)):
            return None
        if meta.get("config_digest") != config_digest:
            log.info("zoo entry %s was trained with another config; not reused", found.folder)
            return None
        if not found.valid():
            log.warning("zoo entry %s: weights missing or changed; not reused", found.folder)
            return None
        return found

    def save(self, group: str, seed: int, *, model: nn.Module, config: dict[str, Any],
             config_digest: str, section: dict[str, Any], probes: torch.Tensor,
             epoch: int | None = None) -> Path:
        """Copy a finished entry into its folder (weights, config, then the record)."""
        import yaml

        from .atomic import atomic_torch_save, atomic_write_text
        from .training.checkpoint import FORMAT, VERSION

        folder = self.folder(group, seed)
        folder.mkdir(parents=True, exist_ok=True)
        state, check = compact_state(model, probes, seed=int(seed))
        atomic_torch_save({"format": FORMAT, "version": VERSION, "config": config,
                           "model": state, "optimizer": None, "scheduler": None,
                           "epoch": int(epoch or 0), "metrics": {},
                           "extra": {"zoo": {"preset": self.preset,
                                             "entry": entry_name(group, seed),
                                             "dtype": check["dtype"]}}},
                          folder / WEIGHTS)
        atomic_write_text(folder / CONFIG, yaml.safe_dump(config, sort_keys=False,
                                                          allow_unicode=True))
        record = {k: v for k, v in section.items() if k != "zoo"}
        record["zoo"] = {"preset": self.preset, "entry": entry_name(group, seed),
                         "group": group, "seed": int(seed), "config_digest": config_digest,
                         "weights": WEIGHTS, "sha256": _sha256(folder / WEIGHTS),
                         "bytes": (folder / WEIGHTS).stat().st_size, **check}
        atomic_write_text(folder / RESULT, json.dumps(record, default=str))
        log.info("zoo: %s (%s weights)", folder, check["dtype"])
        return folder


def _accuracy(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def summary_row(entry: ZooEntry) -> dict[str, Any]:
    """What ``advdefense zoo`` prints of an entry: preset, entry, seed, epochs, clean accuracy
    (the first table's clean row) and, per verdict, the paper-protocol and worst-case
    accuracy, and whether the worst case is only an upper bound."""
    from .reproduction import upper_bound_reasons

    rec = entry.record
    clean = None
    for table in rec.get("tables") or []:
        row = next((r for r in table.get("rows") or [] if r.get("attack") == "clean"), None)
        if row is not None:
            clean = row.get("accuracy")
            break
    verdicts = []
    for i, v in enumerate(rec.get("verdicts") or []):
        verdicts.append({"name": v.get("name"), "paper": _accuracy(v.get("paper") or []),
                         "worst": _accuracy(v.get("worst") or []),
                         "upper_bound": upper_bound_reasons(rec, v, i)})
    training = rec.get("training") or {}
    meta = entry.meta
    return {"name": f"{PREFIX}{entry.preset}/{entry.entry}", "preset": entry.preset,
            "entry": entry.entry, "group": meta.get("group"), "seed": meta.get("seed"),
            "epochs": training.get("best_epoch") or training.get("epochs"),
            "n": len((rec.get("verdicts") or [{}])[0].get("worst") or []) or None,
            "clean": clean, "verdicts": verdicts, "dtype": meta.get("dtype"),
            "bytes": meta.get("bytes")}
