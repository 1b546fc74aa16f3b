"""Class-incremental CIFAR benchmarks over cached embeddings of a frozen encoder.

The images of each split are embedded once per (encoder, weights, resolution, data) and
cached on disk (:func:`kvb_avalanche.encoders.cached_embeddings`); every later benchmark
over the same data is built from the cache in seconds. The benchmarks are ordinary
Avalanche benchmarks over ``TensorDataset``\\ s of embeddings, so any Avalanche strategy
(with a head on ``dim`` features) trains on them, KVB and the baselines alike.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from avalanche.benchmarks.scenarios import class_incremental_benchmark
from torch import Tensor
from torch.utils.data import TensorDataset

from kvb_avalanche.benchmarks.cifar import NUM_CLASSES
from kvb_avalanche.device import resolve_device
from kvb_avalanche.encoders import Encoder, build_encoder, cached_embeddings, embed_images

# the preprocessing of this project's own encoders, left out of their cache keys
DEFAULT_PREPROCESSING = Encoder("", None, 0, "")


def default_cache_dir() -> Path:
    """``$KVB_CACHE_DIR``, else ``$XDG_CACHE_HOME/kvb_avalanche`` (``~/.cache/kvb_avalanche``):
    embeddings, decoded images and fitted keys are kept below it."""
    if os.environ.get("KVB_CACHE_DIR"):
        return Path(os.environ["KVB_CACHE_DIR"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "kvb_avalanche"


@dataclass(frozen=True)
class DataOptions:
    """Where images are read from and embeddings cached, and where they are computed:
    none of it changes a number."""

    root: Path | None = None  # a data root (see load_cifar); None: the default roots
    download: bool = False  # fetch with torchvision when no local copy is found
    cache_dir: Path | None = None  # None: default_cache_dir()
    device: str = "cpu"  # see kvb_avalanche.device: auto, cpu, cuda, cuda:N, mps
    progress: bool = True

    @property
    def data_cache(self) -> Path:
        """Where decoded images are kept (below the cache folder)."""
        return (Path(self.cache_dir) if self.cache_dir is not None else default_cache_dir()) \
            / "data"


@dataclass(frozen=True, eq=False)
class EmbeddedSplits:
    """The embedded train and test splits of a data set, and the key-initialisation data."""

    train: tuple[Tensor, Tensor]  # embeddings (n, dim) float32, labels (n,) int64
    test: tuple[Tensor, Tensor]
    key_init: Tensor | None  # unlabelled embeddings (m, dim), or None: the first experience
    num_classes: int
    encoder: dict  # name, dim and weights identity of the encoder
    record: dict  # per split: source, images, data and embedding-cache identities

    @property
    def dim(self) -> int:
        return self.train[0].shape[1]


def embedding_meta(encoder: Encoder, name: str, split: str, data_identity: str,
                   resolution: int, device: torch.device) -> dict:
    """The identity of a split's embeddings (their cache key): the data, the backbone, its
    weights, the preprocessing, and a device other than the CPU."""
    meta = {"dataset": name, "split": split, "data": data_identity, "encoder": encoder.name,
            "weights": encoder.weights_id, "resolution": resolution}
    preprocessing = encoder.preprocessing(resolution)
    if preprocessing != DEFAULT_PREPROCESSING.preprocessing(resolution):
        meta["preprocessing"] = preprocessing  # (our own encoders keep their cache keys)
    if device.type != "cpu":  # another device (and autocast) gives other float rounding
        meta["device"] = {"type": device.type, "autocast": device.type == "cuda" and encoder.amp}
    return meta


def embed_split(encoder: Encoder, name: str, split: str, *, resolution: int | None = None,
                max_per_class: int | None = None, options: DataOptions = DataOptions()
                ) -> tuple[Tensor, Tensor, dict]:
    """(embeddings float32 (n, dim), labels int64 (n,), record) of one split of the
    registered data set ``name``, cached. ``resolution`` defaults to the encoder's."""
    from kvb_avalanche.benchmarks.registry import DATASETS

    cache_dir = Path(options.cache_dir) if options.cache_dir is not None else default_cache_dir()
    progress = options.progress
    resolution = resolution or encoder.resolution
    data = DATASETS[name].load(split, max_per_class=max_per_class, size=resolution,
                               options=options)
    device = resolve_device(str(options.device))
    meta = embedding_meta(encoder, name, split, data.identity, resolution, device)
    x, cache_id = cached_embeddings(
        cache_dir / "embeddings", meta,
        lambda: embed_images(encoder, data.images, resolution, device=device,
                             progress=progress, desc=f"embedding {name} {split} at {resolution}px"),
    )
    record = {"source": data.source, "images": len(data.labels), "data_identity": data.identity,
              "embedding_cache_identity": cache_id}
    return x, torch.as_tensor(data.labels, dtype=torch.long), record


def embed_dataset(
    dataset: str,
    *,
    encoder: str | Encoder = "efficientnet_lite0",
    weights: Path | None = None,
    resolution: int | None = None,
    max_per_class: int | None = None,
    test_max_per_class: int | None = None,
    key_init_data: str | None = None,
    key_init_max_per_class: int | None = None,
    options: DataOptions = DataOptions(),
) -> EmbeddedSplits:
    """Embed (or load from the cache) the registered data set ``dataset``'s train and test
    splits and, unless ``key_init_data`` is None or ``"none"``, the train split of that data
    set for fitting the keys without labels. Raises ``DataError`` / ``ValueError`` on bad
    input."""
    from kvb_avalanche.benchmarks.registry import DATASETS, key_init_choices

    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    if key_init_data not in (None, *key_init_choices()):
        raise ValueError(f"key_init_data must be one of {', '.join(key_init_choices())} or "
                         f"None, got {key_init_data!r}")
    enc = encoder if isinstance(encoder, Encoder) else build_encoder(encoder, weights)
    common = dict(resolution=resolution, options=options)
    xtr, ytr, rtr = embed_split(enc, dataset, "train", max_per_class=max_per_class, **common)
    xte, yte, rte = embed_split(enc, dataset, "test", max_per_class=test_max_per_class, **common)
    key_init, rkey = None, None
    if key_init_data not in (None, "none"):
        key_init, _, rkey = embed_split(enc, key_init_data, "train",
                                        max_per_class=key_init_max_per_class, **common)
    return EmbeddedSplits(
        (xtr, ytr), (xte, yte), key_init, DATASETS[dataset].num_classes,
        {"name": enc.name, "dim": enc.dim, "weights": enc.weights_id,
         "preprocessing": enc.preprocessing(resolution),
         "device": str(resolve_device(str(options.device)))},
        {f"{dataset}_train": rtr, f"{dataset}_test": rte, "key_init": rkey},
    )


def embed_cifar(dataset: str, **kwargs: Any) -> EmbeddedSplits:
    """:func:`embed_dataset` of ``cifar10`` or ``cifar100``."""
    if dataset not in NUM_CLASSES:
        raise ValueError(f"dataset must be one of {', '.join(NUM_CLASSES)}, got {dataset!r}")
    return embed_dataset(dataset, **kwargs)


def tensor_dataset(x: Tensor, y: Tensor) -> TensorDataset:
    """A TensorDataset with the ``targets`` list Avalanche's class splitting reads."""
    ds = TensorDataset(x, y)
    ds.targets = y.tolist()
    return ds


def tensor_scenario(train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor],
                    class_order: Sequence[int], num_experiences: int) -> Any:
    """A class-incremental Avalanche benchmark over (inputs, labels) tensors."""
    return class_incremental_benchmark(
        {"train": tensor_dataset(*train), "test": tensor_dataset(*test)},
        class_order=list(class_order), num_experiences=num_experiences)


def domain_scenario(train: Sequence[tuple[Tensor, Tensor, Tensor]],
                    test: Sequence[tuple[Tensor, Tensor, Tensor]], order: Sequence[int]) -> Any:
    """A domain-incremental Avalanche benchmark: one experience per domain, in ``order``,
    from (inputs, labels, domains) tensors (one triple per stream)."""
    from avalanche.benchmarks.scenarios import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline

    from kvb_avalanche.avalanche_api import tensor_classification_dataset

    def experiences(parts: Sequence[tuple[Tensor, Tensor, Tensor]]) -> list:
        x, y, domains = (torch.cat(t) for t in zip(*parts, strict=True))
        out = []
        for d in order:
            rows = domains == d
            if not rows.any():
                raise ValueError(f"domain {d} has no rows")
            out.append(tensor_classification_dataset(x[rows], y[rows], task_labels=0))
        return out

    return with_classes_timeline(benchmark_from_datasets(train=experiences(train),
                                                         test=experiences(test)))


def class_order(num_classes: int, seed: int | None = None,
                fixed_class_order: Sequence[int] | None = None) -> list[int]:
    """``fixed_class_order``; else a permutation seeded by ``seed``; else 0 .. num_classes-1."""
    if fixed_class_order is not None:
        order = [int(c) for c in fixed_class_order]
        if sorted(order) != list(range(num_classes)):
            raise ValueError(f"fixed_class_order must be a permutation of 0..{num_classes - 1}, "
                             f"got {order}")
        return order
    if seed is None:
        return list(range(num_classes))
    return torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed)).tolist()


def SplitCIFAR10Embedded(  # noqa: N802 (named like Avalanche's generators)
    n_experiences: int = 5,
    *,
    encoder: str = "efficientnet_lite0",
    weights: Path | None = None,
    resolution: int | None = None,
    seed: int | None = None,
    fixed_class_order: Sequence[int] | None = None,
    max_per_class: int | None = None,
    key_init_data: str | None = "cifar100",
    key_init_max_per_class: int | None = None,
    dataset_root: Path | None = None,
    download: bool = False,
    cache_dir: Path | None = None,
    device: str = "auto",
    progress: bool = True,
    dataset: str = "cifar10",
) -> Any:
    """Split CIFAR-10 over frozen-encoder embeddings, as Avalanche's ``SplitCIFAR10`` over images.

    Class-incremental: ``n_experiences`` experiences of 10 / n_experiences classes each.
    The class order is ``fixed_class_order``, else a permutation seeded by ``seed``, else
    0 .. 9. Images are read from ``dataset_root`` (else ``$KVB_DATA_ROOT``, else Avalanche's
    ``default_dataset_location``; ``download=True`` fetches them there), embedded at
    ``resolution`` px (default: the encoder's) by ``encoder`` (one of
    :data:`kvb_avalanche.encoders.ENCODERS`, or ``timm:NAME``,
    ``torchvision:MODEL:WEIGHTS``, ``open_clip:ARCH:PRETRAINED``; ``weights`` a local
    weights file) on ``device``, and cached in ``cache_dir`` (default
    :func:`default_cache_dir`).

    Returns an Avalanche benchmark whose experiences hold ``(embedding, label)`` pairs,
    with two more attributes: ``key_init_data``, unlabelled embeddings of the train split
    of ``key_init_data`` (CIFAR-100 by default, as the paper; None with ``"none"``) to fit
    a :class:`~kvb_avalanche.KeyValueBottleneck`'s keys on (``KVBStrategy(key_init_loader=
    ...)``), and ``embeddings``, the :class:`EmbeddedSplits` (tensors and provenance).
    ``max_per_class`` keeps the first images of each class (train; half as many test),
    ``key_init_max_per_class`` likewise for the key-initialisation data.
    """
    classes = NUM_CLASSES[dataset]
    if not isinstance(n_experiences, int) or n_experiences < 1 or classes % n_experiences:
        raise ValueError(f"n_experiences must divide the {classes} classes, got {n_experiences!r}")
    order = class_order(classes, seed, fixed_class_order)
    data = embed_cifar(
        dataset, encoder=encoder, weights=weights, resolution=resolution,
        max_per_class=max_per_class,
        test_max_per_class=max_per_class and max(1, max_per_class // 2),
        key_init_data=key_init_data, key_init_max_per_class=key_init_max_per_class,
        options=DataOptions(dataset_root, download, cache_dir, device, progress))
    benchmark = tensor_scenario(data.train, data.test, order, n_experiences)
    benchmark.embeddings = data
    benchmark.key_init_data = data.key_init
    return benchmark


def SplitCIFAR100Embedded(  # noqa: N802 (named like Avalanche's generators)
    n_experiences: int = 10, *, key_init_data: str | None = "cifar10", **kwargs: Any
) -> Any:
    """Split CIFAR-100 over frozen-encoder embeddings: :func:`SplitCIFAR10Embedded`'s
    keyword arguments, with 100 classes (fine labels) and keys fitted by default on
    CIFAR-10's train split, as the paper does."""
    return SplitCIFAR10Embedded(n_experiences, key_init_data=key_init_data, dataset="cifar100",
                                **kwargs)
