"""Which input resolution for the frozen encoder on a CPU? Linear-probe accuracy vs embedding time.

Embeds a class-balanced subset of CIFAR-10 train and test at each resolution, times it,
and fits a linear probe (full-batch Adam on the embeddings) to compare the features.

    python benchmarks/encoder_resolution.py --out results/encoder_resolution
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from kvb_avalanche.benchmarks import load_cifar
from kvb_avalanche.encoders import build_encoder, embed_images
from kvb_avalanche.experiments.reports import write_csv


def linear_probe(xtr, ytr, xte, yte, steps: int = 300, seed: int = 0) -> float:
    """Test accuracy of a linear head trained full-batch with Adam on standardised features."""
    torch.manual_seed(seed)
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    head = nn.Linear(xtr.shape[1], int(ytr.max()) + 1)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(head(xtr), ytr).backward()
        opt.step()
    with torch.no_grad():
        return float((head(xte).argmax(1) == yte).float().mean())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--encoder", default="efficientnet_lite0")
    p.add_argument("--resolutions", type=int, nargs="+", default=[32, 64, 96, 128])
    p.add_argument("--train-per-class", type=int, default=250)
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--data-root", type=Path, default=None, help="folder holding CIFAR-10")
    args = p.parse_args(argv)
    if min(args.resolutions) < 16 or args.train_per_class < 1 or args.test_per_class < 1:
        p.error("resolutions must be >= 16 px and per-class counts positive")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    train = load_cifar("cifar10", "train", root=args.data_root, max_per_class=args.train_per_class)
    test = load_cifar("cifar10", "test", root=args.data_root, max_per_class=args.test_per_class)
    encoder = build_encoder(args.encoder)
    ytr, yte = torch.as_tensor(train.labels), torch.as_tensor(test.labels)
    rows = []
    for res in args.resolutions:
        start = time.perf_counter()
        xtr = embed_images(encoder, train.images, res, desc=f"{res}px train")
        seconds = time.perf_counter() - start
        xte = embed_images(encoder, test.images, res, desc=f"{res}px test")
        rows.append({"encoder": args.encoder, "resolution": res,
                     "linear_probe_accuracy": linear_probe(xtr, ytr, xte, yte),
                     "images_per_second": len(train.labels) / seconds,
                     "minutes_for_85k_images": 85_000 / (len(train.labels) / seconds) / 60})
    table = pd.DataFrame(rows)
    write_csv(table, args.out / "tradeoff.csv")
    print(table.to_string(index=False, float_format="%.3f"))  # noqa: T201


if __name__ == "__main__":
    main()
