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


def key_sharing_rows(strategy: str, seed: int, usage_after: list[torch.Tensor]
                     ) -> list[KeySharingRow]:
    """From key-usage counts (codebooks, pairs) after each experience: per experience, the
    pairs it selects, the share already selected before, and the share selected so far."""
    rows, before = [], torch.zeros_like(usage_after[0], dtype=torch.bool)
    previous = torch.zeros_like(usage_after[0])
    for t, usage in enumerate(usage_after):
        selected = (usage - previous) > 0
        n = int(selected.sum())
        rows.append(KeySharingRow(strategy, seed, t, n,
                                  float((selected & before).sum()) / max(1, n),
                                  float((before | selected).float().mean())))
        before |= selected
        previous = usage
    return rows


# ---------------------------------------------------------------------------- claims
def expectations(summary: pd.DataFrame, matrix: pd.DataFrame) -> pd.DataFrame:
    """The paper's claims on a split benchmark, checked on the seed means: PASS / FAIL / n/a."""
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
    for name in ("naive", "linear_probe"):
        claim(f"{name}: accuracy on experience 0 after the last one", [name],
              lambda n=name: first_exp[n], "<= 0.10", lambda n=name: first_exp[n] <= 0.10)
    claim("kvb average forgetting / naive's", ["kvb", "naive"],
          lambda: forgetting.kvb / forgetting.naive, "<= 1/3",
          lambda: forgetting.kvb <= forgetting.naive / 3)
    for name in ("naive", "linear_probe", "ewc", "lwf"):
        claim(f"kvb final accuracy - {name}'s", ["kvb", name],
              lambda n=name: final.kvb - final[n], "> 0", lambda n=name: final.kvb > final[n])
    claim("kvb final accuracy - joint_linear's", ["kvb", "joint_linear"],
          lambda: final.kvb - final.joint_linear, ">= -0.05",
          lambda: final.kvb >= final.joint_linear - 0.05)
    return pd.DataFrame(rows, columns=["claim", "value", "goal", "status"])


# ---------------------------------------------------------------------------- figures
def plot_curves(matrix: pd.DataFrame, path: Path, title: str) -> None:
    """One panel per strategy: accuracy on each experience as training proceeds (seed mean)."""
    plt = pyplot()
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


# ---------------------------------------------------------------------------- one folder
def write_split_reports(out: Path, records: Sequence[RunRecord], strategies: Sequence[str],
                        joint: set[str], title: str, classes: int) -> pd.DataFrame:
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
    if len(curves):
        plot_curves(curves, out / "forgetting_curves.png",
                    f"{title}: accuracy on each experience as training proceeds")
    plot_final(summary, out / "final_accuracy.png", classes)
    table = mean_std_table(summary, ["final_accuracy", "average_forgetting", "train_seconds"])
    write_csv(table, out / "summary_mean_std.csv")
    write_csv(expectations(summary, matrix), out / "expectations.csv")
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
