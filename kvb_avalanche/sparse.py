"""Fetching value rows and their sparse gradient: gather, coalesce, and the SGD step.

A paper-scale batch fetches 256 x 256 value rows out of 256 x 4096. PyTorch's generic
sparse kernels handle that in per-row loops (``coalesce`` and ``dense.add_(sparse)`` about
3 ms each a step on a 2-core CPU, ``results/perf/breakdown.csv``); the kernels here do the
same work in one pass each, compiled with numba where it is installed (PyTorch
otherwise, same results up to float rounding).

The compiled kernels split the work by codebook: no two threads ever touch the same row,
and every result is the same whatever the number of threads (numba's, see
``numba.set_num_threads``).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor

try:
    import numba
    from numba import prange
except ImportError:  # pragma: no cover - numba is a dependency; clean fallback
    numba, prange = None, range

_RADIX_BITS = 6  # digits of the per-codebook radix sort (64 buckets stay in L1)


def _span(worker, workers, codebooks):
    """The codebooks [start, stop) that one of ``workers`` threads handles."""
    return worker * codebooks // workers, (worker + 1) * codebooks // workers


def _gather_kernel(values, indices, usage, record, out, workers):
    """out[b, c, k] = values[c, indices[b, c, k]], and usage[c, p] += 1 per fetch if record.

    values: (codebooks, pairs, dim); indices: (batch, codebooks, topk) in [0, pairs);
    out: (batch, codebooks, topk, dim).
    """
    batch, codebooks, topk = indices.shape
    dim = values.shape[2]
    for w in prange(workers):
        start, stop = _span(w, workers, codebooks)
        for c in range(start, stop):  # one codebook's values and usage stay in cache
            for b in range(batch):
                for k in range(topk):
                    p = indices[b, c, k]
                    if record:
                        usage[c, p] += 1
                    for d in range(dim):
                        out[b, c, k, d] = values[c, p, d]


def _bits(n):
    """Bits needed to write the numbers 0 .. n - 1."""
    bits = 1
    while (1 << bits) < n:
        bits += 1
    return bits


def _sort_kernel(indices, num_pairs, workers):
    """1st pass of coalescing: each codebook's fetches sorted by pair, distinct pairs counted.

    indices: (batch, codebooks, topk) ints in [0, num_pairs). Returns (ordered
    (codebooks, batch * topk) = pair << position bits | position in the batch, radix-sorted
    (stable, so duplicates keep batch order); first_row (codebooks + 1,): where each
    codebook's rows start among the distinct (codebook, pair) rows, the total last).
    """
    batch, codebooks, topk = indices.shape
    per_codebook = batch * topk
    pos_bits, pair_bits = _bits(per_codebook), _bits(num_pairs)
    buckets = 1 << _RADIX_BITS
    ordered = np.empty((codebooks, per_codebook), np.int64)
    first_row = np.zeros(codebooks + 1, np.int64)
    for w in prange(workers):
        keys = np.empty(per_codebook, np.int64)
        spare = np.empty(per_codebook, np.int64)
        count = np.empty(buckets + 1, np.int64)
        start, stop = _span(w, workers, codebooks)
        for c in range(start, stop):
            for b in range(batch):
                for k in range(topk):
                    keys[b * topk + k] = (np.int64(indices[b, c, k]) << pos_bits) | (b * topk + k)
            shift = pos_bits
            while shift < pos_bits + pair_bits:  # LSD radix sort on the pair bits
                count[:] = 0
                for i in range(per_codebook):
                    count[((keys[i] >> shift) & (buckets - 1)) + 1] += 1
                for q in range(buckets):
                    count[q + 1] += count[q]
                for i in range(per_codebook):
                    digit = (keys[i] >> shift) & (buckets - 1)
                    spare[count[digit]] = keys[i]
                    count[digit] += 1
                keys, spare = spare, keys
                shift += _RADIX_BITS
            distinct = 0
            previous = -1
            for i in range(per_codebook):
                ordered[c, i] = keys[i]
                if keys[i] >> pos_bits != previous:
                    distinct += 1
                    previous = keys[i] >> pos_bits
            first_row[c + 1] = distinct
    for c in range(codebooks):
        first_row[c + 1] += first_row[c]
    return ordered, first_row


def _sum_runs_kernel(ordered, first_row, grad, where, summed, workers):
    """2nd pass of coalescing: sum the grad rows of each run of equal (codebook, pair).

    grad: (batch, codebooks, topk, dim_values), any strides (the voting decoder's is an
    expanded view); fills where (2, m) = (codebook, pair), sorted by both, and summed
    (m, dim_values).
    """
    batch, codebooks, topk, dim = grad.shape
    pos_bits = _bits(batch * topk)
    pos_mask = (1 << pos_bits) - 1
    for w in prange(workers):
        start, stop = _span(w, workers, codebooks)
        for c in range(start, stop):
            row = first_row[c] - 1
            previous = -1
            for i in range(batch * topk):
                pair = ordered[c, i] >> pos_bits
                pos = ordered[c, i] & pos_mask
                b, k = pos // topk, pos % topk
                if pair != previous:
                    row += 1
                    previous = pair
                    where[0, row] = c
                    where[1, row] = pair
                    for d in range(dim):
                        summed[row, d] = grad[b, c, k, d]
                else:
                    for d in range(dim):
                        summed[row, d] += grad[b, c, k, d]


def _add_rows_kernel(table, where, rows, alpha, workers):
    """table[c, p] += alpha * rows[i] for (c, p) = where[:, i], ``where`` sorted by codebook."""
    codebooks, dim = table.shape[0], table.shape[2]
    codebook = where[0]
    for w in prange(workers):
        start, stop = _span(w, workers, codebooks)
        for i in range(np.searchsorted(codebook, start), np.searchsorted(codebook, stop)):
            c = where[0, i]
            p = where[1, i]
            for d in range(dim):
                table[c, p, d] += alpha * rows[i, d]


def _strictly_sorted_kernel(where):
    """Whether the (2, m) (codebook, pair) indices are sorted by both, with no repeats."""
    for i in range(1, where.shape[1]):
        if where[0, i] < where[0, i - 1] or (
                where[0, i] == where[0, i - 1] and where[1, i] <= where[1, i - 1]):
            return False
    return True


def _trained_abs_kernel(values, usage, sums, maxes, workers):
    """Per codebook c: sums[c] = sum and maxes[c] = max of |values[c, p]| over the pairs p
    with usage[c, p] > 0, skipping the untrained ones (most, early in a stream)."""
    codebooks, pairs, dim = values.shape
    for w in prange(workers):
        start, stop = _span(w, workers, codebooks)
        for c in range(start, stop):
            total, largest = 0.0, 0.0
            for p in range(pairs):
                if usage[c, p] > 0:
                    for d in range(dim):
                        a = abs(values[c, p, d])
                        total += a
                        largest = max(largest, a)
            sums[c], maxes[c] = total, largest


if numba is not None:
    _trained_abs_kernel = numba.njit(cache=True, parallel=True)(_trained_abs_kernel)
    _strictly_sorted_kernel = numba.njit(cache=True)(_strictly_sorted_kernel)
    _span = numba.njit(cache=True, inline="always")(_span)
    _gather_kernel = numba.njit(cache=True, parallel=True)(_gather_kernel)
    _bits = numba.njit(cache=True, inline="always")(_bits)
    _sort_kernel = numba.njit(cache=True, parallel=True)(_sort_kernel)
    _sum_runs_kernel = numba.njit(cache=True, parallel=True)(_sum_runs_kernel)
    _add_rows_kernel = numba.njit(cache=True, parallel=True)(_add_rows_kernel)


def _workers(codebooks: int) -> int:
    return max(1, min(codebooks, numba.get_num_threads()))


def _compiled(*tensors: Tensor) -> bool:
    """Whether the numba kernels take these tensors (CPU, float32/64 values)."""
    return numba is not None and all(t.device.type == "cpu" for t in tensors) and all(
        t.dtype in (torch.float32, torch.float64) for t in tensors if t.is_floating_point())


def count_fetches(usage: Tensor, indices: Tensor) -> None:
    """usage[c, indices[b, c, k]] += 1 for every (b, c, k); usage: (codebooks, pairs) long."""
    flat = indices.long().transpose(0, 1).reshape(usage.shape[0], -1)  # (codebooks, n)
    usage.scatter_add_(1, flat, torch.ones_like(flat))


def trained_value_scale(values: Tensor, usage: Tensor) -> tuple[float, float]:
    """Mean and max of |value| over the pairs fetched in training (``usage > 0``), (0, 0)
    if none. values: (codebooks, pairs, dim); usage: (codebooks, pairs).

    One pass that skips untrained pairs, without the (trained pairs, dim) copy that
    ``values[usage > 0]`` makes: 420 MB at split CIFAR-100's 256 x 4096 x 100, after every
    epoch. Sums are per codebook in float64, added in order: the same whatever the threads.
    """
    trained = usage > 0
    n = int(trained.sum()) * values.shape[2]
    if not n:
        return 0.0, 0.0
    if not _compiled(values, usage):
        rows = values.detach()[trained].abs()  # (trained pairs, dim)
        return float(rows.double().sum() / n), float(rows.max())
    codebooks = values.shape[0]
    sums, maxes = np.zeros(codebooks), np.zeros(codebooks)
    _trained_abs_kernel(values.detach().numpy(), usage.numpy(), sums, maxes,
                        _workers(codebooks))
    return float(sums.sum() / n), float(maxes.max())


def fetch_rows(values: Tensor, indices: Tensor, usage: Tensor | None = None) -> Tensor:
    """``values[c, indices[b, c, k]]`` for every (b, c, k), no autograd; counts each fetch in
    ``usage`` (codebooks, pairs) where given.

    values: (codebooks, pairs, dim); indices: (batch, codebooks, topk) ints, which the caller
    has checked lie in [0, pairs) (:meth:`KeyValueBottleneck.check_indices`: the compiled
    kernel does not check bounds). Returns (batch, codebooks, topk, dim).
    """
    codebooks, pairs, dim = values.shape
    if indices.dim() != 3 or indices.shape[1] != codebooks:
        raise ValueError(f"indices must have shape (batch, {codebooks}, topk), "
                         f"got {tuple(indices.shape)}")
    if not _compiled(values, indices):
        with torch.no_grad():
            if usage is not None:
                count_fetches(usage, indices)
            flat = indices.long() + pairs * torch.arange(codebooks, device=indices.device)[
                None, :, None]
            rows = values.reshape(-1, dim).index_select(0, flat.reshape(-1))
            return rows.view(*flat.shape, dim)
    out = values.new_empty((*indices.shape, dim))  # the kernels fill PyTorch's tensors
    record = usage is not None
    usage = usage if record else torch.zeros(1, 1, dtype=torch.long)
    _gather_kernel(values.detach().numpy(), indices.numpy(), usage.numpy(), record,
                   out.numpy(), _workers(codebooks))
    return out


def as_coalesced(grad: Tensor) -> Tensor:
    """A sparse (codebooks, pairs, dim) gradient flagged as coalesced, without re-sorting it
    when it already is.

    Autograd hands the coalesced gradient of :func:`coalesced_fetch_grad` over without a
    copy but loses its coalesced flag on the way (it rebuilds the tensor from its indices
    and values); checking the order is one pass, ``coalesce()`` a sort (about 3 ms a step
    at the paper scale, ``results/perf/breakdown.csv``).
    """
    if grad.is_coalesced():
        return grad
    if (_compiled(grad) and grad.sparse_dim() == 2
            and _strictly_sorted_kernel(grad._indices().numpy())):
        return grad._coalesced_(True)
    return grad.coalesce()


def coalesced_fetch_grad(indices: Tensor, grad: Tensor, shape: torch.Size) -> Tensor:
    """The coalesced sparse gradient of ``values[codebook, indices]`` given the fetched rows' grad.

    indices: (batch, codebooks, topk) ints; grad: (batch, codebooks, topk, dim_values);
    shape: (codebooks, num_pairs, dim_values). Returns a sparse COO tensor of ``shape``.
    """
    codebooks, num_pairs, dim = shape
    if not (_compiled(indices, grad) and grad.dtype in (torch.float32, torch.float64)):
        codebook = torch.arange(codebooks, device=indices.device)[None, :, None]
        where = torch.stack([codebook.expand_as(indices).reshape(-1), indices.long().reshape(-1)])
        return torch.sparse_coo_tensor(where, grad.reshape(-1, dim), shape,
                                       check_invariants=False).coalesce()
    workers = _workers(codebooks)
    ordered, first_row = _sort_kernel(indices.numpy(), num_pairs, workers)
    rows = int(first_row[-1])
    where = torch.empty(2, rows, dtype=torch.long)
    summed = grad.new_empty(rows, dim)
    _sum_runs_kernel(ordered, first_row, grad.detach().numpy(), where.numpy(), summed.numpy(),
                     workers)
    return torch.sparse_coo_tensor(where, summed, shape, is_coalesced=True,
                                   check_invariants=False)


class SparseSGD(torch.optim.Optimizer):
    """Plain SGD (``p -= lr * grad``; no momentum, no weight decay) that applies a coalesced
    sparse gradient of a (codebooks, pairs, dim) table in one pass, where
    ``torch.optim.SGD`` loops over its rows. Any other gradient is applied as SGD does.

    A sparse gradient is first checked to be sorted with no repeats (or coalesced); one
    built with ``is_coalesced=True`` and ``check_invariants=False`` is trusted to be so."""

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        super().__init__(params, dict(lr=lr))

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch.optim's, without its profiling and compiler wrappers (a step's worth of
        time on small steps)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                fast = (g.is_sparse and _compiled(p) and p.dim() == 3 and g.sparse_dim() == 2
                        and g.dtype == p.dtype)
                if not fast:
                    p.add_(g, alpha=-group["lr"])
                    continue
                g = as_coalesced(g)
                _add_rows_kernel(p.detach().numpy(), g._indices().numpy(),
                                 g._values().detach().numpy(), -group["lr"], _workers(p.shape[0]))
        return loss
