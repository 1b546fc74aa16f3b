"""Split CIFAR-10 (5 experiences x 2 classes) on frozen embeddings: KVB vs Avalanche's baselines.

Every strategy is an Avalanche strategy trained on the same cached embeddings of a frozen
pretrained encoder and measured by the same EvaluationPlugin after every experience on the
full CIFAR-10 test set. KVB's keys are fitted without labels on CIFAR-100 embeddings.

    python benchmarks/split_cifar10.py --out results/split_cifar10 --seeds 0 1 2 \\
        --data-root ../shared/data

The same as ``kvb-avalanche split-cifar10``; ``--help`` lists every flag. Each finished
(strategy, seed) is saved at once under OUT/runs/; a continual run is checkpointed after
an experience once 120 s have passed since its last checkpoint (``--checkpoint-every``; 0:
after every experience); re-running the same command resumes. See README.md ("Reproducibility
and resuming").
"""

from __future__ import annotations

import sys

from kvb_avalanche.cli import main as cli


def main(argv: list[str] | None = None):
    """Run the benchmark; returns the results table (mean and std over seeds)."""
    return cli(["split-cifar10", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
