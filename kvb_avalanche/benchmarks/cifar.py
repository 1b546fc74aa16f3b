"""CIFAR-10 / CIFAR-100 as uint8 arrays, read from whatever local copy is at hand.

Data roots are searched in the order of :func:`default_data_roots` (or only the ``root``
given). Under a root, these layouts are recognised, tried in this order:

1. torchvision's python folders ``cifar-10-batches-py`` (``data_batch_1`` .. ``_5``,
   ``test_batch``, ``batches.meta``) and ``cifar-100-python`` (``train``, ``test``, ``meta``;
   fine labels), read with :mod:`pickle` directly (no md5 check of the original files),
   directly under the root or under ``<name>/`` (Avalanche's download layout,
   ``~/.avalanche/data/cifar10/cifar-10-batches-py``);
2. an ImageFolder tree ``<name>/<split>/<class>/*.png|webp|jpg|jpeg``;
3. tar archives ``<name>/*.tar|*.tar.gz|*.tgz`` with members ``<name>/<split>/<class>/<file>``,
   read without extracting. Several archives may together make up one split (CIFAR-100
   train in parts); all present are merged;
4. with ``download=True`` and nothing found, torchvision's own downloader.

Class folders are sorted (byte order) and files sorted by name within each class, so the
order is deterministic and, for CIFAR, the labels equal the original class indices.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from kvb_avalanche.io import atomic_write

log = logging.getLogger(__name__)

NAMES = ("cifar10", "cifar100")
SPLITS = ("train", "test")
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
IMAGE_SUFFIXES = (".png", ".webp", ".jpg", ".jpeg")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
IMAGE_SHAPE = (32, 32, 3)
PICKLE_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_PICKLE_FILES = {
    ("cifar10", "train"): [f"data_batch_{i}" for i in range(1, 6)],
    ("cifar10", "test"): ["test_batch"],
    ("cifar100", "train"): ["train"],
    ("cifar100", "test"): ["test"],
}
# name -> (meta file, label key, class-names key)
_PICKLE_KEYS = {
    "cifar10": ("batches.meta", "labels", "label_names"),
    "cifar100": ("meta", "fine_labels", "fine_label_names"),
}
_TORCHVISION = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}


class DataError(ValueError):
    """No usable copy of a data set, bad data in it, or a bad data-set argument."""


@dataclass(frozen=True, eq=False)
class ImageSplit:
    """One split of a data set as arrays, with a content hash and where it came from."""

    images: np.ndarray  # (n, 32, 32, 3) uint8 RGB
    labels: np.ndarray  # (n,) int64, original class indices
    classes: list[str]  # class names, in label order
    identity: str  # sha256 of images and labels: the same data gives the same identity
    source: str  # where it came from (path and layout), for the record


@dataclass
class _Raw:
    """What one layout produced, before ``max_per_class`` and hashing."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    source: str


def avalanche_data_root() -> Path:
    """Avalanche's data folder: ``default_dataset_location`` without the data set's name
    (``~/.avalanche/data``, or the ``dataset_location`` of ``~/.avalanche/config.json``)."""
    from avalanche.benchmarks.datasets.dataset_utils import default_dataset_location

    return default_dataset_location("cifar10").parent


def default_data_roots() -> list[Path]:
    """Where a local copy is looked for when no root is given, in this order:
    ``$KVB_DATA_ROOT`` (if set), then Avalanche's data folder (:func:`avalanche_data_root`),
    which holds Avalanche's and torchvision's downloads (``cifar10/cifar-10-batches-py``)."""
    roots = []
    if os.environ.get("KVB_DATA_ROOT"):
        roots.append(Path(os.environ["KVB_DATA_ROOT"]).expanduser())
    roots.append(avalanche_data_root())
    return list(dict.fromkeys(r.resolve() for r in roots))


def data_identity(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 over the uint8 pixels and the int64 (little-endian) labels; layout-independent."""
    h = hashlib.sha256(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    h.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    return h.hexdigest()


def _layouts_help(name: str, split: str) -> str:
    tv = _TORCHVISION[name]
    files = ", ".join(_PICKLE_FILES[name, split] + [_PICKLE_KEYS[name][0]])
    return (
        f"Accepted layouts under a data root: (1) torchvision's python folder "
        f"'{PICKLE_DIRS[name]}/' or '{name}/{PICKLE_DIRS[name]}/' ({files}); (2) an "
        f"ImageFolder tree '{name}/{split}/<class>/*.png|webp|jpg|jpeg'; (3) tar archives "
        f"'{name}/*.tar|*.tar.gz|*.tgz' with members '{name}/{split}/<class>/<file>'. "
        f"To download it (needs a network): kvb-avalanche split-cifar10 --download, "
        f"load_cifar(..., download=True) or torchvision.datasets.{tv}(root, download=True); "
        f"or set $KVB_DATA_ROOT / --data-root to a folder holding a copy."
    )


# ---------------------------------------------------------------------------- decoding
def _decode(data: bytes | Path, where: str, size: int | None = None) -> np.ndarray:
    """One image file -> (32, 32, 3) uint8 RGB; with ``size``, any image resized (whole,
    antialiased bilinear) to (size, size, 3)."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except OSError as e:  # PIL.UnidentifiedImageError is an OSError
        raise DataError(f"cannot decode image {where}: {e}") from e
    if size is None and arr.shape != IMAGE_SHAPE:
        raise DataError(f"image {where} is {arr.shape[1]}x{arr.shape[0]}, expected 32x32")
    return arr


def _decode_all(
    entries: list[tuple[str, str, Callable[[], bytes | Path], str]],
    max_per_class: int | None,
    desc: str,
    progress: bool,
    size: int | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Sorted (class, file, getter, where) entries -> images, labels, classes."""
    entries = sorted(entries, key=lambda e: (e[0], e[1]))
    classes = sorted({e[0] for e in entries})
    index = {c: i for i, c in enumerate(classes)}
    if max_per_class is not None:
        seen = dict.fromkeys(classes, 0)
        kept = []
        for e in entries:
            if seen[e[0]] < max_per_class:
                seen[e[0]] += 1
                kept.append(e)
        entries = kept
    shape = IMAGE_SHAPE if size is None else (size, size, 3)
    images = np.empty((len(entries), *shape), dtype=np.uint8)
    for i, (_, _, get, where) in enumerate(tqdm(entries, desc=desc, unit="img",
                                                disable=not progress, leave=False)):
        images[i] = _decode(get(), where, size)
    labels = np.fromiter((index[e[0]] for e in entries), dtype=np.int64, count=len(entries))
    return images, labels, classes


def _hidden(name: str) -> bool:
    return name.startswith(".")  # also macOS '._x.png' resource forks


# ---------------------------------------------------------------------------- layouts
def _key(d: dict, key: str) -> Any:
    """A pickle entry by name, whether the pickle has str (py2 release) or bytes keys."""
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise KeyError(key)


def _from_pickles(folder: Path, name: str, split: str, notes: list[str]) -> _Raw | None:
    meta_file, label_key, names_key = _PICKLE_KEYS[name]
    files = _PICKLE_FILES[name, split] + [meta_file]
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        notes.append(f"{folder} lacks {', '.join(missing)}")
        return None
    images, labels = [], []
    try:
        for f in _PICKLE_FILES[name, split]:
            with open(folder / f, "rb") as fh:
                entry = pickle.load(fh, encoding="bytes")
            data = np.asarray(_key(entry, "data"), dtype=np.uint8)
            ys = np.asarray(_key(entry, label_key), dtype=np.int64)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(ys):
                raise DataError(f"{folder / f}: data {data.shape} and {len(ys)} labels do not "
                                f"make (n, 3072) images with n labels")
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # CHW -> HWC
            labels.append(ys)
        with open(folder / meta_file, "rb") as fh:
            names = _key(pickle.load(fh, encoding="bytes"), names_key)
    except (KeyError, pickle.UnpicklingError, EOFError) as e:
        raise DataError(f"{folder} is not a readable torchvision CIFAR folder: {e!r}") from e
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in names]
    labels_all = np.concatenate(labels)
    if len(labels_all) and (labels_all.min() < 0 or labels_all.max() >= len(classes)):
        raise DataError(f"{folder}: labels outside 0..{len(classes) - 1} ({len(classes)} "
                        f"class names in {meta_file})")
    return _Raw(np.ascontiguousarray(np.concatenate(images)), labels_all, classes,
                f"{folder} (torchvision python folder)")


def _from_tree(folder: Path, max_per_class: int | None, progress: bool,
               notes: list[str], size: int | None = None) -> _Raw | None:
    entries = []
    for d in folder.iterdir():
        if not d.is_dir() or _hidden(d.name):
            continue
        for p in d.iterdir():
            if p.suffix.lower() in IMAGE_SUFFIXES and not _hidden(p.name) and p.is_file():
                entries.append((d.name, p.name, lambda p=p: p, str(p)))
    if not entries:
        notes.append(f"{folder} holds no <class>/<image> files")
        return None
    got = _decode_all(entries, max_per_class, f"decoding {folder}", progress, size)
    return _Raw(*got, f"{folder} (ImageFolder tree)")


def load_image_tree(folder: Path, *, size: int, max_per_class: int | None = None,
                    progress: bool = True) -> ImageSplit:
    """A class-per-folder tree ``folder/<class>/<image>`` of images of any size and mode,
    each resized to (size, size, 3) RGB; labels index the sorted class folders."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder (expected <class>/<image> folders in it)")
    notes: list[str] = []
    got = _from_tree(folder, max_per_class, progress, notes, size)
    if got is None:
        raise DataError(f"{folder} holds no <class>/<image> files "
                        f"({', '.join(IMAGE_SUFFIXES)})")
    return ImageSplit(got.images, got.labels, got.classes,
                      data_identity(got.images, got.labels), got.source)


def _read_archive(archive: Path, prefix: tuple[str, str], found: dict, prefixes: set,
                  bar: tqdm) -> None:
    """Collect the bytes of the image members ``name/split/class/file`` of one archive."""
    with open(archive, "rb") as raw, tarfile.open(fileobj=raw, mode="r:*") as tar:
        done = 0
        for m in tar:
            bar.update(raw.tell() - done)
            done = raw.tell()
            parts = m.name.removeprefix("./").split("/")
            if not m.isfile() or not parts[-1].lower().endswith(IMAGE_SUFFIXES) \
                    or _hidden(parts[-1]):
                continue
            if len(parts) == 4:
                prefixes.add("/".join(parts[:2]))
            if len(parts) != 4 or tuple(parts[:2]) != prefix:
                continue
            data = tar.extractfile(m).read()
            key = (parts[2], parts[3])
            if key in found and found[key][0] != data:
                raise DataError(f"{'/'.join(parts)} differs between archives "
                                f"{found[key][1].name} and {archive.name}")
            found[key] = (data, archive)
        bar.update(raw.tell() - done)


def _from_archives(folder: Path, name: str, split: str, max_per_class: int | None,
                   progress: bool, notes: list[str], cache_dir: Path | None = None
                   ) -> _Raw | None:
    archives = sorted(p for p in folder.iterdir()
                      if p.is_file() and p.name.lower().endswith(ARCHIVE_SUFFIXES))
    if not archives:
        return None
    if cache_dir is None:
        return _read_archives(folder, archives, name, split, max_per_class, progress, notes)
    stamp = [(a.name, a.stat().st_size, a.stat().st_mtime_ns) for a in archives]
    key = hashlib.sha256(repr((str(folder.resolve()), stamp, name, split,
                               max_per_class)).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"{name}-{split}-decoded-{key}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as f:
                got = _Raw(f["images"], f["labels"], [str(c) for c in f["classes"]],
                           str(f["source"]))
                identity = str(f["identity"])
            if data_identity(got.images, got.labels) == identity:
                return got
            log.warning("decoded-image cache %s fails its checksum: reading the archives", path)
        except Exception as e:  # noqa: BLE001 (whatever is wrong with the file, rebuild it)
            log.warning("decoded-image cache %s is unusable (%s): reading the archives", path, e)
    got = _read_archives(folder, archives, name, split, max_per_class, progress, notes)
    if got is not None:
        def save(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, images=got.images, labels=got.labels, classes=np.array(got.classes),
                         source=np.array(got.source),
                         identity=np.array(data_identity(got.images, got.labels)))

        atomic_write(path, save)
    return got


def _read_archives(folder: Path, archives: list[Path], name: str, split: str,
                   max_per_class: int | None, progress: bool, notes: list[str]) -> _Raw | None:
    found: dict[tuple[str, str], tuple[bytes, Path]] = {}
    prefixes: set[str] = set()
    total = sum(a.stat().st_size for a in archives)
    with tqdm(total=total, desc=f"reading {folder}", unit="B", unit_scale=True,
              disable=not progress, leave=False) as bar:
        for archive in archives:
            try:
                _read_archive(archive, (name, split), found, prefixes, bar)
            except (tarfile.TarError, OSError, EOFError) as e:
                raise DataError(f"cannot read archive {archive}: {e}") from e
    names = ", ".join(a.name for a in archives)
    if not found:
        held = ", ".join(sorted(prefixes)) or "nothing in that layout"
        notes.append(f"archives in {folder} ({names}) hold no {name}/{split}/ images "
                     f"(they hold: {held})")
        return None
    entries = [(c, f, lambda k=(c, f): found[k][0], f"{a.name}:{name}/{split}/{c}/{f}")
               for (c, f), (_, a) in found.items()]
    got = _decode_all(entries, max_per_class, f"decoding {name} {split}", progress)
    return _Raw(*got, f"{folder} (tar archives: {names})")


def _find(root: Path, name: str, split: str, max_per_class: int | None, progress: bool,
          notes: list[str], cache_dir: Path | None = None) -> _Raw | None:
    """The first recognised layout under one root, or None."""
    for folder in (root / PICKLE_DIRS[name], root / name / PICKLE_DIRS[name]):
        if folder.is_dir():
            got = _from_pickles(folder, name, split, notes)
            if got is not None:
                return got
    if (root / name / split).is_dir():
        got = _from_tree(root / name / split, max_per_class, progress, notes)
        if got is not None:
            return got
    if (root / name).is_dir():
        return _from_archives(root / name, name, split, max_per_class, progress, notes,
                              cache_dir)
    return None


def _download(root: Path, name: str, split: str) -> _Raw:
    """Fetch with torchvision into ``root/<name>`` (Avalanche's layout) and return its arrays."""
    root = root / name
    import kvb_avalanche  # noqa: F401  (torchvision import hook, before torchvision)

    # isort: split
    import torchvision

    dataset_cls = getattr(torchvision.datasets, _TORCHVISION[name])
    log.info("downloading %s %s into %s with torchvision", name, split, root)
    try:
        ds = dataset_cls(str(root), train=split == "train", download=True)
    except (OSError, RuntimeError) as e:  # URLError is an OSError
        raise DataError(f"downloading {name} into {root} failed: {e}. "
                        f"{_layouts_help(name, split)}") from e
    return _Raw(np.ascontiguousarray(ds.data, dtype=np.uint8), np.asarray(ds.targets, np.int64),
                list(ds.classes), f"{root / PICKLE_DIRS[name]} (torchvision download)")


# ---------------------------------------------------------------------------- public
def load_cifar(
    name: str,
    split: str,
    root: Path | None = None,
    download: bool = False,
    max_per_class: int | None = None,
    progress: bool = True,
    cache_dir: Path | None = None,
) -> ImageSplit:
    """Load one CIFAR split from ``root``, or from the first default root holding a copy.

    ``max_per_class`` keeps the first k images of each class (in file-name order);
    ``download`` fetches the data with torchvision into ``<root>/<name>`` (default root:
    Avalanche's data folder) when no copy is found. ``cache_dir``: where images decoded
    from tar archives are kept (keyed by the archives' names, sizes and times), so the
    next load skips reading and decoding them. Raises :class:`DataError`.
    """
    if name not in NAMES:
        raise DataError(f"unknown data set {name!r} (argument 'name'); "
                        f"choose one of {', '.join(NAMES)}")
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)} (argument 'split'), "
                        f"got {split!r}")
    if max_per_class is not None and (isinstance(max_per_class, bool)
                                      or not isinstance(max_per_class, int | np.integer)
                                      or max_per_class < 1):
        raise DataError(f"max_per_class must be a positive integer or None, got {max_per_class!r}")
    start = time.perf_counter()
    roots = [Path(root).expanduser()] if root is not None else default_data_roots()
    notes: list[str] = []
    got = None
    for r in roots:
        if r.is_dir():
            got = _find(r, name, split, max_per_class, progress, notes, cache_dir)
            if got is not None:
                break
        elif root is not None:
            notes.append(f"{r} is not a folder")
    if got is None and download:
        got = _download(Path(root).expanduser() if root is not None else avalanche_data_root(),
                        name, split)
    if got is None:
        seen = f" Seen: {'; '.join(notes)}." if notes else ""
        raise DataError(f"no copy of {name} {split} found in {', '.join(map(str, roots))}."
                        f"{seen} {_layouts_help(name, split)}")
    images, labels = got.images, got.labels
    if max_per_class is not None:  # tree and archives kept only these already: a no-op there
        keep = np.zeros(len(labels), dtype=bool)
        for c in np.unique(labels):
            keep[np.flatnonzero(labels == c)[:max_per_class]] = True
        if not keep.all():
            images, labels = images[keep], labels[keep]
    if len(got.classes) != NUM_CLASSES[name]:
        log.warning("%s has %d classes, not %d: labels are indices into its sorted class "
                    "folders and may differ from the original ones", got.source,
                    len(got.classes), NUM_CLASSES[name])
    result = ImageSplit(images, labels, got.classes, data_identity(images, labels), got.source)
    log.info("%s %s: %d images, %d classes from %s in %.1fs", name, split, len(labels),
             len(got.classes), got.source, time.perf_counter() - start)
    return result
