"""The fused distance + argmin search against float64 distances and the matmul search."""

import numba
import pytest
import torch

from kvb_avalanche import search
from kvb_avalanche.bottleneck import KeyValueBottleneck
from kvb_avalanche.search import fused_nearest, keys_layout


def _exact(z: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Squared distances in float64: (n, codebooks, pairs)."""
    return (z.double()[:, :, None, :] - keys.double()[None]).square().sum(-1)


@pytest.mark.parametrize("dim_keys,pairs", [(1, 5), (3, 300), (14, 512), (16, 257), (8, 1000)])
def test_fused_search_finds_the_nearest_key_and_its_distance(dim_keys, pairs):
    g = torch.Generator().manual_seed(dim_keys * 1000 + pairs)
    codebooks, n = 3, 40
    keys = torch.randn(codebooks, pairs, dim_keys, generator=g)
    z = torch.randn(n, codebooks, dim_keys, generator=g)
    indices, distances = fused_nearest(z, *keys_layout(keys))
    assert indices.shape == (n, codebooks) and indices.dtype == torch.int64
    exact = _exact(z, keys)
    best = exact.min(-1).values
    chosen = exact.gather(-1, indices[..., None])[..., 0]
    # the chosen key is the nearest one, up to float32 rounding of near ties
    torch.testing.assert_close(chosen, best, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(distances.double(), best, rtol=1e-4, atol=1e-4)
    second = exact.topk(2, -1, largest=False).values[..., 1] if pairs > 1 else best + 1
    clear = (second - best) > 1e-3 * (1 + best)  # no rounding-level tie
    assert torch.equal(indices[clear], exact.argmin(-1)[clear])
    assert clear.float().mean() > 0.9


def test_ties_go_to_the_first_key_and_masked_keys_are_never_chosen():
    keys = torch.zeros(1, 600, 2)
    keys[0, :, 0] = 5.0
    keys[0, [7, 300, 599], 0] = 0.0  # three equal nearest keys, in different tiles
    z = torch.zeros(4, 1, 2)
    indices, distances = fused_nearest(z, *keys_layout(keys))
    assert indices.tolist() == [[7]] * 4 and distances.abs().max() == 0
    mask = torch.ones(1, 600, dtype=torch.bool)
    mask[0, [7, 300]] = False
    indices, _ = fused_nearest(z, *keys_layout(keys), mask=mask)
    assert indices.tolist() == [[599]] * 4


def test_fused_search_does_not_depend_on_the_number_of_threads():
    g = torch.Generator().manual_seed(0)
    keys, z = torch.randn(8, 700, 14, generator=g), torch.randn(64, 8, 14, generator=g)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = fused_nearest(z, *keys_layout(keys))
    finally:
        numba.set_num_threads(threads)
    many = fused_nearest(z, *keys_layout(keys))
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


def test_the_bottleneck_search_agrees_with_its_matmul_search():
    bn = KeyValueBottleneck(64, 16, 300, 6, 4, key_init="random", search="fused")
    z = bn.project(torch.randn(200, 64, generator=torch.Generator().manual_seed(1)))
    fused = bn.nearest(z, topk=1)
    bn.search = "matmul"
    matmul = bn.nearest(z, topk=1)
    assert fused.indices.shape == matmul.indices.shape == (200, 16, 1)
    assert (fused.indices == matmul.indices).float().mean() > 0.999
    torch.testing.assert_close(fused.distances, matmul.distances, rtol=1e-4, atol=1e-4)


def test_the_key_layout_follows_the_keys_and_is_not_pickled():
    import pickle

    bn = KeyValueBottleneck(32, 4, 50, 8, 4, key_init="random", search="fused")
    z = bn.project(torch.randn(10, 32))
    before = bn.nearest(z, topk=1).indices
    bn.keys.mul_(-1.0)  # in place: the layout must be redone
    after = bn.nearest(z, topk=1).indices
    exact = _exact(z, bn.keys).argmin(-1)
    assert torch.equal(after[..., 0], exact) and not torch.equal(before, after)
    assert "_layout" not in pickle.loads(pickle.dumps(bn)).__dict__


def test_kernels_are_compiled_per_key_size_at_first_use():
    search._KERNELS.pop(5, None)
    fused_nearest(torch.zeros(1, 1, 5), *keys_layout(torch.ones(1, 3, 5)))
    assert 5 in search._KERNELS


def test_a_fused_key_fit_finds_the_clusters_the_matmul_fit_finds():
    from kvb_avalanche.keys import KeyFitConfig, fit_keys, quantisation_error

    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 32, generator=g).repeat(64, 1) + 0.05 * torch.randn(1024, 32, generator=g)
    errors = {}
    for kind in ("matmul", "fused"):
        bn = KeyValueBottleneck(32, 4, 16, 8, 4, search=kind)
        fit_keys(bn, [x[i : i + 128] for i in range(0, 1024, 128)], KeyFitConfig(epochs=3),
                 progress=False)
        errors[kind] = quantisation_error(bn, x)
    assert errors["fused"] == pytest.approx(errors["matmul"], rel=1e-3)
    assert errors["fused"] < 0.1 * quantisation_error(
        KeyValueBottleneck(32, 4, 16, 8, 4, key_init="random"), x)


def test_an_unknown_search_is_refused_naming_it():
    with pytest.raises(ValueError, match="search must be 'matmul' or 'fused', got 'gpu'"):
        KeyValueBottleneck(8, 2, 4, 2, 2, search="gpu")
