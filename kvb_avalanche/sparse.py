"""Sparse value gradients: coalescing the fetched rows, and the SGD step that applies them.

A paper-scale batch fetches 256 x 256 value rows out of 256 x 4096. PyTorch's generic
sparse kernels handle that in per-row loops (``coalesce`` 3.3 ms, ``dense.add_(sparse)``
3.4 ms a step on a 2-core CPU, ``results/perf/breakdown.csv``); the kernels here do the
same work in one pass each (compiled with numba where it is installed, PyTorch otherwise,
same results up to float rounding).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; clean fallback
    numba = None

_RADIX_BITS = 6  # digits of the per-codebook radix sort (64 buckets stay in L1)


def _coalesce_kernel(indices, grad, num_pairs):
    """Sum the rows of ``grad`` that fetched the same (codebook, pair), sorted by both.

    indices: (batch, codebooks, topk) ints in [0, num_pairs); grad: (batch, codebooks,
    topk, dim_values), any strides (the voting decoder's is an expanded view). Returns
    (where (2, m) = (codebook, pair), summed (m, dim_values)). Within each codebook the
    batch's indices are radix-sorted (stable, so duplicates are summed in batch order).
    """
    batch, codebooks, topk, dim = grad.shape
    per_codebook = batch * topk
    pos_bits = 1
    while (1 << pos_bits) < per_codebook:
        pos_bits += 1
    pos_mask = (1 << pos_bits) - 1
    pair_bits = 1
    while (1 << pair_bits) < num_pairs:
        pair_bits += 1
    buckets = 1 << _RADIX_BITS
    where = np.empty((2, batch * codebooks * topk), np.int64)
    summed = np.empty((batch * codebooks * topk, dim), grad.dtype)
    keys = np.empty(per_codebook, np.int64)  # pair << pos_bits | position in the batch
    spare = np.empty(per_codebook, np.int64)
    count = np.empty(buckets + 1, np.int64)
    m = 0
    for c in range(codebooks):
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
        previous = -1
        for i in range(per_codebook):
            pair = keys[i] >> pos_bits
            pos = keys[i] & pos_mask
            b, k = pos // topk, pos % topk
            if pair != previous:
                where[0, m], where[1, m] = c, pair
                for d in range(dim):
                    summed[m, d] = grad[b, c, k, d]
                m += 1
                previous = pair
            else:
                for d in range(dim):
                    summed[m - 1, d] += grad[b, c, k, d]
    # (views: autograd copies them into a gradient of its own, which measured faster in
    # the clipping and SGD step that follow than handing it these buffers as they are)
    return where[:, :m], summed[:m]


def _add_rows_kernel(table, where, rows, alpha):
    """table[c, p] += alpha * rows[i] for (c, p) = where[:, i]."""
    dim = table.shape[2]
    for i in range(where.shape[1]):
        c, p = where[0, i], where[1, i]
        for d in range(dim):
            table[c, p, d] += alpha * rows[i, d]


# Serial on purpose: numba's threads and PyTorch's OpenMP pool fight over the cores
# (a parallel version measured 2-3x slower per training step on 2 cores).
if numba is not None:
    _coalesce_kernel = numba.njit(cache=True)(_coalesce_kernel)
    _add_rows_kernel = numba.njit(cache=True)(_add_rows_kernel)


def coalesced_fetch_grad(indices: Tensor, grad: Tensor, shape: torch.Size) -> Tensor:
    """The coalesced sparse gradient of ``values[codebook, indices]`` given the fetched rows' grad.

    indices: (batch, codebooks, topk) ints; grad: (batch, codebooks, topk, dim_values);
    shape: (codebooks, num_pairs, dim_values). Returns a sparse COO tensor of ``shape``.
    """
    codebooks, num_pairs, dim = shape
    compiled = (numba is not None and indices.device.type == "cpu"
                and grad.dtype in (torch.float32, torch.float64))
    if not compiled:
        codebook = torch.arange(codebooks, device=indices.device)[None, :, None]
        where = torch.stack([codebook.expand_as(indices).reshape(-1), indices.long().reshape(-1)])
        return torch.sparse_coo_tensor(where, grad.reshape(-1, dim), shape,
                                       check_invariants=False).coalesce()
    where, summed = _coalesce_kernel(indices.numpy(), grad.detach().numpy(), num_pairs)
    return torch.sparse_coo_tensor(torch.from_numpy(where), torch.from_numpy(summed), shape,
                                   is_coalesced=True, check_invariants=False)


class SparseSGD(torch.optim.Optimizer):
    """Plain SGD (``p -= lr * grad``; no momentum, no weight decay) that applies a coalesced
    sparse gradient of a (codebooks, pairs, dim) table in one pass, where
    ``torch.optim.SGD`` loops over its rows. Any other gradient is applied as SGD does."""

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        super().__init__(params, dict(lr=lr))

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
                fast = (numba is not None and g.is_sparse and p.device.type == "cpu"
                        and p.dim() == 3 and g.sparse_dim() == 2
                        and p.dtype in (torch.float32, torch.float64) and g.dtype == p.dtype)
                if not fast:
                    p.add_(g, alpha=-group["lr"])
                    continue
                g = g if g.is_coalesced() else g.coalesce()
                _add_rows_kernel(p.detach().numpy(), g._indices().numpy(),
                                 g._values().detach().numpy(), -group["lr"])
        return loss
