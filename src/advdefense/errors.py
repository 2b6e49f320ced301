"""User-facing errors: one line that says what is wrong and what to do.

The CLI catches :class:`AdvDefenseError` and prints its message without a traceback.
"""

from __future__ import annotations


class AdvDefenseError(Exception):
    """Bad input or missing resource; the message is shown to the user as is."""


class ConfigError(AdvDefenseError):
    """A malformed or invalid configuration."""


class CheckpointError(AdvDefenseError):
    """A missing, corrupt or foreign checkpoint."""


class DataError(AdvDefenseError):
    """A dataset that is missing or malformed."""


def unknown_name(kind: str, name: str, known) -> AdvDefenseError:
    """Error for an unknown registry entry, listing the valid names."""
    return AdvDefenseError(f"unknown {kind} {name!r}; choose one of: {', '.join(sorted(known))}")
