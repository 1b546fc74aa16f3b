"""Decoders from fetched values (batch, codebooks, topk, dim_values) to class logits."""

from __future__ import annotations

from torch import Tensor, nn


class VotingDecoder(nn.Module):
    """Non-parametric: the mean (the paper's) or the sum of the fetched values over codebooks
    and top-k.

    Each value code is a vote over the classes (``dim_values == num_classes``); the
    softmax is left to the loss. Has no parameters, so it cannot forget. The mean keeps the
    logits, and each value's gradient, 1/codebooks of the sum's: at the paper's lr 0.3 the
    logits then never leave the softmax's linear regime (``kvb_avalanche.metrics``).
    """

    def __init__(self, num_classes: int, reduction: str = "mean") -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.num_classes, self.reduction = num_classes, reduction

    def forward(self, values: Tensor) -> Tensor:
        if values.shape[-1] != self.num_classes:
            raise ValueError(
                f"VotingDecoder needs dim_values == num_classes ({self.num_classes}), "
                f"got values of size {values.shape[-1]}"
            )
        # (batch, [tokens,] codebooks, topk, classes) -> (batch, classes); a sum then a
        # division, so the fetched values' gradient stays an expanded view (no copy)
        votes = values.flatten(1, -2)
        return votes.sum(1) / votes.shape[1] if self.reduction == "mean" else votes.sum(1)


class LinearDecoder(nn.Module):
    """A linear layer on the concatenated values of all codebooks (top-k averaged)."""

    def __init__(self, codebooks: int, dim_values: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.linear = nn.Linear(codebooks * dim_values, num_classes)

    def forward(self, values: Tensor) -> Tensor:
        # (batch, [tokens,] codebooks, topk, dim_values) -> (batch, codebooks * dim_values)
        v = values.mean(-2)
        if v.dim() == 4:
            v = v.mean(1)  # average over tokens
        return self.linear(v.flatten(1))


class MLPDecoder(nn.Module):
    """A one-hidden-layer MLP on the concatenated values of all codebooks."""

    def __init__(self, codebooks: int, dim_values: int, num_classes: int, hidden: int = 256):
        super().__init__()
        self.num_classes = num_classes
        self.inner = LinearDecoder(codebooks, dim_values, hidden)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, values: Tensor) -> Tensor:
        return self.head(self.inner(values))
