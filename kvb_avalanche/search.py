"""The fused nearest-key search: squared distances and their argmin in one pass (numba, CPU).

A key has only ``dim_keys`` (14 in the paper) coordinates, so a distance costs 14
multiply-adds and, materialised, a 4-byte write: a distance block written out and read back
by an argmin is memory-bound. Here each distance lives in a register from its first
multiply-add to the comparison with the running minimum, and never reaches memory.

The kernel puts keys in the SIMD lanes: for one head, a tile of ``TILE`` consecutive keys
is swept with the head's coordinates as scalars (``dim_keys`` unrolled, so the tile loop is
the innermost and vectorises), and each lane keeps its own running minimum and index across
the tiles; the lanes are reduced at the end, smallest distance first and, on a tie, the
smallest index (the first nearest key, as ``torch.min`` returns on the CPU).

Distances are ``|k|^2 - 2 z.k`` summed in a fixed order with fused multiply-adds, then
``|z|^2`` is added: the same formula as the batched-matmul search
(:meth:`KeyValueBottleneck.nearest`), rounded differently, so the two agree up to keys whose
distances tie at the rounding level. Each (head, codebook) is computed by one thread in one
order: the result does not depend on the number of threads. Kernels are generated per
``dim_keys`` and compiled at first use.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; the matmul search remains
    numba = None

TILE = 256  # keys a lane sweeps before the next head; 14 x 256 floats stay in L1

_KERNELS: dict[int, object] = {}

_TEMPLATE = '''
def nearest_kernel(z, keys_t, key_sq, idx_out, dist_out, workers):
    n, codebooks, _ = z.shape
    pairs = keys_t.shape[2]
    full = pairs - pairs % TILE
    for w in prange(workers):
        best = np.empty(TILE, np.float32)
        where = np.empty(TILE, np.int32)
        start = w * codebooks // workers
        stop = (w + 1) * codebooks // workers
        for c in range(start, stop):
            kt = keys_t[c].ravel()  # (dim_keys * pairs,): coordinate j of key p at j * pairs + p
            ks = key_sq[c]
{offsets}
            for r in range(n):
{load}
                for l in range(TILE):
                    best[l] = np.inf
                    where[l] = 0
                for p0 in range(0, full, TILE):
                    for l in range(TILE):
                        lu = np.uint64(l)
                        p = np.uint64(p0) + lu
                        a = ks[p]
{fma}
                        old = best[lu]
                        take = a < old
                        best[lu] = a if take else old
                        where[lu] = np.int32(p) if take else where[lu]
                d = best[0]
                i = where[0]
                for l in range(1, TILE):
                    if best[l] < d or (best[l] == d and where[l] < i):
                        d = best[l]
                        i = where[l]
                for pi in range(full, pairs):  # the last, partial tile
                    p = np.uint64(pi)
                    a = ks[p]
{fma_tail}
                    if a < d:
                        d = a
                        i = np.int32(pi)
                sq = np.float32(0.0)
{square}
                idx_out[r, c] = i
                dist_out[r, c] = max(d + sq, np.float32(0.0))
'''


def _kernel(dim_keys: int):
    """The compiled kernel for heads of ``dim_keys`` coordinates (generated, then cached)."""
    if dim_keys not in _KERNELS:
        pad = " " * 16
        source = _TEMPLATE.format(
            offsets="\n".join(f"            q{j} = np.uint64({j}) * np.uint64(pairs)"
                              for j in range(dim_keys)),
            load="\n".join(f"{pad}z{j} = np.float32(-2.0) * z[r, c, {j}]"
                           for j in range(dim_keys)),
            fma="\n".join(f"{pad}        a += z{j} * kt[q{j} + p]" for j in range(dim_keys)),
            fma_tail="\n".join(f"{pad}    a += z{j} * kt[q{j} + p]" for j in range(dim_keys)),
            square="\n".join(f"{pad}sq += z[r, c, {j}] * z[r, c, {j}]" for j in range(dim_keys)),
        )
        namespace = {"np": np, "prange": numba.prange, "TILE": TILE}
        exec(compile(source, f"<kvb_avalanche.search dim_keys={dim_keys}>", "exec"), namespace)
        # contract: fused multiply-adds, nothing reassociated (each lane sums in order)
        _KERNELS[dim_keys] = numba.njit(parallel=True, boundscheck=False, error_model="numpy",
                                        fastmath={"contract"})(namespace["nearest_kernel"])
    return _KERNELS[dim_keys]


def fused_available(z: Tensor, keys: Tensor) -> bool:
    """Whether :func:`fused_nearest` takes these heads and keys (CPU float32, numba)."""
    return (numba is not None and z.device.type == "cpu" and keys.device.type == "cpu"
            and z.dtype == torch.float32 and keys.dtype == torch.float32)


def keys_layout(keys: Tensor, out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """The kernel's view of keys (codebooks, pairs, dim_keys): (codebooks, dim_keys, pairs)
    contiguous and the squared norms (codebooks, pairs), written into ``out`` where given
    (a key fit redoes them every step: no 58 MB allocation at the paper's scale)."""
    codebooks, pairs, dim_keys = keys.shape
    if out is None or out[0].shape != (codebooks, dim_keys, pairs):
        out = (torch.empty(codebooks, dim_keys, pairs), torch.empty(codebooks, pairs))
    out[0].copy_(keys.transpose(1, 2))
    out[1].copy_(torch.einsum("cpd,cpd->cp", keys, keys))
    return out


def fused_nearest(z: Tensor, keys_t: Tensor, key_sq: Tensor,
                  mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Nearest key per head: heads z (n, codebooks, dim_keys), keys laid out by
    :func:`keys_layout`; ``mask`` (codebooks, pairs) bool excludes keys where False (each
    codebook must keep one). Returns indices (n, codebooks) int64 and squared distances
    (n, codebooks), clamped at 0."""
    n, codebooks, dim_keys = z.shape
    if mask is not None:
        key_sq = key_sq.masked_fill(~mask, float("inf"))
    z_np = z.detach().contiguous().numpy()
    indices = np.empty((n, codebooks), np.int32)
    distances = np.empty((n, codebooks), np.float32)
    workers = max(1, min(codebooks, numba.get_num_threads()))
    _kernel(dim_keys)(z_np, keys_t.numpy(), key_sq.contiguous().numpy(), indices, distances,
                      workers)
    return torch.from_numpy(indices).long(), torch.from_numpy(distances)
