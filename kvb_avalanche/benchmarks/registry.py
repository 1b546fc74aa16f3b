"""The benchmark registry: a benchmark is one class whose attributes declare the scenario.

A benchmark names its setting, its default split, the data set its images come from, the
images' shape, its unlabelled key-initialisation data and its other defaults; its methods
turn embedded data into an Avalanche stream. A data set is a loader registered under a
name. Adding a benchmark is adding one file (see ``docs/benchmarks.md``):

    from kvb_avalanche.benchmarks.registry import Benchmark, register_benchmark

    @register_benchmark
    class SplitMyData(Benchmark):
        name = "split_mydata"
        dataset = "imagefolder"  # a class-per-folder tree under --data-root
        num_classes = 6
        n_experiences = 3

Register it from a module the command imports (``--import MODULE``), or one an installed
package names in the ``kvb_avalanche.benchmarks`` entry-point group.

Settings: ``class-incremental`` (each experience brings new classes) and
``domain-incremental`` (every experience holds the same classes, from another domain).
Task-incremental benchmarks (task labels, a head per task) are refused at registration:
every strategy here has one head over all classes.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import import_module, metadata
from typing import Any, ClassVar

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SETTINGS = ("class-incremental", "domain-incremental")
BUILTIN_MODULES = ("kvb_avalanche.benchmarks.cifar_splits",
                   "kvb_avalanche.benchmarks.cifar100_superclasses",
                   "kvb_avalanche.benchmarks.fmnist", "kvb_avalanche.benchmarks.imagefolder")


@dataclass(frozen=True)
class Dataset:
    """A data set: ``load(split, max_per_class=, size=, options=)`` gives an ``ImageSplit``
    (uint8 images (n, H, W, 3), int64 labels); ``image_shape`` None: any size (the images
    are resized to ``size`` px as they are read)."""

    name: str
    num_classes: int
    image_shape: tuple[int, int, int] | None
    load: Callable[..., Any]
    source: str  # where a copy is looked for, for messages and docs


class Benchmark:
    """A benchmark's declaration (override the attributes) and its streams (the methods).

    ``order`` is the experiences' order key: the class order (class-incremental) or the
    domain order (domain-incremental); ``shuffle_classes`` draws it from the seed.
    """

    name: ClassVar[str]
    setting: ClassVar[str] = "class-incremental"
    dataset: ClassVar[str]  # the data set its images come from (a DATASETS name)
    num_classes: ClassVar[int]  # classes the strategies predict
    n_experiences: ClassVar[int]  # the default split
    key_init_data: ClassVar[str] = "none"  # a data set's train split, or the first experience
    description: ClassVar[str] = ""
    defaults: ClassVar[Mapping[str, Any]] = {}  # other ExperimentConfig fields
    quick: ClassVar[Mapping[str, Any]] = {}  # what --quick changes beyond its preset

    # -- declarations read by the configuration
    @classmethod
    def data_set(cls) -> Dataset | None:
        """A data set of the benchmark's own, registered with it (None: ``dataset`` names
        one registered on its own)."""
        return None

    @classmethod
    def config_defaults(cls) -> dict[str, Any]:
        """The ExperimentConfig values this benchmark starts from."""
        return {"n_experiences": cls.n_experiences, "key_init_data": cls.key_init_data,
                **cls.defaults}

    @classmethod
    def check_split(cls, n_experiences: int) -> str | None:
        """Why ``n_experiences`` cannot split this benchmark (None: it can)."""
        if cls.num_classes % n_experiences:
            return f"must divide the {cls.num_classes} classes, got {n_experiences}"
        return None

    @classmethod
    def order_size(cls) -> int:
        """How many items ``order`` permutes: classes, or domains."""
        return cls.num_classes

    # -- streams
    @classmethod
    def targets(cls, labels: Tensor) -> tuple[Tensor, Tensor | None]:
        """The data set's labels -> (the classes predicted, the domain of each or None)."""
        return labels, None

    @classmethod
    def stream(cls, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor],
               order: Sequence[int], n_experiences: int) -> Any:
        """The Avalanche benchmark over embedded (inputs, data-set labels) splits."""
        return _by_class(cls, train, test, order, n_experiences)

    @classmethod
    def joint_stream(cls, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor],
                     order: Sequence[int]) -> Any:
        """All training data as one experience (an i.i.d. upper bound)."""
        return cls.stream(train, test, order, 1)

    @classmethod
    def first_experience(cls, labels: Tensor, order: Sequence[int], n_experiences: int
                         ) -> Tensor:
        """A bool mask of the training rows of the first experience."""
        classes, _ = cls.targets(labels)
        first = torch.tensor(list(order)[: cls.num_classes // n_experiences])
        return torch.isin(classes, first)


def _by_class(benchmark: type[Benchmark], train: tuple[Tensor, Tensor],
              test: tuple[Tensor, Tensor], order: Sequence[int], n_experiences: int) -> Any:
    """Class-incremental experiences of ``benchmark``'s targets, classes in ``order``."""
    from kvb_avalanche.benchmarks.embedded import tensor_scenario

    (xtr, ytr), (xte, yte) = train, test
    return tensor_scenario((xtr, benchmark.targets(ytr)[0]), (xte, benchmark.targets(yte)[0]),
                           order, n_experiences)


class DomainIncremental(Benchmark):
    """Every experience holds all ``num_classes`` classes, from one domain; ``targets`` gives
    the domain of each row. Experiences are the domains, in ``order``."""

    setting: ClassVar[str] = "domain-incremental"
    num_domains: ClassVar[int]

    @classmethod
    def check_split(cls, n_experiences: int) -> str | None:
        if n_experiences != cls.num_domains:
            return f"must be its {cls.num_domains} domains, got {n_experiences}"
        return None

    @classmethod
    def order_size(cls) -> int:
        return cls.num_domains

    @classmethod
    def stream(cls, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor],
               order: Sequence[int], n_experiences: int) -> Any:
        from kvb_avalanche.benchmarks.embedded import domain_scenario

        return domain_scenario([(train[0], *cls.targets(train[1]))],
                               [(test[0], *cls.targets(test[1]))], order)

    @classmethod
    def joint_stream(cls, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor],
                     order: Sequence[int]) -> Any:
        return _by_class(cls, train, test, list(range(cls.num_classes)), 1)

    @classmethod
    def first_experience(cls, labels: Tensor, order: Sequence[int], n_experiences: int
                         ) -> Tensor:
        _, domains = cls.targets(labels)
        return domains == list(order)[0]


class Registry(Mapping[str, Any]):
    """Names -> entries, filled by the built-in modules and the entry-point group on first
    use (so that importing this module imports no data set)."""

    def __init__(self, kind: str) -> None:
        self.kind, self._entries = kind, {}

    def add(self, name: str, entry: Any) -> None:
        if name in self._entries and self._entries[name] is not entry:
            raise ValueError(f"{self.kind} {name!r} is registered already")
        self._entries[name] = entry

    def __getitem__(self, name: str) -> Any:
        _load()
        if name not in self._entries:
            close = difflib.get_close_matches(str(name), list(self._entries), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise KeyError(f"unknown {self.kind} {name!r}{hint}; registered: "
                           f"{', '.join(self._entries)}")
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        _load()
        return iter(list(self._entries))

    def __len__(self) -> int:
        _load()
        return len(self._entries)


DATASETS = Registry("data set")
BENCHMARKS = Registry("benchmark")
_loaded = False


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN_MODULES:
        import_module(module)
    for entry in metadata.entry_points(group="kvb_avalanche.benchmarks"):
        try:
            entry.load()
        except Exception as e:  # noqa: BLE001 (one broken package must not stop the rest)
            log.warning("entry point %r = %r of group kvb_avalanche.benchmarks failed to "
                        "load, its benchmarks are missing: %s: %s", entry.name, entry.value,
                        type(e).__name__, e)


def register_dataset(name: str, *, num_classes: int, image_shape: tuple[int, int, int] | None,
                     source: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a loader ``load(split, *, max_per_class, size, options) -> ImageSplit``."""
    def add(load: Callable[..., Any]) -> Callable[..., Any]:
        DATASETS.add(name, Dataset(name, num_classes, image_shape, load, source))
        return load

    return add


def register_benchmark(cls: type[Benchmark]) -> type[Benchmark]:
    """Register a :class:`Benchmark` subclass under its ``name`` (a class decorator); its
    declaration is checked first."""
    for attr in ("name", "dataset", "num_classes", "n_experiences"):
        if not hasattr(cls, attr):
            raise TypeError(f"benchmark {cls.__name__} must declare {attr!r}")
    if cls.setting not in SETTINGS:
        raise ValueError(f"benchmark {cls.name!r}: setting must be one of {', '.join(SETTINGS)}, "
                         f"got {cls.setting!r} (task-incremental benchmarks are not supported: "
                         "every strategy here has one head over all classes)")
    if (why := cls.check_split(cls.n_experiences)) is not None:
        raise ValueError(f"benchmark {cls.name!r}: its n_experiences {why}")
    if (own := cls.data_set()) is not None:
        DATASETS.add(own.name, own)
    BENCHMARKS.add(cls.name, cls)
    return cls


def adopt(cls: type[Benchmark]) -> None:
    """Register a benchmark class that arrived with a pickled configuration (a sweep's
    worker, whose process never imported the module that registered it); one registered
    under its name already is kept."""
    if cls.name not in BENCHMARKS:
        register_benchmark(cls)


def key_init_choices() -> tuple[str, ...]:
    """What ``key_init_data`` may name: a registered data set's train split, or 'none'."""
    return (*sorted(DATASETS), "none")
