"""Unsupervised key initialisation: EMA k-means with dead-code replacement.

Keys are fitted per codebook on projected, unlabelled embeddings, then frozen. The EMA
state (``ema_counts`` as per-sample fractions, ``ema_sums``) lives in the bottleneck's
buffers and is always kept consistent with the keys, including after the optional Lloyd
k-means start: the official implementation leaves its running averages at zero after
k-means, so the first EMA step drags every key towards the origin and codes collapse.
"""

from __future__ import annotations

import logging
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
        seed: seeds the Lloyd start and the dead-code replacement.
    """

    epochs: int = 1
    decay: float = 0.95
    eps: float = 1e-5
    dead_code_threshold: float = 0.05
    kmeans_start: bool = True
    kmeans_iters: int = 10
    kmeans_samples: int = 20_000
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
    counts = sums = None
    for _ in tqdm(range(iters), desc="fitting keys (Lloyd k-means start)", disable=not progress):
        idx = bn.nearest(z, topk=1).indices[..., 0]  # (n, codebooks)
        counts, sums = _assign_stats(z, idx, bn.num_pairs)
        filled = counts > 0
        means = sums / counts.clamp_min(1)[..., None]
        bn.keys.copy_(torch.where(filled[..., None], means, bn.keys))
    if counts is None:  # iters=0: keys stay the sampled points; assign once for the EMA state
        counts, _ = _assign_stats(z, bn.nearest(z, topk=1).indices[..., 0], bn.num_pairs)
    # EMA state as per-sample fractions, consistent with the keys (empty clusters: count 0).
    bn.ema_counts.copy_(counts / n)
    bn.ema_sums.copy_(bn.keys * bn.ema_counts[..., None])


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
    bn.keys.copy_(bn.ema_sums / smoothed[..., None].clamp_min(1e-12))
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

    if cfg.kmeans_start:
        gathered, n = [], 0
        for batch in loader:
            gathered.append(heads(batch))
            n += gathered[-1].shape[0]
            if n >= cfg.kmeans_samples:
                break
        if not gathered:
            raise ValueError("the key-initialisation loader yielded no batch")
        lloyd_start(bn, torch.cat(gathered)[: cfg.kmeans_samples], cfg.kmeans_iters, generator,
                    progress)
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
    bn.fit_stats = stats  # travels with the bottleneck (copies, checkpoints), for the metrics
    log.info("fitted keys: %s", {k: v for k, v in stats.items() if k != "keys_replaced_per_epoch"})
    return stats
