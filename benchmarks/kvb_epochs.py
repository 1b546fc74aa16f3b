"""How many epochs does KVB need? Accuracy over epochs per experience, with and without masking.

Trains the split CIFAR-10 KVB (same data, keys, configuration and code cache as
``split_cifar10.py``) for each epoch count, class-incrementally and i.i.d. (``kvb_joint``),
and evaluates every trained model twice: searching all keys, and searching only keys
used in training (``--mask-unused-keys``). Also records the mean |value| and the test
loss, which show whether training left the linear regime of the softmax.

    python benchmarks/kvb_epochs.py --out results/kvb_epochs --epoch-grid 1 10 100
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from benchmarks import split_cifar10 as sc  # noqa: E402
from benchmarks.helpers import evaluate, make_evaluator, summarize, tensor_scenario, write_csv  # noqa: E402
from kvb_avalanche import FrozenCodesPlugin  # noqa: E402
from kvb_avalanche.encoders import build_encoder  # noqa: E402

log = logging.getLogger("kvb_epochs")


def evaluate_both(strategy, stream, name, seed, trained_through) -> list[dict]:
    """Rows for the model as trained, evaluated without and with masking of unused keys."""
    rows = []
    bn = strategy.model.bottleneck
    for mask in (False, True):
        bn.mask_unused_keys = mask
        metrics_rows = evaluate(strategy, stream, name, seed, trained_through)
        loss = strategy.evaluator.get_last_metrics()["Loss_Stream/eval_phase/test_stream"]
        for r in metrics_rows:
            r.update(masked=mask, test_loss=float(loss),
                     mean_abs_value=float(bn.values.detach().abs().mean()))
        rows += metrics_rows
    bn.mask_unused_keys = False
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epoch-grid", type=int, nargs="+", default=[1, 10, 100])
    p.add_argument("--seed", type=int, default=0)
    own, rest = p.parse_known_args(argv)
    if any(e < 1 for e in own.epoch_grid):
        p.error("--epoch-grid takes positive integers")
    args = sc.parse_args(["--out", str(own.out), "--seeds", str(own.seed), *rest])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    encoder = build_encoder(args.encoder, args.weights)
    xtr, ytr, _ = sc.embeddings_for(args, encoder, "cifar10", "train", args.max_per_class)
    xte, yte, _ = sc.embeddings_for(args, encoder, "cifar10", "test",
                                    args.max_per_class and max(1, args.max_per_class // 2))
    key_data = None
    if args.key_init_data != "none":
        key_data = sc.embeddings_for(args, encoder, args.key_init_data, "train",
                                     20 if args.quick else None)[0]
    seed = own.seed
    order = sc.class_order(args, seed)
    first = xtr[torch.isin(ytr, torch.tensor(order[:2]))]
    bottleneck = sc.fitted_bottleneck(args, encoder.dim, key_data, first, seed)
    codes = FrozenCodesPlugin(progress=args.progress)
    stream = tensor_scenario((xtr, ytr), (xte, yte), order, sc.NUM_EXPERIENCES)
    joint = tensor_scenario((xtr, ytr), (xte, yte), order, 1)
    rows = []
    for epochs in sorted(set(own.epoch_grid)):
        torch.manual_seed(seed)
        run_args = copy.copy(args)
        run_args.kvb_epochs = epochs
        strategy = sc.make_strategy("kvb", run_args, encoder.dim, make_evaluator(), bottleneck,
                                    codes)
        start = time.perf_counter()
        for experience in stream.train_stream:
            strategy.train(experience, eval_streams=[])
        seconds = time.perf_counter() - start
        for r in evaluate_both(strategy, stream, "kvb", seed, sc.NUM_EXPERIENCES - 1):
            rows.append({"epochs": epochs, "train_seconds": seconds, **r})
        log.info("kvb, %d epochs/experience: %.0f s", epochs, seconds)
    # i.i.d.: one run, evaluated whenever the cumulative epoch count reaches a grid point
    torch.manual_seed(seed)
    strategy = sc.make_strategy("kvb_joint", args, encoder.dim, make_evaluator(), bottleneck,
                                codes)
    done, seconds = 0, 0.0
    for epochs in sorted(set(own.epoch_grid)):
        strategy.train_epochs = epochs - done
        start = time.perf_counter()
        strategy.train(joint.train_stream[0], eval_streams=[])
        seconds += time.perf_counter() - start
        done = epochs
        for r in evaluate_both(strategy, stream, "kvb_joint", seed, sc.NUM_EXPERIENCES - 1):
            rows.append({"epochs": epochs, "train_seconds": seconds, **r})
        log.info("kvb_joint, %d epochs: %.0f s", epochs, seconds)
    matrix = pd.DataFrame(rows)
    curve = []
    for (strategy_name, epochs, masked), g in matrix.groupby(["strategy", "epochs", "masked"]):
        s = summarize(g)
        curve.append({"strategy": strategy_name, "epochs": epochs, "masked": masked,
                      "final_accuracy": float(s.final_accuracy.iloc[0]),
                      "accuracy_on_first_experience":
                          float(g[g.evaluated_on == 0].accuracy.iloc[0]),
                      "test_loss": g.test_loss.iloc[0], "mean_abs_value": g.mean_abs_value.iloc[0],
                      "train_seconds": g.train_seconds.iloc[0]})
    curve = pd.DataFrame(curve)
    own.out.mkdir(parents=True, exist_ok=True)
    write_csv(curve, own.out / "curve.csv")
    plot(curve, own.out / "curve.png")
    print(curve.to_string(index=False, float_format="%.4f"))  # noqa: T201


def plot(curve: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for (name, masked), g in curve.groupby(["strategy", "masked"]):
        ax.plot(g.epochs, g.final_accuracy, marker="o",
                label=f"{name}{' (masked)' if masked else ''}",
                linestyle="--" if masked else "-")
    ax.set_xscale("log")
    ax.set_xlabel("epochs per experience")
    ax.set_ylabel("final accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
