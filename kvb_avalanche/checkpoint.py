"""Per-experience checkpoints: Avalanche's own, made to work with torch's optimisers.

Avalanche's ``save_checkpoint`` pickles the whole strategy with ``dill``. On torch 2.13 it
fails on every ``torch.optim`` optimiser: ``torch.optim/__init__.py`` deletes its
submodule names (``del sgd``), so ``dill`` cannot find ``torch.optim.sgd.SGD`` by
reference, pickles the class by value and stops at a ``typing_extensions`` sentinel in
its globals ("Can't pickle sentinel"). Everything else of a strategy pickles (model,
plugins and their buffers, evaluator, clock) and Avalanche restores the global RNGs.

So the optimiser is left out of Avalanche's pickle and saved as a ``state_dict`` with its
parameters' names; on loading it is pointed at the loaded model's parameters. Open log
files (``CSVLogger``) are pickled so that loading reopens them without truncation, at
the position of the checkpoint. The file is written atomically.

    strategy = KVBStrategy(model=..., evaluator=...)
    start, progress = maybe_load_checkpoint(strategy, "ckpt.pt")
    for experience in benchmark.train_stream[start:]:
        strategy.train(experience)
        save_checkpoint(strategy, "ckpt.pt")
"""

from __future__ import annotations

import io
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dill
import torch
from avalanche.checkpointing import maybe_load_checkpoint as _avalanche_load
from avalanche.checkpointing import save_checkpoint as _avalanche_save

from kvb_avalanche.io import atomic_write

FORMAT = 1


@contextmanager
def _reopen_files_without_truncation():
    """dill's default reopens a pickled file handle with its mode: 'w' would truncate it."""
    previous = dill.settings["fmode"]
    dill.settings["fmode"] = dill.CONTENTS_FMODE
    try:
        yield
    finally:
        dill.settings["fmode"] = previous


def save_checkpoint(strategy: Any, path: str | Path, extra: Any = None) -> None:
    """Save the strategy's state (and ``extra``, any picklable progress record) to ``path``.

    Call it between experiences, not from inside a training or evaluation loop (as
    Avalanche's own). Raises ValueError if the optimiser updates a tensor that is not a
    parameter of ``strategy.model``.
    """
    optimizer = getattr(strategy, "optimizer", None)  # StreamingLDA has none
    names = {id(p): n for n, p in strategy.model.named_parameters()}
    groups = []
    for group in optimizer.param_groups if optimizer is not None else []:
        missing = [tuple(p.shape) for p in group["params"] if id(p) not in names]
        if missing:
            raise ValueError(f"save_checkpoint: the optimizer updates tensors of shapes {missing} "
                             f"that are not parameters of strategy.model")
        groups.append([names[id(p)] for p in group["params"]])
    pickled = io.BytesIO()
    with _reopen_files_without_truncation():
        _avalanche_save(strategy, pickled,
                        exclude=["optimizer"] if hasattr(strategy, "optimizer") else [])
    payload = {
        "format": FORMAT,
        "strategy": pickled.getvalue(),
        "optimizer": None if optimizer is None else {
            "class": type(optimizer).__qualname__, "params": groups,
            "state": optimizer.state_dict()},
        "extra": extra,
    }
    atomic_write(Path(path), lambda tmp: torch.save(payload, tmp))


def maybe_load_checkpoint(strategy: Any, path: str | Path) -> tuple[int, Any]:
    """Restore ``strategy`` from ``path`` if it exists: (experiences already trained, extra).

    Without a file it changes nothing and returns ``(0, None)``. The strategy must be built
    as the saved one was (same model architecture, optimiser class and parameter groups).
    """
    path = Path(path)
    if not path.exists():
        return 0, None
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a kvb-avalanche checkpoint of format {FORMAT}")
    saved, optimizer = payload["optimizer"], getattr(strategy, "optimizer", None)
    have = None if optimizer is None else (type(optimizer).__qualname__,
                                           len(optimizer.param_groups))
    want = None if saved is None else (saved["class"], len(saved["params"]))
    if have != want:
        raise ValueError(f"{path} holds an optimizer (class, parameter groups) {want}; the "
                         f"strategy has {have}")
    strategy, done = _avalanche_load(strategy, io.BytesIO(payload["strategy"]))
    if optimizer is None:
        return done, payload["extra"]
    params = dict(strategy.model.named_parameters())
    for group, names in zip(optimizer.param_groups, saved["params"], strict=True):
        group["params"] = [params[n] for n in names]
    optimizer.state = defaultdict(dict)
    optimizer.load_state_dict(saved["state"])
    return done, payload["extra"]
