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
