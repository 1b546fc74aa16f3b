"""The paper's 2-D toy (Träuble et al. 2023, Fig. 2): 8 Gaussian blobs learned 2 classes at a time.

Class-incremental in 4 stages, classes (0,4), (1,5), (2,6), (3,7); 100 samples a stage;
full-batch steps; one Adam optimiser (lr 1e-3) per strategy for the whole stream. KVB fits
its keys without labels on fresh uniform points of the unit square, then freezes them.
Baselines go through Avalanche on the same stream and the same evaluator.

    python benchmarks/toy_2d.py --out results/toy_2d --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from avalanche.training.supervised import EWC, Naive, Replay  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.helpers import (  # noqa: E402
    MATRIX_COLUMNS,
    SUMMARY_COLUMNS,
    RunStore,
    atomic_write,
    make_evaluator,
    mean_std_table,
    plot_curves,
    run_stream,
    summarize,
    tensor_scenario,
    write_csv,
)
from kvb_avalanche import (  # noqa: E402
    KeyFitConfig,
    KeyValueBottleneck,
    KVBModel,
    KVBStrategy,
    VotingDecoder,
)

log = logging.getLogger("toy_2d")

NUM_CLASSES = 8
CLASS_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]
STRATEGIES = ["kvb_20x20", "kvb_1x400", "kvb_1x400_masked", "linear_probe", "naive_mlp",
              "ewc_mlp", "replay_mlp"]


def class_means(seed: int, min_gap: float = 0.2) -> torch.Tensor:
    """8 blob centres in [0.1, 0.9]^2, at least ``min_gap`` apart (seeded rejection sampling)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    means: list[torch.Tensor] = []
    while len(means) < NUM_CLASSES:
        m = 0.1 + 0.8 * torch.rand(2, generator=g)
        if all((m - o).norm() >= min_gap for o in means):
            means.append(m)
    return torch.stack(means)


def blobs(means: torch.Tensor, per_class: int, std: float, g: torch.Generator):
    """(inputs (n, 2), labels (n,)) with ``per_class`` points around each mean."""
    y = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    x = means[y] + std * torch.randn(len(y), 2, generator=g)
    return x, y


def make_kvb(kind: str, seed: int, args) -> tuple[KVBModel, list[torch.Tensor]]:
    """A KVB model and its unlabelled key-fitting batches (fresh uniform points)."""
    codebooks, pairs, projection = (20, 20, "random") if kind == "kvb_20x20" else (1, 400, "chunk")
    bn = KeyValueBottleneck(2, codebooks, pairs, 2, NUM_CLASSES, projection=projection,
                            values_init="randn", values_init_std=1e-3, seed=seed,
                            mask_unused_keys=kind.endswith("_masked"))
    g = torch.Generator().manual_seed(20_000 + seed)
    batches = [torch.rand(100, 2, generator=g) for _ in range(args.key_steps)]
    return KVBModel(None, bn, VotingDecoder(NUM_CLASSES)), batches


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, NUM_CLASSES))


def make_strategy(name: str, seed: int, args, evaluator):
    torch.manual_seed(seed)
    common = dict(train_mb_size=100, train_epochs=args.steps, eval_mb_size=1000,
                  evaluator=evaluator, criterion=nn.CrossEntropyLoss())
    if name.startswith("kvb"):
        model, batches = make_kvb(name, seed, args)
        adam = torch.optim.Adam([model.bottleneck.values], lr=args.lr)
        fit = KeyFitConfig(epochs=1, kmeans_start=False, seed=seed)
        return KVBStrategy(model=model, optimizer=adam, key_init_loader=batches, key_fit=fit,
                           clip_grad_norm=None, **common)
    model = nn.Linear(2, NUM_CLASSES) if name == "linear_probe" else mlp()
    adam = torch.optim.Adam(model.parameters(), lr=args.lr)
    if name in ("linear_probe", "naive_mlp"):
        return Naive(model=model, optimizer=adam, **common)
    if name == "ewc_mlp":
        return EWC(model=model, optimizer=adam, ewc_lambda=args.ewc_lambda, **common)
    return Replay(model=model, optimizer=adam, mem_size=args.replay_size, **common)


GRID = 100  # decision regions are stored as predictions on a GRID x GRID lattice


@torch.no_grad()
def region_predictions(model: nn.Module) -> list[int]:
    """Predicted class on a GRID x GRID lattice of the unit square (row-major, y up)."""
    axis = torch.linspace(0, 1, GRID)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
    model.eval()
    return model(grid).argmax(1).tolist()


def plot_regions(regions: dict[str, list[int]], data, path: Path) -> None:
    """Decision regions of each strategy's final model (first seed) over the unit square."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = data
    cols = 3
    fig, axes = plt.subplots(math.ceil(len(regions) / cols), cols, figsize=(9, 6), squeeze=False)
    for ax, (name, pred) in zip(axes.flat, regions.items(), strict=False):
        ax.imshow(torch.tensor(pred).reshape(GRID, GRID), origin="lower", extent=(0, 1, 0, 1),
                  cmap="tab10", vmin=0, vmax=9, alpha=0.45)
        ax.scatter(x[:, 0], x[:, 1], c=y, cmap="tab10", vmin=0, vmax=9, s=3)
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.flat[len(regions):]:
        ax.axis("off")
    fig.suptitle("decision regions after the last stage (first seed)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--strategies", nargs="+", default=STRATEGIES, choices=STRATEGIES)
    p.add_argument("--steps", type=int, default=1000, help="full-batch steps per stage")
    p.add_argument("--key-steps", type=int, default=1000, help="EMA steps fitting the keys")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (all strategies)")
    p.add_argument("--ewc-lambda", type=float, default=100.0)
    p.add_argument("--replay-size", type=int, default=100)
    p.add_argument("--std", type=float, default=0.035, help="blob standard deviation")
    p.add_argument("--overwrite", action="store_true",
                   help="discard results in --out from a different configuration")
    args = p.parse_args(argv)
    for name in ("steps", "key_steps", "replay_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, "
                    f"got {getattr(args, name)}")
    return args


def main(argv=None) -> pd.DataFrame:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    arguments = {k: v for k, v in sorted(vars(args).items()) if k not in ("out", "overwrite")}
    store = RunStore(args.out, arguments, args.overwrite)
    try:
        store.check()
    except ValueError as e:
        sys.stderr.write(f"toy_2d.py: error: {e}\n")
        raise SystemExit(2) from e
    store.open({})
    records = []
    for seed in args.seeds:
        g = torch.Generator().manual_seed(seed)
        means = class_means(seed)
        train = blobs(means, 50, args.std, g)  # 4 stages x 2 classes x 50 = 100 a stage
        test = blobs(means, 100, args.std, g)
        bench = tensor_scenario(train, test, CLASS_ORDER, num_experiences=4)
        for name in args.strategies:
            if (record := store.load(name, seed)) is None:
                start = time.perf_counter()
                strategy = make_strategy(name, seed, args, make_evaluator())
                matrix, train_s = run_stream(strategy, bench, name, seed)
                record = {"matrix": matrix, "train_seconds": train_s,
                          "regions": region_predictions(strategy.model)}
                store.save(name, seed, record)
                final = sum(r["accuracy"] for r in matrix if r["trained_through"] == 3) / 4
                log.info("seed %d %-16s final accuracy %.3f (%.1fs)", seed, name, final,
                         time.perf_counter() - start)
            records.append((name, seed, record))
        if seed == args.seeds[0]:
            regions = {name: r["regions"] for name, s, r in records if s == seed}
            plot_regions(regions, test, args.out / "decision_regions.png")
    matrix = pd.DataFrame([row for _, _, r in records for row in r["matrix"]],
                          columns=MATRIX_COLUMNS)
    timing = pd.DataFrame([{"strategy": name, "seed": seed, "train_seconds": r["train_seconds"]}
                           for name, seed, r in records])
    summary = summarize(matrix).merge(timing, on=["strategy", "seed"])[SUMMARY_COLUMNS]
    write_csv(matrix, args.out / "accuracy_matrix.csv")
    write_csv(summary, args.out / "summary.csv")
    plot_curves(matrix, args.out / "accuracy_curves.png",
                "2-D toy: accuracy on each stage as training proceeds")
    table = mean_std_table(summary, ["final_accuracy", "average_forgetting"])
    print(table.to_string(index=False, float_format="%.3f"))  # noqa: T201 (the CLI's output)
    return summary


if __name__ == "__main__":
    main()
