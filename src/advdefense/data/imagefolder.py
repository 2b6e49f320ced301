"""Image folders as datasets: ``split/class/*.jpg|*.jpeg|*.png`` in a folder, .tar or .tar.gz.

Layout
    The split folders ``train`` and ``test`` (other top-level entries are ignored; a single
    enclosing folder, as in ``name/train/...``, is looked through), one folder per class under
    each split, image files (``.jpg``, ``.jpeg``, ``.png``, any case) directly in the class
    folders. Other files, hidden entries and files deeper than ``split/class/`` are ignored.
    Classes are the sorted class-folder names that hold images (in either split); a label is
    its class's position in that list.
Order
    Within a split, class by class in turn (round-robin): the first file of class 0, the first
    of class 1, ..., then the second of each, with the files of a class in sorted name order.
    Any prefix of a split is then as class-balanced as the folder allows.
Decoding
    Pillow, once per source; grey-scale images (modes ``1``, ``L``, ``LA``) stay one channel
    unless an image of the source is in colour, then all are RGB (alpha is dropped). All images
    must share one size.
Cache
    The decoded ``uint8`` arrays (N, H, W, C) of every split, the classes, the file names and
    the per-channel mean/std of the training split are stored in one ``.npz`` file under
    :func:`cache_dir` (``$ADVDEFENSE_CACHE``, else ``$XDG_CACHE_HOME/advdefense``, else
    ``~/.cache/advdefense``), written atomically, and kept in memory for the process. The key
    is a SHA-256 digest of the source: for a .tar/.tar.gz file, of its bytes (any change to the
    content gives a new key); for a folder, of the sorted relative paths, sizes and
    modification times (nanoseconds) of its image files, so a load does not read every byte
    of a large folder. An edit that keeps a file's size *and* resets its modification time is
    not seen in a folder; pack the folder as a .tar to key by content. A missing, unreadable
    or undecodable image raises one :class:`~advdefense.errors.DataError` line naming the file
    before anything is written to the cache.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_open
from ..errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLIT_DIRS = ("train", "test")
CACHE_VERSION = 1
_GREY_MODES = ("1", "L", "LA")
_MEMO: dict[str, ImageArrays] = {}

__all__ = ["ImageArrays", "IMAGE_SUFFIXES", "SPLIT_DIRS", "cache_dir", "cache_file",
           "load_image_arrays", "round_robin", "source_digest", "val_size"]


@dataclass(frozen=True)
class ImageArrays:
    """A decoded source: ``images[split]`` uint8 (N, H, W, C), ``labels[split]`` int64 (N,),
    ``files[split]`` (relative names ``class/file``) in the split's order; ``classes``; the
    per-channel ``mean``/``std`` in [0, 1] of the training split (of ``test`` without one)."""

    source: str
    digest: str
    classes: tuple[str, ...]
    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    files: dict[str, tuple[str, ...]]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def channels(self) -> int:
        return int(next(iter(self.images.values())).shape[3])

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of every image."""
        shape = next(iter(self.images.values())).shape
        return int(shape[1]), int(shape[2])


def cache_dir() -> Path:
    """Where decoded sources are cached (see the module docstring)."""
    env = os.environ.get("ADVDEFENSE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "advdefense"


def cache_file(digest: str) -> Path:
    """The cache file of a source digest."""
    return cache_dir() / "imagefolder" / f"v{CACHE_VERSION}-{digest}.npz"


def _is_archive(path: Path) -> bool:
    return path.is_file()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _folder_images(root: Path) -> list[tuple[str, os.stat_result]]:
    """``(relative posix path, stat)`` of every image file under ``root``, sorted by path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or not _is_image(name):
                continue
            full = Path(dirpath) / name
            try:
                st = full.stat()
            except OSError as exc:
                raise DataError(f"image file {full} is missing or unreadable "
                                f"({exc.strerror or _one_line(exc)}); restore or remove it"
                                ) from None
            found.append((full.relative_to(root).as_posix(), st))
    found.sort(key=lambda item: item[0])
    return found


def source_digest(path: str | Path) -> str:
    """The cache key of a source: SHA-256 of a tar file's bytes, or of a folder's sorted image
    paths, sizes and modification times."""
    path = Path(path)
    h = hashlib.sha256()
    if _is_archive(path):
        h.update(b"tar\0")
        try:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except OSError as exc:
            raise DataError(f"cannot read {path} ({_one_line(exc)})") from None
    else:
        h.update(b"folder\0")
        for rel, st in _folder_images(path):
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _layout(names: list[str], source: Path) -> dict[str, dict[str, list[str]]]:
    """``{split: {class: [name, ...]}}`` from relative image paths (see the module docstring).
    Names keep the source's spelling (needed to read them back)."""
    parts = [[p for p in n.split("/") if p not in ("", ".")] for n in names]
    depth = 0  # strip enclosing folders shared by every image, up to a split folder
    while parts and all(len(p) > depth + 1 for p in parts):
        head = parts[0][depth]
        if head in SPLIT_DIRS or any(p[depth] != head for p in parts):
            break
        depth += 1
    layout: dict[str, dict[str, list[str]]] = {}
    ignored = 0
    for name, p in zip(names, parts, strict=True):
        rest = p[depth:]
        if len(rest) != 3 or rest[0] not in SPLIT_DIRS or rest[1].startswith("."):
            ignored += 1
            continue
        layout.setdefault(rest[0], {}).setdefault(rest[1], []).append(name)
    if ignored:
        log.warning("%s: %d image files outside split/class/ ignored", source, ignored)
    if not layout:
        raise DataError(f"no images laid out as train|test/<class>/<file>.jpg|png in {source}; "
                        "arrange the images that way")
    return layout


def round_robin(by_class: dict[str, list[str]], classes: tuple[str, ...]
                ) -> list[tuple[str, int]]:
    """``(name, label)`` in the split order: class by class in turn, each class's files sorted
    by name."""
    queues = [sorted(by_class.get(c, []), key=_class_file_key) for c in classes]
    out = []
    longest = max((len(q) for q in queues), default=0)
    for i in range(longest):
        for label, q in enumerate(queues):
            if i < len(q):
                out.append((q[i], label))
    return out


def _class_file_key(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def val_size(n_train: int, num_classes: int) -> int:
    """Size of ``val`` (the tail of ``train``): about a tenth of ``train``, a multiple of the
    number of classes (so a round-robin tail is balanced), at most half."""
    if n_train < 2:
        return 0
    k = max(1, num_classes)
    return min(n_train // 2, k * max(1, round(n_train / (10 * k))))


def _decode(data: bytes, where: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            arr = np.asarray(im.convert("L" if im.mode in _GREY_MODES else "RGB"))
    except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds for bad files
        raise DataError(f"cannot decode image {where} ({_one_line(exc)}); replace or remove "
                        "the file") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def _read_tar(path: Path, wanted: set[str]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tf:
            for m in tf:
                if m.name not in wanted:
                    continue
                f = tf.extractfile(m)
                if f is None:
                    raise DataError(f"image {m.name} in {path} is not a regular file; store "
                                    "the image itself in the archive")
                out[m.name] = f.read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(f"cannot read {path} as a .tar or .tar.gz archive "
                        f"({_one_line(exc)}); check or re-create the file") from None
    return out


def _tar_image_names(path: Path) -> list[str]:
    try:
        with tarfile.open(path, "r:*") as tf:
            names = []
            for m in tf:
                if m.isdir() or not _is_image(m.name) or Path(m.name).name.startswith("."):
                    continue
                if not m.isreg():
                    raise DataError(f"image {m.name} in {path} is a link or special file; "
                                    "store the image itself in the archive")
                names.append(m.name)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(f"cannot read {path} as a .tar or .tar.gz archive "
                        f"({_one_line(exc)}); check or re-create the file") from None
    return names


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    c = images.shape[3]
    total = np.zeros(c)
    squares = np.zeros(c)
    count = 0
    for start in range(0, len(images), 4096):  # float64 in chunks: no full-size copy
        chunk = images[start:start + 4096].reshape(-1, c).astype(np.float64) / 255.0
        total += chunk.sum(0)
        squares += (chunk * chunk).sum(0)
        count += chunk.shape[0]
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(squares / max(count, 1) - mean * mean, 0.0))
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


def _decode_source(path: Path, digest: str) -> ImageArrays:
    archive = _is_archive(path)
    names = _tar_image_names(path) if archive else [rel for rel, _ in _folder_images(path)]
    layout = _layout(names, path)
    classes = tuple(sorted({c for split in layout.values() for c in split}))
    order = {s: round_robin(layout[s], classes) for s in SPLIT_DIRS if s in layout}
    if archive:
        blobs = _read_tar(path, {n for items in order.values() for n, _ in items})
    decoded: dict[str, list[np.ndarray]] = {}
    first: tuple[str, tuple[int, int]] | None = None
    colour = False
    for split, items in order.items():
        arrays = []
        for name, _ in items:
            if archive:
                where = f"{name} in {path}"
                data = blobs.get(name)
                if data is None:
                    raise DataError(f"image {where} is missing from the archive; re-create it")
            else:
                where = str(path / name)
                try:
                    data = (path / name).read_bytes()
                except OSError as exc:
                    raise DataError(f"image file {where} is missing or unreadable "
                                    f"({exc.strerror or _one_line(exc)}); restore or remove it"
                                    ) from None
            arr = _decode(data, where)
            if first is None:
                first = (where, arr.shape[:2])
            elif arr.shape[:2] != first[1]:
                h, w = arr.shape[:2]
                raise DataError(f"image {where} is {h}x{w} but {first[0]} is "
                                f"{first[1][0]}x{first[1][1]}; resize the images to one size")
            colour = colour or arr.shape[2] == 3
            arrays.append(arr)
        decoded[split] = arrays
    images = {}
    for split, arrays in decoded.items():
        if colour:
            arrays = [a if a.shape[2] == 3 else np.repeat(a, 3, axis=2) for a in arrays]
        images[split] = np.ascontiguousarray(np.stack(arrays).astype(np.uint8))
    labels = {s: np.array([lab for _, lab in items], dtype=np.int64) for s, items in order.items()}
    files = {s: tuple(_relative_name(n) for n, _ in items) for s, items in order.items()}
    mean, std = _channel_stats(images["train" if "train" in images else "test"])
    return ImageArrays(str(path), digest, classes, images, labels, files, mean, std)


def _relative_name(name: str) -> str:
    """``class/file`` of a source path."""
    parts = [p for p in name.split("/") if p]
    return "/".join(parts[-2:])


def _save(arrays: ImageArrays, target: Path) -> None:
    payload: dict[str, np.ndarray] = {
        "classes": np.array(arrays.classes, dtype=str),
        "mean": np.array(arrays.mean), "std": np.array(arrays.std)}
    for s in arrays.images:
        payload[f"{s}_images"] = arrays.images[s]
        payload[f"{s}_labels"] = arrays.labels[s]
        payload[f"{s}_files"] = np.array(arrays.files[s], dtype=str)
    try:
        with atomic_open(target, "wb") as f:
            np.savez(f, **payload)
    except OSError as exc:
        log.warning("cannot write the image cache %s (%s); decoding again next time",
                    target, _one_line(exc))


def _load_cached(target: Path, source: Path, digest: str) -> ImageArrays | None:
    if not target.is_file():
        return None
    try:
        with np.load(target, allow_pickle=False) as z:
            splits = [s for s in SPLIT_DIRS if f"{s}_images" in z.files]
            if not splits:
                raise ValueError("no split in the file")
            return ImageArrays(
                str(source), digest, tuple(str(c) for c in z["classes"]),
                {s: z[f"{s}_images"] for s in splits}, {s: z[f"{s}_labels"] for s in splits},
                {s: tuple(str(n) for n in z[f"{s}_files"]) for s in splits},
                tuple(float(v) for v in z["mean"]), tuple(float(v) for v in z["std"]))
    except Exception as exc:  # noqa: BLE001 - any unreadable cache file is rebuilt
        log.warning("image cache %s is unreadable (%s); decoding the source again", target,
                    _one_line(exc))
        return None


def load_image_arrays(path: str | Path, *, use_cache: bool = True) -> ImageArrays:
    """Decode (or read from the cache) a folder, .tar or .tar.gz of ``split/class/*.jpg|png``.

    One :class:`~advdefense.errors.DataError` line for a missing source, a bad archive, or a
    missing or undecodable image (nothing is written to the cache then).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"image folder or archive {path} not found; give a folder, .tar or "
                        ".tar.gz laid out as train|test/<class>/<image>")
    if not (path.is_dir() or path.is_file()):
        raise DataError(f"{path} is neither a folder nor a file")
    digest = source_digest(path)
    if digest in _MEMO:
        return _MEMO[digest]
    target = cache_file(digest)
    arrays = _load_cached(target, path, digest) if use_cache else None
    if arrays is None:
        log.info("decoding images of %s (cached afterwards in %s)", path, target.parent)
        arrays = _decode_source(path, digest)
        if use_cache:
            _save(arrays, target)
    _MEMO[digest] = arrays
    return arrays
