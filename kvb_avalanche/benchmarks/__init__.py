"""Benchmark generators: CIFAR over cached embeddings of a frozen encoder, the paper's 2-D toy."""

from kvb_avalanche.benchmarks.cifar import DataError, ImageSplit, default_data_roots, load_cifar
from kvb_avalanche.benchmarks.embedded import (
    EmbeddedSplits,
    SplitCIFAR10Embedded,
    SplitCIFAR100Embedded,
    class_order,
    default_cache_dir,
    embed_cifar,
    tensor_scenario,
)
from kvb_avalanche.benchmarks.toy import Toy2D

__all__ = [
    "DataError",
    "EmbeddedSplits",
    "ImageSplit",
    "SplitCIFAR100Embedded",
    "SplitCIFAR10Embedded",
    "Toy2D",
    "class_order",
    "default_cache_dir",
    "default_data_roots",
    "embed_cifar",
    "load_cifar",
    "tensor_scenario",
]
