"""The paper's 2-D toy (Träuble et al. 2023, Fig. 2): 8 Gaussian blobs in the unit square,
learnt 2 classes at a time."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kvb_avalanche.benchmarks.embedded import tensor_scenario

NUM_CLASSES = 8
CLASS_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]  # 4 stages: (0, 4), (1, 5), (2, 6), (3, 7)


def class_means(seed: int, min_gap: float = 0.2) -> Tensor:
    """8 blob centres in [0.1, 0.9]^2, at least ``min_gap`` apart (seeded rejection sampling)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    means: list[Tensor] = []
    while len(means) < NUM_CLASSES:
        m = 0.1 + 0.8 * torch.rand(2, generator=g)
        if all((m - o).norm() >= min_gap for o in means):
            means.append(m)
    return torch.stack(means)


def blobs(means: Tensor, per_class: int, std: float, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """(inputs (n, 2), labels (n,)) with ``per_class`` points around each mean."""
    y = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    x = means[y] + std * torch.randn(len(y), 2, generator=g)
    return x, y


def Toy2D(seed: int, std: float = 0.035, train_per_class: int = 50,  # noqa: N802
          test_per_class: int = 100) -> Any:
    """The 2-D toy as an Avalanche benchmark of 4 class-incremental stages (100 training
    points a stage by default). The blob centres and samples are fixed by ``seed``; the
    test points are in ``benchmark.test_points`` (inputs, labels) for plotting."""
    g = torch.Generator().manual_seed(seed)
    means = class_means(seed)
    train = blobs(means, train_per_class, std, g)
    test = blobs(means, test_per_class, std, g)
    benchmark = tensor_scenario(train, test, CLASS_ORDER, num_experiences=4)
    benchmark.test_points = test
    return benchmark


def key_init_points(seed: int, batches: int, batch_size: int = 100) -> list[Tensor]:
    """Fresh uniform points of the unit square, unlabelled, to fit the toy's keys on."""
    g = torch.Generator().manual_seed(20_000 + seed)
    return [torch.rand(batch_size, 2, generator=g) for _ in range(batches)]
