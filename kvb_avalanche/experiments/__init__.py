"""The experiment machinery: typed configurations, strategy registries, the runner with its
run store and reports, and sweeps (in this process or on Ray)."""

from kvb_avalanche.experiments.config import (
    QUICK,
    ConfigError,
    ExperimentConfig,
    ToyConfig,
)
from kvb_avalanche.experiments.records import KeySharingRow, MatrixRow, RunRecord, RunStore
from kvb_avalanche.experiments.runner import (
    RunOptions,
    Workbench,
    fit_bottleneck,
    make_evaluator,
    run_experiment,
    run_stream,
    run_toy,
)
from kvb_avalanche.experiments.strategies import STRATEGIES, TOY, BuildContext, StrategyRegistry
from kvb_avalanche.experiments.sweep import SweepSpec, load_spec, parse_spec, run_sweep

__all__ = [
    "QUICK",
    "STRATEGIES",
    "TOY",
    "BuildContext",
    "ConfigError",
    "ExperimentConfig",
    "KeySharingRow",
    "MatrixRow",
    "RunOptions",
    "RunRecord",
    "RunStore",
    "StrategyRegistry",
    "SweepSpec",
    "ToyConfig",
    "Workbench",
    "fit_bottleneck",
    "load_spec",
    "make_evaluator",
    "parse_spec",
    "run_experiment",
    "run_stream",
    "run_sweep",
    "run_toy",
]
