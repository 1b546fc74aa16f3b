"""Sparse value gradients (kvb_avalanche/sparse.py): the compiled kernels against PyTorch."""

import pytest
import torch

import kvb_avalanche.sparse as sparse
from kvb_avalanche import KeyValueBottleneck, SparseSGD, VotingDecoder

SHAPE = torch.Size([6, 50, 3])  # (codebooks, pairs, dim_values)


def fetched(batch=40, topk=2, dtype=torch.int64, seed=0, pairs=SHAPE[1], values=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # few pairs per codebook, so the batch fetches many rows twice or more
    indices = torch.randint(0, pairs, (batch, SHAPE[0], topk), generator=g).to(dtype)
    grad = torch.randn(batch, SHAPE[0], topk, SHAPE[2], generator=g, dtype=values)
    return indices, grad


def dense_reference(indices, grad, pairs=SHAPE[1]):
    out = torch.zeros(SHAPE[0], pairs, SHAPE[2], dtype=grad.dtype)
    codebook = torch.arange(SHAPE[0])[None, :, None].expand_as(indices)
    out.index_put_((codebook, indices.long()), grad, accumulate=True)
    return out


def torch_coalesced(indices, grad, shape):
    codebook = torch.arange(shape[0])[None, :, None].expand_as(indices)
    where = torch.stack([codebook.reshape(-1), indices.long().reshape(-1)])
    return torch.sparse_coo_tensor(where, grad.reshape(-1, shape[2]), shape,
                                   check_invariants=True).coalesce()


SIZES = [(dtype, pairs, batch) for dtype in (torch.int16, torch.int32, torch.int64)
         for pairs, batch in ((50, 40), (1, 3), (4096, 2000), (70_000, 3000))
         if not (dtype == torch.int16 and pairs > 2**15)]  # int16 codes hold <= 32768 pairs


@pytest.mark.parametrize("dtype, pairs, batch", SIZES)
@pytest.mark.parametrize("topk", [1, 2])
@pytest.mark.parametrize("values", [torch.float32, torch.float64])
def test_coalesced_gradient_sums_duplicates_and_is_sorted_like_torchs(
        dtype, topk, pairs, batch, values):
    # 4096 and 70,000 pairs take two and three passes of the radix sort
    indices, grad = fetched(batch=batch, topk=topk, dtype=dtype, pairs=pairs, values=values)
    shape = torch.Size([SHAPE[0], pairs, SHAPE[2]])
    ours = sparse.coalesced_fetch_grad(indices, grad, shape)
    assert ours.is_coalesced() and ours.shape == shape and ours.dtype == values
    reference = torch_coalesced(indices, grad, shape)
    assert ours._nnz() < indices.numel()  # duplicates were merged
    assert torch.equal(ours._indices(), reference._indices())  # same rows, same order
    torch.testing.assert_close(ours._values(), reference._values())
    torch.testing.assert_close(ours.to_dense(), dense_reference(indices, grad, pairs))


def test_gradients_of_two_backward_passes_add_up_to_a_coalesced_sum():
    values = torch.nn.Parameter(torch.zeros(SHAPE[0], 4096, SHAPE[2]))
    bn = KeyValueBottleneck(4, SHAPE[0], 4096, 2, SHAPE[2], key_init="random", sparse_grad=True)
    first, second = fetched(batch=300, pairs=4096, seed=1), fetched(batch=300, pairs=4096, seed=2)
    bn.values = values
    for indices, grad in (first, second):
        (bn.fetch(indices) * grad).sum().backward()
    g = values.grad.coalesce()
    indices = torch.cat([first[0], second[0]])
    reference = torch_coalesced(indices, torch.cat([first[1], second[1]]), values.shape)
    assert torch.equal(g._indices(), reference._indices())
    torch.testing.assert_close(g._values(), reference._values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gradients_take_the_torch_path(dtype):
    indices, grad = fetched()
    ours = sparse.coalesced_fetch_grad(indices, grad.to(dtype), SHAPE)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours.to_dense().float(), dense_reference(indices, grad),
                               atol=0.05, rtol=0.02)


def test_an_expanded_gradient_is_read_through_its_strides():
    indices, _ = fetched()
    per_sample = torch.randn(indices.shape[0], 1, 1, SHAPE[2])
    expanded = per_sample.expand(-1, SHAPE[0], indices.shape[2], -1)  # the voting decoder's
    assert expanded.stride()[1:3] == (0, 0)
    ours = sparse.coalesced_fetch_grad(indices, expanded, SHAPE)
    torch.testing.assert_close(ours.to_dense(), dense_reference(indices, expanded.contiguous()))


@pytest.mark.skipif(sparse.numba is None, reason="compares the numba kernels with the fallback")
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


@pytest.mark.skipif(sparse.numba is None or sparse.numba.config.NUMBA_NUM_THREADS < 2,
                    reason="compares numba's kernels on one thread and on several")
def test_the_compiled_kernels_give_the_same_bits_whatever_the_thread_count():
    # the work is split by codebook; a split that summed across threads would differ in
    # bits. 7 codebooks do not split evenly; codebook 3 fetches nothing (an empty span).
    g = torch.Generator().manual_seed(3)
    indices = torch.randint(0, 4096, (500, 7, 2), generator=g)
    indices[:, 3] = indices[:, 2]
    grad = torch.randn(500, 7, 2, SHAPE[2], generator=g)
    grad[:, 3] = 0
    values = torch.randn(7, 4096, SHAPE[2], generator=g)
    before = sparse.numba.get_num_threads()
    results = []
    try:
        for threads in (1, sparse.numba.config.NUMBA_NUM_THREADS):
            sparse.numba.set_num_threads(threads)
            usage = torch.zeros(7, 4096, dtype=torch.long)
            out = sparse.fetch_rows(values, indices, usage)
            grad_values = sparse.coalesced_fetch_grad(indices, grad, values.shape)
            keep = grad_values._indices()[0] != 3  # no gradient row in codebook 3
            grad_values = torch.sparse_coo_tensor(
                grad_values._indices()[:, keep], grad_values._values()[keep], values.shape,
                is_coalesced=True, check_invariants=True)
            p = torch.nn.Parameter(values.clone())
            p.grad = grad_values
            SparseSGD([p], lr=0.7).step()
            results.append((out, usage, grad_values._indices(), grad_values._values(),
                            p.detach()))
    finally:
        sparse.numba.set_num_threads(before)
    reference = values.clone()
    reference.index_put_(tuple(results[0][2]), results[0][3], accumulate=True)
    assert torch.equal(results[0][4][3], values[3])  # the empty codebook is untouched
    torch.testing.assert_close(results[0][4], values + (reference - values) * -0.7)
    for a, b in zip(results[0], results[1], strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(sparse.numba is None, reason="compares the numba kernels with the fallback")
def test_fetch_rows_and_its_usage_count_match_the_torch_fallback(monkeypatch):
    indices, _ = fetched(batch=300, topk=2, dtype=torch.int16)
    values = torch.randn(SHAPE)
    results = []
    for compiled in (True, False):
        if not compiled:
            monkeypatch.setattr(sparse, "numba", None)
        usage = torch.zeros(SHAPE[:2], dtype=torch.long)
        results.append((sparse.fetch_rows(values, indices, usage), usage))
    (out, usage), (out_fallback, usage_fallback) = results
    codebook = torch.arange(SHAPE[0])[None, :, None]
    assert torch.equal(out, values[codebook, indices.long()])  # a gather is exact
    assert torch.equal(out, out_fallback) and torch.equal(usage, usage_fallback)
    assert usage.sum() == indices.numel() and usage.max() > 1  # repeats are counted


def test_autograds_gradient_is_flagged_coalesced_again_without_resorting(monkeypatch):
    # autograd keeps the backward's tensors but drops their coalesced flag on the way
    bn = KeyValueBottleneck(4, SHAPE[0], 4096, 2, SHAPE[2], key_init="random", sparse_grad=True)
    indices, grad = fetched(batch=300, pairs=4096)
    (bn.fetch(indices) * grad).sum().backward()
    g = bn.values.grad
    # if a PyTorch release keeps the flag, as_coalesced has nothing left to do
    assert not g.is_coalesced(), "autograd kept the coalesced flag"
    reference = torch_coalesced(indices, grad, bn.values.shape)

    def no_sort(self):
        raise AssertionError("coalesce() called on an already sorted gradient")

    if sparse.numba is not None:
        monkeypatch.setattr(torch.Tensor, "coalesce", no_sort)
    flagged = sparse.as_coalesced(g)
    monkeypatch.undo()
    assert flagged.is_coalesced() and (flagged is g or sparse.numba is None)
    assert torch.equal(flagged._indices(), reference._indices())
    torch.testing.assert_close(flagged._values(), reference._values())
    # unsorted codebooks, unsorted pairs within a codebook, a repeat in sorted order: each is
    # coalesced for real, not merely flagged
    for where, expected, summed in (([[1, 0, 1], [5, 2, 5]], [[0, 1], [2, 5]], [1.0, 2.0]),
                                    ([[0, 0, 1], [5, 2, 0]], [[0, 0, 1], [2, 5, 0]], [1.0] * 3),
                                    ([[0, 0, 1], [2, 2, 0]], [[0, 1], [2, 0]], [2.0, 1.0])):
        raw = torch.sparse_coo_tensor(torch.tensor(where), torch.ones(3, SHAPE[2]), SHAPE)
        fixed = sparse.as_coalesced(raw)
        assert fixed.is_coalesced() and fixed._indices().tolist() == expected
        assert fixed._values()[:, 0].tolist() == summed


def test_fetch_rows_refuses_indices_of_the_wrong_shape_before_touching_memory():
    values = torch.randn(SHAPE)
    for bad in (torch.zeros(4, SHAPE[0] + 1, 1, dtype=torch.long),
                torch.zeros(4, SHAPE[0], dtype=torch.long)):
        with pytest.raises(ValueError, match=r"indices must have shape \(batch, 6, topk\)"):
            sparse.fetch_rows(values, bad)


def test_trained_value_scale_is_the_mean_and_max_over_fetched_pairs_only():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(6, 50, 7, generator=g)
    usage = (torch.rand(6, 50, generator=g) > 0.7).long() * 3
    values[usage == 0] = 100.0  # untrained pairs must not count
    rows = values[usage > 0].abs()  # (trained pairs, dim)
    mean, largest = sparse.trained_value_scale(values, usage)
    assert mean == pytest.approx(float(rows.double().mean()), rel=1e-12)
    assert largest == float(rows.max()) < 100.0
    assert sparse.trained_value_scale(values, torch.zeros_like(usage)) == (0.0, 0.0)
