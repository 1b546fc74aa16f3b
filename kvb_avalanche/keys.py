"""Unsupervised key initialisation: EMA k-means with dead-code replacement.

Keys are fitted per codebook on projected, unlabelled embeddings, then frozen. The EMA
state (``ema_counts`` as per-sample fractions, ``ema_sums``) lives in the bottleneck's
buffers and is always kept consistent with the keys, including after the optional Lloyd
k-means start: the official implementation leaves its running averages at zero after
k-means, so the first EMA step drags every key towards the origin and codes collapse.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from kvb_avalanche.bottleneck import KeyValueBottleneck

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeyFitConfig:
    """How keys are fitted.

    Args:
        epochs: passes of EMA updates over the loader.
        decay: EMA decay of counts and sums per step.
        eps: Laplace smoothing of the counts.
        dead_code_threshold: a key whose EMA usage falls below this fraction of a uniform
            share (``threshold / num_pairs``) is replaced by a random embedding of the batch.
        kmeans_start: start from Lloyd k-means on up to ``kmeans_samples`` embeddings.
        kmeans_iters: Lloyd iterations (0: the keys stay the sampled embeddings).
        kmeans_samples: embeddings gathered from the loader for the Lloyd start.
        rotation_iters: with ``projection="learned"``, alternations of an orthogonal
            Procrustes step and a Lloyd step that learn the rotation (OPQ) before the keys
            are fitted as for any projection.
        seed: seeds the Lloyd start and the dead-code replacement.
    """

    epochs: int = 1
    decay: float = 0.95
    eps: float = 1e-5
    dead_code_threshold: float = 0.05
    kmeans_start: bool = True
    kmeans_iters: int = 10
    kmeans_samples: int = 20_000
    rotation_iters: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise ValueError(f"epochs must be a non-negative integer, got {self.epochs!r}")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay!r}")
        if self.eps < 0 or self.dead_code_threshold < 0:
            raise ValueError("eps and dead_code_threshold must be >= 0")
        if self.kmeans_iters < 0 or self.kmeans_samples < 1:
            raise ValueError("kmeans_iters must be >= 0 and kmeans_samples >= 1")
        if not isinstance(self.rotation_iters, int) or self.rotation_iters < 0:
            raise ValueError(f"rotation_iters must be a non-negative integer, got "
                             f"{self.rotation_iters!r}")

    @classmethod
    def official(cls, epochs: int, seed: int = 0) -> KeyFitConfig:
        """The official code's fitting: no Lloyd start (the keys start as the bottleneck's
        Gaussian draw, ``key_init="random"``), EMA at decay 0.95, and its dead-code threshold
        ``0.1 x batch / num_pairs`` on batch counts, which is 0.1 of a uniform share in the
        per-sample fractions kept here."""
        return cls(epochs=epochs, decay=0.95, dead_code_threshold=0.1, kmeans_start=False,
                   seed=seed)


def _assign_stats(z: Tensor, indices: Tensor, num_pairs: int) -> tuple[Tensor, Tensor]:
    """Per-key counts (codebooks, pairs) and sums (codebooks, pairs, dim_keys) of heads z.

    z: (n, codebooks, dim_keys); indices: (n, codebooks) nearest key per head.
    """
    n, codebooks, dim_keys = z.shape
    flat = (indices + num_pairs * torch.arange(codebooks, device=z.device)).reshape(-1)
    counts = torch.zeros(codebooks * num_pairs, device=z.device, dtype=z.dtype)
    counts.index_add_(0, flat, torch.ones_like(flat, dtype=z.dtype))
    sums = torch.zeros(codebooks * num_pairs, dim_keys, device=z.device, dtype=z.dtype)
    sums.index_add_(0, flat, z.reshape(-1, dim_keys))
    return counts.view(codebooks, num_pairs), sums.view(codebooks, num_pairs, dim_keys)


def _sample_rows(z: Tensor, shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    """Random heads of z (n, codebooks, dim_keys), one per (codebook, key): (codebooks, k, dim)."""
    codebooks, k = shape
    rows = torch.randint(z.shape[0], (codebooks, k), generator=generator).to(z.device)
    return z[rows, torch.arange(codebooks, device=z.device)[:, None]]


@torch.no_grad()
def lloyd_start(
    bn: KeyValueBottleneck, z: Tensor, iters: int, generator: torch.Generator,
    progress: bool = False,
) -> None:
    """Lloyd k-means on heads z (n, codebooks, dim_keys); sets keys and a consistent EMA state."""
    n = z.shape[0]
    if n >= bn.num_pairs:
        perm = torch.stack([torch.randperm(n, generator=generator) for _ in range(bn.codebooks)])
        keys = z[perm[:, : bn.num_pairs].T, torch.arange(bn.codebooks)].transpose(0, 1)
    else:
        keys = _sample_rows(z, (bn.codebooks, bn.num_pairs), generator)
        # drawn on the CPU generator whatever the device: the same keys on every device
        jitter = torch.randn(keys.shape, generator=generator).to(keys.device)
        keys = keys + 1e-3 * keys.std() * jitter
    bn.keys.copy_(keys)
    lloyd_steps(bn, z, iters, progress)


@torch.no_grad()
def lloyd_steps(bn: KeyValueBottleneck, z: Tensor, iters: int, progress: bool = False) -> None:
    """``iters`` Lloyd iterations from the current keys on heads z (n, codebooks, dim_keys),
    then an EMA state consistent with the keys."""
    counts = None
    for _ in tqdm(range(iters), desc="fitting keys (Lloyd k-means start)", disable=not progress):
        idx = bn.nearest(z, topk=1).indices[..., 0]  # (n, codebooks)
        counts, sums = _assign_stats(z, idx, bn.num_pairs)
        filled = counts > 0
        means = sums / counts.clamp_min(1)[..., None]
        bn.keys.copy_(torch.where(filled[..., None], means, bn.keys))
    if counts is None:  # iters=0: keys stay the sampled points; assign once for the EMA state
        counts, _ = _assign_stats(z, bn.nearest(z, topk=1).indices[..., 0], bn.num_pairs)
    # EMA state as per-sample fractions, consistent with the keys (empty clusters: count 0).
    bn.ema_counts.copy_(counts / z.shape[0])
    bn.ema_sums.copy_(bn.keys * bn.ema_counts[..., None])


def quantisation_error(bn: KeyValueBottleneck, x: Tensor) -> float:
    """Mean squared distance of the heads of embeddings x (n, dim_embed) to their nearest
    keys, summed over codebooks."""
    return bn.nearest(bn.project(x), topk=1).distances[..., 0].sum(-1).mean().item()


def pca_allocation(x: Tensor, codebooks: int) -> Tensor:
    """OPQ's parametric rotation (dim, dim), float64: the principal axes of x (n, dim),
    dealt to ``codebooks`` equal chunks by eigenvalue allocation, so that the product of
    each chunk's variances is about equal (largest first, each to the chunk with the
    smallest product that still has room)."""
    x64 = x.to(torch.float64)
    variances, axes = torch.linalg.eigh(torch.cov(x64.T))  # ascending
    dim = x.shape[1]
    size = dim // codebooks
    log_products = [0.0] * codebooks
    members: list[list[int]] = [[] for _ in range(codebooks)]
    for axis in reversed(range(dim)):  # largest variance first
        open_ = [c for c in range(codebooks) if len(members[c]) < size]
        chunk = min(open_, key=lambda c: (log_products[c], c))
        members[chunk].append(axis)
        log_products[chunk] += math.log(max(variances[axis].item(), 1e-12))
    return axes[:, [a for chunk in members for a in chunk]]


@torch.no_grad()
def learn_rotation(bn: KeyValueBottleneck, x: Tensor, cfg: KeyFitConfig,
                   generator: torch.Generator, progress: bool = False) -> list[float]:
    """Learn ``projection="learned"``'s rotation on unlabelled embeddings x (n, dim_embed):
    OPQ (Ge et al., CVPR 2013). Start from its parametric solution (:func:`pca_allocation`),
    then alternate a Lloyd step on the rotated chunks and the orthogonal Procrustes solution
    ``R = argmin ||x R - q(x R)||`` (``U V^T`` of ``x^T q``'s SVD); neither step raises the
    quantisation error. Returns it before each Procrustes step and at the end."""
    rotation = pca_allocation(x, bn.codebooks)
    bn.set_rotation(rotation)
    lloyd_start(bn, bn.project(x), cfg.kmeans_iters, generator)
    errors = []
    x64 = x.to(torch.float64)
    for _ in tqdm(range(cfg.rotation_iters), desc="learning the projection (OPQ)",
                  disable=not progress):
        z = bn.project(x)  # (n, codebooks, dim_keys)
        idx = bn.nearest(z, topk=1).indices[..., 0]  # (n, codebooks)
        errors.append((z - bn.keys[torch.arange(bn.codebooks), idx]).square().sum((1, 2))
                      .mean().item())
        # the nearest keys, laid out as rotation's columns: (n, (codebooks dim_keys))
        target = bn.keys[torch.arange(bn.codebooks), idx].reshape(len(x), -1)
        u, _, vh = torch.linalg.svd(x64.T @ target.to(torch.float64))
        rotation = u @ vh
        bn.set_rotation(rotation)
        lloyd_steps(bn, bn.project(x), 1)
    errors.append(quantisation_error(bn, x))
    return errors


@torch.no_grad()
def ema_step(
    bn: KeyValueBottleneck, z: Tensor, cfg: KeyFitConfig, generator: torch.Generator
) -> int:
    """One EMA k-means step on heads z (batch, codebooks, dim_keys). Returns keys replaced."""
    idx = bn.nearest(z, topk=1).indices[..., 0]  # (batch, codebooks)
    counts, sums = _assign_stats(z, idx, bn.num_pairs)
    bn.ema_counts.mul_(cfg.decay).add_(counts / z.shape[0], alpha=1 - cfg.decay)
    bn.ema_sums.mul_(cfg.decay).add_(sums / z.shape[0], alpha=1 - cfg.decay)
    total = bn.ema_counts.sum(-1, keepdim=True)  # (codebooks, 1)
    smoothed = (bn.ema_counts + cfg.eps) / (total + bn.num_pairs * cfg.eps) * total
    torch.div(bn.ema_sums, smoothed[..., None].clamp_min(1e-12), out=bn.keys)
    dead = bn.ema_counts < cfg.dead_code_threshold / bn.num_pairs  # (codebooks, pairs)
    n_dead = int(dead.sum())
    if n_dead:
        fresh = _sample_rows(z, (bn.codebooks, bn.num_pairs), generator)
        reset = cfg.dead_code_threshold / bn.num_pairs
        bn.keys.copy_(torch.where(dead[..., None], fresh, bn.keys))
        bn.ema_counts.masked_fill_(dead, reset)
        bn.ema_sums.copy_(torch.where(dead[..., None], fresh * reset, bn.ema_sums))
    return n_dead


def _embeddings(batch: Tensor | tuple | list) -> Tensor:
    """First element of a loader batch (embeddings), whatever else it carries."""
    return batch[0] if isinstance(batch, tuple | list) else batch


@torch.no_grad()
def fit_keys(
    bn: KeyValueBottleneck,
    loader: Iterable,
    config: KeyFitConfig | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Fit the keys of ``bn`` on an iterable of unlabelled embedding batches.

    ``loader`` yields tensors (batch, dim_embed) or tuples whose first item is one (so a
    labelled DataLoader works; labels are ignored). Returns a few statistics of the fit
    (``ema_steps``; ``keys_replaced``, in all and ``keys_replaced_per_epoch``: the dead-code
    churn; ``keys_in_use``; ``seconds``, the fit's wall time), also kept as ``bn.fit_stats``.
    """
    cfg = config or KeyFitConfig()
    if bool(bn.keys_frozen):
        raise RuntimeError("keys are frozen (freeze_keys() was called): they cannot be refitted")
    generator = torch.Generator().manual_seed(cfg.seed)
    device = bn.keys.device
    start = time.perf_counter()

    def heads(batch) -> Tensor:
        x = _embeddings(batch).to(device)
        bn.check_embeddings(x, name="key-initialisation embeddings")
        return bn.project(x.reshape(-1, bn.dim_embed))

    def gather(transform) -> Tensor:
        gathered, n = [], 0
        for batch in loader:
            gathered.append(transform(batch))
            n += gathered[-1].shape[0]
            if n >= cfg.kmeans_samples:
                break
        if not gathered:
            raise ValueError("the key-initialisation loader yielded no batch")
        return torch.cat(gathered)[: cfg.kmeans_samples]

    rotation_errors = None
    if bn.projection_kind == "learned":
        def embeddings(batch) -> Tensor:
            heads(batch)  # (checks the embeddings)
            return _embeddings(batch).to(device).reshape(-1, bn.dim_embed).float()

        start_state = [t.clone() for t in (bn.keys, bn.ema_counts, bn.ema_sums)]
        rotation_errors = learn_rotation(bn, gather(embeddings), cfg,
                                         torch.Generator().manual_seed(cfg.seed), progress)
        # the keys are then fitted on the learned projection as on any other
        for buffer, saved in zip((bn.keys, bn.ema_counts, bn.ema_sums), start_state,
                                 strict=True):
            buffer.copy_(saved)
        log.info("learned the projection: quantisation error %.4g -> %.4g over %d "
                 "iterations", rotation_errors[0], rotation_errors[-1], cfg.rotation_iters)
    if cfg.kmeans_start:
        lloyd_start(bn, gather(heads), cfg.kmeans_iters, generator, progress)
    bn.keys_initialized.fill_(True)
    per_epoch, steps, samples = [], 0, 0
    for epoch in tqdm(range(cfg.epochs), desc="fitting keys (EMA k-means)",
                      disable=not progress):
        per_epoch.append(0)
        for batch in loader:
            z = heads(batch)  # (batch, codebooks, dim_keys)
            per_epoch[-1] += ema_step(bn, z, cfg, generator)
            steps += 1
            samples += z.shape[0] if epoch == 0 else 0
    if steps == 0 and not cfg.kmeans_start:
        raise ValueError("the key-initialisation loader yielded no batch")
    if steps and samples < bn.num_pairs:
        log.warning(
            "keys fitted on %d inputs, fewer than the %d keys of each codebook: at least %d "
            "keys per codebook never had an input and stay where they started (an online "
            "stream's first mini-experience, say). The paper fits the keys on separate "
            "unlabelled data: pass key_init_loader (KVBPlugin, KVBStrategy).", samples,
            bn.num_pairs, bn.num_pairs - samples)
    usage = (bn.ema_counts > 0).float().mean().item()
    stats = {"ema_steps": steps, "keys_replaced": sum(per_epoch),
             "keys_replaced_per_epoch": per_epoch, "keys_in_use": usage,
             "seconds": time.perf_counter() - start}
    if rotation_errors is not None:
        stats["rotation_errors"] = rotation_errors
    bn.fit_stats = stats  # travels with the bottleneck (copies, checkpoints), for the metrics
    log.info("fitted keys: %s", {k: v for k, v in stats.items()
                                 if k not in ("keys_replaced_per_epoch", "rotation_errors")})
    return stats
