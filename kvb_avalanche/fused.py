"""The voting decoder's training step without autograd: one pass per phase, by codebook.

For a :class:`~kvb_avalanche.KVBModel` with a :class:`~kvb_avalanche.VotingDecoder`,
cross-entropy (any label smoothing) and plain SGD on the values (:class:`SparseSGD`, or
``torch.optim.SGD`` without momentum or weight decay), with or without norm clipping, the
step has a closed form. With codes ``idx`` (batch B, codebooks C, topk K) and values ``V``
(C, pairs, classes):

    logits z_b = s * sum_{c,k} V[c, idx[b,c,k]]          s = 1/(C K) (mean) or 1 (sum)
    dL/dz_b   = (softmax(z_b) - t_b) / B                  t_b the (smoothed) target
    G[c, p]   = s * sum_{b,k: idx[b,c,k] = p} dL/dz_b     the values' gradient
    V[c, p]  -= lr * min(1, max_norm / (||G|| + 1e-6)) * G[c, p]

:class:`FusedVotingStep` computes it in three compiled kernels: the vote (which also
the gradient grouped by (codebook, pair) with its norm, and the update (which also
counts key usage).
Work is split by codebook (or by fixed groups of codebooks), never summed in an order that
depends on the number of threads: the same bits whatever ``NUMBA_NUM_THREADS``. Against
autograd (which sums in another order) values agree to float32 rounding.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin
from torch import Tensor, nn

from kvb_avalanche.avalanche_api import criterion_of
from kvb_avalanche.decoders import VotingDecoder
from kvb_avalanche.model import KVBModel
from kvb_avalanche.sparse import SparseSGD, _span, _workers, numba, prange

GROUP = 16  # codebooks summed together in the vote, a fixed group whatever the threads


def _vote_kernel(values, idx, partial):
    """partial[g, b] = sum over the codebooks c of group g, and k, of values[c, idx[b, c, k]].

    partial: (groups, batch, classes), zeroed here. (Explicit indices, not row views:
    numba makes a view per row, which costs more than the sum.)"""
    batch, codebooks, topk = idx.shape
    classes = values.shape[2]
    for g in prange(partial.shape[0]):
        for b in range(batch):
            for d in range(classes):
                partial[g, b, d] = 0.0
        for c in range(g * GROUP, min(codebooks, (g + 1) * GROUP)):
            for b in range(batch):
                for k in range(topk):
                    p = idx[b, c, k]
                    for d in range(classes):
                        partial[g, b, d] += values[c, p, d]


def _group_kernel(idx, grad, scale, slot, rows, keys, fetches, count, normsq, workers):
    """Per codebook c: G[c, p] = scale * sum of grad[b] over the (b, k) with idx[b, c, k] = p,
    written compactly: rows[c, :count[c]] (the sums) at keys[c, :count[c]] (the pairs), in
    first-seen order, with fetches[c, u] the times pair keys[c, u] was fetched;
    normsq[c] = their squared norm. slot (workers, pairs) is a worker's own table of the
    place u + 1 of each pair seen in the codebook (0: not seen), in cache, left all 0.
    (The key-usage table is counted in the update, which touches the same pairs.)"""
    batch, codebooks, topk = idx.shape
    classes = grad.shape[1]
    for w in prange(workers):
        start, stop = _span(w, workers, codebooks)
        for c in range(start, stop):
            n = 0
            for b in range(batch):
                for k in range(topk):
                    p = idx[b, c, k]
                    u = slot[w, p] - 1
                    if u < 0:  # first seen
                        u = n
                        n += 1
                        slot[w, p] = n
                        keys[c, u] = p
                        fetches[c, u] = 0
                        for d in range(classes):
                            rows[c, u, d] = 0.0
                    fetches[c, u] += 1
                    for d in range(classes):
                        rows[c, u, d] += scale * grad[b, d]
            total = 0.0
            for u in range(n):
                slot[w, keys[c, u]] = 0
                for d in range(classes):
                    total += rows[c, u, d] * rows[c, u, d]
            count[c] = n
            normsq[c] = total


def _loss_kernel(logits, targets, smoothing, grad):
    """Mean cross-entropy of logits (batch, classes) against the targets, label-smoothed, and
    its gradient grad[b] = (softmax(logits[b]) - t_b) / batch; serial (a few thousand
    numbers: a parallel region would cost more, and so would a PyTorch op right after one)."""
    batch, classes = logits.shape
    total = 0.0
    for b in range(batch):
        top = logits[b, 0]
        for d in range(1, classes):
            top = max(top, logits[b, d])
        norm = 0.0
        for d in range(classes):
            norm += np.exp(logits[b, d] - top)
        log_norm = top + np.log(norm)
        for d in range(classes):
            target = smoothing / classes + (1.0 - smoothing if d == targets[b] else 0.0)
            total -= target * (logits[b, d] - log_norm)
            grad[b, d] = (np.exp(logits[b, d] - log_norm) - target) / batch
    return total / batch


def _apply_kernel(values, rows, keys, count, alpha, usage, fetches, record, workers):
    """values[c, keys[c, u]] += alpha * rows[c, u] for u < count[c], and with record
    usage[c, keys[c, u]] += fetches[c, u]."""
    codebooks, classes = values.shape[0], values.shape[2]
    for w in prange(workers):
        start, stop = _span(w, workers, codebooks)
        for c in range(start, stop):
            for u in range(count[c]):
                p = keys[c, u]
                if record:
                    usage[c, p] += fetches[c, u]
                for d in range(classes):
                    values[c, p, d] += alpha * rows[c, u, d]


if numba is not None:
    _vote_kernel = numba.njit(cache=True, parallel=True)(_vote_kernel)
    _group_kernel = numba.njit(cache=True, parallel=True)(_group_kernel)
    _apply_kernel = numba.njit(cache=True, parallel=True)(_apply_kernel)
    _loss_kernel = numba.njit(cache=True)(_loss_kernel)


def _own_hook(plugin: SupervisedPlugin, hook: str) -> bool:
    return getattr(type(plugin), hook) is not getattr(SupervisedPlugin, hook)


def why_not_fused(strategy: Any) -> str | None:
    """Why ``strategy``'s training step needs autograd, or None when the fused step applies."""
    model, optimizer, criterion = strategy.model, strategy.optimizer, criterion_of(strategy)
    if numba is None:
        return "numba is not installed"
    if not isinstance(model, KVBModel) or not isinstance(model.decoder, VotingDecoder):
        return "the decoder is not a VotingDecoder"
    values = model.bottleneck.values
    if values.device.type != "cpu" or values.dtype not in (torch.float32, torch.float64):
        return f"the values are {values.dtype} on {values.device} (the kernels take CPU floats)"
    if type(criterion) is not nn.CrossEntropyLoss or criterion.weight is not None or (
            criterion.reduction != "mean"):
        return "the criterion is not a plain nn.CrossEntropyLoss (mean, no class weights)"
    if type(optimizer) not in (SparseSGD, torch.optim.SGD) or len(optimizer.param_groups) != 1:
        return f"the optimizer is {type(optimizer).__name__}, not SGD with one parameter group"
    group = optimizer.param_groups[0]
    if type(optimizer) is torch.optim.SGD and (group["momentum"] or group["weight_decay"]
                                               or group["maximize"]):
        return "the SGD has momentum, weight decay or maximize"
    # Avalanche's make_optimizer hands the optimizer every model parameter; frozen ones
    # (a frozen encoder's) get no gradient, so the step still updates the values alone
    if not any(p is values for p in group["params"]) or any(
            p.requires_grad for p in group["params"] if p is not values):
        return "the optimizer updates more than the bottleneck's values"
    if not values.requires_grad:
        return "the values are frozen"
    for plugin in strategy.plugins:
        if isinstance(plugin, EvaluationPlugin):
            continue  # its metrics read outputs and losses, not gradients
        for hook in ("before_backward", "after_backward"):
            if _own_hook(plugin, hook):
                return f"{type(plugin).__name__} acts at {hook} (it may need the autograd graph)"
    return None


class FusedVotingStep:
    """The fused step's state between the template's forward, criterion, backward and
    optimizer_step: the batch's codes and logits, the grouped gradient, its norm."""

    def __init__(self, model: KVBModel) -> None:
        bn = model.bottleneck
        self.model, self.bn = model, bn
        self.scale = 1.0 if model.decoder.reduction == "sum" else 1.0 / (bn.codebooks * bn.topk)
        self._buffers: tuple | None = None
        self._partial: np.ndarray | None = None  # (groups, batch, classes) vote sums
        self.idx: np.ndarray | None = None
        self.normsq: np.ndarray | None = None

    def forward(self, x: Tensor) -> Tensor:
        """Logits (batch, classes) of inputs or codes x; no graph."""
        model, bn = self.model, self.bn
        codes = x if model.is_codes(x) else model.codes(x)
        self.idx = codes.numpy()
        if self.idx.ndim != 3 or self.idx.shape[1] != bn.codebooks or (self.idx.size and (
                self.idx.min() < 0 or self.idx.max() >= bn.num_pairs)):
            bn.check_indices(codes, name="x (cached codes)")  # raises, naming the problem
        values = bn.values.detach().numpy()
        shape = (-(-bn.codebooks // GROUP), codes.shape[0], values.shape[2])
        if self._partial is None or self._partial.shape != shape:
            self._partial = np.empty(shape, dtype=values.dtype)
        partial = self._partial
        _vote_kernel(values, self.idx, partial)
        return torch.from_numpy(partial.sum(0) * self.scale)  # over the groups, in order

    def loss(self, logits: Tensor, targets: Tensor, label_smoothing: float) -> Tensor:
        """The mean (label-smoothed) cross-entropy, as a scalar tensor; keeps its gradient
        with respect to the logits for :meth:`backward`."""
        y = targets.numpy()  # checked by KVBStrategy.criterion: integers in [0, classes)
        z = logits.detach().numpy()
        self.grad = np.empty_like(z)
        loss = _loss_kernel(z, y, float(label_smoothing), self.grad)
        return torch.tensor(loss, dtype=logits.dtype)

    def backward(self) -> None:
        """The values' gradient, grouped by (codebook, pair), and its squared norm."""
        bn = self.bn
        grad = self.grad  # (batch, classes): (softmax - smoothed target) / batch
        classes = grad.shape[1]
        codebooks, pairs = bn.codebooks, bn.num_pairs
        rows_per = self.idx.shape[0] * self.idx.shape[2]
        workers = _workers(codebooks)
        dtype = grad.dtype
        shape = (workers, pairs, classes, codebooks, rows_per, grad.dtype)
        if self._buffers is None or self._buffers[0] != shape:
            self._buffers = (shape, np.zeros((workers, pairs), np.int64),
                             np.empty((codebooks, rows_per, classes), dtype),
                             np.empty((codebooks, rows_per), np.int64),
                             np.empty((codebooks, rows_per), np.int64),
                             np.empty(codebooks, np.int64), np.empty(codebooks, np.float64))
        _, slot, rows, keys, fetches, count, normsq = self._buffers
        _group_kernel(self.idx, grad, self.scale, slot, rows, keys, fetches, count, normsq,
                      workers)
        self.normsq = normsq

    def grad_norm(self) -> float:
        return float(np.sqrt(self.normsq.sum()))

    def step(self, lr: float, max_norm: float | None) -> None:
        """values -= lr * clip(G); the batch's fetches are counted in ``key_usage`` (in
        training with frozen keys, as ``KeyValueBottleneck.fetch`` does)."""
        factor = 1.0
        if max_norm is not None:
            factor = min(1.0, max_norm / (self.grad_norm() + 1e-6))
        _, _, rows, keys, fetches, count, _ = self._buffers
        bn = self.bn
        record = bool(bn.keys_frozen) and self.model.training
        usage = bn.key_usage if record else torch.zeros(1, 1, dtype=torch.long)
        _apply_kernel(bn.values.detach().numpy(), rows, keys, count, -lr * factor, usage.numpy(),
                      fetches, record, _workers(bn.codebooks))
