from itertools import pairwise

import pytest
import torch
from conftest import blob_embeddings

from kvb_avalanche import KeyFitConfig, KeyValueBottleneck, fit_keys
from kvb_avalanche.keys import ema_step


def test_ema_kmeans_finds_every_cluster_without_dead_keys():
    points, _, centres = blob_embeddings(8, 100, 2, spread=0.02)
    bn = KeyValueBottleneck(2, 1, 8, 2, 3, projection="chunk")
    perm = torch.randperm(len(points))
    batches = [points[perm[i : i + 100]] for i in range(0, 800, 100)]
    stats = fit_keys(bn, batches, KeyFitConfig(epochs=30, kmeans_start=False), progress=False)
    d = torch.cdist(centres, bn.keys[0])  # (clusters, keys)
    assert (d.min(1).values < 0.1).all(), "some cluster has no key"
    assert stats["keys_in_use"] == 1.0


def test_lloyd_start_sets_a_consistent_ema_state_so_the_first_step_does_not_collapse():
    points, _, _ = blob_embeddings(16, 50, 6)
    bn = KeyValueBottleneck(6, 2, 16, 3, 3, seed=0)
    fit_keys(bn, [points], KeyFitConfig(epochs=0, kmeans_start=True), progress=False)
    used = bn.ema_counts > 0
    torch.testing.assert_close(bn.ema_sums[used] / bn.ema_counts[used, None], bn.keys[used])
    torch.testing.assert_close(bn.ema_counts.sum(-1), torch.ones(2))
    keys = bn.keys.clone()
    # one EMA step on the same data keeps the keys (official code: keys drift to the origin)
    ema_step(bn, bn.project(points), KeyFitConfig(), torch.Generator().manual_seed(0))
    assert (bn.keys - keys).norm(dim=-1).max() < 0.05 * keys.norm(dim=-1).mean()


def test_dead_keys_are_replaced_by_data_points():
    bn = KeyValueBottleneck(2, 1, 20, 2, 3, projection="chunk", key_init="random")
    bn.keys.mul_(0).add_(100.0)  # every key far away from the data
    bn.ema_sums.copy_(bn.keys * bn.ema_counts[..., None])
    data = torch.rand(200, 2)
    fit_keys(bn, [data[:100], data[100:]], KeyFitConfig(epochs=60, kmeans_start=False),
             progress=False)
    assert bn.keys.abs().max() < 1.5, "keys far from the data were not replaced"
    assert (bn.ema_counts > 0).all()


def test_fit_is_reproducible_for_a_seed():
    points, _, _ = blob_embeddings(8, 40, 5)
    runs = []
    for _ in range(2):
        bn = KeyValueBottleneck(5, 3, 10, 2, 3, seed=4)
        fit_keys(bn, [points[:160], points[160:]], KeyFitConfig(epochs=3, seed=7), progress=False)
        runs.append(bn.keys.clone())
    assert torch.equal(*runs)


def test_zero_lloyd_iterations_keep_the_sampled_points():
    """kmeans_iters=0: the start is sampled embeddings, not one Lloyd update of them."""
    from kvb_avalanche.keys import lloyd_start

    bn = KeyValueBottleneck(6, 3, 8, 2, 4, seed=0)
    z = bn.project(torch.randn(200, 6))  # (n, codebooks, dim_keys)
    lloyd_start(bn, z, 0, torch.Generator().manual_seed(0))

    def sampled(c):  # whether every key of codebook c is one of its heads, exactly
        return bool((bn.keys[c][:, None] == z[None, :, c]).all(-1).any(1).all())

    assert all(sampled(c) for c in range(3))
    torch.testing.assert_close(bn.ema_counts.sum(1), torch.ones(3))
    lloyd_start(bn, z, 2, torch.Generator().manual_seed(0))
    assert not all(sampled(c) for c in range(3))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("samples", [40, 400], ids=["fewer_samples_than_keys", "more"])
def test_fit_on_a_device_gives_the_cpu_keys(device, samples):
    """Random draws come from the CPU generator, so a GPU fit starts from the CPU's keys
    (both Lloyd branches: sampled with jitter when n < pairs, a permutation otherwise)."""
    points, _, _ = blob_embeddings(8, samples // 8, 6)
    fitted = []
    for on in ("cpu", device):
        bn = KeyValueBottleneck(6, 3, 64, 2, 4, seed=0).to(on)
        stats = fit_keys(bn, [points[: samples // 2], points[samples // 2 :]],
                         KeyFitConfig(epochs=2, seed=3), progress=False)
        assert bn.keys.device.type == torch.device(on).type
        fitted.append((bn.keys.cpu(), stats["keys_in_use"]))
    torch.testing.assert_close(fitted[1][0], fitted[0][0], atol=1e-4, rtol=1e-4)
    assert fitted[1][1] == fitted[0][1]


def test_official_key_init_preset(monkeypatch):
    """key_init='official': Gaussian keys, no Lloyd start, EMA epochs at threshold 0.1."""
    import kvb_avalanche.keys as keys
    from kvb_avalanche.benchmarks.embedded import EmbeddedSplits
    from kvb_avalanche.experiments import ExperimentConfig
    from kvb_avalanche.experiments.runner import fit_bottleneck, key_identity

    def no_lloyd(*args, **kwargs):
        raise AssertionError("the official preset has no Lloyd start")

    seen = []
    real_step = keys.ema_step
    monkeypatch.setattr(keys, "lloyd_start", no_lloyd)
    monkeypatch.setattr(keys, "ema_step", lambda bn, z, cfg, g: seen.append(cfg) or
                        real_step(bn, z, cfg, g))
    x = torch.randn(300, 12)
    data = EmbeddedSplits((x, torch.arange(300) % 10), (x, torch.arange(300) % 10), x, 10,
                          {}, {})
    config = ExperimentConfig(key_init="official", key_epochs=3, codebooks=4, num_pairs=16,
                              dim_keys=3, batch_size=100, strategies=("kvb",))
    bn = fit_bottleneck(config, data, seed=0, progress=False)
    assert len(seen) == 3 * 3 and all(c == KeyFitConfig.official(3, seed=0) for c in seen)
    assert bn.fit_stats["ema_steps"] == 9 and bool(bn.keys_frozen)
    start = KeyValueBottleneck(12, 4, 16, 3, 10, key_init="random", seed=0).keys
    assert not torch.equal(bn.keys, start)  # fitted from the Gaussian start
    assert key_identity(config, 0) != key_identity(config.replace(key_init="ours"), 0)


def test_official_preset_makes_the_official_codes_step_in_batch_count_units():
    """One EMA step of KeyFitConfig.official, computed by hand in the official code's units:
    counts and sums in batch counts (here x 8), decay 0.95, dead below 0.1 x batch / pairs."""
    batch, pairs = 8, 5
    bn = KeyValueBottleneck(1, 1, pairs, 1, 2, projection="chunk", key_init="random")
    bn.keys.copy_(torch.tensor([0.0, 1.0, 2.0, 10.0, 20.0]).view(1, pairs, 1))
    # per-sample fractions; in batch counts 2.8, 2.4, 2.464, 0.16, 0.176
    bn.ema_counts.copy_(torch.tensor([[0.35, 0.3, 0.308, 0.02, 0.022]]))
    bn.ema_sums.copy_(bn.keys * bn.ema_counts[..., None])
    z = torch.tensor([0.2, 0.4, 0.9, 1.3, 1.1, 2.2, 1.8, 2.6]).view(batch, 1, 1)
    cfg = KeyFitConfig.official(epochs=1)
    assert (cfg.decay, cfg.dead_code_threshold, cfg.kmeans_start) == (0.95, 0.1, False)
    replaced = ema_step(bn, z, cfg, torch.Generator().manual_seed(0))

    # nearest keys: 0 <- {0.2, 0.4}, 1 <- {0.9, 1.3, 1.1}, 2 <- {2.2, 1.8, 2.6}, none for 10, 20
    # counts: 0.95 * [2.8, 2.4, 2.464, 0.16, 0.176] + 0.05 * [2, 3, 3, 0, 0]
    #       = [2.76, 2.43, 2.4908, 0.152, 0.1672]; the threshold is 0.1 x 8 / 5 = 0.16, so
    # the key at 10 (0.152) dies and is reset to 0.16, the key at 20 (0.1672) lives.
    # sums:  0.95 * [0, 2.4, 4.928, -, 3.52] + 0.05 * [0.6, 3.3, 6.6, -, 0]
    #       = [0.03, 2.445, 5.0116, -, 3.344]; keys = sums / counts
    assert replaced == 1
    counts = bn.ema_counts[0] * batch
    torch.testing.assert_close(counts, torch.tensor([2.76, 2.43, 2.4908, 0.16, 0.1672]))
    keys = bn.keys[0, :, 0]
    torch.testing.assert_close(keys[[0, 1, 2, 4]],  # Laplace smoothing moves them by < 1e-3
                               torch.tensor([0.03 / 2.76, 2.445 / 2.43, 5.0116 / 2.4908, 20.0]),
                               rtol=1e-3, atol=1e-6)
    assert keys[3].item() in z.flatten().tolist()  # the dead key restarts on a batch head
    torch.testing.assert_close(bn.ema_sums[0, 3, 0], keys[3] * 0.16 / batch)


def test_pca_allocation_deals_the_principal_axes_so_each_chunks_variance_product_balances():
    from kvb_avalanche.keys import pca_allocation

    variances = torch.tensor([16.0, 8.0, 4.0, 3.0, 1.0, 0.5])
    x = torch.randn(40_000, 6, generator=torch.Generator().manual_seed(0)) * variances.sqrt()
    rotation = pca_allocation(x, codebooks=2)  # (6, 6)
    # by hand, largest first to the chunk with the smallest product that has room:
    # 16 -> a; 8 -> b; 4 -> b (8 < 16); 3 -> a (16 < 32); 1 -> b (32 < 48); 0.5 -> a (b is
    # full): chunk a = axes 0, 3, 5 and chunk b = axes 1, 2, 4
    assert rotation.abs().argmax(0).tolist() == [0, 3, 5, 1, 2, 4]
    assert torch.allclose(rotation.T @ rotation, torch.eye(6, dtype=torch.float64), atol=1e-12)


def _learned_fit(x, seed=0):
    bn = KeyValueBottleneck(4, 2, 8, 2, 3, projection="learned")
    stats = fit_keys(bn, [x[i : i + 200] for i in range(0, len(x), 200)],
                     KeyFitConfig(epochs=1, seed=seed), progress=False)
    return bn, stats


def test_a_learned_projection_is_an_orthogonal_rotation_that_lowers_the_quantisation_error():
    from kvb_avalanche.keys import quantisation_error

    # the variance sits in the first chunk: chunking wastes the second codebook
    x = torch.randn(4000, 4, generator=torch.Generator().manual_seed(0)) \
        * torch.tensor([3.0, 2.0, 0.1, 0.1])
    chunk = KeyValueBottleneck(4, 2, 8, 2, 3, projection="chunk")
    fit_keys(chunk, [x[i : i + 200] for i in range(0, 4000, 200)], KeyFitConfig(epochs=1),
             progress=False)
    learned, stats = _learned_fit(x)
    rotation = learned.projection.permute(1, 0, 2).reshape(4, 4).double()  # (dim, dim)
    assert torch.allclose(rotation.T @ rotation, torch.eye(4, dtype=torch.float64), atol=1e-6)
    errors = stats["rotation_errors"]
    assert len(errors) == 11 and all(b <= a * (1 + 1e-5) for a, b in pairwise(errors))
    assert errors[-1] < errors[0]
    assert quantisation_error(learned, x) < 0.4 * quantisation_error(chunk, x)
    again, _ = _learned_fit(x)
    assert torch.equal(again.projection, learned.projection) and torch.equal(again.keys,
                                                                               learned.keys)
    learned.freeze_keys()
    with pytest.raises(RuntimeError, match="keys are frozen"):
        learned.set_rotation(torch.eye(4))


@pytest.mark.parametrize("projection, rotation, message", [
    ("random", torch.eye(4), "set_rotation needs projection='learned'"),
    ("learned", torch.eye(3), r"rotation must be \(4, 4\), got \(3, 3\)"),
])
def test_set_rotation_refuses_another_projection_or_shape(projection, rotation, message):
    bn = KeyValueBottleneck(4, 2, 8, 2, 3, projection=projection)
    with pytest.raises(ValueError, match=message):
        bn.set_rotation(rotation)
