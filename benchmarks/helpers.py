"""Shared benchmark glue: tensor scenarios, the common evaluator, running a stream, tables, plots.

Every strategy of a benchmark goes through :func:`run_stream` with an evaluator from
:func:`make_evaluator`, so KVB and the baselines are measured by exactly the same code.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import torch
from avalanche.benchmarks.scenarios import class_incremental_benchmark
from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics, loss_metrics
from avalanche.logging import BaseLogger
from avalanche.training.plugins import EvaluationPlugin
from torch.utils.data import TensorDataset

from kvb_avalanche.checkpoint import maybe_load_checkpoint, save_checkpoint
from kvb_avalanche.io import atomic_write

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = ["strategy", "seed", "final_accuracy", "average_forgetting", "train_seconds"]
MATRIX_COLUMNS = ["strategy", "seed", "trained_through", "evaluated_on", "accuracy"]
_EXP_ACC = re.compile(r"^Top1_Acc_Exp/eval_phase/test_stream/(?:Task\d+/)?Exp(\d+)$")


def tensor_dataset(x: torch.Tensor, y: torch.Tensor) -> TensorDataset:
    """A TensorDataset with the ``targets`` list Avalanche's class splitting reads."""
    ds = TensorDataset(x, y)
    ds.targets = y.tolist()
    return ds


def tensor_scenario(
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    class_order: Sequence[int],
    num_experiences: int,
):
    """A class-incremental Avalanche benchmark over (inputs, labels) tensors."""
    return class_incremental_benchmark(
        {"train": tensor_dataset(*train), "test": tensor_dataset(*test)},
        class_order=list(class_order),
        num_experiences=num_experiences,
    )


def make_evaluator(loggers: Sequence[BaseLogger] = ()) -> EvaluationPlugin:
    """Accuracy and forgetting at experience and stream level, plus the stream loss."""
    return EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True),
        forgetting_metrics(experience=True, stream=True),
        loss_metrics(stream=True),
        loggers=list(loggers),
    )


def evaluate(strategy, benchmark, name: str, seed: int, trained_through: int) -> list[dict]:
    """Accuracy-matrix rows: accuracy on every test experience, via the strategy's evaluator."""
    metrics = strategy.eval(benchmark.test_stream)
    accs = {int(m[1]): v for k, v in metrics.items() if (m := _EXP_ACC.match(k))}
    if len(accs) != len(benchmark.test_stream):
        raise RuntimeError(f"expected accuracy for every test experience, got {sorted(accs)}")
    return [{"strategy": name, "seed": seed, "trained_through": trained_through,
             "evaluated_on": j, "accuracy": float(accs[j])} for j in sorted(accs)]


def run_stream(
    strategy, benchmark, name: str, seed: int,
    after_experience: Callable[[int], None] | None = None,
    checkpoint: Path | None = None,
    state: dict | None = None,
) -> tuple[list[dict], float]:
    """Train on each experience in turn, evaluating the whole test stream after each.

    Returns accuracy-matrix rows and the training wall time in seconds (evaluation excluded).
    ``after_experience(t)`` is called after training on experience t, before its evaluation.

    With ``checkpoint``, the strategy, the rows so far and ``state`` (a dict the caller
    fills, e.g. from ``after_experience``) are saved there after every experience; a
    checkpoint found at the start is resumed from, restoring them (``state`` in place).
    """
    rows, train_seconds, start_at = [], 0.0, 0
    if checkpoint is not None:
        start_at, progress = maybe_load_checkpoint(strategy, checkpoint)
        if progress is not None:
            rows, train_seconds = progress["rows"], progress["train_seconds"]
            if state is not None:
                state.update(progress["state"])
            log.info("%s seed %d: resuming after experience %d from %s", name, seed,
                     start_at - 1, checkpoint)
    for t, experience in enumerate(benchmark.train_stream):
        if t < start_at:
            continue
        start = time.perf_counter()
        strategy.train(experience, eval_streams=[])
        train_seconds += time.perf_counter() - start
        if after_experience is not None:
            after_experience(t)
        rows += evaluate(strategy, benchmark, name, seed, t)
        if checkpoint is not None:
            save_checkpoint(strategy, checkpoint, extra={
                "rows": rows, "train_seconds": train_seconds, "state": state or {}})
    return rows, train_seconds


def summarize(matrix: pd.DataFrame) -> pd.DataFrame:
    """Final accuracy (mean over experiences after the last one) and average forgetting.

    Forgetting of experience j: its accuracy right after training on it minus its final
    accuracy, averaged over all but the last experience (as Avalanche's StreamForgetting);
    NaN for a strategy evaluated only at the end (joint training).
    """
    out = []
    for (strategy, seed), g in matrix.groupby(["strategy", "seed"], sort=False):
        acc = g.pivot(index="trained_through", columns="evaluated_on", values="accuracy")
        last = acc.index.max()
        final = acc.loc[last]
        forgetting = [acc.loc[j, j] - final[j] for j in acc.columns
                      if j < last and j in acc.index]
        out.append({
            "strategy": strategy, "seed": seed,
            "final_accuracy": float(final.mean()),
            "average_forgetting": (float(sum(forgetting) / len(forgetting)) if forgetting
                                   else float("nan")),
        })
    return pd.DataFrame(out)


def mean_std_table(summary: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Mean and std over seeds per strategy, in first-seen strategy order."""
    order = list(dict.fromkeys(summary["strategy"]))
    agg = summary.groupby("strategy")[list(columns)].agg(["mean", "std"]).reindex(order)
    agg.columns = [f"{c}_{s}" for c, s in agg.columns]
    return agg.reset_index()


def write_csv(df: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False, float_format="%.6g"))


def write_json(obj: dict, path: Path) -> None:
    def dump(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)

    atomic_write(path, dump)


class RunStore:
    """Finished (strategy, seed) runs of one configuration under ``OUT/runs/``.

    Each run is written atomically as soon as it finishes, so a killed sweep loses only the
    run in progress; re-running the same command loads what is done and runs the rest.
    ``OUT/config.json`` records the configuration: a different one is refused (naming the
    differing arguments) unless ``overwrite``, which discards the stored runs.
    """

    def __init__(self, out: Path, arguments: dict, overwrite: bool = False) -> None:
        self.out, self.arguments, self.overwrite = Path(out), arguments, overwrite
        self.runs = self.out / "runs"

    def check(self) -> None:
        """Raise ValueError if ``out`` holds runs of another configuration (writes nothing)."""
        config = self.out / "config.json"
        if self.overwrite or not config.exists():
            return
        previous = json.loads(config.read_text()).get("arguments", {})
        differ = sorted(k for k in set(previous) | set(self.arguments)
                        if previous.get(k) != self.arguments.get(k))
        if differ:
            shown = ", ".join(f"--{k.replace('_', '-')} ({previous.get(k)!r} -> "
                              f"{self.arguments.get(k)!r})" for k in differ)
            raise ValueError(f"--out {self.out} holds results of a different configuration: "
                             f"{shown}. Use another --out, or --overwrite to discard them.")

    def open(self, record: dict) -> None:
        """Create ``out`` and write config.json (with ``record`` beside the arguments)."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.overwrite:  # finished runs and the checkpoints of unfinished ones
            for f in [*self.runs.glob("*.json"), *(self.out / "checkpoints").glob("*.pt")]:
                f.unlink()
        write_json({"arguments": self.arguments, **record}, self.out / "config.json")

    def _path(self, strategy: str, seed: int) -> Path:
        return self.runs / f"{strategy}-seed{seed}.json"

    def load(self, strategy: str, seed: int) -> dict | None:
        path = self._path(strategy, seed)
        return json.loads(path.read_text()) if path.exists() else None

    def save(self, strategy: str, seed: int, result: dict) -> None:
        write_json(result, self._path(strategy, seed))


def plot_curves(matrix: pd.DataFrame, path: Path, title: str) -> None:
    """One panel per strategy: accuracy on each experience as training proceeds (seed mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = list(dict.fromkeys(matrix["strategy"]))
    cols = min(4, len(strategies))
    rows = -(-len(strategies) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.7 * rows), squeeze=False,
                             sharex=True, sharey=True)
    for ax, name in zip(axes.flat, strategies, strict=False):
        g = matrix[matrix.strategy == name]
        mean = g.groupby(["evaluated_on", "trained_through"])["accuracy"].agg(["mean", "std"])
        for j in sorted(g.evaluated_on.unique()):
            m = mean.loc[j]
            m = m[m.index >= j]  # from the moment the experience was learned
            ax.plot(m.index, m["mean"], marker="o", ms=3, label=f"exp {j}")
            ax.fill_between(m.index, m["mean"] - m["std"].fillna(0),
                            m["mean"] + m["std"].fillna(0), alpha=0.15)
        ax.set_title(name, fontsize=10)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(strategies):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("trained through experience")
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy")
    axes.flat[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
