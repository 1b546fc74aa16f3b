"""KVBStrategy: a SupervisedTemplate with the bottleneck's plugin and the paper's defaults."""

from __future__ import annotations

import logging
import numbers
from collections.abc import Iterable, Sequence

import torch
from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch import nn

from kvb_avalanche.avalanche_api import as_experiences, criterion_of
from kvb_avalanche.fused import FusedVotingStep, why_not_fused
from kvb_avalanche.keys import KeyFitConfig
from kvb_avalanche.metrics import COUNTING_REGIME, regime
from kvb_avalanche.model import KVBModel
from kvb_avalanche.plugin import CacheCodes, FrozenCodesPlugin, KVBPlugin, check_model
from kvb_avalanche.sparse import SparseSGD, as_coalesced

log = logging.getLogger(__name__)


class KVBStrategy(SupervisedTemplate):
    """Train a :class:`KVBModel` on any Avalanche stream.

    Defaults follow the paper: SGD (lr 0.3; :class:`SparseSGD`, which applies sparse value
    gradients in one pass) on the values, gradient-norm clipping at 1.0, cross-entropy with
    label smoothing 0.1. ``optimizer`` and ``criterion`` override them;
    ``clip_grad_norm=None`` turns clipping off. Keys are fitted by :class:`KVBPlugin`
    (from ``key_init_loader``, or the first experience given to :meth:`train`) before
    anything else happens, the periodic evaluation of ``eval_every >= 0`` included.

    ``cache_codes`` (:class:`FrozenCodesPlugin`): with ``"auto"`` (default) values are
    trained and evaluated from cached key indices whenever the data are repeatable (no
    random transform): the same result, far fewer key searches. Data that another plugin
    mixes in (replay) are looked up once per distinct input; data with random transforms
    are looked up per batch. ``True`` caches even those (one augmentation draw, frozen;
    warned), ``False`` never caches.

    ``fused`` (:mod:`kvb_avalanche.fused`): with a :class:`VotingDecoder`, cross-entropy
    and plain SGD on the values, the training step is computed without autograd, in
    compiled kernels, inside the template's own ``forward``, ``criterion``, ``backward``
    and ``optimizer_step`` (every plugin hook fires; ``mb_output`` holds the logits and
    ``loss`` the loss). ``None`` (default) takes it when it applies and no plugin acts at
    ``before_backward`` / ``after_backward``; ``False`` never; ``True`` insists (an error
    says why it cannot). A log line says which step runs. No ``.grad`` is filled, and a
    plugin that reads gradients at another hook is not detected: pass ``fused=False`` to it.

    KVB is single-head: a stream with task labels other than 0 is refused unless
    ``ignore_task_labels=True`` (one head over all classes, task labels unused). Targets
    must be integer class indices below the decoder's ``num_classes``; both are checked
    for each experience before anything trains, and for every batch.
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
        cache_codes: CacheCodes = "auto",
        fused: bool | None = None,
        train_mb_size: int = 256,
        train_epochs: int = 1,
        eval_mb_size: int | None = 1024,
        device: str | torch.device = "cpu",
        plugins: Sequence[SupervisedPlugin] | None = None,
        evaluator: EvaluationPlugin | None = None,
        eval_every: int = -1,
        ignore_task_labels: bool = False,
        **base_kwargs,
    ) -> None:
        check_model(model, "KVBStrategy")
        _positive_int(train_mb_size, "train_mb_size")
        _positive_int(train_epochs, "train_epochs")
        if eval_mb_size is not None:
            _positive_int(eval_mb_size, "eval_mb_size")
        if optimizer is None and not (_real(lr) and lr > 0):
            raise ValueError(f"lr must be a number > 0, got {lr!r}")
        if not (_real(label_smoothing) and 0 <= label_smoothing < 1):
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        if clip_grad_norm is not None and clip_grad_norm <= 0:
            raise ValueError(f"clip_grad_norm must be > 0 or None, got {clip_grad_norm!r}")
        if optimizer is not None:
            check_sparse_optimizer(optimizer, model)
        self.ignore_task_labels = ignore_task_labels
        self.clip_grad_norm = clip_grad_norm
        if fused not in (None, True, False):
            raise ValueError(f"fused must be None (auto), True or False, got {fused!r}")
        self.fused, self._fused_step, self._step_said = fused, None, None
        self.training_step: str | None = None  # "fused" or "autograd": this experience's
        if optimizer is None:
            optimizer = SparseSGD([model.bottleneck.values], lr=lr)
        self.kvb = KVBPlugin(key_init_loader, key_fit, freeze_decoder, batch_size=train_mb_size)
        own = [self.kvb] if cache_codes is False else [self.kvb, FrozenCodesPlugin(cache_codes)]
        own.append(CountingRegimeWarning())
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

    def train(self, experiences, eval_streams=None, **kwargs):
        """Avalanche's ``train``, with the keys fitted first on the first experience when
        there is no ``key_init_loader`` (so an initial periodic evaluation has keys)."""
        experiences = as_experiences(experiences)
        for experience in experiences:  # before any work: key fitting included
            self._check_experience(experience)
        if experiences and not bool(self.model.bottleneck.keys_frozen):
            self.model.to(self.device)
            self.kvb.prepare(self.model, None if self.kvb.key_init_loader is not None
                             else experiences[0], self.device)
        return super().train(experiences, eval_streams, **kwargs)

    def _check_experience(self, experience) -> None:
        """Refuse task labels (unless ignored) and targets the decoder cannot score."""
        if not len(experience.dataset):
            return  # nothing to check (KVBPlugin names an empty experience it needs)
        labels = getattr(experience.dataset, "targets_task_labels", None)
        labels = labels.uniques if hasattr(labels, "uniques") else getattr(
            experience, "task_labels", None)
        tasks = sorted({int(t) for t in labels or [0]})
        if tasks != [0] and not self.ignore_task_labels:
            raise ValueError(
                f"experience {experience.current_experience} has task labels {tasks}: "
                "KVBStrategy is single-head and does not use them; pass "
                "ignore_task_labels=True to train one head over all classes anyway")
        targets = getattr(experience.dataset, "targets", None)
        if targets is not None:
            check_targets(torch.as_tensor(sorted(targets.uniques)
                                          if hasattr(targets, "uniques") else list(targets)),
                          self.model.num_classes,
                          f"experience {experience.current_experience}'s targets")

    # ---------------------------------------------------------------- the training step
    def _before_training_exp(self, **kwargs) -> None:
        super()._before_training_exp(**kwargs)
        why = "fused=False" if self.fused is False else why_not_fused(self)
        if why is not None and self.fused is True:
            raise ValueError(f"fused=True, but the fused step does not apply: {why}")
        self._fused_step = FusedVotingStep(self.model) if why is None else None
        self.training_step = "fused" if why is None else "autograd"
        said = "fused voting step" if why is None else f"autograd step ({why})"
        if said != self._step_said:
            log.info("KVBStrategy trains with the %s", said)
            self._step_said = said

    def _fusing(self) -> bool:
        return self._fused_step is not None and self.is_training

    def forward(self):
        if self._fusing():
            return self._fused_step.forward(self.mb_x)
        return super().forward()

    def criterion(self):
        if self.is_training:
            check_targets(self.mb_y, self.model.num_classes, "mb_y (the batch's targets)")
            if self.mb_y.dtype != torch.long:  # int16/int32 targets: both steps take int64
                self.mbatch[1] = self.mb_y.long()
        if self._fusing():
            return self._fused_step.loss(self.mb_output, self.mb_y,
                                         criterion_of(self).label_smoothing)
        return super().criterion()

    def backward(self) -> None:
        if self._fusing():
            self._fused_step.backward()
        else:
            super().backward()

    def optimizer_step(self) -> None:
        if self._fusing():
            self._fused_step.step(self.optimizer.param_groups[0]["lr"], self.clip_grad_norm)
            return
        if self.clip_grad_norm is not None:
            clip_grad_norm(self.model.parameters(), self.clip_grad_norm)
        super().optimizer_step()

    def _after_training_exp(self, **kwargs) -> None:
        super()._after_training_exp(**kwargs)
        self._fused_step = None  # holds the batch's codes and gradient buffers


class CountingRegimeWarning(SupervisedPlugin):
    """Says once per run (per strategy), through ``logging``, when training ended an
    experience in the counting regime (:data:`kvb_avalanche.metrics.COUNTING_REGIME`): the
    softmax stayed near uniform over the last epoch, so the values are per-key class counts.
    Later experiences in that regime are counted, not logged (an online stream has hundreds):
    ``experiences`` of ``trained`` so far, and :meth:`summary` says it with the count."""

    # counts start from these class values (a checkpoint of an older version has none)
    experiences = trained = 0

    def before_training_epoch(self, strategy, **kwargs) -> None:
        self._sum, self._count = 0.0, 0
        self._last = strategy.clock.train_exp_epochs == strategy.train_epochs - 1

    def after_training_iteration(self, strategy, **kwargs) -> None:
        if (self._last and isinstance(strategy.mb_output, torch.Tensor)
                and strategy.mb_output.dim() == 2):
            r = regime(strategy.mb_output)
            self._sum += float(r.sum())
            self._count += len(r)

    def after_training_exp(self, strategy, **kwargs) -> None:
        self.trained += 1
        if not (getattr(self, "_count", 0) and self._sum / self._count < COUNTING_REGIME):
            return
        self.experiences += 1
        exp, value = strategy.experience.current_experience, self._sum / self._count
        if self.experiences > 1:
            log.debug("KVB ended experience %d in the counting regime too (regime %.2g)",
                      exp, value)
            return
        log.warning(
            "KVB ended experience %d in the counting regime (regime %.2g < %g over its last "
            "epoch): the softmax stays near uniform, so each value holds its key's class "
            "counts and predictions are a vote of them; it cannot forget, nor learn beyond "
            "the counts. A larger lr, VotingDecoder(reduction='sum') or more epochs move "
            "it out (kvb_avalanche.metrics). Later experiences in this regime are counted, "
            "not logged.", exp, value, COUNTING_REGIME)

    def summary(self) -> str | None:
        """One line with the count, or None if no experience ended in the regime."""
        if not self.experiences:
            return None
        return (f"KVB ended {self.experiences} of {self.trained} training experiences in the "
                f"counting regime (regime < {COUNTING_REGIME})")


SPARSE_OPTIMIZERS = (SparseSGD, torch.optim.SGD, torch.optim.SparseAdam, torch.optim.Adagrad)


def check_sparse_optimizer(optimizer: torch.optim.Optimizer, model: KVBModel) -> None:
    """Refuse, at construction, a torch optimizer that cannot step on the sparse value
    gradients of ``KeyValueBottleneck(sparse_grad=True)`` (it would fail at the first step)."""
    values = model.bottleneck.values
    if (model.bottleneck.sparse_grad and values.requires_grad
            and type(optimizer).__module__.startswith("torch.optim")
            and not isinstance(optimizer, SPARSE_OPTIMIZERS)):
        raise ValueError(
            f"optimizer: {type(optimizer).__name__} cannot take the sparse value gradients of "
            "KeyValueBottleneck(sparse_grad=True); use SparseSGD, torch.optim.SGD, SparseAdam "
            "or Adagrad, or build the bottleneck with sparse_grad=False")


def check_targets(targets: torch.Tensor, num_classes: int | None, name: str) -> None:
    """Targets must be integer class indices in [0, num_classes) (num_classes None: >= 0)."""
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"{name} must be integer class indices, got {targets.dtype} "
                         f"(e.g. {targets.flatten()[:3].tolist()}); convert them with .long()")
    if targets.numel() == 0:
        return
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or (num_classes is not None and high >= num_classes):
        raise ValueError(f"{name} must lie in [0, {num_classes}) (the decoder's num_classes), "
                         f"got {low} to {high}")


def _real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _positive_int(value: object, name: str) -> None:
    """Any integer (NumPy's too), not a bool, at least 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


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
