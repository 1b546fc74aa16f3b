"""How many epochs does KVB need? Accuracy over epochs per experience, with and without masking.

Trains the split CIFAR-10 KVB (same data, keys, configuration and code cache as
``kvb-avalanche split-cifar10``) for each epoch count, class-incrementally and i.i.d.
(``kvb_joint``), and evaluates every trained model twice: searching all keys, and
searching only keys used in training (``--mask-unused-keys``). Also records the mean
|value| and the test loss, which show whether training left the softmax's linear regime.

    python benchmarks/kvb_epochs.py --out results/kvb_epochs --epoch-grid 1 10 100 \\
        --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

from kvb_avalanche.benchmarks import tensor_scenario
from kvb_avalanche.cli import add_config_flags, add_run_flags, config_from, options_from
from kvb_avalanche.experiments.config import QUICK, ExperimentConfig
from kvb_avalanche.experiments.reports import pyplot, savefig, summarize, write_csv
from kvb_avalanche.experiments.runner import Workbench, evaluate, make_evaluator, seed_class_order
from kvb_avalanche.experiments.strategies import STRATEGIES, BuildContext

log = logging.getLogger("kvb_epochs")


def evaluate_both(strategy, stream, name: str, seed: int, trained_through: int) -> list[dict]:
    """Rows for the model as trained, evaluated without and with masking of unused keys."""
    rows, bn = [], strategy.model.bottleneck
    for mask in (False, True):
        bn.mask_unused_keys = mask
        matrix = evaluate(strategy, stream, name, seed, trained_through)
        loss = strategy.evaluator.get_last_metrics()["Loss_Stream/eval_phase/test_stream"]
        rows += [{**asdict(r), "masked": mask, "test_loss": float(loss),
                  "mean_abs_value": float(bn.values.detach().abs().mean())} for r in matrix]
    bn.mask_unused_keys = False
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epoch-grid", type=int, nargs="+", default=[1, 10, 100])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="the --quick configuration")
    add_config_flags(p, ExperimentConfig, skip=("benchmark", "seeds", "strategies", "kvb_epochs"))
    add_run_flags(p)
    args = p.parse_args(argv)
    if any(e < 1 for e in args.epoch_grid):
        p.error("--epoch-grid takes positive integers")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    seed = args.seed
    config = config_from(args, ExperimentConfig, {**(QUICK if args.quick else {}),
                                                  "seeds": [seed], "strategies": ["kvb"]})
    bench = Workbench(options_from(args))
    data = bench.data(config)
    bottleneck, codes = bench.keys(config, seed)
    order = seed_class_order(config, seed)
    stream = tensor_scenario(data.train, data.test, order, config.n_experiences)
    joint = tensor_scenario(data.train, data.test, order, 1)
    last = config.n_experiences - 1

    def build(name: str, epochs: int):
        torch.manual_seed(seed)
        ctx = BuildContext(config.replace(kvb_epochs=epochs), seed, data.dim, config.num_classes,
                           make_evaluator(), copy.deepcopy(bottleneck), codes)
        return STRATEGIES[name].build(ctx)

    rows = []
    for epochs in sorted(set(args.epoch_grid)):
        strategy = build("kvb", epochs)
        start = time.perf_counter()
        for experience in stream.train_stream:
            strategy.train(experience, eval_streams=[])
        seconds = time.perf_counter() - start
        rows += [{"epochs": epochs, "train_seconds": seconds, **r}
                 for r in evaluate_both(strategy, stream, "kvb", seed, last)]
        log.info("kvb, %d epochs/experience: %.0f s", epochs, seconds)
    # i.i.d.: one run, evaluated whenever the cumulative epoch count reaches a grid point
    strategy, done, seconds = build("kvb_joint", config.kvb_epochs), 0, 0.0
    for epochs in sorted(set(args.epoch_grid)):
        strategy.train_epochs = epochs - done
        start = time.perf_counter()
        strategy.train(joint.train_stream[0], eval_streams=[])
        seconds += time.perf_counter() - start
        done = epochs
        rows += [{"epochs": epochs, "train_seconds": seconds, **r}
                 for r in evaluate_both(strategy, stream, "kvb_joint", seed, last)]
        log.info("kvb_joint, %d epochs: %.0f s", epochs, seconds)
    curve = []
    for (name, epochs, masked), g in pd.DataFrame(rows).groupby(["strategy", "epochs", "masked"]):
        curve.append({"strategy": name, "epochs": epochs, "masked": masked,
                      "final_accuracy": float(summarize(g).final_accuracy.iloc[0]),
                      "accuracy_on_first_experience":
                          float(g[g.evaluated_on == 0].accuracy.iloc[0]),
                      "test_loss": g.test_loss.iloc[0], "mean_abs_value": g.mean_abs_value.iloc[0],
                      "train_seconds": g.train_seconds.iloc[0]})
    curve = pd.DataFrame(curve)
    write_csv(curve, args.out / "curve.csv")
    plot(curve, args.out / "curve.png")
    print(curve.to_string(index=False, float_format="%.4f"))  # noqa: T201


def plot(curve: pd.DataFrame, path: Path) -> None:
    fig, ax = pyplot().subplots(figsize=(5, 3.4))
    for (name, masked), g in curve.groupby(["strategy", "masked"]):
        ax.plot(g.epochs, g.final_accuracy, marker="o", linestyle="--" if masked else "-",
                label=f"{name}{' (masked)' if masked else ''}")
    ax.set_xscale("log")
    ax.set_xlabel("epochs per experience")
    ax.set_ylabel("final accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    savefig(fig, path)


if __name__ == "__main__":
    main()
