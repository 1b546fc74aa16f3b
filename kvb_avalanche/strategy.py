"""KVBStrategy: a SupervisedTemplate with the bottleneck's plugin and the paper's defaults."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch import nn

from kvb_avalanche.keys import KeyFitConfig
from kvb_avalanche.model import KVBModel
from kvb_avalanche.plugin import FrozenCodesPlugin, KVBPlugin
from kvb_avalanche.sparse import SparseSGD, as_coalesced


class KVBStrategy(SupervisedTemplate):
    """Train a :class:`KVBModel` on any Avalanche stream.

    Defaults follow the paper: SGD (lr 0.3; :class:`SparseSGD`, which applies sparse value
    gradients in one pass) on the values, gradient-norm clipping at 1.0, cross-entropy with
    label smoothing 0.1. ``optimizer`` and ``criterion`` override them;
    ``clip_grad_norm=None`` turns clipping off. Keys are fitted by :class:`KVBPlugin`
    (from ``key_init_loader`` or the first experience) before anything is trained.
    With ``cache_codes`` (default) values are trained and evaluated from cached key indices
    (:class:`FrozenCodesPlugin`): exactly the same result, far fewer key searches.
    """

    def __init__(
        self,
        *,
        model: KVBModel,
        optimizer: torch.optim.Optimizer | None = None,
        criterion: nn.Module | None = None,
        lr: float = 0.3,
        label_smoothing: float = 0.1,
        clip_grad_norm: float | None = 1.0,
        key_init_loader: Iterable | None = None,
        key_fit: KeyFitConfig | None = None,
        freeze_decoder: bool | None = None,
        cache_codes: bool = True,
        train_mb_size: int = 256,
        train_epochs: int = 1,
        eval_mb_size: int | None = 1024,
        device: str | torch.device = "cpu",
        plugins: Sequence[SupervisedPlugin] | None = None,
        evaluator: EvaluationPlugin | None = None,
        eval_every: int = -1,
        **base_kwargs,
    ) -> None:
        if clip_grad_norm is not None and clip_grad_norm <= 0:
            raise ValueError(f"clip_grad_norm must be > 0 or None, got {clip_grad_norm!r}")
        self.clip_grad_norm = clip_grad_norm
        if optimizer is None:
            optimizer = SparseSGD([model.bottleneck.values], lr=lr)
        self.kvb = KVBPlugin(key_init_loader, key_fit, freeze_decoder, batch_size=train_mb_size)
        own = [self.kvb, FrozenCodesPlugin()] if cache_codes else [self.kvb]
        super().__init__(
            model=model,
            optimizer=optimizer,
            criterion=criterion or nn.CrossEntropyLoss(label_smoothing=label_smoothing),
            train_mb_size=train_mb_size,
            train_epochs=train_epochs,
            eval_mb_size=eval_mb_size,
            device=device,
            plugins=[*own, *(plugins or [])],
            evaluator=evaluator or default_evaluator,
            eval_every=eval_every,
            **base_kwargs,
        )

    def optimizer_step(self) -> None:
        if self.clip_grad_norm is not None:
            clip_grad_norm(self.model.parameters(), self.clip_grad_norm)
        super().optimizer_step()


@torch.no_grad()
def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_`` that also takes sparse gradients. Returns the norm."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    for p in params:  # sum a sparse gradient's duplicates once, for this and the step
        if p.grad.is_sparse:
            p.grad = as_coalesced(p.grad)
    norms = [(p.grad._values() if p.grad.is_sparse else p.grad).norm() for p in params]
    total = torch.stack(norms).norm()
    scale = max_norm / (total + 1e-6)
    if scale < 1:
        for p in params:
            p.grad.mul_(scale)
    return float(total)
