"""Split CIFAR-100 (50 experiences x 2 classes) on frozen embeddings: KVB vs Avalanche's baselines.

The paper's CIFAR-100 setting: keys fitted without labels on CIFAR-10 embeddings, values of
100 classes; every strategy of ``split_cifar10.py``, through the same runner and evaluator.

    python benchmarks/split_cifar100.py --out results/split_cifar100 --seeds 0 1 2 \\
        --data-root ../shared/data

The same as ``kvb-avalanche split-cifar100``; ``--help`` lists every flag.
"""

from __future__ import annotations

import sys

from kvb_avalanche.cli import main as cli


def main(argv: list[str] | None = None):
    """Run the benchmark; returns the results table (mean and std over seeds)."""
    return cli(["split-cifar100", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
