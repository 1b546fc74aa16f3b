"""The README's table: every strategy's final accuracy on every committed benchmark folder
(seed mean ± std, from each folder's ``summary_mean_std.csv``), as Markdown.

    .venv/bin/python scripts/benchmark_table.py results/split_cifar10 results/split_cifar100 ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd


def column(folder: Path) -> tuple[str, dict[str, str]]:
    """A folder's heading (benchmark, online, seeds) and its strategies' cells."""
    config = json.loads((folder / "config.json").read_text())["config"]
    runs = pd.read_csv(folder / "summary.csv")
    seeds = runs.groupby("strategy").seed.nunique()
    table = pd.read_csv(folder / "summary_mean_std.csv").set_index("strategy")
    heading = config["benchmark"] + (" online" if config.get("online") else "")
    n = int(seeds.max())
    heading += f" ({n} seed{'s' if n > 1 else ''})"
    cells = {}
    for strategy, row in table.iterrows():
        std = row.final_accuracy_std
        cells[strategy] = (f"{row.final_accuracy_mean:.3f}" + (f" ± {std:.3f}"
                                                               if pd.notna(std) else ""))
    return heading, cells


def main(argv: list[str] | None = None) -> str:
    folders = [Path(a) for a in (sys.argv[1:] if argv is None else argv)]
    columns = [column(f) for f in folders]
    strategies = list(dict.fromkeys(s for _, cells in columns for s in cells))
    lines = ["| strategy | " + " | ".join(h for h, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for s in strategies:
        cells = [c.get(s, "–") for _, c in columns]
        name = f"**{s}**" if s == "kvb" else s
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    sys.stdout.write(text + "\n")
    return text


if __name__ == "__main__":
    main()
