"""Split CIFAR-10 and split CIFAR-100: the paper's class-incremental settings, and the
standard splits of pretrained-model continual learning (CIFAR-100 in 10 x 10 and 20 x 5).

Images come from a local copy in any layout :func:`~kvb_avalanche.benchmarks.cifar.load_cifar`
reads (torchvision's or Avalanche's download folders, an ImageFolder tree, tar archives),
or from torchvision's downloader with ``--download``.
"""

from __future__ import annotations

from typing import Any

from kvb_avalanche.benchmarks.cifar import ImageSplit, load_cifar
from kvb_avalanche.benchmarks.registry import Benchmark, register_benchmark, register_dataset

_WHERE = ("$KVB_DATA_ROOT or --data-root, then Avalanche's data folder (torchvision's "
          "python folders, an ImageFolder tree or tar archives); --download fetches it")


def _loader(name: str):
    def load(split: str, *, max_per_class: int | None, size: int | None,
             options: Any) -> ImageSplit:
        return load_cifar(name, split, root=options.root, download=options.download,
                          max_per_class=max_per_class, progress=options.progress,
                          cache_dir=options.data_cache)

    return load


register_dataset("cifar10", num_classes=10, image_shape=(32, 32, 3), source=_WHERE)(
    _loader("cifar10"))
register_dataset("cifar100", num_classes=100, image_shape=(32, 32, 3), source=_WHERE)(
    _loader("cifar100"))


@register_benchmark
class SplitCIFAR10(Benchmark):
    """The paper's setting: 5 experiences of 2 classes, keys fitted on CIFAR-100."""

    name = "split_cifar10"
    dataset = "cifar10"
    num_classes = 10
    n_experiences = 5
    key_init_data = "cifar100"
    description = "CIFAR-10, 5 experiences of 2 classes, keys fitted on CIFAR-100 (the paper)"


@register_benchmark
class SplitCIFAR100(Benchmark):
    """The paper's CIFAR-100 setting: 50 experiences of 2 classes, keys fitted on CIFAR-10."""

    name = "split_cifar100"
    dataset = "cifar100"
    num_classes = 100
    n_experiences = 50
    key_init_data = "cifar10"
    description = "CIFAR-100, 50 experiences of 2 classes, keys fitted on CIFAR-10 (the paper)"
    quick = {"n_experiences": 10}  # 100 images a class: 10 experiences of 10


@register_benchmark
class SplitCIFAR100By10(SplitCIFAR100):
    """CIFAR-100 in 10 experiences of 10 classes (LAMDA-PILOT's B0 Inc10)."""

    name = "split_cifar100_10x10"
    n_experiences = 10
    description = "CIFAR-100, 10 experiences of 10 classes (pretrained-model CL's split)"
    quick = {}


@register_benchmark
class SplitCIFAR100By5(SplitCIFAR100):
    """CIFAR-100 in 20 experiences of 5 classes (LAMDA-PILOT's B0 Inc5)."""

    name = "split_cifar100_20x5"
    n_experiences = 20
    description = "CIFAR-100, 20 experiences of 5 classes (pretrained-model CL's split)"
    quick = {}
