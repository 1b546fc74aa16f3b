"""Where a paper-scale training step on cached codes spends its time.

Runs KVBStrategy's two steps by hand, the autograd one and the fused voting step (the same
bottleneck, decoder, loss, clipping and SGD), timing each part over shuffled batches of
one experience, and, for reference, what PyTorch's generic sparse kernels take for the same
gradient. Writes ``DIR/breakdown.csv`` (step, part, ms per step). Avalanche's own
per-iteration work (hooks, metrics, moving the batch) comes on top of these in a strategy.

    python benchmarks/cached_step_breakdown.py --out results/perf
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

# the paper scale, as bench_bottleneck.py's "paper" case; an epoch is one CIFAR-10 experience
PAPER = dict(batch=256, codebooks=256, pairs=4096, dim_keys=14, dim_values=10, dim=1280)
EPOCH_SAMPLES = 10_000


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=5, help="timed epochs (after one warm-up)")
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error(f"--epochs must be a positive integer, got {args.epochs}")
    import pandas as pd
    import torch

    from kvb_avalanche import KeyValueBottleneck, SparseSGD, VotingDecoder
    from kvb_avalanche.experiments.reports import write_csv
    from kvb_avalanche.strategy import clip_grad_norm

    c = PAPER
    batch = c["batch"]
    g = torch.Generator().manual_seed(0)
    bn = KeyValueBottleneck(c["dim"], c["codebooks"], c["pairs"], c["dim_keys"],
                            c["dim_values"], key_init="random", sparse_grad=True)
    bn.freeze_keys()
    decoder, criterion = VotingDecoder(c["dim_values"]), torch.nn.CrossEntropyLoss(
        label_smoothing=0.1)
    codes = torch.randint(0, c["pairs"], (EPOCH_SAMPLES, c["codebooks"], 1), generator=g,
                          dtype=torch.int16)
    labels = torch.randint(0, 2, (EPOCH_SAMPLES,), generator=g)
    optimizer = SparseSGD([bn.values], lr=0.3)
    seconds: Counter[str] = Counter()
    steps = 0

    def epoch(timed: bool) -> None:
        nonlocal steps
        order = torch.randperm(EPOCH_SAMPLES, generator=g)
        for i in range(0, EPOCH_SAMPLES, batch):
            marks = [time.perf_counter()]
            idx = order[i : i + batch]
            x, y = codes.index_select(0, idx), labels.index_select(0, idx)
            marks.append(time.perf_counter())
            optimizer.zero_grad()
            fetched = bn.fetch(x)  # (batch, codebooks, 1, dim_values)
            marks.append(time.perf_counter())
            loss = criterion(decoder(fetched), y)
            marks.append(time.perf_counter())
            loss.backward()
            marks.append(time.perf_counter())
            clip_grad_norm([bn.values], 1.0)
            marks.append(time.perf_counter())
            optimizer.step()
            marks.append(time.perf_counter())
            if timed:
                steps += 1
                for name, a, b in zip(("batch indexing", "fetch (gather, key usage)",
                                       "decoder + loss", "backward (coalesce kernel)",
                                       "gradient clipping", "SparseSGD step"),
                                      marks, marks[1:], strict=False):
                    seconds[name] += b - a

    epoch(timed=False)
    for _ in range(args.epochs):
        epoch(timed=True)
    rows = [{"step": "autograd", "part": k, "ms_per_step": v / steps * 1000}
            for k, v in seconds.items()]
    rows.append({"step": "autograd", "part": "total",
                 "ms_per_step": sum(seconds.values()) / steps * 1000})
    rows += fused_parts(bn, codes, labels, g, args.epochs)

    # PyTorch's generic sparse kernels on one step's gradient, for reference
    x = codes[:batch]
    fetched = bn.fetch(x)
    criterion(decoder(fetched), labels[:batch]).backward()
    grad = bn.values.grad
    codebook = torch.arange(c["codebooks"])[None, :, None].expand_as(x)
    where = torch.stack([codebook.reshape(-1), x.long().reshape(-1)])
    raw = torch.sparse_coo_tensor(where, torch.randn(where.shape[1], c["dim_values"]),
                                  bn.values.shape, check_invariants=True)
    table = bn.values.detach().clone()
    for name, fn in (("reference: torch sparse coalesce()", raw.coalesce),
                     ("reference: torch dense.add_(sparse) (torch.optim.SGD)",
                      lambda: table.add_(grad, alpha=-0.3))):
        fn()
        start = time.perf_counter()
        for _ in range(20):
            fn()
        rows.append({"step": "reference", "part": name,
                     "ms_per_step": (time.perf_counter() - start) / 20 * 1000})
    write_csv(pd.DataFrame(rows), args.out / "breakdown.csv")
    print(pd.DataFrame(rows).to_string(index=False, float_format="%.3f"))  # noqa: T201


def fused_parts(bn, codes, labels, g, epochs: int) -> list[dict]:
    """The fused voting step's parts, ms per step, over ``epochs`` timed epochs."""
    import torch

    from kvb_avalanche import KVBModel, VotingDecoder
    from kvb_avalanche.fused import FusedVotingStep

    model = KVBModel(None, bn, VotingDecoder(PAPER["dim_values"])).train()
    step = FusedVotingStep(model)
    names = ("batch indexing", "vote kernel (gather, sum)", "loss and its gradient (serial)",
             "group kernel (gradient by pair, norm)", "update kernel (clip, SGD, key usage)")
    seconds = dict.fromkeys(names, 0.0)
    steps = 0
    for timed in [False] + [True] * epochs:
        order = torch.randperm(len(codes), generator=g)
        for i in range(0, len(codes), PAPER["batch"]):
            marks = [time.perf_counter()]
            idx = order[i : i + PAPER["batch"]]
            x, y = codes.index_select(0, idx), labels.index_select(0, idx)
            marks.append(time.perf_counter())
            logits = step.forward(x)
            marks.append(time.perf_counter())
            step.loss(logits, y, 0.1)
            marks.append(time.perf_counter())
            step.backward()
            marks.append(time.perf_counter())
            step.step(0.3, 1.0)
            marks.append(time.perf_counter())
            if timed:
                steps += 1
                for name, a, b in zip(names, marks[:-1], marks[1:], strict=True):
                    seconds[name] += b - a
    rows = [{"step": "fused", "part": k, "ms_per_step": v / steps * 1000}
            for k, v in seconds.items()]
    return rows + [{"step": "fused", "part": "total",
                    "ms_per_step": sum(seconds.values()) / steps * 1000}]


if __name__ == "__main__":
    main()
