"""The experiment machinery: typed configurations whose fields declare the stages they change
(identity), strategy registries, the runner with its run store and reports, and sweeps run
by an engine (in this process, on Ray or on SLURM)."""

from kvb_avalanche.experiments.config import (
    QUICK,
    ConfigError,
    ExperimentConfig,
    ToyConfig,
)
from kvb_avalanche.experiments.engines import ENGINES, Engine, EngineOptions
from kvb_avalanche.experiments.identity import Stage
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
from kvb_avalanche.experiments.sweep import (
    SweepFailed,
    SweepSpec,
    load_spec,
    parse_spec,
    report,
    run_sweep,
)

__all__ = [
    "ENGINES",
    "QUICK",
    "STRATEGIES",
    "TOY",
    "BuildContext",
    "ConfigError",
    "Engine",
    "EngineOptions",
    "ExperimentConfig",
    "KeySharingRow",
    "MatrixRow",
    "RunOptions",
    "RunRecord",
    "RunStore",
    "Stage",
    "StrategyRegistry",
    "SweepFailed",
    "SweepSpec",
    "ToyConfig",
    "Workbench",
    "fit_bottleneck",
    "load_spec",
    "make_evaluator",
    "parse_spec",
    "report",
    "run_experiment",
    "run_stream",
    "run_sweep",
    "run_toy",
]
