"""The code cache's parts: reading a dataset's codes, the loader over them, a content-keyed
memo for batches that other plugins assemble, and the check for random transforms.

Codes are a :class:`~kvb_avalanche.model.KVBModel`'s key indices (n, codebooks, topk) for
its inputs. With a frozen encoder and frozen keys they are a function of the input's
content, so they can be computed once per input instead of once per epoch, exactly, as
long as the input a sample yields is the same every time it is read.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from avalanche.benchmarks.utils.data_loader import TaskBalancedDataLoader
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

# transforms that draw random numbers although their name does not start with "Random"
_STOCHASTIC_TRANSFORMS = {
    "AugMix", "AutoAugment", "ColorJitter", "CutMix", "ElasticTransform", "GaussianBlur",
    "GaussianNoise", "JPEG", "MixUp", "RandAugment", "ScaleJitter", "TrivialAugmentWide",
}
PROBE_SAMPLES = 64  # samples read twice to see whether a dataset's reads are repeatable


class CodesLoader:
    """Training batches ``[codes, targets, task labels]`` by indexing whole tensors.

    Draws from the global RNG exactly what Avalanche's single-task training loader draws
    per epoch (PyTorch's ``DataLoader`` iterator takes a base seed, then its
    ``RandomSampler`` a permutation seed) and yields the same batches in the same order, so
    training from it is bit-identical to training from the Avalanche loader.

    It carries the ``DataLoader`` attributes plugins read: ``dataset`` (the dataset whose
    codes these are), ``batch_size``, ``drop_last``, ``sampler`` and ``batch_sampler``
    (describing the sampling; iteration draws the same randomness without them),
    ``num_workers`` (0), ``collate_fn``, ``pin_memory``, ``generator`` and ``timeout``.
    """

    def __init__(self, codes: Tensor, targets: Tensor, task_labels: Tensor, batch_size: int,
                 shuffle: bool = True, drop_last: bool = False, dataset: Any = None) -> None:
        self.tensors = (codes, targets, task_labels)  # (n, codebooks, topk), (n,), (n,)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.dataset = dataset
        n = len(codes)
        self.sampler = RandomSampler(range(n)) if shuffle else SequentialSampler(range(n))
        self.batch_sampler = BatchSampler(self.sampler, batch_size, drop_last)
        self.num_workers, self.pin_memory, self.timeout = 0, False, 0
        self.generator, self.persistent_workers = None, False
        self.collate_fn = getattr(dataset, "collate_fn", None)

    def __len__(self) -> int:
        n = len(self.tensors[0])
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[list[Tensor]]:
        n = len(self.tensors[0])
        torch.empty((), dtype=torch.int64).random_()  # the DataLoader iterator's base seed
        if self.shuffle:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        else:
            order = torch.arange(n)
        for i in range(len(self)):
            batch = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield [t.index_select(0, batch) for t in self.tensors]


def plain_loader_settings(loader: Any, dataset: Any) -> tuple[int, bool, bool] | None:
    """(batch_size, shuffle, drop_last) if ``loader`` is one that Avalanche builds for a
    single task over ``dataset`` with a plain random or sequential sampler, the dataset's
    own collate and no persistent workers (the batches :class:`CodesLoader` reproduces);
    otherwise ``None``."""
    if type(loader) is TaskBalancedDataLoader:
        custom = {"sampler", "batch_sampler", "generator", "ffcv_args"} & set(loader.loader_kwargs)
        if (custom or len(loader.datasets) != 1 or len(loader.datasets[0]) != len(dataset)
                or loader.distributed_sampling or loader.never_ending):
            return None
        kwargs = loader.loader_kwargs
        if _persistent(kwargs.get("num_workers", 0), kwargs.get("persistent_workers", False)):
            return None
        if kwargs.get("collate_fn", dataset.collate_fn) != dataset.collate_fn:
            return None
        return (loader.batch_sizes[0], bool(kwargs.get("shuffle", False)),
                bool(kwargs.get("drop_last", False)))
    if (type(loader) is DataLoader and loader.dataset is dataset and loader.generator is None
            and loader.collate_fn == dataset.collate_fn
            and not _persistent(loader.num_workers, loader.persistent_workers)):
        sampler = loader.sampler
        plain = type(sampler) is SequentialSampler or (
            type(sampler) is RandomSampler and sampler.generator is None
            and not sampler.replacement and sampler.num_samples == len(dataset))
        if plain and type(loader.batch_sampler) is BatchSampler:
            return loader.batch_size, type(sampler) is RandomSampler, loader.drop_last
    return None


def _persistent(num_workers: int, persistent_workers: bool) -> bool:
    """Persistent workers draw their base seed once, not every epoch as CodesLoader does."""
    return bool(persistent_workers) and num_workers > 0


# ---------------------------------------------------------------------------- randomness
def random_transforms(dataset: Any, probe: int = PROBE_SAMPLES) -> str | None:
    """Why reading ``dataset`` is not repeatable, or ``None`` if it is.

    Two checks: a transform that draws random numbers among the dataset's transforms (an
    Avalanche dataset's current transform group, and the ``transform`` of what it wraps),
    by name (``Random*``, ``ColorJitter``, ...); then its first ``probe`` samples read twice
    under different seeds of the global torch, numpy and ``random`` generators, which are
    restored afterwards (so the probe changes no later draw).
    """
    if (name := _random_transform_name(dataset, set(), 0)) is not None:
        return f"{name} among its transforms"
    n = min(len(dataset), probe)
    states = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        reads = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            np.random.seed(seed)
            random.seed(seed)
            reads.append([_inputs(dataset[i]) for i in range(n)])
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
    for i, (a, b) in enumerate(zip(*reads, strict=True)):
        if not _same(a, b):
            return f"two reads of its sample {i} differ"
    return None


def _inputs(sample: Any) -> Any:
    return sample[0] if isinstance(sample, tuple | list) else sample


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return bool(np.array_equal(a, b))
    if hasattr(a, "tobytes") and hasattr(b, "tobytes"):  # PIL images
        return a.tobytes() == b.tobytes()
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 (not comparable: assume they differ)
        return False


def _random_transform_name(obj: Any, seen: set[int], depth: int,
                           group: str | None = None) -> str | None:
    """The class name of a random transform reachable from ``obj``, or None.

    ``group``: the transform group an enclosing Avalanche dataset reads its data with;
    nested Avalanche datasets apply that group, not their own current one.
    """
    if obj is None or id(obj) in seen or depth > 12 or isinstance(obj, str | bytes | Tensor):
        return None
    seen.add(id(obj))
    name = type(obj).__name__
    if name.startswith("Random") or name in _STOCHASTIC_TRANSFORMS:
        return name
    children: list[Any] = []
    groups = [getattr(obj, a, None) for a in ("_frozen_transform_groups", "_transform_groups")]
    groups = [g for g in groups if g is not None and hasattr(g, "transform_groups")]
    if groups:  # an Avalanche dataset: only one transform group applies
        group = group or getattr(obj._transform_groups, "current_group", None)
        children += [g.transform_groups.get(group) for g in groups]
    for attr in ("_flat_data", "transforms", "transform", "dataset", "datasets", "_datasets"):
        value = getattr(obj, attr, None)
        if isinstance(value, list | tuple):
            children += list(value)
        elif value is not None:
            children.append(value)
    if isinstance(obj, nn.Module):
        children += list(obj.children())
    for child in children:
        if (found := _random_transform_name(child, seen, depth + 1, group)) is not None:
            return found
    return None


# ---------------------------------------------------------------------------- reading codes
def read_dataset(dataset: Any, batch_size: int) -> Iterator[list[Tensor]]:
    """Batches ``[inputs, targets, ..., task labels]`` of a dataset, in order.

    The loader has its own generator: iterating a DataLoader draws a seed from the global
    RNG otherwise, which would change the strategy's shuffling compared to no cache.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                        collate_fn=getattr(dataset, "collate_fn", None),
                        generator=torch.Generator())
    yield from loader


def content_hash(batches: Iterator[Tensor]) -> str:
    """SHA-1 (fast, not for security) of the bytes, shapes and dtypes of a sequence of tensors."""
    h = hashlib.sha1(usedforsecurity=False)
    for x in batches:
        h.update(f"{tuple(x.shape)}{x.dtype}".encode())
        h.update(_bytes(x))
    return h.hexdigest()


def _bytes(x: Tensor) -> np.ndarray:
    """A tensor's bytes as a uint8 array (n, bytes per sample), without a copy where it can."""
    flat = x.detach().cpu().contiguous().reshape(len(x), -1)
    return flat.view(torch.uint8).numpy() if flat.numel() else flat.numpy()


class CodeMemo:
    """Codes of raw input rows, keyed by each row's content (shape, dtype and bytes).

    For batches that other plugins assemble (a replay loader mixing the experience with
    its buffer): every row whose content was looked up before is served from the memo, the
    others are looked up now, in one call, and remembered. Exact whatever the batch, since
    codes depend only on the content, as long as :meth:`check` is told the model's
    fingerprint when it may have changed.
    """

    def __init__(self) -> None:
        self.index: dict[bytes, int] = {}
        self.table: Tensor | None = None  # (capacity, codebooks, topk)
        self.size = 0
        self.fingerprint: str | None = None
        self.hits = self.misses = 0

    def check(self, fingerprint: str) -> None:
        """Forget everything if the codes' function changed (encoder, projection, keys)."""
        if fingerprint != self.fingerprint:
            self.__init__()
            self.fingerprint = fingerprint

    def codes(self, model: Any, x: Tensor) -> Tensor:
        """Codes (batch, codebooks, topk) of inputs x (batch, ...), on x's device."""
        base = hashlib.blake2b(f"{tuple(x.shape[1:])}{x.dtype}".encode(), digest_size=16)
        keys = []
        for row in _bytes(x):
            h = base.copy()
            h.update(row)
            keys.append(h.digest())
        new = list(dict.fromkeys(k for k in keys if k not in self.index))
        if new:
            first = {k: i for i, k in reversed(list(enumerate(keys)))}
            rows = torch.tensor([first[k] for k in new], device=x.device)
            self._add(new, model.codes(x.index_select(0, rows)).cpu())
        self.misses += len(new)
        self.hits += len(keys) - len(new)
        where = torch.tensor([self.index[k] for k in keys])
        return self.table.index_select(0, where).to(x.device)

    def _add(self, keys: list[bytes], codes: Tensor) -> None:
        need = self.size + len(keys)
        if self.table is None or need > len(self.table):
            grown = codes.new_empty((max(need, 2 * self.size, 1024), *codes.shape[1:]))
            if self.table is not None:
                grown[: self.size] = self.table[: self.size]
            self.table = grown
        self.table[self.size : need] = codes
        for i, k in enumerate(keys):
            self.index[k] = self.size + i
        self.size = need
