"""Split CIFAR-10 (5 experiences x 2 classes) on frozen embeddings: KVB vs Avalanche's baselines.

Every strategy is an Avalanche strategy trained on the same cached embeddings of a frozen
pretrained encoder and measured by the same EvaluationPlugin after every experience on the
full CIFAR-10 test set. KVB's keys are fitted without labels on CIFAR-100 embeddings.

    python benchmarks/split_cifar10.py --out results/split_cifar10 --seeds 0 1 2

Each finished (strategy, seed) is saved at once under OUT/runs/; re-running the same
command resumes, skipping what is done. See README.md ("Reproducibility and resuming").
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from avalanche.logging import CSVLogger, InteractiveLogger  # noqa: E402
from avalanche.training.supervised import EWC, LwF, Naive, Replay, StreamingLDA  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.cifar import DataError, load_cifar  # noqa: E402
from benchmarks.helpers import (  # noqa: E402
    MATRIX_COLUMNS,
    SUMMARY_COLUMNS,
    RunStore,
    atomic_write,
    evaluate,
    make_evaluator,
    mean_std_table,
    plot_curves,
    run_stream,
    summarize,
    tensor_scenario,
    write_csv,
)
from kvb_avalanche import (  # noqa: E402
    FrozenCodesPlugin,
    KeyFitConfig,
    KeyValueBottleneck,
    KVBModel,
    KVBStrategy,
    VotingDecoder,
    fit_keys,
)
from kvb_avalanche.encoders import ENCODERS, build_encoder, cached_embeddings, embed_images  # noqa: E402

log = logging.getLogger("split_cifar10")

NUM_CLASSES, NUM_EXPERIENCES = 10, 5
STRATEGIES = ["kvb", "linear_probe", "naive", "ewc", "replay", "lwf", "slda", "joint_linear",
              "kvb_joint"]
JOINT = {"joint_linear", "kvb_joint"}
# Arguments that do not change results: they may differ when resuming into an --out.
NOT_IDENTITY = {"out", "overwrite", "progress", "data_root", "cache_dir", "download"}


# ---------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Class-incremental split CIFAR-10 on frozen embeddings: KVB vs baselines.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--strategies", nargs="+", default=STRATEGIES, metavar="NAME",
                   help=f"any of {', '.join(STRATEGIES)}")
    p.add_argument("--quick", action="store_true",
                   help="tiny end-to-end run: 100 train / 50 test images a class, 32 px, small "
                        "bottleneck, few epochs (for tests and a first look)")
    p.add_argument("--data-root", type=Path, default=None,
                   help="folder holding CIFAR (torchvision folders, ImageFolder trees or tar "
                        "archives); default: the first of the standard locations that has it")
    p.add_argument("--download", action="store_true",
                   help="download CIFAR with torchvision if no local copy is found")
    p.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "embeddings")
    p.add_argument("--encoder", default="efficientnet_lite0", metavar="NAME",
                   help=f"any of {', '.join(ENCODERS)}")
    p.add_argument("--weights", type=Path, default=None, help="encoder weights file (state dict)")
    p.add_argument("--resolution", type=int, default=64,
                   help="encoder input size in px (see results/encoder_resolution)")
    p.add_argument("--max-per-class", type=int, default=None,
                   help="use at most this many training images per class")
    p.add_argument("--key-init-data", default="cifar100", choices=["cifar100", "cifar10", "none"],
                   help="unlabelled data the keys are fitted on ('none': the first experience)")
    p.add_argument("--shuffle-classes", action="store_true",
                   help="shuffle the class order per seed (default order [0,1] ... [8,9])")
    # KVB: the paper's configuration
    p.add_argument("--codebooks", type=int, default=256)
    p.add_argument("--num-pairs", type=int, default=4096)
    p.add_argument("--dim-keys", type=int, default=14)
    p.add_argument("--dim-values", type=int, default=NUM_CLASSES)
    p.add_argument("--topk", type=int, default=1)
    p.add_argument("--kvb-lr", type=float, default=0.3)
    p.add_argument("--kvb-epochs", type=int, default=10,
                   help="KVB epochs per experience (flat from 1 to 100: results/kvb_epochs)")
    p.add_argument("--mask-unused-keys", action="store_true",
                   help="at evaluation, search only keys trained on (official deactivate_counts)")
    p.add_argument("--key-epochs", type=int, default=2, help="EMA k-means epochs")
    p.add_argument("--kmeans-samples", type=int, default=8192,
                   help="embeddings for the Lloyd k-means start of the keys")
    p.add_argument("--kmeans-iters", type=int, default=3)
    # baselines
    p.add_argument("--epochs", type=int, default=10, help="baseline epochs per experience")
    p.add_argument("--lr", type=float, default=1e-3, help="baselines' Adam learning rate")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--hidden", type=int, default=128, help="MLP head hidden units")
    p.add_argument("--buffer-size", type=int, default=200, help="replay buffer size")
    p.add_argument("--ewc-lambda", type=float, default=1000.0)
    p.add_argument("--lwf-alpha", type=float, default=1.0)
    p.add_argument("--lwf-temperature", type=float, default=2.0)
    p.add_argument("--overwrite", action="store_true",
                   help="discard results in --out from a different configuration")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    if args.quick:
        apply_quick(args, sys.argv[1:] if argv is None else argv)
    try:
        validate(args)
    except ValueError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    return args


QUICK = dict(max_per_class=100, resolution=32, codebooks=32, num_pairs=256, dim_keys=8,
             kvb_epochs=30, kvb_lr=10.0, epochs=20, batch_size=32, key_epochs=2,
             kmeans_samples=2000,
             buffer_size=50)


def apply_quick(args: argparse.Namespace, argv: list[str]) -> None:
    """--quick defaults, unless the flag was given explicitly."""
    given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}
    for k, v in QUICK.items():
        if k not in given:
            setattr(args, k, v)


def validate(args: argparse.Namespace) -> None:
    """Refuse bad arguments before any work or any file is written."""
    unknown = [s for s in args.strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"unknown strategy {unknown[0]!r} in --strategies; choose from "
                         f"{', '.join(STRATEGIES)}")
    if args.encoder not in ENCODERS:
        raise ValueError(f"unknown --encoder {args.encoder!r}; choose from {', '.join(ENCODERS)}")
    for name in ("kvb_epochs", "epochs", "batch_size", "buffer_size", "codebooks", "num_pairs",
                 "dim_keys", "dim_values", "topk", "resolution", "hidden"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.key_epochs < 0:
        raise ValueError(f"--key-epochs must be >= 0, got {args.key_epochs}")
    if args.max_per_class is not None and args.max_per_class < 1:
        raise ValueError(f"--max-per-class must be a positive integer, got {args.max_per_class}")
    if args.topk > args.num_pairs:
        raise ValueError(f"--topk ({args.topk}) must be <= --num-pairs ({args.num_pairs})")
    if args.dim_values != NUM_CLASSES:
        raise ValueError(f"--dim-values must equal the number of classes ({NUM_CLASSES}) with "
                         f"the voting decoder, got {args.dim_values}")
    if args.weights is not None and not args.weights.is_file():
        raise ValueError(f"--weights {args.weights}: no such file")
    out = args.out.resolve()
    probe = out if out.exists() else next(p for p in out.parents if p.exists())
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise ValueError(f"--out {args.out}: {probe} is not a writable folder")


def identity_args(args: argparse.Namespace) -> dict:
    """The arguments that decide results (what a resumed run must share)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items())
            if k not in NOT_IDENTITY}


# ---------------------------------------------------------------------------- data
def embeddings_for(args, encoder, name: str, split: str, max_per_class: int | None):
    """(embeddings float32 (n, dim), labels int64 (n,), record) for one CIFAR split, cached."""
    data = load_cifar(name, split, root=args.data_root, download=args.download,
                      max_per_class=max_per_class, progress=args.progress)
    meta = {"dataset": name, "split": split, "data": data.identity, "encoder": encoder.name,
            "weights": encoder.weights_id, "resolution": args.resolution}
    x, cache_id = cached_embeddings(
        args.cache_dir, meta,
        lambda: embed_images(encoder, data.images, args.resolution, progress=args.progress,
                             desc=f"embedding {name} {split} at {args.resolution}px"),
    )
    record = {"source": data.source, "images": len(data.labels), "data_identity": data.identity,
              "embedding_cache_identity": cache_id}
    return x, torch.as_tensor(data.labels, dtype=torch.long), record


# ---------------------------------------------------------------------------- strategies
def mlp(dim: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, NUM_CLASSES))


def fitted_bottleneck(args, dim: int, key_data: torch.Tensor | None, first_exp_x, seed: int):
    """The paper's bottleneck with keys fitted (without labels) and frozen."""
    bn = KeyValueBottleneck(dim, args.codebooks, args.num_pairs, args.dim_keys, args.dim_values,
                            topk=args.topk, values_init="zeros", seed=seed,
                            mask_unused_keys=args.mask_unused_keys, sparse_grad=True)
    data = key_data if key_data is not None else first_exp_x
    g = torch.Generator().manual_seed(seed)
    perm = data[torch.randperm(len(data), generator=g)]
    batches = [perm[i : i + args.batch_size] for i in range(0, len(perm), args.batch_size)]
    fit = KeyFitConfig(epochs=args.key_epochs, kmeans_samples=args.kmeans_samples,
                       kmeans_iters=args.kmeans_iters, seed=seed)
    fit_keys(bn, batches, fit, progress=args.progress)
    bn.freeze_keys()
    return bn


def make_strategy(name: str, args, dim: int, evaluator, bottleneck=None, codes=None):
    common = dict(train_mb_size=args.batch_size, eval_mb_size=1024, evaluator=evaluator)
    if name in ("kvb", "kvb_joint"):
        model = KVBModel(None, copy.deepcopy(bottleneck), VotingDecoder(NUM_CLASSES))
        return KVBStrategy(model=model, lr=args.kvb_lr, train_epochs=args.kvb_epochs,
                           cache_codes=False, plugins=[codes], **common)
    if name == "slda":
        return StreamingLDA(slda_model=nn.Identity(), criterion=nn.CrossEntropyLoss(),
                            input_size=dim, num_classes=NUM_CLASSES, shrinkage_param=1e-4,
                            train_epochs=1, **common)
    linear = name in ("linear_probe", "joint_linear")
    model = nn.Linear(dim, NUM_CLASSES) if linear else mlp(dim, args.hidden)
    common.update(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=args.lr),
                  criterion=nn.CrossEntropyLoss(), train_epochs=args.epochs)
    if name in ("linear_probe", "joint_linear", "naive"):
        return Naive(**common)
    if name == "ewc":
        return EWC(ewc_lambda=args.ewc_lambda, **common)
    if name == "replay":
        return Replay(mem_size=args.buffer_size, **common)
    return LwF(alpha=args.lwf_alpha, temperature=args.lwf_temperature, **common)


def class_order(args, seed: int) -> list[int]:
    """[0, 1, ..., 9], or a permutation seeded by ``seed`` with --shuffle-classes."""
    if not args.shuffle_classes:
        return list(range(NUM_CLASSES))
    return torch.randperm(NUM_CLASSES, generator=torch.Generator().manual_seed(seed)).tolist()


def key_sharing_rows(seed: int, usage_after: list[torch.Tensor]) -> list[dict]:
    """Per experience: keys it selects, the fraction already selected before, all-time share."""
    rows, before = [], torch.zeros_like(usage_after[0], dtype=torch.bool)
    previous = torch.zeros_like(usage_after[0])
    for t, usage in enumerate(usage_after):
        selected = (usage - previous) > 0
        n = int(selected.sum())
        rows.append({"strategy": "kvb", "seed": seed, "experience": t, "keys_selected": n,
                     "fraction_shared_with_earlier": float((selected & before).sum()) / max(1, n),
                     "fraction_ever_selected": float((before | selected).float().mean())})
        before |= selected
        previous = usage
    return rows


def run_one(name, seed, args, data, bottleneck, codes, out: Path):
    """Train one strategy through the stream for one seed; returns its result record.

    A continual run is checkpointed after every experience under ``OUT/checkpoints/`` and
    resumed from there after a kill; the checkpoint goes once the record is written.
    """
    (xtr, ytr), (xte, yte) = data
    order = class_order(args, seed)
    stream = tensor_scenario((xtr, ytr), (xte, yte), order, NUM_EXPERIENCES)
    checkpoint = out / "checkpoints" / f"{name}-seed{seed}.pt"
    resuming = checkpoint.exists() and name not in JOINT
    torch.manual_seed(seed)
    # a resumed strategy gets its loggers back from the checkpoint, its CSV files reopened
    # where they were; a new CSVLogger would truncate them
    csv = [] if resuming else [CSVLogger(log_folder=str(out / "logs" / f"{name}-seed{seed}"))]
    loggers = [*csv, InteractiveLogger()] if args.progress else csv
    strategy = make_strategy(name, args, xtr.shape[1], make_evaluator(loggers), bottleneck, codes)
    state: dict = {"usage_after": []}
    try:
        if name in JOINT:  # i.i.d. upper bound: all classes at once, then the same evaluation
            joint = tensor_scenario((xtr, ytr), (xte, yte), order, 1)
            start = time.perf_counter()
            strategy.train(joint.train_stream[0], eval_streams=[])
            train_seconds = time.perf_counter() - start
            rows = evaluate(strategy, stream, name, seed, trained_through=NUM_EXPERIENCES - 1)
        else:
            def snapshot(t: int) -> None:
                if name == "kvb":
                    state["usage_after"].append(strategy.model.bottleneck.key_usage.clone())

            rows, train_seconds = run_stream(strategy, stream, name, seed,
                                             after_experience=snapshot, checkpoint=checkpoint,
                                             state=state)
    finally:
        for logger in strategy.evaluator.loggers:
            if isinstance(logger, CSVLogger):
                logger.close()
    usage_after = state["usage_after"]
    sharing = key_sharing_rows(seed, usage_after) if usage_after else []
    return {"strategy": name, "seed": seed, "train_seconds": train_seconds, "matrix": rows,
            "key_sharing": sharing, "class_order": order}


# ---------------------------------------------------------------------------- outputs
def versions() -> dict:
    out = {}
    for pkg in ("kvb-avalanche", "torch", "torchvision", "avalanche-lib", "numpy", "pandas"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    try:
        out["kvb-avalanche git commit"] = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
            check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out["kvb-avalanche git commit"] = None
    return out


def write_tables(args, records: list[dict]) -> pd.DataFrame:
    matrix = pd.DataFrame([r for rec in records for r in rec["matrix"]], columns=MATRIX_COLUMNS)
    order = {s: i for i, s in enumerate(STRATEGIES)}
    matrix = matrix.sort_values(["strategy", "seed", "trained_through", "evaluated_on"],
                                key=lambda c: c.map(order) if c.name == "strategy" else c)
    summary = summarize(matrix)
    summary["train_seconds"] = [next(r["train_seconds"] for r in records
                                     if r["strategy"] == s and r["seed"] == seed)
                                for s, seed in zip(summary.strategy, summary.seed, strict=True)]
    summary.loc[summary.strategy.isin(JOINT), "average_forgetting"] = float("nan")
    summary = summary[SUMMARY_COLUMNS]
    write_csv(matrix, args.out / "accuracy_matrix.csv")
    write_csv(summary, args.out / "summary.csv")
    sharing = pd.DataFrame([r for rec in records for r in rec["key_sharing"]])
    if len(sharing):
        write_csv(sharing, args.out / "key_sharing.csv")
    curves = matrix[~matrix.strategy.isin(JOINT)]
    plot_curves(curves, args.out / "forgetting_curves.png",
                "split CIFAR-10: accuracy on each experience as training proceeds")
    plot_final(summary, args.out / "final_accuracy.png")
    table = mean_std_table(summary, ["final_accuracy", "average_forgetting", "train_seconds"])
    write_csv(table, args.out / "summary_mean_std.csv")
    write_csv(expectations(summary, matrix), args.out / "expectations.csv")
    return table


def expectations(summary: pd.DataFrame, matrix: pd.DataFrame) -> pd.DataFrame:
    """The paper's claims on this benchmark, checked on the seed means: PASS / FAIL / n/a."""
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
    return pd.DataFrame(rows)


def plot_final(summary: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(summary.strategy))
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(names), 3.2))
    for i, name in enumerate(names):
        acc = summary[summary.strategy == name].final_accuracy
        ax.bar(i, acc.mean(), color="tab:orange" if name.startswith("kvb") else "tab:blue",
               alpha=0.7)
        ax.scatter([i] * len(acc), acc, color="k", s=10, zorder=3)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylabel("final accuracy (all 10 classes)")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    store = RunStore(args.out, identity_args(args), args.overwrite)
    try:
        store.check()
        encoder = build_encoder(args.encoder, args.weights)
        train = embeddings_for(args, encoder, "cifar10", "train", args.max_per_class)
        test = embeddings_for(args, encoder, "cifar10", "test",
                              args.max_per_class and max(1, args.max_per_class // 2))
        key_data, key_record = None, None
        if args.key_init_data != "none" and any(s.startswith("kvb") for s in args.strategies):
            key_cap = 20 if args.quick else None
            kx, _, key_record = embeddings_for(args, encoder, args.key_init_data, "train", key_cap)
            key_data = kx
    except (DataError, ValueError) as e:
        sys.stderr.write(f"split_cifar10.py: error: {e}\n")
        raise SystemExit(2) from e

    store.open({"all_arguments": vars(args), "versions": versions(),
                "encoder": {"name": encoder.name, "dim": encoder.dim,
                            "weights": encoder.weights_id},
                "data": {"cifar10_train": train[2], "cifar10_test": test[2],
                         "key_init": key_record}})

    data = ((train[0], train[1]), (test[0], test[1]))
    records = []
    for seed in args.seeds:
        bottleneck, codes = None, None
        for name in args.strategies:
            if (done := store.load(name, seed)) is not None:
                records.append(done)
                log.info("seed %d %-12s already done", seed, name)
                continue
            if name.startswith("kvb") and bottleneck is None:
                first_classes = torch.tensor(class_order(args, seed)[:2])
                first = train[0][torch.isin(train[1], first_classes)]
                bottleneck = fitted_bottleneck(args, encoder.dim, key_data, first, seed)
                codes = FrozenCodesPlugin(progress=args.progress)
            start = time.perf_counter()
            record = run_one(name, seed, args, data, bottleneck, codes, args.out)
            store.save(name, seed, record)
            (args.out / "checkpoints" / f"{name}-seed{seed}.pt").unlink(missing_ok=True)
            records.append(record)
            final = summarize(pd.DataFrame(record["matrix"])).final_accuracy.iloc[0]
            log.info("seed %d %-12s final accuracy %.3f  (%.0f s)", seed, name, final,
                     time.perf_counter() - start)
    table = write_tables(args, records)
    checks = pd.read_csv(args.out / "expectations.csv")
    with pd.option_context("display.width", 160):
        print(table.to_string(index=False, float_format="%.3f"))  # noqa: T201 (CLI output)
        print(checks.to_string(index=False))  # noqa: T201
    return table


if __name__ == "__main__":
    main()
