"""The paper's 2-D toy (Träuble et al. 2023, Fig. 2): 8 Gaussian blobs learned 2 classes at a time.

Class-incremental in 4 stages, classes (0,4), (1,5), (2,6), (3,7); 100 samples a stage;
full-batch steps; one Adam optimiser (lr 1e-3) per strategy for the whole stream. KVB fits
its keys without labels on fresh uniform points of the unit square, then freezes them.
Baselines go through Avalanche on the same stream and the same evaluator.

    python benchmarks/toy_2d.py --out results/toy_2d --seeds 0 1 2

The same as ``kvb-avalanche toy-2d``; ``--help`` lists every flag.
"""

from __future__ import annotations

import sys

from kvb_avalanche.cli import main as cli


def main(argv: list[str] | None = None):
    """Run the toy; returns the results table (mean and std over seeds)."""
    return cli(["toy-2d", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
