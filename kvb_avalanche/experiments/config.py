"""Typed experiment configurations: every field named, typed, validated; JSON round trip.

A configuration is everything that decides an experiment's numbers (paths, progress bars
and the output folder are not part of it). Errors name the field (``ConfigError.field``);
the command line renders the same message with its flags.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from kvb_avalanche.benchmarks.registry import BENCHMARKS, key_init_choices
from kvb_avalanche.experiments.identity import Stage


def benchmark_defaults(benchmark: str) -> dict[str, Any]:
    """What a registered benchmark changes from ExperimentConfig's defaults."""
    return BENCHMARKS[benchmark].config_defaults()


ONLINE = {"epochs": 1, "kvb_epochs": 1}
"""What ``online`` changes: every strategy sees each training example once."""


class ConfigError(ValueError):
    """A bad configuration value. ``template`` names fields as ``{field}``; :meth:`render`
    writes them as the caller calls them (field names, or command-line flags)."""

    def __init__(self, field_name: str, template: str, fields: typing.Iterable[str] = ()) -> None:
        self.field, self.template = field_name, template
        self._names = {field_name, *fields}
        super().__init__(self.render(lambda name: name))

    def render(self, name: typing.Callable[[str], str]) -> str:
        return re.sub(r"\{(\w+)\}", lambda m: name(m.group(1)) if m.group(1) in self._names
                      else m.group(0), self.template)


def flag(field_name: str) -> str:
    """The command-line flag of a field."""
    return "--" + field_name.replace("_", "-")


def describe(help_text: str, **extra: Any) -> dict:
    """Field metadata: the help shown by the command line, and (``stage=``) the stages whose
    output the field changes (:mod:`kvb_avalanche.experiments.identity`)."""
    return {"help": help_text, **extra}


@dataclass(frozen=True)
class BaseConfig:
    """Checks and converts field types from the annotations, then runs :meth:`validate`."""

    kind: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name),
                                                     hints[f.name], self._field_names()))
        self.validate()

    @classmethod
    def _field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad field."""

    def to_dict(self) -> dict:
        """Plain JSON types: paths as strings, tuples as lists."""
        def plain(v: Any) -> Any:
            if isinstance(v, Path):
                return str(v)
            if isinstance(v, tuple | list):
                return [plain(x) for x in v]
            return v

        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict) -> BaseConfig:
        """The configuration with ``values`` over the defaults; unknown keys are refused."""
        names = cls._field_names()
        for key in values:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=3)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise ConfigError(str(key), f"{{{key}}} is not a field of {cls.__name__}{hint}; "
                                  f"fields: {', '.join(names)}")
        return cls(**values)

    def replace(self, **changes: Any) -> BaseConfig:
        return type(self).from_dict({**self.to_dict(), **changes})


def _coerce(name: str, value: Any, hint: Any, fields: list[str]) -> Any:
    """``value`` converted to the annotated type, or a ConfigError naming the field."""
    def bad(expected: str) -> ConfigError:
        return ConfigError(name, f"{{{name}}} must be {expected}, got {value!r}", fields)

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner[0], fields) if len(inner) == 1 else value
    if origin is Literal:
        if value not in args:
            raise bad(f"one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise bad(f"a list of {args[0].__name__}")
        items = [_coerce(name, v, args[0], fields) for v in value]
        if not items:
            raise bad("a non-empty list")
        return tuple(items)
    if hint in _SCALARS:
        expected, accepted = _SCALARS[hint]
        if not isinstance(value, accepted) or (hint is not bool and isinstance(value, bool)):
            raise bad(expected)
        return hint(value)
    return value


# scalar type -> (what the error says it must be, the Python types accepted)
_SCALARS: dict[type, tuple[str, type | types.UnionType]] = {
    bool: ("true or false", bool), int: ("an integer", int), float: ("a number", int | float),
    str: ("a string", str), Path: ("a path", str | Path)}


def _positive(config: BaseConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ConfigError(name, f"{{{name}}} must be a positive integer, got {value}")


def _known_strategies(config: BaseConfig, known: typing.Iterable[str]) -> None:
    known = list(known)
    for name in config.strategies:
        if name not in known:
            raise ConfigError("strategies", f"unknown strategy {name!r} in {{strategies}}; "
                              f"choose from {', '.join(known)}")
    if len(set(config.strategies)) != len(config.strategies):
        raise ConfigError("strategies", f"{{strategies}} lists a strategy twice: "
                          f"{list(config.strategies)}")


def _cifar_strategies() -> tuple[str, ...]:
    from kvb_avalanche.experiments.strategies import BUILTIN

    return BUILTIN


def _toy_strategies() -> tuple[str, ...]:
    from kvb_avalanche.experiments.strategies import TOY

    return tuple(TOY)


@dataclass(frozen=True)
class ExperimentConfig(BaseConfig):
    """Class-incremental CIFAR on frozen embeddings: KVB against Avalanche's baselines.

    Defaults are the paper's KVB configuration (256 codebooks x 4096 pairs, keys fitted on
    CIFAR-100 without labels) and this project's baselines on split CIFAR-10.
    """

    kind: ClassVar[str] = "split_cifar"

    # every field declares the stages whose output it changes (stage=, see identity.py):
    # runs, keys and embeddings are shared exactly where those fields agree
    benchmark: str = field(default="split_cifar10", metadata=describe(
        "a registered benchmark (kvb-avalanche benchmarks lists them)", metavar="NAME",
        stage=Stage.EMBEDDINGS))
    n_experiences: int = field(default=5, metadata=describe(
        "experiences the classes (or domains) are split in", stage=Stage.RUNS,
        first_experience=True))
    online: bool = field(default=False, metadata=describe(
        "online: each experience is split into mini-experiences of experience_size examples "
        "(Avalanche's split_online_stream), seen once (epochs and kvb_epochs 1); accuracy is "
        "measured at the end of each experience", stage=Stage.RUNS))
    experience_size: int = field(default=10, metadata=describe(
        "online: examples a mini-experience", stage=Stage.RUNS))
    seeds: tuple[int, ...] = field(default=(0, 1, 2), metadata=describe(
        "seeds, one run each", stage=Stage.NONE))
    strategies: tuple[str, ...] = field(default_factory=_cifar_strategies, metadata=describe(
        "strategies to run (default: the built-in ones; a registered one runs when named)",
        metavar="NAME",
        registry="kvb_avalanche.experiments.strategies:STRATEGIES", stage=Stage.NONE))
    # data and encoder
    encoder: str = field(default="efficientnet_lite0", metadata=describe(
        "frozen encoder: efficientnet_lite0, efficientnet_lite2, resnet50, timm:NAME, "
        "torchvision:MODEL:WEIGHTS or open_clip:ARCH:PRETRAINED", metavar="NAME",
        stage=Stage.EMBEDDINGS))
    weights: Path | None = field(default=None, metadata=describe(
        "local encoder weights file (state dict, .safetensors); default: the encoder's own "
        "(downloaded for library names)", stage=Stage.EMBEDDINGS))
    resolution: int | None = field(default=None, metadata=describe(
        "encoder input size in px; default: the encoder's (64 for our own names, see "
        "results/encoder_resolution; the pretrained one for library names)",
        stage=Stage.EMBEDDINGS))
    # a GPU embeds under float16 autocast (cosine 0.99996 to the CPU's float32 embeddings,
    # results/gpu_check), fits its own keys and trains by autograd: another device, other
    # numbers, from the embeddings on
    device: str = field(default="auto", metadata=describe(
        "where embeddings, keys and training run: auto (cuda if available), cpu, cuda, "
        "cuda:N, mps", stage=Stage.EMBEDDINGS))
    max_per_class: int | None = field(default=None, metadata=describe(
        "use at most this many training images per class", stage=Stage.EMBEDDINGS))
    test_max_per_class: int | None = field(default=None, metadata=describe(
        "use at most this many test images per class", stage=Stage.EMBEDDINGS))
    key_init_data: str = field(
        default="cifar100", metadata=describe(
            "a data set whose train split, unlabelled, the keys are fitted on ('none': the "
            "first experience)", metavar="DATA", stage=Stage.KEYS, embedded=True))
    key_init_max_per_class: int | None = field(default=None, metadata=describe(
        "use at most this many key-initialisation images per class", stage=Stage.KEYS,
        embedded=True))
    shuffle_classes: bool = field(default=False, metadata=describe(
        "shuffle the class order per seed (default order [0,1] ... [8,9])", stage=Stage.RUNS,
        first_experience=True))
    # KVB: the paper's configuration
    codebooks: int = field(default=256, metadata=describe("KVB codebooks", stage=Stage.KEYS))
    num_pairs: int = field(default=4096, metadata=describe(
        "KVB key-value pairs per codebook", stage=Stage.KEYS))
    dim_keys: int = field(default=14, metadata=describe("KVB key dimension", stage=Stage.KEYS))
    dim_values: int | None = field(default=None, metadata=describe(
        "KVB value dimension (default and, with the voting decoder, only: the class count)",
        stage=Stage.KEYS))
    projection: Literal["random", "chunk", "learned"] = field(default="random", metadata=describe(
        "how an embedding is split into the codebooks' heads: random (fixed Gaussian "
        "projections, the paper's default), chunk (consecutive slices), or learned (slices "
        "of a rotation learned with the keys on the key-initialisation data, OPQ); chunk "
        "and learned need dim_keys x codebooks = the embedding size", stage=Stage.KEYS))
    decoder: Literal["voting", "linear", "mlp"] = field(default="voting", metadata=describe(
        "KVB's decoder: voting (the paper's non-parametric mean of the fetched values), "
        "linear or mlp (trained heads on the concatenated values)",
        stage=Stage.BOTTLENECK_RUNS))
    topk: int = field(default=1, metadata=describe(  # the code cache holds topk keys
        "keys fetched per codebook", stage=Stage.KEYS))
    kvb_lr: float = field(default=0.3, metadata=describe(
        "KVB learning rate (SGD on values)", stage=Stage.BOTTLENECK_RUNS))
    kvb_epochs: int = field(default=10, metadata=describe(
        "KVB epochs per experience (flat from 1 to 100: results/kvb_epochs)",
        stage=Stage.BOTTLENECK_RUNS))
    mask_unused_keys: bool = field(default=False, metadata=describe(
        "at evaluation, search only keys trained on (official deactivate_counts)",
        stage=Stage.BOTTLENECK_RUNS))
    key_init: Literal["ours", "official"] = field(default="ours", metadata=describe(
        "key fitting: ours (a Lloyd k-means start on kmeans_samples embeddings, kmeans_iters "
        "iterations, then key_epochs EMA epochs, dead-code threshold 0.05 of a uniform share) "
        "or official (the authors' code: random Gaussian keys, then key_epochs EMA epochs, "
        "decay 0.95, dead-code threshold 0.1 x batch / pairs; they run 10 epochs)",
        stage=Stage.KEYS))
    key_epochs: int = field(default=2, metadata=describe(
        "EMA k-means epochs fitting the keys", stage=Stage.KEYS))
    kmeans_samples: int = field(default=8192, metadata=describe(
        "embeddings for the Lloyd k-means start of the keys (key_init ours)", stage=Stage.KEYS))
    kmeans_iters: int = field(default=3, metadata=describe(
        "Lloyd k-means iterations (key_init ours; 0: keys are the sampled embeddings)",
        stage=Stage.KEYS))
    # baselines
    epochs: int = field(default=10, metadata=describe(
        "baseline epochs per experience", stage=Stage.BASELINE_RUNS))
    lr: float = field(default=1e-3, metadata=describe(
        "baselines' Adam learning rate", stage=Stage.BASELINE_RUNS))
    batch_size: int = field(default=256, metadata=describe(  # key fitting's batches too
        "training batch size (all strategies)", stage=(Stage.KEYS, Stage.RUNS)))
    hidden: int = field(default=128, metadata=describe(  # KVB's mlp decoder reads it too
        "hidden units of the baselines' MLP heads and of KVB's mlp decoder",
        stage=Stage.RUNS))
    buffer_size: int = field(default=200, metadata=describe(
        "replay buffer size", stage=Stage.BASELINE_RUNS))
    ewc_lambda: float = field(default=1000.0, metadata=describe(
        "EWC penalty weight", stage=Stage.BASELINE_RUNS))
    lwf_alpha: float = field(default=1.0, metadata=describe(
        "LwF distillation weight", stage=Stage.BASELINE_RUNS))
    lwf_temperature: float = field(default=2.0, metadata=describe(
        "LwF temperature", stage=Stage.BASELINE_RUNS))
    ranpac_dim: int = field(default=2000, metadata=describe(
        "RanPAC's random-projection size M (its paper: 10000; see docs/experiments.md)",
        stage=Stage.BASELINE_RUNS))

    @classmethod
    def for_benchmark(cls, benchmark: str, **changes: Any) -> ExperimentConfig:
        """The defaults of ``benchmark`` (split CIFAR-100: 50 experiences of 2 classes, keys
        fitted on CIFAR-10, as the paper; online: one epoch), with ``changes`` over them."""
        _check_benchmark(benchmark)
        return cls.from_dict({"benchmark": benchmark, **benchmark_defaults(benchmark),
                              **(ONLINE if changes.get("online") else {}), **changes})

    def __reduce__(self) -> tuple:
        # the benchmark's class travels with a pickled configuration (by value when its
        # module is pickled by value, as --import modules are on Ray and SLURM), so that a
        # worker that never imported a user's benchmark module knows it
        return _restore, (type(self), dict(self.__dict__), BENCHMARKS[self.benchmark])

    @property
    def spec(self) -> Any:
        """The registered benchmark class (:mod:`kvb_avalanche.benchmarks.registry`)."""
        return BENCHMARKS[self.benchmark]

    @property
    def dataset(self) -> str:
        return self.spec.dataset

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def values_dim(self) -> int:
        return self.num_classes if self.dim_values is None else self.dim_values

    def validate(self) -> None:
        from kvb_avalanche.device import check_device
        from kvb_avalanche.encoders import check_encoder
        from kvb_avalanche.experiments.strategies import STRATEGIES

        _check_benchmark(self.benchmark)
        _known_strategies(self, STRATEGIES)
        for name, check in (("encoder", check_encoder), ("device", check_device)):
            try:
                check(getattr(self, name))
            except ValueError as e:
                raise ConfigError(name, f"{{{name}}}: {e}") from e
        _positive(self, "n_experiences", "kvb_epochs", "epochs", "batch_size", "buffer_size",
                  "codebooks", "num_pairs", "dim_keys", "dim_values", "topk", "resolution",
                  "hidden", "ranpac_dim", "experience_size", "max_per_class",
                  "test_max_per_class", "key_init_max_per_class", "kmeans_samples")
        for name in ("key_epochs", "kmeans_iters"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"{{{name}}} must be >= 0, got {getattr(self, name)}")
        for name in ("kvb_lr", "lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(name, f"{{{name}}} must be > 0, got {getattr(self, name)}")
        if (why := self.spec.check_split(self.n_experiences)) is not None:
            raise ConfigError("n_experiences", f"{{n_experiences}} of {self.benchmark} {why}")
        if self.key_init_data not in key_init_choices():
            raise ConfigError("key_init_data", f"{{key_init_data}} must be a registered data "
                              f"set or 'none' ({', '.join(key_init_choices())}), got "
                              f"{self.key_init_data!r}")
        if self.online and (self.epochs, self.kvb_epochs) != (1, 1):
            raise ConfigError("epochs", "an {online} stream is seen once: {epochs} and "
                              f"{{kvb_epochs}} must be 1, got {self.epochs} and "
                              f"{self.kvb_epochs}", ["online", "kvb_epochs"])
        if self.topk > self.num_pairs:
            raise ConfigError("topk", f"{{topk}} ({self.topk}) must be <= {{num_pairs}} "
                              f"({self.num_pairs})", ["num_pairs"])
        if self.decoder == "voting" and self.values_dim != self.num_classes:
            raise ConfigError("dim_values", f"{{dim_values}} must equal the number of classes "
                              f"({self.num_classes}) with the voting {{decoder}}, got "
                              f"{self.dim_values}", ["decoder"])
        if self.weights is not None and not self.weights.is_file():
            raise ConfigError("weights", f"{{weights}} {self.weights}: no such file")


QUICK = dict(max_per_class=100, test_max_per_class=50, key_init_max_per_class=20, resolution=32,
             codebooks=32, num_pairs=256, dim_keys=8, kvb_epochs=30, kvb_lr=10.0, epochs=20,
             batch_size=32, key_epochs=2, kmeans_samples=2000, buffer_size=50)
"""``--quick``: a one-minute end-to-end run on 100 images a class (tests, a first look)."""


def quick(benchmark: str) -> dict[str, Any]:
    """The ``--quick`` values for ``benchmark`` (with what the benchmark declares for it),
    the same for an experiment and a sweep."""
    _check_benchmark(benchmark)
    return {**QUICK, **BENCHMARKS[benchmark].quick}


def _restore(cls: type, state: dict, benchmark: Any) -> Any:
    """A pickled ExperimentConfig: its benchmark adopted, its fields as they were (already
    validated where it was made; a worker learns the strategies it names after this)."""
    from kvb_avalanche.benchmarks.registry import adopt

    adopt(benchmark)
    config = object.__new__(cls)
    for name, value in state.items():
        object.__setattr__(config, name, value)
    return config


def _check_benchmark(name: str) -> None:
    if name not in BENCHMARKS:
        close = difflib.get_close_matches(str(name), list(BENCHMARKS), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError("benchmark", f"{{benchmark}} must be a registered benchmark{hint}: "
                          f"{', '.join(BENCHMARKS)}; got {name!r}")

@dataclass(frozen=True)
class ToyConfig(BaseConfig):
    """The paper's 2-D toy: 8 blobs in 4 class-incremental stages, full-batch Adam."""

    kind: ClassVar[str] = "toy_2d"

    seeds: tuple[int, ...] = field(default=(0, 1, 2), metadata=describe("seeds, one run each"))
    strategies: tuple[str, ...] = field(default_factory=_toy_strategies, metadata=describe(
        "strategies to run (default: all registered)", metavar="NAME",
        registry="kvb_avalanche.experiments.strategies:TOY"))
    steps: int = field(default=1000, metadata=describe("full-batch steps per stage", metavar="N"))
    key_steps: int = field(default=1000, metadata=describe("EMA steps fitting the keys",
                                                           metavar="N"))
    lr: float = field(default=1e-3, metadata=describe("Adam learning rate (all strategies)"))
    std: float = field(default=0.035, metadata=describe("blob standard deviation"))
    # the baselines' own
    ewc_lambda: float = field(default=100.0, metadata=describe("EWC penalty weight"))
    replay_size: int = field(default=100, metadata=describe("replay buffer size"))

    def validate(self) -> None:
        from kvb_avalanche.experiments.strategies import TOY

        _known_strategies(self, TOY)
        _positive(self, "steps", "key_steps", "replay_size")
        if not self.lr > 0 or not self.std > 0:
            name = "lr" if not self.lr > 0 else "std"
            raise ConfigError(name, f"{{{name}}} must be > 0, got {getattr(self, name)}")
