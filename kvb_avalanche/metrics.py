"""KVB diagnostics as Avalanche metrics: keys in use, key sharing, value scale, the learning
regime, the training loss and the key-fitting churn, for any ``EvaluationPlugin`` beside
``accuracy_metrics``:

    EvaluationPlugin(accuracy_metrics(stream=True), *kvb_metrics(), loggers=[...])

Every Avalanche logger that logs all metric values (interactive, text, TensorBoard, WandB)
shows them with no extra code; Avalanche's ``CSVLogger`` writes only accuracy, loss and
forgetting, so :class:`MetricsCSVLogger` writes every value to one long CSV.

**The learning regime.** With cross-entropy, a logit's gradient is ``p - y`` (``p`` the
softmax, ``y`` the target). Split it as ``(u - y) + (p - u)`` with ``u`` the uniform
distribution: the first part does not depend on the model, the second does. While the
logits are small (the softmax's linear regime, which the paper's mean voting decoder at lr
0.3 never leaves: ``results/kvb_epochs``) ``p ~ u``, every step adds the same vector per
fetched key and class, and the values become per-key class counts: KVB votes counts.
:class:`LearningRegime` reports, averaged over an epoch's training samples,

    regime = ||p - u||_2 / ||onehot(y) - u||_2 = ||p - u||_2 / sqrt(1 - 1/C)

0 when the logits are all equal (pure counting), 1 when the softmax is one-hot on the
label (saturated). Below :data:`COUNTING_REGIME` (0.1) the value-dependent part is under a
tenth of the gradient: the counting regime, and ``KVBStrategy`` says so once per experience.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch
from avalanche.evaluation import PluginMetric
from avalanche.evaluation.metric_results import MetricValue
from avalanche.evaluation.metric_utils import get_metric_name
from avalanche.logging import BaseLogger
from torch import Tensor

from kvb_avalanche.bottleneck import KeyValueBottleneck
from kvb_avalanche.model import KVBModel
from kvb_avalanche.sparse import trained_value_scale

COUNTING_REGIME = 0.1


def regime(logits: Tensor) -> Tensor:
    """Per sample: ||softmax(logits) - uniform||_2 / sqrt(1 - 1/C), in [0, 1].

    logits: (batch, classes) -> (batch,)."""
    z = logits.detach().cpu().double().numpy()  # numpy: no thread pool for a small array
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    classes = z.shape[-1]
    distance = np.sqrt(((p - 1.0 / classes) ** 2).sum(axis=-1) / (1.0 - 1.0 / classes))
    return torch.from_numpy(distance)


def _bottleneck(strategy: Any) -> KeyValueBottleneck | None:
    model = getattr(strategy, "model", None)
    return model.bottleneck if isinstance(model, KVBModel) else None


class _KVBMetric(PluginMetric[float]):
    """A metric of a KVBModel's bottleneck; emits nothing for other models."""

    name = ""

    def __init__(self) -> None:
        super().__init__()
        self._last: float | None = None

    def result(self) -> float | None:
        return self._last

    def reset(self) -> None:
        self._last = None

    def _emit(self, strategy: Any, name: str, value: float, experience: bool = False,
              x: int | None = None) -> MetricValue:
        self._last = value
        full = get_metric_name(name, strategy, add_experience=experience, add_task=False)
        return MetricValue(self, full, value, strategy.clock.train_iterations if x is None else x)

    def __str__(self) -> str:
        return self.name


class _PerExperience(_KVBMetric):
    """Snapshots the key-usage counts when an experience starts, so what it selects is known."""

    def __init__(self) -> None:
        super().__init__()
        self._start: Tensor | None = None

    def before_training_exp(self, strategy: Any) -> None:
        bn = _bottleneck(strategy)
        self._start = None if bn is None else bn.key_usage.detach().clone()

    def _selected(self, strategy: Any) -> Tensor | None:
        """(codebooks, pairs) bool: the pairs this experience fetched in training."""
        bn = _bottleneck(strategy)
        if bn is None or self._start is None:
            return None
        return (bn.key_usage - self._start) > 0


class KeysInUse(_PerExperience):
    """The fraction of (codebook, key) pairs fetched in training: by each experience
    (``KeysInUse_Exp``) and by the stream so far (``KeysInUse_Stream``)."""

    name = "KeysInUse"

    def after_training_exp(self, strategy: Any) -> list[MetricValue] | None:
        selected = self._selected(strategy)
        if selected is None:
            return None
        ever = float((_bottleneck(strategy).key_usage > 0).float().mean())
        return [self._emit(strategy, "KeysInUse_Exp", float(selected.float().mean()), True),
                self._emit(strategy, "KeysInUse_Stream", ever)]


class KeySharing(_PerExperience):
    """Per experience: how many pairs it selects (``KeysSelected_Exp``) and the fraction of
    them that earlier experiences had already selected (``KeySharing_Exp``): which
    experiences share keys decides what a later one can overwrite."""

    name = "KeySharing"

    def __init__(self) -> None:
        super().__init__()
        self._before: Tensor | None = None  # pairs selected by earlier experiences

    def reset(self) -> None:  # the stream's history is kept across experiences
        self._last = None

    def after_training_exp(self, strategy: Any) -> list[MetricValue] | None:
        selected = self._selected(strategy)
        if selected is None:
            return None
        before = self._before if self._before is not None else torch.zeros_like(selected)
        n = int(selected.sum())
        shared = float((selected & before).sum()) / max(1, n)
        self._before = before | selected
        return [self._emit(strategy, "KeysSelected_Exp", float(n), True),
                self._emit(strategy, "KeySharing_Exp", shared, True)]


class ValueScale(_KVBMetric):
    """Mean and max |value| over the pairs trained so far, and the mean's growth since the
    previous epoch, after every training epoch; mean and max again at the end of each
    experience (``ValueScale_Mean_Exp``, ``ValueScale_Max_Exp``). In the linear regime the
    mean grows by the same amount every epoch."""

    name = "ValueScale"

    def __init__(self) -> None:
        super().__init__()
        self._previous: float | None = None

    @staticmethod
    def _scale(bn: KeyValueBottleneck) -> tuple[float, float]:
        return trained_value_scale(bn.values, bn.key_usage)

    def after_training_epoch(self, strategy: Any) -> list[MetricValue] | None:
        bn = _bottleneck(strategy)
        if bn is None:
            return None
        mean, largest = self._scale(bn)
        growth = mean - (self._previous if self._previous is not None else 0.0)
        self._previous = mean
        return [self._emit(strategy, "ValueScale_Mean", mean),
                self._emit(strategy, "ValueScale_Max", largest),
                self._emit(strategy, "ValueScale_Growth", growth)]

    def after_training_exp(self, strategy: Any) -> list[MetricValue] | None:
        bn = _bottleneck(strategy)
        if bn is None:
            return None
        mean, largest = self._scale(bn)
        return [self._emit(strategy, "ValueScale_Mean_Exp", mean, True),
                self._emit(strategy, "ValueScale_Max_Exp", largest, True)]


class _EpochMean(_KVBMetric):
    """A per-sample quantity averaged over each training epoch (``<name>_Epoch``), and over
    the experience's last epoch again at its end (``<name>_Exp``)."""

    def __init__(self) -> None:
        super().__init__()
        self._sum, self._count = 0.0, 0

    def _batch(self, strategy: Any) -> tuple[float, int] | None:
        """(sum over the minibatch's samples, their number), or None to skip it."""
        raise NotImplementedError

    def before_training_epoch(self, strategy: Any) -> None:
        self._sum, self._count = 0.0, 0

    def after_training_iteration(self, strategy: Any) -> None:
        if _bottleneck(strategy) is not None and (batch := self._batch(strategy)) is not None:
            self._sum += batch[0]
            self._count += batch[1]

    def after_training_epoch(self, strategy: Any) -> list[MetricValue] | None:
        if not self._count:
            return None
        return [self._emit(strategy, f"{self.name}_Epoch", self._sum / self._count)]

    def after_training_exp(self, strategy: Any) -> list[MetricValue] | None:
        if not self._count:
            return None
        return [self._emit(strategy, f"{self.name}_Exp", self._sum / self._count, True)]


class LearningRegime(_EpochMean):
    """The epoch's mean of :func:`regime` over the training samples (``Regime_Epoch``; the
    last epoch's again as ``Regime_Exp``): 0 in the softmax's linear (counting) regime, 1
    saturated. See the module's docstring."""

    name = "Regime"

    def _batch(self, strategy: Any) -> tuple[float, int] | None:
        if not isinstance(strategy.mb_output, Tensor):
            return None
        r = regime(strategy.mb_output)
        return float(r.sum()), len(r)


class TrainLoss(_EpochMean):
    """The training loss, averaged over the epoch's samples (``TrainLoss_Epoch``; the
    experience's last epoch again as ``TrainLoss_Exp``): whether the values learn more than
    counts shows in the loss falling below its value at uniform logits, log(C)."""

    name = "TrainLoss"

    def _batch(self, strategy: Any) -> tuple[float, int] | None:
        if not isinstance(strategy.loss, Tensor):
            return None
        n = len(strategy.mb_y)
        return float(strategy.loss.detach()) * n, n


class KeyFitChurn(_KVBMetric):
    """The keys replaced as dead codes in each EMA epoch of the key fitting
    (``KeysReplaced_KeyFit``, x = the EMA epoch), once, when the fitted keys are first seen."""

    name = "KeyFitChurn"

    def __init__(self) -> None:
        super().__init__()
        self._reported: dict | None = None  # the fit reported (by value: a checkpoint
        # restores an equal copy, which must not be reported again)

    def reset(self) -> None:
        self._last = None

    def before_training_exp(self, strategy: Any) -> list[MetricValue] | None:
        bn = _bottleneck(strategy)
        stats = getattr(bn, "fit_stats", None)
        if not stats or self._reported == stats:
            return None
        self._reported = dict(stats)
        return [self._emit(strategy, "KeysReplaced_KeyFit", float(n), x=epoch)
                for epoch, n in enumerate(stats["keys_replaced_per_epoch"])]


def kvb_metrics(key_usage: bool = True, key_sharing: bool = True, value_scale: bool = True,
                regime: bool = True, train_loss: bool = True, key_fit: bool = True
                ) -> list[PluginMetric]:
    """KVB's diagnostics, to pass to an ``EvaluationPlugin`` beside Avalanche's metrics."""
    chosen = [(key_usage, KeysInUse), (key_sharing, KeySharing), (value_scale, ValueScale),
              (regime, LearningRegime), (train_loss, TrainLoss), (key_fit, KeyFitChurn)]
    return [cls() for wanted, cls in chosen if wanted]


class MetricsCSVLogger(BaseLogger):
    """Every scalar metric value, as rows ``name, x, value`` of one CSV file (Avalanche's
    ``CSVLogger`` keeps accuracy, loss and forgetting only). A new logger starts the file
    afresh; one restored from a checkpoint goes on where the checkpoint left it."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", newline="")  # noqa: SIM115 (open for the run)
        self._writer = csv.writer(self._file)
        self._writer.writerow(["name", "x", "value"])

    def log_single_metric(self, name: str, value: Any, x_plot: int) -> None:
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, int | float) and not isinstance(value, bool):
            self._writer.writerow([name, x_plot, f"{value:.6g}"])
            self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __getstate__(self) -> dict:
        # a checkpoint reopens the file where it was: rows a killed run wrote after it go
        self._file.flush()
        state = {k: v for k, v in self.__dict__.items() if k not in ("_file", "_writer")}
        state["_position"] = self._file.tell()
        return state

    def __setstate__(self, state: dict) -> None:
        position = state.pop("_position")
        self.__dict__.update(state)
        self._file = open(self.path, "a", newline="")  # noqa: SIM115 (open for the run)
        self._file.truncate(position)
        self._writer = csv.writer(self._file)
