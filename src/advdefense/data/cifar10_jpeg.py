"""``cifar10-jpeg``: CIFAR-10 (JPEG copy), natural images offline.

All 60,000 CIFAR-10 images as baseline JPEG files at quality about 75, laid out as
``train/<class>/NNNN.jpg`` (5,000 per class) and ``test/<class>/NNNN.jpg`` (1,000 per class).
Decoded pixels differ from CIFAR-10's by about an 8/255 perturbation, so results on it are
natural-image results, never CIFAR-10 results.

Sources, in the order :func:`resolve_source` tries them for a data root:

* the root itself when it is a .tar/.tar.gz file, or a folder with ``train/`` or ``test/``;
* ``cifar10-jpeg.tar.gz``, ``cifar10-jpeg.tar`` or ``cifar10-jpeg/`` inside the root folder;
* otherwise the subset shipped with the package (``cifar10-jpeg-subset.tar.gz``: the first 500
  training and the first 100 test images of every class in file-name order, the original JPEG
  bytes). By the round-robin order of :mod:`.imagefolder`, its ``train`` and ``test`` are the
  first 5,000 and 1,000 images of the full copy's.

Classes in folder (alphabetical) order are CIFAR-10's label indices 0-9 (:data:`CLASSES`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import DataError
from .imagefolder import ImageArrays, load_image_arrays

log = logging.getLogger(__name__)

NAME = "cifar10-jpeg"
TITLE = "CIFAR-10 (JPEG copy)"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")
SUBSET = Path(__file__).with_name("cifar10-jpeg-subset.tar.gz")
SOURCE_NAMES = ("cifar10-jpeg.tar.gz", "cifar10-jpeg.tar", "cifar10-jpeg")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# per-channel mean/std of the full copy's training split (50,000 decoded images)
MEAN = (0.4913, 0.4821, 0.4465)
STD = (0.2452, 0.2428, 0.2606)


def resolve_source(root: str | Path | None) -> Path:
    """The archive or folder ``cifar10-jpeg`` reads for a data root (module docstring)."""
    if root is not None:
        root = Path(root).expanduser()
        if root.is_file():
            return root
        if root.is_dir():
            if (root / "train").is_dir() or (root / "test").is_dir():
                return root
            for name in SOURCE_NAMES:
                if (root / name).exists():
                    return root / name
        elif root.name.lower().endswith(ARCHIVE_SUFFIXES):
            raise DataError(f"{NAME} archive {root} not found; point --data-root at the "
                            "JPEG copy (cifar10-jpeg.tar.gz) or leave it out for the shipped "
                            "subset")
    if not SUBSET.is_file():
        raise DataError(f"the shipped {NAME} subset {SUBSET.name} is missing from the package; "
                        "reinstall advdefense or pass --data-root with the full copy")
    log.debug("%s: using the shipped subset %s", NAME, SUBSET.name)
    return SUBSET


def load(root: str | Path | None) -> ImageArrays:
    """The decoded (cached) images of the source :func:`resolve_source` picks; checks that it
    is the JPEG copy's layout (the ten CIFAR-10 classes, 32x32 RGB)."""
    source = resolve_source(root)
    arrays = load_image_arrays(source)
    if arrays.classes != CLASSES:
        raise DataError(f"{source} is not the CIFAR-10 JPEG copy: its classes are "
                        f"{', '.join(arrays.classes)}; expected {', '.join(CLASSES)}")
    if arrays.size != (32, 32) or arrays.channels != 3:
        h, w = arrays.size
        raise DataError(f"{source} is not the CIFAR-10 JPEG copy: images are {h}x{w} with "
                        f"{arrays.channels} channel(s); expected 32x32 RGB")
    return arrays
