import os
from pathlib import Path

import pytest
import torch

import kvb_avalanche  # noqa: F401  (arms the torchvision hook before Avalanche is imported)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def blob_embeddings(n_clusters: int, per_cluster: int, dim: int, spread: float = 0.05, seed=0,
                    noise_seed=None, scale: float = 3.0, offset: float = 0.0):
    """Gaussian clusters: (points (n, dim), labels (n,), centres (k, dim)).

    ``seed`` fixes the centres, ``noise_seed`` (default: seed) the samples around them;
    ``offset`` shifts every centre along the all-ones direction, as in non-negative features.
    """
    g = torch.Generator().manual_seed(seed)
    centres = offset + scale * torch.randn(n_clusters, dim, generator=g)
    if noise_seed is not None:
        g = torch.Generator().manual_seed(1000 + noise_seed)
    labels = torch.arange(n_clusters).repeat_interleave(per_cluster)
    points = centres[labels] + spread * torch.randn(len(labels), dim, generator=g)
    return points, labels, centres


class DigitsImages(torch.utils.data.Dataset):
    """scikit-learn's 8x8 digits as a torchvision-style dataset: (PIL image, target)."""

    def __init__(self, images, targets, transform=None):
        self.images, self.targets, self.transform = images, list(targets), transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        from PIL import Image

        image = Image.fromarray(self.images[i])
        return (self.transform(image) if self.transform else image), self.targets[i]


def digits_benchmark(classes=4, train_transform=None, eval_transform=None, n_experiences=2):
    """A class-incremental ``nc_benchmark`` over the first ``classes`` digits (8x8 PIL images),
    every 4th image of a class in the test set."""
    from avalanche.benchmarks import nc_benchmark
    from sklearn.datasets import load_digits
    from torchvision import transforms

    digits = load_digits()
    keep = digits.target < classes
    images = (digits.images[keep] * 255 / 16).round().astype("uint8")
    targets = digits.target[keep]
    test = torch.arange(len(targets)) % 4 == 0
    to_tensor = transforms.ToTensor()
    return nc_benchmark(
        DigitsImages(images[~test.numpy()], targets[~test.numpy()]),
        DigitsImages(images[test.numpy()], targets[test.numpy()]),
        n_experiences=n_experiences, task_labels=False, fixed_class_order=list(range(classes)),
        train_transform=train_transform or to_tensor, eval_transform=eval_transform or to_tensor)


def frozen_conv_encoder(dim: int = 16, seed: int = 0) -> torch.nn.Module:
    """A small random conv net, frozen: (batch, 1, H, W) float images -> (batch, dim)."""
    from torch import nn

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, dim, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                        nn.Flatten(), nn.Linear(4 * dim, dim))
    return net.eval().requires_grad_(False)


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if SHARED_DATA.is_dir():  # tests (and the scripts they start) read CIFAR from here
    os.environ.setdefault("KVB_DATA_ROOT", str(SHARED_DATA))


@pytest.fixture(scope="session")
def cifar_cache(tmp_path_factory):
    """One embedding and decoded-image cache for every test that reads ../shared/data, so
    each archive is decoded once per session."""
    return tmp_path_factory.mktemp("kvb-cache")


def final_accuracy_by_hand(matrix) -> dict:
    """(strategy, seed) -> mean accuracy over the test experiences after the last one
    trained, from an accuracy matrix's rows (a DataFrame) without the reports' code."""
    out = {}
    for (strategy, seed), rows in matrix.groupby(["strategy", "seed"]):
        last = rows[rows.trained_through == rows.trained_through.max()]
        out[(strategy, int(seed))] = sum(last.accuracy) / len(last)
    return out
