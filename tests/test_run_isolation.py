"""A run's numbers are a function of its configuration and seed alone: a baseline run alone
gives the same bits as after other strategies (keys fitted, KVB with the fused step,
StreamingLDA, replay, the linear probe) ran in the process, whatever they left in the
global torch, numpy and ``random`` generators."""

import random

import numpy as np
import pytest
import torch
from avalanche.training.supervised import Naive

import kvb_avalanche.experiments.runner as runner
from kvb_avalanche.benchmarks.embedded import EmbeddedSplits
from kvb_avalanche.experiments.config import QUICK, ExperimentConfig
from kvb_avalanche.experiments.strategies import STRATEGIES, StrategySpec, _head
from kvb_avalanche.plugin import FrozenCodesPlugin

SEED = 2
BEFORE = ["kvb", "slda", "replay", "linear_probe", "kvb_joint"]
BASELINES = ["naive", "ewc", "lwf", "replay", "global_rng_probe"]


def _global_rng_probe(ctx):
    """An MLP head initialised from numpy and ``random`` (as a user's strategy may be): its
    numbers depend on those generators' state when the run starts."""
    strategy = Naive(**_head(ctx, linear=False))
    with torch.no_grad():
        for p in strategy.model.parameters():
            p.copy_(torch.from_numpy(np.random.standard_normal(p.shape).astype("float32"))
                    * (0.05 + 0.01 * random.random()))
    return strategy


@pytest.fixture
def setup(monkeypatch):
    monkeypatch.setitem(STRATEGIES._specs, "global_rng_probe", StrategySpec(
        "global_rng_probe", _global_rng_probe, joint=False, uses_bottleneck=False))
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 32, generator=g).abs()
    y = torch.arange(400) % 10
    x = (centres[y] + torch.randn(400, 32, generator=g)).relu()
    data = EmbeddedSplits((x[:300], y[:300]), (x[300:], y[300:]), x[:300], 10, {},
                          {"key_init": {"embedding_cache_identity": "a"}})
    config = ExperimentConfig(**{**QUICK, "epochs": 2, "kvb_epochs": 2, "batch_size": 32,
                                 "hidden": 16, "seeds": (SEED,)})
    params = {}
    run_stream = runner.run_stream

    def keeping_parameters(strategy, benchmark, name, seed, *args, **kwargs):
        out = run_stream(strategy, benchmark, name, seed, *args, **kwargs)
        params[name] = [t.detach().clone() for t in strategy.model.state_dict().values()]
        return out

    monkeypatch.setattr(runner, "run_stream", keeping_parameters)
    bottleneck = runner.fit_bottleneck(config, data, SEED, progress=False)

    def run(name):
        bn = bottleneck if STRATEGIES[name].uses_bottleneck else None
        codes = FrozenCodesPlugin(progress=False) if bn is not None else None
        record = runner.run_split(config, data, name, SEED, bn, codes, None, progress=False)
        return record.matrix, params.pop(name, None)

    return run


def _scramble(k):
    """Leave the global generators somewhere else, as an earlier run would."""
    torch.rand(k)
    np.random.rand(k)
    for _ in range(k):
        random.random()


def test_a_baseline_alone_and_after_other_strategies_gives_the_same_bits(setup):
    run = setup
    alone = {}
    for name in BASELINES:
        _scramble(1)
        alone[name] = run(name)
    _scramble(7)
    for name in BEFORE:
        run(name)
    for name in BASELINES:
        matrix, params = run(name)
        assert matrix == alone[name][0], name
        assert len(params) == len(alone[name][1]) > 0, name
        for a, b in zip(params, alone[name][1], strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b), name
