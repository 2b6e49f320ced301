"""Atomic file writes: a file is either its old content or its complete new content, never half.

Every writer goes through :func:`atomic_write_bytes`: the data is written to a temporary file
in the destination folder, flushed and ``fsync``-ed, given the permissions a plain ``open``
would have given it (``0o666`` minus the umask; ``mkstemp`` creates ``0o600`` files), then
``os.replace``-d over the destination; the folder is ``fsync``-ed so the rename itself is
durable. A crash at any point leaves the previous file intact (and at worst a stray
``.<name>.*.tmp`` file beside it).

This module depends only on the standard library (torch is imported inside
:func:`atomic_torch_save`), so every layer can use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_open", "atomic_torch_save", "atomic_write_bytes",
           "atomic_write_json", "atomic_write_text"]


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse directory fsync
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file for writing that replaces ``path`` when the block ends cleanly.

    ``mode`` is ``"wb"`` or ``"w"`` (UTF-8 text). On an exception the temporary file is
    removed and ``path`` is left as it was. Parent folders are created.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes only ('wb' or 'w'), got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1,
                      default: Any = str) -> Path:
    """Serialize ``obj`` to JSON first (so a serialization error writes nothing), then write it
    atomically; ``default`` converts what JSON does not know (``str`` by default)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=default))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (streamed into the temporary file)."""
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)
    return Path(path)
