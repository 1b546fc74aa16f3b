"""Split Fashion-MNIST: 28x28 grey images of 10 clothing classes, 5 experiences of 2.

Read from the four idx files (``train-images-idx3-ubyte`` ... ``t10k-labels-idx1-ubyte``,
gzipped or not) wherever a copy is: under ``--data-root`` (directly, in ``fashion-mnist/``,
or torchvision's ``FashionMNIST/raw/``), Avalanche's data folder, or Debian's
``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``). The files are
uncompressed and their idx headers checked here (magic number, sizes, label range), so
copies whose gzip bytes differ from torchvision's (Debian's do) are read as they are;
``--download`` fetches torchvision's own, md5-checked. A ``--data-root`` is searched
first, then the default places. Grey images are repeated to three
channels for the encoders.
"""

from __future__ import annotations

import gzip
import logging
from pathlib import Path
from typing import Any

import numpy as np

from kvb_avalanche.benchmarks.cifar import DataError, ImageSplit, data_identity
from kvb_avalanche.benchmarks.registry import Benchmark, register_benchmark, register_dataset

log = logging.getLogger(__name__)

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
           "Sneaker", "Bag", "Ankle boot"]
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
DEBIAN = Path("/usr/share/datasets/fashion-mnist")
_WHERE = (f"--data-root or $KVB_DATA_ROOT (directly, fashion-mnist/ or FashionMNIST/raw/), "
          f"Avalanche's data folder (fashionmnist/FashionMNIST/raw/), or {DEBIAN} (Debian's "
          "dataset-fashion-mnist); --download fetches it with torchvision")


def _folders(root: Path | None) -> list[Path]:
    from kvb_avalanche.benchmarks.cifar import avalanche_data_root, default_data_roots

    # a --data-root given is searched first, then the default places: one --data-root
    # often serves CIFAR (the key-initialisation data) while Fashion-MNIST is elsewhere
    roots = [*([Path(root).expanduser()] if root is not None else []), *default_data_roots()]
    folders = [f for r in roots for f in (r, r / "fashion-mnist", r / "FashionMNIST" / "raw",
                                          r / "fashionmnist" / "FashionMNIST" / "raw")]
    folders += [avalanche_data_root() / "fashionmnist" / "FashionMNIST" / "raw", DEBIAN]
    return list(dict.fromkeys(folders))


def _read_idx(folder: Path, stem: str, magic: int) -> np.ndarray | None:
    for path in (folder / stem, folder / f"{stem}.gz"):
        if path.is_file():
            opener = gzip.open if path.suffix == ".gz" else open
            try:
                with opener(path, "rb") as f:
                    raw = f.read()
            except (OSError, EOFError) as e:
                raise DataError(f"cannot read {path}: {e}") from e
            dims = magic & 0xFF
            if len(raw) < 4 + 4 * dims or int.from_bytes(raw[:4], "big") != magic:
                raise DataError(f"{path} is not an idx file of {dims} dimension(s) "
                                f"(magic {raw[:4].hex()}, expected {magic:08x})")
            shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
            data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims)
            if data.size != int(np.prod(shape)):
                raise DataError(f"{path}: its header says {shape}, it holds {data.size} bytes")
            return data.reshape(shape)
    return None


def load_fmnist(split: str, *, max_per_class: int | None = None, size: int | None = None,
                options: Any = None) -> ImageSplit:
    """One Fashion-MNIST split as (n, 28, 28, 3) uint8 images (grey repeated) and labels."""
    root = getattr(options, "root", None)
    seen = []
    for folder in _folders(root):
        images = _read_idx(folder, FILES[split][0], 0x00000803)
        labels = _read_idx(folder, FILES[split][1], 0x00000801)
        if images is None or labels is None:
            seen.append(str(folder))
            continue
        source = f"{folder} (idx files)"
        break
    else:
        if not getattr(options, "download", False):
            raise DataError(f"no copy of Fashion-MNIST {split} found; looked in "
                            f"{', '.join(seen)}. Looked for: {_WHERE}")
        images, labels, source = _download(root, split)
    if len(images) != len(labels) or images.shape[1:] != (28, 28) or labels.max() > 9:
        raise DataError(f"{source}: {images.shape} images and {len(labels)} labels (max "
                        f"{labels.max()}) are not Fashion-MNIST's (n, 28, 28) and 10 classes")
    labels = labels.astype(np.int64)
    if max_per_class is not None:
        keep = np.concatenate([np.flatnonzero(labels == c)[:max_per_class] for c in range(10)])
        keep.sort()
        images, labels = images[keep], labels[keep]
    rgb = np.ascontiguousarray(np.repeat(images[..., None], 3, axis=-1))  # (n, 28, 28, 3)
    return ImageSplit(rgb, labels, list(CLASSES), data_identity(rgb, labels), source)


def _download(root: Path | None, split: str) -> tuple[np.ndarray, np.ndarray, str]:
    import kvb_avalanche  # noqa: F401  (torchvision import hook, before torchvision)

    # isort: split
    import torchvision

    from kvb_avalanche.benchmarks.cifar import avalanche_data_root

    folder = Path(root).expanduser() if root is not None else avalanche_data_root() / "fashionmnist"
    try:
        ds = torchvision.datasets.FashionMNIST(str(folder), train=split == "train",
                                               download=True)
    except (OSError, RuntimeError) as e:
        raise DataError(f"downloading Fashion-MNIST into {folder} failed: {e}") from e
    return ds.data.numpy(), ds.targets.numpy(), f"{folder} (torchvision download)"


register_dataset("fmnist", num_classes=10, image_shape=(28, 28, 1), source=_WHERE)(load_fmnist)


@register_benchmark
class SplitFMNIST(Benchmark):
    """Fashion-MNIST in 5 experiences of 2 classes (mammoth's seq-fmnist order); keys fitted
    on CIFAR-100's train split, unlabelled, as the paper fits CIFAR-10's."""

    name = "split_fmnist"
    dataset = "fmnist"
    num_classes = 10
    n_experiences = 5
    key_init_data = "cifar100"
    description = "Fashion-MNIST (28x28 grey), 5 experiences of 2 classes, keys on CIFAR-100"
