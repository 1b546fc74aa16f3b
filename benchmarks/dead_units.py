"""Dead hidden units of the MLP-head baselines along a split CIFAR stream.

On split CIFAR-100 (50 x 2 classes) naive, LwF and replay with the MLP head (1280-128-C,
ReLU, Adam lr 1e-3, as on split CIFAR-10) stop learning even the experience they are
trained on. This measures why: after each experience, the fraction of hidden units that
no test image activates, and the mean number active per image. The strategies are built
by the benchmark's own registry and trained on its own stream, seed and class order.

    python benchmarks/dead_units.py --out results/split_cifar100/dead_units.csv \\
        --data-root ../shared/data --strategies naive lwf replay ewc
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from kvb_avalanche.benchmarks.embedded import tensor_scenario
from kvb_avalanche.experiments.config import QUICK, ExperimentConfig
from kvb_avalanche.experiments.runner import (
    RunOptions,
    Workbench,
    make_evaluator,
    seed_class_order,
)
from kvb_avalanche.experiments.strategies import STRATEGIES, BuildContext
from kvb_avalanche.io import atomic_write

log = logging.getLogger("dead_units")
MLP_STRATEGIES = ("naive", "ewc", "replay", "lwf")


def hidden_activity(model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(fraction of hidden units inactive on every row of x, mean active units per row) of
    the first Linear + ReLU of ``model``; x: (n, dim)."""
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    with torch.no_grad():
        h = torch.relu(first(x.to(first.weight.device)))  # (n, hidden)
    return float((h.amax(0) == 0).float().mean()), float((h > 0).float().sum(1).mean())


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="CSV file to write")
    parser.add_argument("--benchmark", default="split_cifar100",
                        choices=["split_cifar10", "split_cifar100"])
    parser.add_argument("--strategies", nargs="+", default=list(MLP_STRATEGIES),
                        choices=MLP_STRATEGIES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="the --quick preset's data")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    config = ExperimentConfig.for_benchmark(
        args.benchmark, seeds=(args.seed,), strategies=tuple(args.strategies),
        **(QUICK if args.quick else {}))
    data = Workbench(RunOptions(data_root=args.data_root, cache_dir=args.cache_dir,
                                progress=args.progress)).data(config)
    order = seed_class_order(config, args.seed)
    stream = tensor_scenario(data.train, data.test, order, config.n_experiences)
    rows = []
    for name in args.strategies:
        torch.manual_seed(args.seed)  # as the runner seeds each run
        strategy = STRATEGIES[name].build(BuildContext(
            config, args.seed, data.dim, config.num_classes, make_evaluator()))
        for t, experience in enumerate(tqdm(stream.train_stream, desc=name,
                                            disable=not args.progress)):
            strategy.train(experience, eval_streams=[])
            dead, active = hidden_activity(strategy.model, data.test[0])
            rows.append({"strategy": name, "seed": args.seed, "trained_through": t,
                         "dead_fraction": dead, "mean_active_units": active})
        log.info("%s: %.3f of the hidden units dead after the last experience, %.1f active "
                 "per test image", name, dead, active)
    table = pd.DataFrame(rows)
    atomic_write(args.out, lambda tmp: table.to_csv(tmp, index=False))
    return table


if __name__ == "__main__":
    main()
