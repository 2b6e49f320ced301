"""What a result records about how it was made: the command line with every path relative to
the working folder, and the machine as hardware (CPU, cores, threads) and software (torch,
python) -- never an absolute path, a user or a host name.

A report then reads the same wherever it was made, and the command it shows runs again from
the folder it was run in (the repository root, for everything under ``docs/`` and
``benchmarks/results/``).
"""

from __future__ import annotations

import os
import platform
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["command_line", "cpu_name", "machine", "machine_line", "relative_path",
           "relative_value"]


def relative_path(path: str | os.PathLike) -> str:
    """``path`` relative to the working folder (``../x`` when it lies outside it)."""
    text = os.fspath(path)
    if not os.path.isabs(text):
        return text
    try:
        return os.path.relpath(text)
    except ValueError:  # another drive (Windows): keep the name only
        return Path(text).name


def relative_value(value: Any) -> Any:
    """An absolute path (``str`` or ``Path``) made relative; a ``Path`` becomes ``str``;
    ``key=/abs/path`` (``--set output_dir=...``, ``--out=...``) keeps its key; anything else
    is returned unchanged. Dicts, lists and tuples are converted item by item."""
    if isinstance(value, dict):
        return {k: relative_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [relative_value(v) for v in value]
    if isinstance(value, os.PathLike):
        return relative_path(value)
    if not isinstance(value, str):
        return value
    if os.path.isabs(value):
        return relative_path(value)
    key, sep, rest = value.partition("=")
    if sep and os.path.isabs(rest):
        return f"{key}={relative_path(rest)}"
    return value


def command_line(argv: Sequence[str | os.PathLike]) -> str:
    """A shell command line from ``argv`` with every absolute path made relative."""
    return shlex.join(str(relative_value(a)) for a in argv)


def cpu_name() -> str:
    """The CPU model name (``/proc/cpuinfo`` on Linux, else what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """CPU, cores, torch threads, torch and python versions of this process."""
    import torch

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def machine_line(device: Any = None) -> str:
    """:func:`machine` in one line: ``"<cpu>, 2 cores, 2 threads, torch 2.x, python 3.x"``;
    with a CUDA ``device``, its GPU's name first (``"NVIDIA H200 GPU; <cpu>, ..."``)."""
    import torch

    m = machine()
    line = (f"{m['cpu']}, {m['cores']} cores, {m['threads']} threads, torch {m['torch']}, "
            f"python {m['python']}")
    if device is not None and torch.device(device).type == "cuda":
        line = f"{torch.cuda.get_device_name(torch.device(device))} GPU; {line}"
    return line
