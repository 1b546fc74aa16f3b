"""Sparse value gradients (kvb_avalanche/sparse.py): the compiled kernels against PyTorch."""

import pytest
import torch

import kvb_avalanche.sparse as sparse
from kvb_avalanche import KeyValueBottleneck, SparseSGD, VotingDecoder

SHAPE = torch.Size([6, 50, 3])  # (codebooks, pairs, dim_values)


def fetched(batch=40, topk=2, dtype=torch.int64, seed=0):
    g = torch.Generator().manual_seed(seed)
    # few pairs per codebook, so the batch fetches many rows twice or more
    indices = torch.randint(0, SHAPE[1], (batch, SHAPE[0], topk), generator=g).to(dtype)
    grad = torch.randn(batch, SHAPE[0], topk, SHAPE[2], generator=g)
    return indices, grad


def dense_reference(indices, grad):
    out = torch.zeros(SHAPE)
    codebook = torch.arange(SHAPE[0])[None, :, None].expand_as(indices)
    out.index_put_((codebook, indices.long()), grad, accumulate=True)
    return out


@pytest.mark.parametrize("dtype", [torch.int16, torch.int64])
@pytest.mark.parametrize("topk", [1, 2])
def test_coalesced_gradient_sums_duplicates_and_is_sorted_like_torchs(dtype, topk):
    indices, grad = fetched(topk=topk, dtype=dtype)
    ours = sparse.coalesced_fetch_grad(indices, grad, SHAPE)
    assert ours.is_coalesced() and ours.shape == SHAPE
    reference = torch.sparse_coo_tensor(
        torch.stack([torch.arange(SHAPE[0])[None, :, None].expand_as(indices).reshape(-1),
                     indices.long().reshape(-1)]),
        grad.reshape(-1, SHAPE[2]), SHAPE, check_invariants=True).coalesce()
    assert ours._nnz() < indices.numel()  # duplicates were merged
    assert torch.equal(ours._indices(), reference._indices())  # same rows, same order
    torch.testing.assert_close(ours._values(), reference._values())
    torch.testing.assert_close(ours.to_dense(), dense_reference(indices, grad))


def test_an_expanded_gradient_is_read_through_its_strides():
    indices, _ = fetched()
    per_sample = torch.randn(indices.shape[0], 1, 1, SHAPE[2])
    expanded = per_sample.expand(-1, SHAPE[0], indices.shape[2], -1)  # the voting decoder's
    assert expanded.stride()[1:3] == (0, 0)
    ours = sparse.coalesced_fetch_grad(indices, expanded, SHAPE)
    torch.testing.assert_close(ours.to_dense(), dense_reference(indices, expanded.contiguous()))


def test_without_numba_the_torch_fallback_gives_the_same_gradient_and_step(monkeypatch):
    indices, grad = fetched()
    compiled = sparse.coalesced_fetch_grad(indices, grad, SHAPE)
    start = torch.randn(SHAPE)
    p_compiled = torch.nn.Parameter(start.clone())
    p_compiled.grad = compiled
    SparseSGD([p_compiled], lr=0.5).step()
    monkeypatch.setattr(sparse, "numba", None)
    fallback = sparse.coalesced_fetch_grad(indices, grad, SHAPE)
    assert torch.equal(fallback._indices(), compiled._indices())
    torch.testing.assert_close(fallback._values(), compiled._values())
    p_fallback = torch.nn.Parameter(start.clone())
    p_fallback.grad = fallback
    SparseSGD([p_fallback], lr=0.5).step()
    torch.testing.assert_close(p_fallback.detach(), p_compiled.detach())


@pytest.mark.parametrize("grad_kind", ["sparse", "uncoalesced", "dense"])
def test_sparse_sgd_steps_like_torch_sgd(grad_kind):
    indices, grad = fetched()
    g = {"sparse": sparse.coalesced_fetch_grad(indices, grad, SHAPE),
         "uncoalesced": torch.sparse_coo_tensor(
             torch.stack([torch.arange(SHAPE[0])[None, :, None].expand_as(indices).reshape(-1),
                          indices.reshape(-1)]), grad.reshape(-1, SHAPE[2]), SHAPE,
             check_invariants=True),
         "dense": dense_reference(indices, grad)}[grad_kind]
    start = torch.randn(SHAPE)
    params = []
    for opt in (SparseSGD, torch.optim.SGD):
        p = torch.nn.Parameter(start.clone())
        optimizer = opt([p], lr=0.3)
        for _ in range(2):
            p.grad = g.clone()
            optimizer.step()
        params.append(p.detach())
    assert not torch.equal(params[0], start)
    torch.testing.assert_close(params[0], params[1])  # up to summation order


def test_sparse_sgd_refuses_a_non_positive_lr():
    with pytest.raises(ValueError, match="lr must be > 0"):
        SparseSGD([torch.nn.Parameter(torch.zeros(2))], lr=0.0)


def test_a_training_step_through_the_bottleneck_matches_the_dense_one():
    torch.manual_seed(0)
    x, y = torch.randn(64, 12), torch.randint(0, 3, (64,))
    values = []
    for sparse_grad, opt in ((False, torch.optim.SGD), (True, SparseSGD)):
        bn = KeyValueBottleneck(12, 4, 16, 3, 3, key_init="random", values_init="randn",
                                sparse_grad=sparse_grad)
        optimizer = opt([bn.values], lr=0.5)
        for _ in range(3):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(VotingDecoder(3)(bn(x)), y)
            loss.backward()
            optimizer.step()
        values.append(bn.values.detach())
    torch.testing.assert_close(values[0], values[1])
