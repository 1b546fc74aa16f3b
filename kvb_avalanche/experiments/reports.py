"""Tables and figures from run records: summaries, accuracy matrices, key sharing, forgetting
curves, the paper's claims checked on our numbers, and the 2-D toy's decision regions.

Every writer takes records (or tables) and a folder, and writes atomically; ``kvb-avalanche
report DIR`` redraws them all from ``DIR/runs``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from kvb_avalanche.experiments.records import (
    MATRIX_COLUMNS,
    SUMMARY_COLUMNS,
    KeySharingRow,
    RunRecord,
)
from kvb_avalanche.io import atomic_write


def write_csv(df: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False, float_format="%.6g"))


def savefig(fig, path: Path, dpi: int = 120) -> None:
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    plt.close(fig)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------- tables
def matrix_table(records: Sequence[RunRecord], order: Sequence[str] = ()) -> pd.DataFrame:
    """All accuracy-matrix rows, strategies in ``order`` (then by name), then seeds."""
    matrix = pd.DataFrame([dataclasses.asdict(r) for rec in records for r in rec.matrix],
                          columns=MATRIX_COLUMNS)
    rank = {s: i for i, s in enumerate(order)}
    return matrix.sort_values(
        ["strategy", "seed", "trained_through", "evaluated_on"],
        key=lambda c: c.map(lambda s: (rank.get(s, len(rank)), s)) if c.name == "strategy" else c,
    ).reset_index(drop=True)


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
    return pd.DataFrame(out, columns=["strategy", "seed", "final_accuracy", "average_forgetting"])


def summary_table(records: Sequence[RunRecord], matrix: pd.DataFrame) -> pd.DataFrame:
    """summarize() with each run's training seconds."""
    summary = summarize(matrix)
    seconds = {(r.strategy, r.seed): r.train_seconds for r in records}
    summary["train_seconds"] = [seconds[k] for k in zip(summary.strategy, summary.seed,
                                                         strict=True)]
    return summary[SUMMARY_COLUMNS]


def mean_std_table(summary: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Mean and std over seeds per strategy, in first-seen strategy order."""
    order = list(dict.fromkeys(summary["strategy"]))
    agg = summary.groupby("strategy")[list(columns)].agg(["mean", "std"]).reindex(order)
    agg.columns = [f"{c}_{s}" for c, s in agg.columns]
    return agg.reset_index()


def _per_experience(metrics: dict[str, tuple[list, list]], prefix: str) -> dict[int, float]:
    """An experience-level training metric's last value per experience id."""
    return {int(name.rsplit("Exp", 1)[1]): values[-1] for name, (_, values) in metrics.items()
            if name.startswith(prefix + "/train_phase/")}


def _stream(metrics: dict[str, tuple[list, list]], prefix: str) -> list[float]:
    """A stream-level training metric's values, one per time it was emitted."""
    return next((values for name, (_, values) in metrics.items()
                 if name.startswith(prefix + "/train_phase/")), [])


def key_sharing_rows(strategy: str, seed: int, metrics: dict[str, tuple[list, list]]
                     ) -> list[KeySharingRow]:
    """Per experience, from the KVB metrics an evaluator logged (``get_all_metrics()``): the
    pairs it selects, the share already selected before, the share selected so far. Empty
    where the evaluator had no such metrics."""
    selected = _per_experience(metrics, "KeysSelected_Exp")
    shared = _per_experience(metrics, "KeySharing_Exp")
    ever = _stream(metrics, "KeysInUse_Stream")
    return [KeySharingRow(strategy, seed, t, int(selected[t]), float(shared[t]), float(ever[t]))
            for t in sorted(selected)]


def diagnostics_rows(strategy: str, seed: int, metrics: dict[str, tuple[list, list]]
                     ) -> list[dict]:
    """Per experience, KVB's diagnostics at its end: keys in use (by it, and so far), key
    sharing, value scale (mean, max |value| over trained pairs), the learning regime and the
    last epoch's training loss."""
    columns = {"keys_in_use_experience": _per_experience(metrics, "KeysInUse_Exp"),
               "key_sharing": _per_experience(metrics, "KeySharing_Exp"),
               "value_scale_mean": _per_experience(metrics, "ValueScale_Mean_Exp"),
               "value_scale_max": _per_experience(metrics, "ValueScale_Max_Exp"),
               "regime": _per_experience(metrics, "Regime_Exp"),
               "train_loss": _per_experience(metrics, "TrainLoss_Exp")}
    ever = _stream(metrics, "KeysInUse_Stream")
    return [{"strategy": strategy, "seed": seed, "experience": t,
             "keys_in_use_stream": ever[t] if t < len(ever) else None,
             **{k: v.get(t) for k, v in columns.items()}}
            for t in sorted(columns["value_scale_mean"])]


# ---------------------------------------------------------------------------- claims
def expectations(summary: pd.DataFrame, matrix: pd.DataFrame,
                 setting: str = "class-incremental") -> pd.DataFrame:
    """The paper's claims on a split benchmark, checked on the seed means: PASS / FAIL / n/a.
    Domain-incrementally, the class-incremental claim that a naive learner scores nothing
    on the first experience at the end does not apply (its classes come back), and is left
    out."""
    final = summary.groupby("strategy").final_accuracy.mean()
    forgetting = summary.groupby("strategy").average_forgetting.mean()
    last = matrix.trained_through.max()
    first_exp = matrix[(matrix.trained_through == last) & (matrix.evaluated_on == 0)]
    first_exp = first_exp.groupby("strategy").accuracy.mean()
    rows = []

    def claim(text, needs, value, goal, ok):
        have = all(n in final.index for n in needs)
        rows.append({"claim": text, "value": round(float(value()), 4) if have else None,
                     "goal": goal, "status": ("PASS" if ok() else "FAIL") if have else "n/a"})

    claim("kvb final accuracy / kvb_joint's", ["kvb", "kvb_joint"],
          lambda: final.kvb / final.kvb_joint, ">= 0.9", lambda: final.kvb >= 0.9 * final.kvb_joint)
    for name in ("naive", "linear_probe") if setting == "class-incremental" else ():
        claim(f"{name}: accuracy on experience 0 after the last one", [name],
              lambda n=name: first_exp[n], "<= 0.10", lambda n=name: first_exp[n] <= 0.10)
    claim("kvb average forgetting / naive's", ["kvb", "naive"],
          lambda: (forgetting.kvb / forgetting.naive if forgetting.naive else math.nan),
          "<= 1/3",
          lambda: forgetting.kvb <= forgetting.naive / 3)
    for name in ("naive", "linear_probe", "ewc", "lwf"):
        claim(f"kvb final accuracy - {name}'s", ["kvb", name],
              lambda n=name: final.kvb - final[n], "> 0", lambda n=name: final.kvb > final[n])
    claim("kvb final accuracy - joint_linear's", ["kvb", "joint_linear"],
          lambda: final.kvb - final.joint_linear, ">= -0.05",
          lambda: final.kvb >= final.joint_linear - 0.05)
    from kvb_avalanche.experiments.strategies import FROZEN_FEATURE

    frozen = [s for s in FROZEN_FEATURE if s in final.index]
    best = max(frozen, key=lambda s: final[s]) if frozen else None
    claim(f"kvb final accuracy - the strongest frozen-feature baseline's ({best or 'none run'})",
          ["kvb", *([best] if best else ["a frozen-feature baseline"])],
          lambda: final.kvb - final[best], ">= 0", lambda: final.kvb >= final[best])
    return pd.DataFrame(rows, columns=["claim", "value", "goal", "status"])


# ---------------------------------------------------------------------------- figures
def _strategy_panels(matrix: pd.DataFrame, size: tuple[float, float], xlabel: str,
                     ylabel: str, **subplots: Any) -> tuple[Any, Any, list[tuple[Any, str]]]:
    """A grid of panels, one per strategy of ``matrix`` (at most 4 a row), axes labelled
    on the outer edge; returns the figure, the axes and (panel, strategy) pairs."""
    plt = pyplot()
    strategies = list(dict.fromkeys(matrix["strategy"]))
    cols = min(4, len(strategies))
    rows = -(-len(strategies) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows),
                             squeeze=False, **subplots)
    for ax in axes.flat[len(strategies):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel(xlabel)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    return fig, axes, list(zip(axes.flat, strategies, strict=False))


def plot_curves(matrix: pd.DataFrame, path: Path, title: str) -> None:
    """One panel per strategy: accuracy on each experience as training proceeds (seed mean)."""
    fig, axes, panels = _strategy_panels(matrix, (3.2, 2.7), "trained through experience",
                                         "accuracy", sharex=True, sharey=True)
    for ax, name in panels:
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
    axes.flat[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(title)
    fig.tight_layout()
    savefig(fig, path)


def plot_heatmaps(matrix: pd.DataFrame, path: Path, title: str) -> None:
    """One panel per strategy: the accuracy matrix (seed mean) as a heat map, rows the
    experience trained through, columns the experience evaluated on; readable where curves
    are not (50 experiences)."""
    fig, axes, panels = _strategy_panels(matrix, (3.4, 3.2), "evaluated on experience",
                                         "trained through")
    image = None
    for ax, name in panels:
        grid = (matrix[matrix.strategy == name]
                .groupby(["trained_through", "evaluated_on"])["accuracy"].mean()
                .unstack("evaluated_on"))  # (trained_through, evaluated_on)
        image = ax.imshow(grid.to_numpy(), vmin=0, vmax=1, cmap="viridis", origin="upper",
                          interpolation="nearest", aspect="auto")
        ax.set_title(name, fontsize=10)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="accuracy")
    fig.suptitle(title)
    savefig(fig, path)


def plot_final(summary: pd.DataFrame, path: Path, classes: int) -> None:
    """Final accuracy per strategy: seed mean as a bar, each seed as a dot."""
    plt = pyplot()
    names = list(dict.fromkeys(summary.strategy))
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(names), 3.2))
    for i, name in enumerate(names):
        acc = summary[summary.strategy == name].final_accuracy
        ax.bar(i, acc.mean(), color="tab:orange" if name.startswith("kvb") else "tab:blue",
               alpha=0.7)
        ax.scatter([i] * len(acc), acc, color="k", s=10, zorder=3)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylabel(f"final accuracy (all {classes} classes)")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    savefig(fig, path)


def plot_regions(regions: dict[str, list[int]], points: tuple[torch.Tensor, torch.Tensor],
                 path: Path, grid: int) -> None:
    """Decision regions (predictions on a grid x grid lattice) of each strategy's final model
    over the unit square, with the test points."""
    plt = pyplot()
    x, y = points
    cols = 3
    fig, axes = plt.subplots(math.ceil(len(regions) / cols), cols, figsize=(9, 6), squeeze=False)
    for ax, (name, pred) in zip(axes.flat, regions.items(), strict=False):
        ax.imshow(torch.tensor(pred).reshape(grid, grid), origin="lower", extent=(0, 1, 0, 1),
                  cmap="tab10", vmin=0, vmax=9, alpha=0.45)
        ax.scatter(x[:, 0], x[:, 1], c=y, cmap="tab10", vmin=0, vmax=9, s=3)
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.flat[len(regions):]:
        ax.axis("off")
    fig.suptitle("decision regions after the last stage (first seed)")
    fig.tight_layout()
    savefig(fig, path, dpi=110)


def plot_diagnostics(diagnostics: pd.DataFrame, path: Path, title: str) -> None:
    """KVB's diagnostics over experiences (seed mean, seeds' min-max): keys in use, key
    sharing, value scale, learning regime; one line per KVB strategy."""
    from kvb_avalanche.metrics import COUNTING_REGIME

    plt = pyplot()
    panels = [("keys in use", ["keys_in_use_experience", "keys_in_use_stream"], False),
              ("keys shared with earlier experiences", ["key_sharing"], False),
              ("|value| over trained pairs", ["value_scale_mean", "value_scale_max"], True),
              ("learning regime (0: counting)", ["regime"], True)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.2))
    for ax, (label, columns, log) in zip(axes, panels, strict=True):
        for (name, column), style in zip(
                [(n, c) for n in dict.fromkeys(diagnostics.strategy) for c in columns],
                ["-", "--", ":", "-."] * 4, strict=False):
            g = diagnostics[diagnostics.strategy == name].groupby("experience")[column]
            stats = g.agg(["mean", "min", "max"]).astype(float)
            ax.plot(stats.index, stats["mean"], marker="o", ms=3, linestyle=style,
                    label=f"{name}: {column.replace('_', ' ')}")
            ax.fill_between(stats.index, stats["min"], stats["max"], alpha=0.15)
        if "regime" in columns:
            ax.axhline(COUNTING_REGIME, color="grey", linewidth=0.8, linestyle=":",
                       label="counting-regime threshold")
        if log:
            ax.set_yscale("log")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("experience")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    savefig(fig, path)


# ---------------------------------------------------------------------------- one folder
def write_split_reports(out: Path, records: Sequence[RunRecord], strategies: Sequence[str],
                        joint: set[str], title: str, classes: int,
                        setting: str = "class-incremental") -> pd.DataFrame:
    """Every table and figure of a split benchmark's folder; returns the mean/std table."""
    matrix = matrix_table(records, strategies)
    summary = summary_table(records, matrix)
    summary.loc[summary.strategy.isin(joint), "average_forgetting"] = float("nan")
    write_csv(matrix, out / "accuracy_matrix.csv")
    write_csv(summary, out / "summary.csv")
    sharing = pd.DataFrame([dataclasses.asdict(r) for rec in records for r in rec.key_sharing])
    if len(sharing):
        write_csv(sharing, out / "key_sharing.csv")
    curves = matrix[~matrix.strategy.isin(joint)]
    if len(curves) and curves.evaluated_on.nunique() > 10:
        plot_heatmaps(curves, out / "accuracy_heatmaps.png",
                      f"{title}: accuracy matrix (seed mean)")
    elif len(curves):
        plot_curves(curves, out / "forgetting_curves.png",
                    f"{title}: accuracy on each experience as training proceeds")
    diagnostics = pd.DataFrame([row for rec in records
                                for row in rec.extra.get("kvb_diagnostics", [])])
    if len(diagnostics):
        write_csv(diagnostics, out / "kvb_diagnostics.csv")
        plot_diagnostics(diagnostics[~diagnostics.strategy.isin(joint)],
                         out / "kvb_diagnostics.png", f"{title}: KVB diagnostics")
    plot_final(summary, out / "final_accuracy.png", classes)
    table = mean_std_table(summary, ["final_accuracy", "average_forgetting", "train_seconds"])
    write_csv(table, out / "summary_mean_std.csv")
    write_csv(expectations(summary, matrix, setting), out / "expectations.csv")
    return table


def write_toy_reports(out: Path, records: Sequence[RunRecord], strategies: Sequence[str]
                      ) -> pd.DataFrame:
    """The toy's tables and accuracy curves; returns the mean/std table."""
    matrix = matrix_table(records, strategies)
    summary = summary_table(records, matrix)
    write_csv(matrix, out / "accuracy_matrix.csv")
    write_csv(summary, out / "summary.csv")
    plot_curves(matrix, out / "accuracy_curves.png",
                "2-D toy: accuracy on each stage as training proceeds")
    return mean_std_table(summary, ["final_accuracy", "average_forgetting"])
