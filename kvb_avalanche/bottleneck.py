"""The discrete key-value bottleneck (Träuble et al., ICML 2023, arXiv 2207.11240).

An embedding is projected by C fixed projections (random, chunks, or a rotation learned
with the keys on unlabelled data, then chunks) into C low-dimensional heads.
Each head looks up its nearest key(s) in its own codebook of ``num_pairs`` keys and
fetches the value code paired with that key. Keys are fitted without labels (EMA
k-means, see :mod:`kvb_avalanche.keys`) and then frozen; only the values that a batch
fetched receive gradient, which is what localises learning and limits forgetting.
"""

from __future__ import annotations

import hashlib
import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from kvb_avalanche.search import fused_available, fused_nearest, keys_layout
from kvb_avalanche.sparse import coalesced_fetch_grad, count_fetches, fetch_rows

Projection = Literal["random", "chunk", "learned"]
ValuesInit = Literal["zeros", "randn"]
KeyInit = Literal["kmeans", "random"]


class Lookup(NamedTuple):
    """Result of the nearest-key search."""

    indices: Tensor  # (batch, codebooks, topk) int64
    distances: Tensor  # (batch, codebooks, topk) squared L2


class _FetchSparse(torch.autograd.Function):
    """values[codebook, index] whose gradient is a sparse (codebooks, pairs, dim) tensor.

    The dense gradient of a paper-scale bottleneck is 256 x 4096 x 10 floats, almost all
    zero; a sparse one costs only the fetched rows, in the backward pass and in SGD.
    """

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, usage: Tensor | None) -> Tensor:
        # indices: (batch, codebooks, topk) -> out (batch, codebooks, topk, dim_values);
        # each fetch is counted in usage (codebooks, pairs) where given
        ctx.save_for_backward(indices)
        ctx.shape = values.shape
        return fetch_rows(values, indices, usage)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (indices,) = ctx.saved_tensors
        return coalesced_fetch_grad(indices, grad, ctx.shape), None, None


def _check_positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class KeyValueBottleneck(nn.Module):
    """C codebooks of (key, value) pairs behind C fixed projections.

    Args:
        dim_embed: size of the input embeddings.
        codebooks: number of codebooks C (heads).
        num_pairs: keys (and values) per codebook.
        dim_keys: size of each head after projection. With ``projection="chunk"`` or
            ``"learned"`` it must equal ``dim_embed / codebooks`` (the embedding is split in
            chunks).
        dim_values: size of each value code (the number of classes for a voting decoder).
        topk: number of nearest keys fetched per codebook.
        projection: ``"random"`` (fixed Gaussian, seeded), ``"chunk"`` (split), or
            ``"learned"``: chunks of the embedding rotated by an orthogonal matrix that
            :func:`kvb_avalanche.keys.fit_keys` learns with the keys, on the same unlabelled
            data, to minimise their quantisation error (OPQ, Ge et al., CVPR 2013), and
            frozen with them. Until then it is the identity (``"chunk"``).
        values_init: ``"zeros"`` or ``"randn"`` (scaled by ``values_init_std``).
        key_init: ``"kmeans"`` (keys must be fitted before use, see
            :func:`kvb_avalanche.keys.fit_keys`) or ``"random"`` (Gaussian keys, usable
            at once).
        seed: seeds projections, random keys and random values; no global RNG is used.
        mask_unused_keys: in eval mode, search only keys fetched during training (after the
            keys were frozen), so an unseen region falls back to the nearest trained key
            instead of an untrained value (the official code's ``deactivate_counts``).
        sparse_grad: give ``values`` a sparse gradient holding only the fetched rows (use
            plain SGD, which takes sparse gradients; KVBStrategy clips them too).
        chunk_bytes: memory bound of the distance block in the key search.
        search: ``"matmul"`` (batched matmul in ``chunk_bytes`` blocks, then argmin) or
            ``"fused"`` (:mod:`kvb_avalanche.search`: distances and argmin in one pass, on
            the CPU in float32 with ``topk`` 1; a 3x faster search, a 1.2x faster key fit).
            Their codes agree up to rounding-level ties, which a key fit amplifies: KVB's
            split CIFAR-10 accuracy moves by about 0.002 (0.5478 to 0.5459), so
            ``"matmul"`` stays the default until the committed results are regenerated
            with ``"fused"``.
    """

    def __init__(
        self,
        dim_embed: int,
        codebooks: int,
        num_pairs: int,
        dim_keys: int,
        dim_values: int,
        topk: int = 1,
        projection: Projection = "random",
        values_init: ValuesInit = "zeros",
        values_init_std: float = 0.001,
        key_init: KeyInit = "kmeans",
        seed: int = 0,
        mask_unused_keys: bool = False,
        sparse_grad: bool = False,
        chunk_bytes: int = 8 * 2**20,
        search: Literal["matmul", "fused"] = "matmul",
    ) -> None:
        super().__init__()
        if search not in ("matmul", "fused"):
            raise ValueError(f"search must be 'matmul' or 'fused', got {search!r}")
        self.search = search
        for name, value in [
            ("dim_embed", dim_embed),
            ("codebooks", codebooks),
            ("num_pairs", num_pairs),
            ("dim_keys", dim_keys),
            ("dim_values", dim_values),
            ("topk", topk),
        ]:
            _check_positive_int(name, value)
        if topk > num_pairs:
            raise ValueError(f"topk must be <= num_pairs ({num_pairs}), got {topk}")
        if projection not in ("random", "chunk", "learned"):
            raise ValueError(f"projection must be 'random', 'chunk' or 'learned', got "
                             f"{projection!r}")
        if values_init not in ("zeros", "randn"):
            raise ValueError(f"values_init must be 'zeros' or 'randn', got {values_init!r}")
        if key_init not in ("kmeans", "random"):
            raise ValueError(f"key_init must be 'kmeans' or 'random', got {key_init!r}")
        if projection in ("chunk", "learned") and dim_embed != codebooks * dim_keys:
            raise ValueError(
                f"projection={projection!r} splits the embedding into codebooks chunks: "
                f"dim_keys must "
                f"be dim_embed / codebooks = {dim_embed}/{codebooks}, got dim_keys={dim_keys}"
            )
        self.dim_embed, self.codebooks, self.num_pairs = dim_embed, codebooks, num_pairs
        self.dim_keys, self.dim_values, self.topk = dim_keys, dim_values, topk
        self.projection_kind = projection
        self.chunk_bytes = chunk_bytes

        generator = torch.Generator().manual_seed(seed)
        if projection == "random":
            proj = torch.randn(codebooks, dim_embed, dim_keys, generator=generator)
            proj /= math.sqrt(dim_embed)
        else:
            proj = torch.zeros(codebooks, dim_embed, dim_keys)
            for c in range(codebooks):
                proj[c, c * dim_keys : (c + 1) * dim_keys] = torch.eye(dim_keys)
        self.register_buffer("projection", proj)  # (codebooks, dim_embed, dim_keys)

        keys = torch.randn(codebooks, num_pairs, dim_keys, generator=generator)
        self.register_buffer("keys", keys)  # (codebooks, num_pairs, dim_keys)
        self.register_buffer("keys_initialized", torch.tensor(key_init == "random"))
        self.register_buffer("keys_frozen", torch.tensor(False))
        # EMA k-means state, kept consistent with ``keys`` (keys = ema_sums / ema_counts).
        # Counts are per-sample fractions, so they do not depend on the batch size.
        self.register_buffer("ema_counts", torch.full((codebooks, num_pairs), 1.0 / num_pairs))
        self.register_buffer("ema_sums", keys / num_pairs)
        # How often each key was fetched in training mode after the keys were frozen.
        self.register_buffer("key_usage", torch.zeros(codebooks, num_pairs, dtype=torch.long))
        self.mask_unused_keys = mask_unused_keys
        self.sparse_grad = sparse_grad
        self.fit_stats: dict | None = None  # set by fit_keys: how the keys were fitted

        values = torch.zeros(codebooks, num_pairs, dim_values)
        if values_init == "randn":
            values = values_init_std * torch.randn(values.shape, generator=generator)
        self.values = nn.Parameter(values)  # (codebooks, num_pairs, dim_values)

    # ------------------------------------------------------------------ checks
    def check_embeddings(self, x: Tensor, name: str = "x") -> None:
        """Raise a ValueError naming ``name`` unless x is (batch[, tokens], dim_embed) finite."""
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() not in (2, 3) or x.shape[-1] != self.dim_embed:
            raise ValueError(
                f"{name} must have shape (batch, {self.dim_embed}) or "
                f"(batch, tokens, {self.dim_embed}), got {tuple(x.shape)}"
            )
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or inf values")

    def check_indices(self, indices: Tensor, name: str = "indices") -> None:
        """Raise a ValueError naming ``name`` unless it is (batch, codebooks, topk) integer
        key indices in [0, num_pairs) (cached codes come from outside the module)."""
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got dtype {indices.dtype}")
        if indices.dim() != 3 or indices.shape[1] != self.codebooks:
            raise ValueError(f"{name} must have shape (batch, {self.codebooks}, topk), "
                             f"got {tuple(indices.shape)}")
        if indices.numel():
            low, high = (int(v) for v in torch.aminmax(indices))
            if low < 0 or high >= self.num_pairs:
                raise ValueError(f"{name} must lie in [0, num_pairs={self.num_pairs}), got "
                                 f"values from {low} to {high}")

    def _check_ready(self) -> None:
        if not bool(self.keys_initialized):
            raise RuntimeError(
                "keys are not initialised: this bottleneck was built with key_init='kmeans', "
                "so fit them first (kvb_avalanche.keys.fit_keys, or KVBPlugin / KVBStrategy "
                "which do it before the first experience)"
            )

    @torch.no_grad()
    def set_rotation(self, rotation: Tensor) -> None:
        """``projection="learned"``: heads become chunks of ``x @ rotation``.

        rotation: (dim_embed, dim_embed), orthogonal; its columns ``c * dim_keys ..`` make
        codebook c's projection.
        """
        if self.projection_kind != "learned":
            raise ValueError(f"set_rotation needs projection='learned', this bottleneck's is "
                             f"{self.projection_kind!r}")
        if bool(self.keys_frozen):
            raise RuntimeError("keys are frozen (freeze_keys() was called): the projection "
                               "that decides their codes cannot change")
        d = self.dim_embed
        if tuple(rotation.shape) != (d, d):
            raise ValueError(f"rotation must be ({d}, {d}), got {tuple(rotation.shape)}")
        # (dim_embed, (codebooks dim_keys)) -> (codebooks, dim_embed, dim_keys)
        chunks = rotation.reshape(d, self.codebooks, self.dim_keys).permute(1, 0, 2)
        self.projection.copy_(chunks.to(self.projection.dtype))

    # ------------------------------------------------------------------ lookup
    def project(self, x: Tensor) -> Tensor:
        """(batch, dim_embed) -> (batch, codebooks, dim_keys)."""
        return torch.einsum("bd,cdk->bck", x.to(self.projection.dtype), self.projection)

    @torch.no_grad()
    def nearest(self, z: Tensor, topk: int | None = None, mask: Tensor | None = None) -> Lookup:
        """Nearest keys by squared L2 for projected heads ``z`` (batch, codebooks, dim_keys).

        With ``search="fused"``, ``topk`` 1, on the CPU in float32: the fused distance +
        argmin kernel (:mod:`kvb_avalanche.search`). Otherwise one batched matmul per block
        of codebooks, sized to stay under ``chunk_bytes``; never builds a (codebooks,
        batch, pairs, dim_keys) tensor nor an autograd graph.
        ``mask`` (codebooks, num_pairs) bool excludes keys where False.
        """
        topk = self.topk if topk is None else topk
        fused = getattr(self, "search", "matmul") == "fused"  # (bottlenecks pickled before it)
        if fused and topk == 1 and fused_available(z, self.keys):
            indices, distances = fused_nearest(z, *self._keys_layout(), mask=mask)
            return Lookup(indices[..., None], distances[..., None])
        batch = z.shape[0]
        z = z.transpose(0, 1)  # (codebooks, batch, dim_keys)
        key_sq = self.keys.pow(2).sum(-1, keepdim=True).transpose(1, 2)  # (codebooks, 1, pairs)
        # Blocks of (codebooks x rows x num_pairs) float32 distances, at most chunk_bytes.
        rows = max(1, min(batch, self.chunk_bytes // (4 * self.num_pairs)))  # batch may be 0
        step = max(1, self.chunk_bytes // (4 * rows * self.num_pairs))
        indices = torch.empty(self.codebooks, batch, topk, dtype=torch.long, device=z.device)
        distances = torch.empty(self.codebooks, batch, topk, dtype=z.dtype, device=z.device)
        for c in range(0, self.codebooks, step):
            keys_t = self.keys[c : c + step].transpose(1, 2)  # (chunk, dim_keys, pairs)
            for r in range(0, batch, rows):
                zc = z[c : c + step, r : r + rows]  # (chunk, rows, dim_keys)
                # (chunk, rows, pairs) = |k|^2 - 2 z.k ; |z|^2 is added after the reduction
                d = torch.baddbmm(key_sq[c : c + step], zc, keys_t, alpha=-2)
                if mask is not None:
                    d.masked_fill_(~mask[c : c + step, None], float("inf"))
                if topk == 1:
                    dist, idx = d.min(-1, keepdim=True)
                else:
                    dist, idx = d.topk(topk, dim=-1, largest=False)
                indices[c : c + step, r : r + rows] = idx
                distances[c : c + step, r : r + rows] = dist + zc.pow(2).sum(-1, keepdim=True)
        # contiguous, as cached codes are: a fetch then lays its values out (and the decoder
        # sums them) in the same order whichever way the codes came
        return Lookup(indices.transpose(0, 1).contiguous(),
                      distances.transpose(0, 1).clamp_min_(0).contiguous())

    def _keys_layout(self) -> tuple[Tensor, Tensor]:
        """The fused search's layout of the keys, redone only when the keys changed."""
        stamp = (id(self.keys), self.keys.data_ptr(), self.keys._version)
        if getattr(self, "_layout_stamp", None) != stamp:
            self._layout = keys_layout(self.keys, getattr(self, "_layout", None))
            self._layout_stamp = stamp
        return self._layout

    def __getstate__(self) -> dict:
        """Pickles (checkpoints, copies) without the search's derived key layout."""
        state = self.__dict__.copy()
        state.pop("_layout", None)
        state.pop("_layout_stamp", None)
        return state

    def lookup(self, x: Tensor) -> Lookup:
        """Nearest keys for embeddings x (batch, dim_embed) -> indices (batch, codebooks, topk)."""
        self._check_ready()
        mask = None
        if self.mask_unused_keys and not self.training:
            mask = self.key_usage > 0
            mask = mask | ~mask.any(-1, keepdim=True)  # a never-trained codebook keeps all keys
        return self.nearest(self.project(x), mask=mask)

    def fetch(self, indices: Tensor, name: str = "indices") -> Tensor:
        """Values for key indices (batch, codebooks, topk) -> (batch, codebooks, topk, dim_values).

        Only the fetched rows of ``values`` enter the graph, so only they get gradient.
        In training mode with frozen keys the fetched keys are counted (``key_usage``).
        ``name`` is the argument named in the error raised for bad indices.
        """
        self.check_indices(indices, name=name)
        record = self.training and bool(self.keys_frozen)
        if self.sparse_grad:  # counts the fetches while it gathers them
            return _FetchSparse.apply(self.values, indices, self.key_usage if record else None)
        if record:
            self.record_usage(indices)
        codebook = torch.arange(self.codebooks, device=indices.device)[None, :, None]
        return self.values[codebook, indices.long()]

    def forward(
        self,
        x: Tensor,
        return_indices: bool = False,
        return_distances: bool = False,
    ) -> Tensor | tuple[Tensor, ...]:
        """Fetch values for embeddings.

        x: (batch, dim_embed) or (batch, tokens, dim_embed).
        Returns values (batch, [tokens,] codebooks, topk, dim_values), then indices and
        distances (batch, [tokens,] codebooks, topk) if asked for.
        """
        self.check_embeddings(x)
        lead = x.shape[:-1]
        found = self.lookup(x.reshape(-1, self.dim_embed))
        values = self.fetch(found.indices)
        out = [values.reshape(*lead, *values.shape[1:])]
        if return_indices:
            out.append(found.indices.reshape(*lead, *found.indices.shape[1:]))
        if return_distances:
            out.append(found.distances.reshape(*lead, *found.distances.shape[1:]))
        return out[0] if len(out) == 1 else tuple(out)

    @torch.no_grad()
    def record_usage(self, indices: Tensor) -> None:
        """Count fetched keys (for evaluation-time masking of never-trained keys)."""
        count_fetches(self.key_usage, indices)

    # ------------------------------------------------------------------ state
    def freeze_keys(self) -> None:
        """Freeze keys for good: no later fitting moves them, in train mode or not."""
        self._check_ready()
        self.keys_frozen.fill_(True)

    def fingerprint(self) -> str:
        """Hash of everything that decides the key indices in the current mode.

        Projection, keys and topk; in eval mode with ``mask_unused_keys`` also the mask.
        """
        # SHA-1 for speed (hardware-accelerated; 4x blake2b here), not security: it runs
        # before every epoch and every evaluated experience, over 76 MB at 256 x 4096
        h = hashlib.sha1(usedforsecurity=False)
        tensors = [self.projection, self.keys]
        if self.mask_unused_keys and not self.training:
            tensors.append(self.key_usage > 0)
        for t in tensors:
            h.update(memoryview(t.detach().cpu().contiguous().numpy()).cast("B"))
        h.update(f"{self.topk}".encode())
        return h.hexdigest()

    def extra_repr(self) -> str:
        return (
            f"dim_embed={self.dim_embed}, codebooks={self.codebooks}, num_pairs={self.num_pairs}, "
            f"dim_keys={self.dim_keys}, dim_values={self.dim_values}, topk={self.topk}, "
            f"projection={self.projection_kind!r}"
        )
