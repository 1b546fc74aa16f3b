import pytest
import torch
from conftest import blob_embeddings

from kvb_avalanche import (
    KeyFitConfig,
    KeyValueBottleneck,
    KVBModel,
    LinearDecoder,
    MLPDecoder,
    VotingDecoder,
    fit_keys,
)


def fitted(dim=12, codebooks=6, pairs=16, dim_keys=3, dim_values=4, topk=1, **kw):
    bn = KeyValueBottleneck(dim, codebooks, pairs, dim_keys, dim_values, topk=topk, **kw)
    x = torch.randn(400, dim)
    fit_keys(bn, [x[i : i + 100] for i in range(0, 400, 100)], KeyFitConfig(epochs=2),
             progress=False)
    return bn


def brute_force(bn, x, k):
    z = torch.einsum("bd,cdk->bck", x, bn.projection)
    d = ((z[:, :, None, :] - bn.keys[None]) ** 2).sum(-1)  # (batch, codebooks, pairs)
    return d.topk(k, dim=-1, largest=False)


@pytest.mark.parametrize("topk", [1, 3])
@pytest.mark.parametrize("chunk_bytes", [64 * 2**20, 256])  # one block / many small blocks
def test_lookup_equals_brute_force(topk, chunk_bytes):
    bn = fitted(topk=topk, chunk_bytes=chunk_bytes)
    x = torch.randn(50, 12)
    values, idx, dist = bn(x, return_indices=True, return_distances=True)
    ref_d, ref_i = brute_force(bn, x, topk)
    assert values.shape == (50, 6, topk, 4) and idx.shape == dist.shape == (50, 6, topk)
    assert torch.equal(idx, ref_i)
    torch.testing.assert_close(dist, ref_d, atol=1e-4, rtol=1e-4)
    codebook = torch.arange(6)[None, :, None]
    assert torch.equal(values, bn.values[codebook, ref_i])


def test_token_inputs_keep_their_token_axis():
    bn = fitted(topk=2)
    x = torch.randn(5, 7, 12)
    values, idx = bn(x, return_indices=True)
    assert values.shape == (5, 7, 6, 2, 4) and idx.shape == (5, 7, 6, 2)
    flat_values, flat_idx = bn(x.reshape(35, 12), return_indices=True)
    assert torch.equal(idx.reshape(35, 6, 2), flat_idx)
    assert torch.equal(values.reshape(35, 6, 2, 4), flat_values)


def test_projection_is_a_seeded_buffer_and_chunk_split_selects_coordinates():
    a = KeyValueBottleneck(12, 6, 16, 3, 4, seed=1)
    b = KeyValueBottleneck(12, 6, 16, 3, 4, seed=1)
    c = KeyValueBottleneck(12, 6, 16, 3, 4, seed=2)
    assert torch.equal(a.projection, b.projection) and not torch.equal(a.projection, c.projection)
    assert "projection" in a.state_dict() and "keys" in a.state_dict()
    assert [n for n, _ in a.named_parameters()] == ["values"]
    chunk = KeyValueBottleneck(12, 4, 16, 3, 4, projection="chunk")
    x = torch.randn(2, 12)
    assert torch.equal(chunk.project(x), x.reshape(2, 4, 3))


def test_only_fetched_values_get_gradient_and_unselected_values_stay_bit_identical():
    bn = fitted(values_init="randn", values_init_std=0.1)
    bn.freeze_keys()
    before = bn.values.detach().clone()
    keys_before, proj_before = bn.keys.clone(), bn.projection.clone()
    opt = torch.optim.SGD(bn.parameters(), lr=0.5)
    x = torch.randn(3, 12)
    values, idx = bn(x, return_indices=True)
    values.pow(2).sum().backward()
    selected = torch.zeros(6, 16, dtype=torch.bool)
    selected[torch.arange(6)[None, :], idx[..., 0]] = True
    assert bn.values.grad[~selected].abs().sum() == 0
    assert (bn.values.grad[selected].abs().sum(-1) > 0).all()
    assert not bn.keys.requires_grad and not bn.projection.requires_grad
    opt.step()
    assert torch.equal(bn.values.detach()[~selected], before[~selected])
    assert not torch.equal(bn.values.detach()[selected], before[selected])
    assert torch.equal(bn.keys, keys_before) and torch.equal(bn.projection, proj_before)


def test_frozen_keys_never_move_in_train_mode():
    bn = fitted()
    bn.freeze_keys()
    bn.train()
    keys = bn.keys.clone()
    for _ in range(3):
        bn(torch.randn(64, 12)).sum().backward()
    assert torch.equal(bn.keys, keys)
    with pytest.raises(RuntimeError, match="frozen"):
        fit_keys(bn, [torch.randn(10, 12)], progress=False)
    assert torch.equal(bn.keys, keys)


def test_state_dict_round_trip_restores_outputs_and_frozen_state():
    bn = fitted(values_init="randn")
    bn.freeze_keys()
    other = KeyValueBottleneck(12, 6, 16, 3, 4, seed=99)
    other.load_state_dict(bn.state_dict())
    x = torch.randn(20, 12)
    assert torch.equal(other(x), bn(x))
    assert bool(other.keys_frozen) and bool(other.keys_initialized)
    assert other.fingerprint() == bn.fingerprint()


def test_voting_decoder_is_the_mean_of_fetched_values():
    bn = fitted(topk=2, values_init="randn")
    model = KVBModel(None, bn, VotingDecoder(4))
    x = torch.randn(8, 12)
    values = bn(x)  # (8, 6, 2, 4)
    torch.testing.assert_close(model(x), values.mean(dim=(1, 2)))
    assert list(VotingDecoder(4).parameters()) == []


def test_parametric_decoders_shapes():
    bn = fitted(topk=2, values_init="randn")
    for decoder in (LinearDecoder(6, 4, 5), MLPDecoder(6, 4, 5, hidden=7)):
        assert KVBModel(None, bn, decoder)(torch.randn(3, 12)).shape == (3, 5)


def test_cached_codes_give_the_same_logits_as_embeddings():
    bn = fitted(topk=2, values_init="randn")
    model = KVBModel(None, bn, VotingDecoder(4))
    x = torch.randn(30, 12)
    codes = model.codes(x)
    assert codes.dtype == torch.int16 and codes.shape == (30, 6, 2)
    assert torch.equal(model(codes), model(x))


def test_masking_falls_back_to_the_nearest_trained_key():
    points, _, _ = blob_embeddings(4, 50, 12)
    bn = KeyValueBottleneck(12, 3, 8, 4, 4, seed=0)
    fit_keys(bn, [points], KeyFitConfig(epochs=5), progress=False)
    bn.freeze_keys()
    bn.train()
    bn(points[:50])  # training only ever sees the first cluster
    used = bn.key_usage > 0
    bn.eval()
    test = torch.randn(200, 12) * 3
    _, unmasked = bn(test, return_indices=True)
    bn.mask_unused_keys = True
    _, masked = bn(test, return_indices=True)
    assert used[torch.arange(3)[None, :], masked[..., 0]].all()
    assert not used[torch.arange(3)[None, :], unmasked[..., 0]].all()
    z = bn.project(test)
    d = ((z[:, :, None] - bn.keys[None]) ** 2).sum(-1).masked_fill(~used[None], float("inf"))
    assert torch.equal(masked[..., 0], d.argmin(-1))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: KeyValueBottleneck(12, 6, 16, 3, 4, topk=17), "topk must be <= num_pairs"),
        (lambda: KeyValueBottleneck(12, 0, 16, 3, 4), "codebooks must be a positive integer"),
        (lambda: KeyValueBottleneck(12, 4, 16, 5, 4, projection="chunk"), "dim_keys"),
        (lambda: KeyValueBottleneck(12, 4, 16, 3, 4, projection="pca"), "projection"),
        (lambda: KVBModel(None, KeyValueBottleneck(12, 4, 16, 3, 5), VotingDecoder(10)),
         r"dim_values must equal num_classes \(10\), got dim_values=5"),
    ],
)
def test_bad_configuration_is_refused_with_the_argument_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.randn(4, 11), r"shape \(batch, 12\) or \(batch, tokens, 12\), got \(4, 11\)"),
        (torch.randn(4), r"got \(4,\)"),
        (torch.full((4, 12), float("nan")), "NaN or inf"),
        (torch.full((4, 12), float("inf")), "NaN or inf"),
        (torch.ones(4, 12, dtype=torch.long), "floating-point"),
    ],
)
def test_bad_embeddings_are_refused(x, match):
    bn = fitted()
    with pytest.raises(ValueError, match=match):
        bn(x)


def test_forward_before_kmeans_init_raises():
    bn = KeyValueBottleneck(12, 4, 16, 3, 4, key_init="kmeans")
    with pytest.raises(RuntimeError, match="keys are not initialised"):
        bn(torch.randn(2, 12))
    assert KeyValueBottleneck(12, 4, 16, 3, 4, key_init="random")(torch.randn(2, 12)).shape == (
        2, 4, 1, 4)


def test_sparse_gradient_equals_the_dense_one_and_sgd_takes_it():
    dense, sparse = fitted(values_init="randn"), fitted(values_init="randn", sparse_grad=True)
    sparse.load_state_dict(dense.state_dict())
    x = torch.randn(40, 12)
    for bn in (dense, sparse):
        bn(x).pow(2).sum().backward()
    assert sparse.values.grad.is_sparse
    torch.testing.assert_close(sparse.values.grad.to_dense(), dense.values.grad)
    before = sparse.values.detach().clone()
    torch.optim.SGD(sparse.parameters(), lr=0.1).step()
    torch.testing.assert_close(sparse.values.detach(), before - 0.1 * dense.values.grad)


def test_every_fetch_path_counts_key_usage_alike():
    # sparse with autograd (counted by the gather kernel), sparse without
    # autograd, and the dense path
    indices = torch.randint(0, 16, (50, 4, 2), generator=torch.Generator().manual_seed(0))
    counts = []
    for sparse_grad, grad in ((True, True), (True, False), (False, True)):
        bn = KeyValueBottleneck(8, 4, 16, 2, 3, key_init="random", sparse_grad=sparse_grad)
        bn.freeze_keys()
        with torch.set_grad_enabled(grad):
            out = bn.fetch(indices)
        assert out.requires_grad == grad
        counts.append(bn.key_usage.clone())
        bn.eval()
        bn.fetch(indices)  # not counted outside training
        assert torch.equal(bn.key_usage, counts[-1])
    reference = torch.zeros(4, 16, dtype=torch.long)
    for c in range(4):
        reference[c] = torch.bincount(indices[:, c].reshape(-1), minlength=16)
    for usage in counts:
        assert torch.equal(usage, reference)


@pytest.mark.parametrize("bad, message", [
    (torch.full((2, 4, 1), 16), r"indices must lie in \[0, num_pairs=16\), got values from 16"),
    (torch.full((2, 4, 1), -1), r"indices must lie in \[0, num_pairs=16\), got values from -1"),
    (torch.zeros(2, 4, 1), "indices must be an integer tensor"),
    (torch.zeros(2, 3, 1, dtype=torch.long), r"indices must have shape \(batch, 4, topk\)"),
])
def test_fetching_bad_codes_is_refused_before_any_value_is_read(bad, message):
    bn = KeyValueBottleneck(8, 4, 16, 2, 3, key_init="random", sparse_grad=True)
    bn.freeze_keys()  # in training mode, so a fetch would count key usage
    with pytest.raises(ValueError, match=message):
        bn.fetch(bad)
    assert int(bn.key_usage.sum()) == 0  # refused before anything was recorded
    bn.fetch(torch.full((2, 4, 1), 15))
    assert int(bn.key_usage.sum()) == 8


def test_an_empty_batch_looks_up_to_empty_codes():
    bn = KeyValueBottleneck(8, 4, 16, 2, 4)
    bn.keys_initialized.fill_(True)
    lookup = bn.lookup(torch.empty(0, 8))
    assert lookup.indices.shape == (0, 4, 1) and lookup.indices.dtype == torch.long
