"""The trainer's process-group helpers: those of :mod:`advdefense.distributed`.

They live one layer down so that evaluation can use them without importing training; this
module keeps ``from advdefense.training import distributed`` working. The DDP wrapping itself
(``_AuxDDP``, which runs ``forward_with_aux`` through DDP's forward) is in
:mod:`advdefense.training.trainer`.
"""

from __future__ import annotations

from ..distributed import *  # noqa: F403  (the re-export)
from ..distributed import __all__  # noqa: F401
