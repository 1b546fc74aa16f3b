"""Strategy registries: a name -> a builder of an Avalanche strategy, and what the runner
must know of it (trained i.i.d. or class-incrementally; needs the fitted bottleneck).

Register your own beside ours, in a module that the command imports with ``--import
MODULE`` (sweep workers import it too), or that an installed package names in the
``kvb_avalanche.strategies`` entry-point group:

    @STRATEGIES.register("kvb_adam", uses_bottleneck=True, reads=Stage.BOTTLENECK_RUNS)
    def kvb_adam(ctx: BuildContext) -> SupervisedTemplate:
        model = KVBModel(None, ctx.bottleneck, VotingDecoder(ctx.num_classes))
        # the runner's bottleneck has sparse value gradients: SparseAdam takes them
        adam = torch.optim.SparseAdam([model.bottleneck.values], lr=0.01)
        return KVBStrategy(model=model, optimizer=adam, **ctx.common())

(tests/test_experiments.py runs this example.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import torch
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.supervised import EWC, LwF, Naive, Replay
from avalanche.training.templates import SupervisedTemplate
from torch import nn

from kvb_avalanche.baselines import (
    BatchedStreamingLDA,
    FeCAMStrategy,
    NCMStrategy,
    RanPACStrategy,
    SimpleCILStrategy,
)
from kvb_avalanche.bottleneck import KeyValueBottleneck
from kvb_avalanche.decoders import LinearDecoder, MLPDecoder, VotingDecoder
from kvb_avalanche.experiments.identity import Stage
from kvb_avalanche.keys import KeyFitConfig
from kvb_avalanche.model import KVBModel
from kvb_avalanche.plugin import FrozenCodesPlugin
from kvb_avalanche.strategy import KVBStrategy

log = logging.getLogger(__name__)


@dataclass
class BuildContext:
    """What a builder gets: the configuration, the data's shape, the shared evaluator, and
    for bottleneck strategies a fresh copy of the seed's fitted bottleneck (keys frozen)
    and the seed's code cache."""

    config: Any  # ExperimentConfig or ToyConfig
    seed: int
    dim: int
    num_classes: int
    evaluator: EvaluationPlugin
    bottleneck: KeyValueBottleneck | None = None
    codes: FrozenCodesPlugin | None = None
    device: torch.device = torch.device("cpu")

    def common(self) -> dict:
        """Keyword arguments every CIFAR strategy shares."""
        return dict(train_mb_size=self.config.batch_size, eval_mb_size=1024,
                    evaluator=self.evaluator, device=self.device)


@dataclass(frozen=True)
class StrategySpec:
    name: str
    build: Callable[[BuildContext], SupervisedTemplate]
    joint: bool  # trained once on all classes (an i.i.d. upper bound), evaluated at the end
    uses_bottleneck: bool  # needs the seed's fitted key-value bottleneck
    # the run stages whose fields the builder reads (identity.py): its runs are shared by
    # grid points that agree on those fields. Unsaid, every run field: never shared wrongly
    reads: frozenset[Stage] = frozenset({Stage.BOTTLENECK_RUNS, Stage.BASELINE_RUNS})

    def __post_init__(self) -> None:
        runs = {Stage.BOTTLENECK_RUNS, Stage.BASELINE_RUNS}
        if not self.reads or not self.reads <= runs:
            raise ValueError(f"strategy {self.name!r}: reads must name run stages "
                             f"(Stage.BOTTLENECK_RUNS, Stage.BASELINE_RUNS or Stage.RUNS), got "
                             f"{sorted(self.reads)}")
        if self.uses_bottleneck and Stage.BOTTLENECK_RUNS not in self.reads:
            raise ValueError(f"strategy {self.name!r} uses the bottleneck: its reads must "
                             "include Stage.BOTTLENECK_RUNS (its runs depend on the keys)")


class StrategyRegistry(Mapping[str, StrategySpec]):
    """Strategies by name, in registration order."""

    def __init__(self, family: str, entry_points: str | None = None) -> None:
        self.family = family
        self._specs: dict[str, StrategySpec] = {}
        # installed packages register strategies through this entry-point group: each entry
        # names a module (or an object in one) whose import registers them, loaded once
        self.entry_points, self._loaded = entry_points, entry_points is None

    def _load_entry_points(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for entry in metadata.entry_points(group=self.entry_points):
            try:
                entry.load()
            except Exception as e:  # noqa: BLE001 (one broken package must not stop the rest)
                log.warning("entry point %r = %r of group %r failed to load, its strategies "
                            "are missing: %s: %s", entry.name, entry.value, self.entry_points,
                            type(e).__name__, e)

    def register(self, name: str, *, joint: bool = False, uses_bottleneck: bool = False,
                 reads: Stage | Iterable[Stage] = Stage.RUNS
                 ) -> Callable[[Callable[[BuildContext], SupervisedTemplate]],
                               Callable[[BuildContext], SupervisedTemplate]]:
        """Register a builder. ``reads``: the run stages whose configuration fields it
        reads (``Stage.BOTTLENECK_RUNS``: KVB's, ``Stage.BASELINE_RUNS``: the baselines',
        default ``Stage.RUNS``, both); a sweep shares its runs only across grid points that
        agree on all of those fields."""
        stages = {Stage(s) for s in ((reads,) if isinstance(reads, str) else reads)}
        if Stage.RUNS in stages:
            stages = (stages - {Stage.RUNS}) | {Stage.BOTTLENECK_RUNS, Stage.BASELINE_RUNS}
        StrategySpec(name, lambda ctx: None, joint, uses_bottleneck, frozenset(stages))

        def add(build: Callable[[BuildContext], SupervisedTemplate]):
            if name in self._specs:
                raise ValueError(f"strategy {name!r} is registered already in {self.family}")
            self._specs[name] = StrategySpec(name, build, joint, uses_bottleneck,
                                             frozenset(stages))
            return build

        return add

    def adopt(self, spec: StrategySpec) -> None:
        """Register a spec built elsewhere (a worker adopting the driver's strategy)."""
        if spec.name in self._specs and self._specs[spec.name] is not spec:
            raise ValueError(f"strategy {spec.name!r} is registered already in {self.family}")
        self._specs[spec.name] = spec

    def __getitem__(self, name: str) -> StrategySpec:
        self._load_entry_points()
        if name not in self._specs:
            raise KeyError(f"unknown {self.family} strategy {name!r}; choose from "
                           f"{', '.join(self._specs)}")
        return self._specs[name]

    def __iter__(self) -> Iterator[str]:
        self._load_entry_points()
        return iter(list(self._specs))

    def __len__(self) -> int:
        self._load_entry_points()
        return len(self._specs)


# ---------------------------------------------------------------------------- split CIFAR
STRATEGIES = StrategyRegistry("split CIFAR", entry_points="kvb_avalanche.strategies")


def kvb_decoder(config: Any, codebooks: int, dim_values: int, num_classes: int) -> nn.Module:
    """The configuration's decoder: voting (the paper's), linear or mlp (``hidden`` units)."""
    if getattr(config, "decoder", "voting") == "voting":
        return VotingDecoder(num_classes)
    if config.decoder == "linear":
        return LinearDecoder(codebooks, dim_values, num_classes)
    return MLPDecoder(codebooks, dim_values, num_classes, hidden=config.hidden)


def _kvb(ctx: BuildContext) -> SupervisedTemplate:
    cfg, bn = ctx.config, ctx.bottleneck
    model = KVBModel(None, bn, kvb_decoder(cfg, bn.codebooks, bn.dim_values, ctx.num_classes))
    optimizer = None  # the voting decoder: SparseSGD on the values, the paper's
    if list(model.decoder.parameters()):  # a trained decoder learns at the values' lr
        optimizer = torch.optim.SGD([{"params": [bn.values]},
                                     {"params": list(model.decoder.parameters())}],
                                    lr=cfg.kvb_lr)
    return KVBStrategy(model=model, lr=cfg.kvb_lr, optimizer=optimizer,
                       train_epochs=cfg.kvb_epochs, cache_codes=False,
                       plugins=[ctx.codes] if ctx.codes is not None else [], **ctx.common())


STRATEGIES.register("kvb", uses_bottleneck=True, reads=Stage.BOTTLENECK_RUNS)(_kvb)


def _mlp(dim: int, hidden: int, classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def _head(ctx: BuildContext, linear: bool) -> dict:
    """A linear or MLP head with its Adam optimiser, cross-entropy and the baseline epochs."""
    cfg = ctx.config
    model = (nn.Linear(ctx.dim, ctx.num_classes) if linear
             else _mlp(ctx.dim, cfg.hidden, ctx.num_classes))
    return dict(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=cfg.lr),
                criterion=nn.CrossEntropyLoss(), train_epochs=cfg.epochs, **ctx.common())


def _register_heads(registry: StrategyRegistry, head: Callable[[BuildContext, bool], dict],
                    names: tuple[str, str, str, str], buffer_field: str) -> None:
    """A linear probe, then naive fine-tuning, EWC and replay of an MLP head (in that
    order, under ``names``), each with the head ``head(ctx, linear)`` gives."""
    probe, naive, ewc, replay = names
    baseline = Stage.BASELINE_RUNS
    registry.register(probe, reads=baseline)(lambda ctx: Naive(**head(ctx, True)))
    registry.register(naive, reads=baseline)(lambda ctx: Naive(**head(ctx, False)))
    registry.register(ewc, reads=baseline)(
        lambda ctx: EWC(ewc_lambda=ctx.config.ewc_lambda, **head(ctx, False)))
    registry.register(replay, reads=baseline)(lambda ctx: Replay(
        mem_size=getattr(ctx.config, buffer_field),
                                                 **head(ctx, False)))


_register_heads(STRATEGIES, _head, ("linear_probe", "naive", "ewc", "replay"), "buffer_size")


@STRATEGIES.register("lwf", reads=Stage.BASELINE_RUNS)
def _lwf(ctx: BuildContext) -> SupervisedTemplate:
    cfg = ctx.config
    return LwF(alpha=cfg.lwf_alpha, temperature=cfg.lwf_temperature, **_head(ctx, linear=False))


@STRATEGIES.register("slda", reads=Stage.BASELINE_RUNS)
def _slda(ctx: BuildContext) -> SupervisedTemplate:
    return BatchedStreamingLDA(slda_model=nn.Identity(), criterion=nn.CrossEntropyLoss(),
                        input_size=ctx.dim, num_classes=ctx.num_classes, shrinkage_param=1e-4,
                        train_epochs=1, **ctx.common())


# the field's methods on frozen pretrained features: closed-form heads, no gradient step
@STRATEGIES.register("ncm", reads=Stage.BASELINE_RUNS)
def _ncm(ctx: BuildContext) -> SupervisedTemplate:
    return NCMStrategy(num_classes=ctx.num_classes, **ctx.common())


@STRATEGIES.register("simplecil", reads=Stage.BASELINE_RUNS)
def _simplecil(ctx: BuildContext) -> SupervisedTemplate:
    return SimpleCILStrategy(num_classes=ctx.num_classes, dim=ctx.dim, **ctx.common())


@STRATEGIES.register("fecam", reads=Stage.BASELINE_RUNS)
def _fecam(ctx: BuildContext) -> SupervisedTemplate:
    return FeCAMStrategy(num_classes=ctx.num_classes, **ctx.common())


@STRATEGIES.register("ranpac", reads=Stage.BASELINE_RUNS)
def _ranpac(ctx: BuildContext) -> SupervisedTemplate:
    return RanPACStrategy(num_classes=ctx.num_classes, dim=ctx.dim,
                          projection_dim=ctx.config.ranpac_dim, seed=ctx.seed, **ctx.common())


# the frozen-feature baselines the claims table compares KVB with (the strongest of them)
FROZEN_FEATURE: tuple[str, ...] = ("slda", "ncm", "simplecil", "fecam", "ranpac")


@STRATEGIES.register("joint_linear", joint=True, reads=Stage.BASELINE_RUNS)
def _joint_linear(ctx: BuildContext) -> SupervisedTemplate:
    return Naive(**_head(ctx, linear=True))


STRATEGIES.register("kvb_joint", joint=True, uses_bottleneck=True,
                    reads=Stage.BOTTLENECK_RUNS)(_kvb)


# the default strategies of a configuration: these, whatever else is registered, so that
# registering one (or installing a package that does) leaves old results' defaults alone
BUILTIN: tuple[str, ...] = tuple(STRATEGIES._specs)  # noqa: SLF001 (no entry points yet)


# ---------------------------------------------------------------------------- the 2-D toy
TOY = StrategyRegistry("2-D toy")


def _toy_common(ctx: BuildContext) -> dict:
    return dict(train_mb_size=100, train_epochs=ctx.config.steps, eval_mb_size=1000,
                evaluator=ctx.evaluator, criterion=nn.CrossEntropyLoss())


def _toy_kvb(codebooks: int, pairs: int, projection: str, masked: bool = False):
    def build(ctx: BuildContext) -> SupervisedTemplate:
        from kvb_avalanche.benchmarks.toy import key_init_points

        torch.manual_seed(ctx.seed)
        bn = KeyValueBottleneck(2, codebooks, pairs, 2, ctx.num_classes, projection=projection,
                                values_init="randn", values_init_std=1e-3, seed=ctx.seed,
                                mask_unused_keys=masked)
        model = KVBModel(None, bn, VotingDecoder(ctx.num_classes))
        adam = torch.optim.Adam([model.bottleneck.values], lr=ctx.config.lr)
        fit = KeyFitConfig(epochs=1, kmeans_start=False, seed=ctx.seed)
        return KVBStrategy(model=model, optimizer=adam, key_fit=fit, clip_grad_norm=None,
                           key_init_loader=key_init_points(ctx.seed, ctx.config.key_steps),
                           **_toy_common(ctx))

    return build


TOY.register("kvb_20x20")(_toy_kvb(20, 20, "random"))
TOY.register("kvb_1x400")(_toy_kvb(1, 400, "chunk"))
TOY.register("kvb_1x400_masked")(_toy_kvb(1, 400, "chunk", masked=True))


def _toy_head(ctx: BuildContext, linear: bool) -> dict:
    torch.manual_seed(ctx.seed)
    model = (nn.Linear(2, ctx.num_classes) if linear else
             nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, ctx.num_classes)))
    adam = torch.optim.Adam(model.parameters(), lr=ctx.config.lr)
    return dict(model=model, optimizer=adam, **_toy_common(ctx))


_register_heads(TOY, _toy_head, ("linear_probe", "naive_mlp", "ewc_mlp", "replay_mlp"),
                "replay_size")
