"""A sweep's tables and figures: one row per run with a column per swept field, final
accuracy and KVB's state against each swept field. Partial grids (failed or unfinished
runs) are drawn from what finished."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from kvb_avalanche.experiments.records import SUMMARY_COLUMNS, RunRecord
from kvb_avalanche.experiments.reports import (
    matrix_table,
    pyplot,
    savefig,
    summary_table,
    write_csv,
)
from kvb_avalanche.experiments.runner import is_reference
from kvb_avalanche.experiments.spec import SweepSpec, point_name
from kvb_avalanche.experiments.strategies import STRATEGIES

# KVB's state at the end of a run (empty for the baselines)
DIAGNOSTIC_COLUMNS = {
    "keys_in_use": "keys in use (fraction of pairs trained)",
    "value_scale_mean": "mean |value| over trained pairs",
    "train_loss": "last epoch's training loss",
    "key_fit_seconds": "key fitting wall time (s)",
}


def kvb_columns(record: RunRecord) -> dict[str, float | None]:
    """A bottleneck run's :data:`DIAGNOSTIC_COLUMNS`, from its last experience's
    diagnostics and its keys' fit; None where the run has none."""
    rows = record.extra.get("kvb_diagnostics") or [{}]
    last, fit = rows[-1], record.extra.get("key_fit") or {}
    return {"keys_in_use": last.get("keys_in_use_stream"),
            "value_scale_mean": last.get("value_scale_mean"),
            "train_loss": last.get("train_loss"), "key_fit_seconds": fit.get("seconds")}


def sweep_tables(spec: SweepSpec, records: dict[tuple, RunRecord]
                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(summary, accuracy matrix) of the whole grid, one column per swept field first."""
    summaries, matrices = [], []
    for point, _ in spec.points():
        recs = [r for (name, _, _), r in records.items() if name == point_name(point)]
        if not recs:
            continue
        matrix = matrix_table(recs, spec.strategies)
        summary = summary_table(recs, matrix)
        joint = summary.strategy.map(lambda s: STRATEGIES[s].joint)
        summary.loc[joint.astype(bool), "average_forgetting"] = float("nan")
        diagnostics = {(r.strategy, r.seed): kvb_columns(r) for r in recs}
        for column in DIAGNOSTIC_COLUMNS:  # floats, NaN for a baseline (never objects)
            values = [diagnostics[k][column]
                      for k in zip(summary.strategy, summary.seed, strict=True)]
            summary[column] = [float("nan") if v is None else float(v) for v in values]
        for table, dest in ((summary, summaries), (matrix, matrices)):
            for i, (name, value) in enumerate(point.items()):
                table.insert(i, name, [value] * len(table))
            dest.append(table)
    columns = list(spec.grid)
    summary = (pd.concat(summaries, ignore_index=True) if summaries
               else pd.DataFrame(columns=columns + SUMMARY_COLUMNS + list(DIAGNOSTIC_COLUMNS)))
    matrix = pd.concat(matrices, ignore_index=True) if matrices else pd.DataFrame()
    return summary, matrix


def write_sweep_reports(out: Path, spec: SweepSpec, records: dict[tuple, RunRecord]
                        ) -> pd.DataFrame:
    summary, matrix = sweep_tables(spec, records)
    write_csv(summary, out / "summary.csv")
    write_csv(matrix, out / "accuracy_matrix.csv")
    if len(summary) and spec.grid:
        plot_sweep(summary, list(spec.grid), out / "sweep.png")
        plot_sweep_diagnostics(summary, list(spec.grid), out / "sweep_diagnostics.png")
    return summary


def _axis(summary: pd.DataFrame, name: str) -> tuple[list, dict, bool]:
    """The swept field's values, their x positions, and whether they are numbers."""
    values = list(dict.fromkeys(summary[name]))
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    return values, {v: (v if numeric else i) for i, v in enumerate(values)}, numeric


def _curves(ax, summary: pd.DataFrame, name: str, others: list[str], column: str,
            references: bool = True) -> None:
    """``column`` against the swept field ``name``: per strategy (and setting of the other
    swept fields) the seed mean, the seeds' min-max as a band; references as lines."""
    values, position, numeric = _axis(summary, name)
    for key, g in summary.groupby(["strategy", *others], sort=False):
        key = key if isinstance(key, tuple) else (key,)
        if g[column].isna().all():
            continue
        label = ", ".join([str(key[0])] + [f"{o}={v}" for o, v in zip(others, key[1:],
                                                                   strict=True)])
        if is_reference(key[0], name):
            if references:
                per_seed = g.groupby("seed")[column].first()
                line = ax.axhline(per_seed.mean(), ls="--", lw=1.2, color="0.35"
                                  if STRATEGIES[key[0]].joint else "0.6")
                ax.axhspan(per_seed.min(), per_seed.max(), color=line.get_color(), alpha=0.12)
                line.set_label(f"{label} (reference)")
            continue
        stats = g.groupby(name, sort=False)[column].agg(["mean", "min", "max"])
        stats = stats.reindex([v for v in values if v in stats.index])
        x = [position[v] for v in stats.index]
        ax.plot(x, stats["mean"], marker="o", ms=4, label=label)
        ax.fill_between(x, stats["min"], stats["max"], alpha=0.15)
    if numeric and min(values) > 0 and max(values) / min(values) >= 8:
        ax.set_xscale("log", base=2)
    labels = [f"{v:g}" if numeric else str(v) for v in values]  # 300000.0 -> 300000
    ax.set_xticks([position[v] for v in values], labels,
                  rotation=30 if sum(map(len, labels)) > 20 else 0)
    ax.minorticks_off()
    ax.set_xlabel(name)
    ax.grid(alpha=0.3)


def plot_sweep(summary: pd.DataFrame, fields: list[str], path: Path) -> None:
    """Final accuracy against each swept field (a row each): class-incremental and i.i.d.
    strategies side by side, every reference (a strategy the field does not touch) drawn
    as a dashed line in both with its seeds' range."""
    plt = pyplot()
    joint = summary.strategy.map(lambda s: STRATEGIES[s].joint).astype(bool)
    settings = [(title, mask) for title, mask in (("class-incremental", ~joint),
                                                  ("i.i.d. (joint)", joint)) if mask.any()]
    fig, axes = plt.subplots(len(fields), len(settings), squeeze=False,
                             figsize=(4.6 * len(settings), 3.6 * len(fields)))
    for row, name in zip(axes, fields, strict=True):
        others = [f for f in fields if f != name]
        refs = summary[[is_reference(s, name) for s in summary.strategy]]
        for ax, (title, mask) in zip(row, settings, strict=True):
            own = summary[mask & ~summary.index.isin(refs.index)]
            _curves(ax, pd.concat([own, refs]), name, others, "final_accuracy")
            ax.set_title(title, fontsize=10)
            ax.set_ylabel("final accuracy")
            ax.set_ylim(0, 1)
            ax.legend(fontsize=7)
    fig.tight_layout()
    savefig(fig, path)


def plot_sweep_diagnostics(summary: pd.DataFrame, fields: list[str], path: Path) -> None:
    """Average forgetting and KVB's state at the end of its runs (training loss, mean
    |value|, keys in use) against each swept field, for the columns that have values."""
    columns = {"average_forgetting": "average forgetting",
               **{c: DIAGNOSTIC_COLUMNS[c] for c in ("train_loss", "value_scale_mean",
                                                     "keys_in_use")}}
    columns = {c: t for c, t in columns.items() if summary[c].notna().any()}
    if not columns:
        return
    plt = pyplot()
    fig, axes = plt.subplots(len(fields), len(columns), squeeze=False,
                             figsize=(4.2 * len(columns), 3.4 * len(fields)))
    for row, name in zip(axes, fields, strict=True):
        others = [f for f in fields if f != name]
        for ax, (column, title) in zip(row, columns.items(), strict=True):
            _curves(ax, summary, name, others, column, references=False)
            ax.set_title(title, fontsize=10)
            if ax.get_legend_handles_labels()[0]:  # a panel only baselines reach is empty
                ax.legend(fontsize=7)
    fig.tight_layout()
    savefig(fig, path)


