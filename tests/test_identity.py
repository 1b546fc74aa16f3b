"""Identities derived from the fields' stage declarations: every field declares one, a change
of a field changes exactly the identities it declares, and what it is declared not to
change stays bitwise equal when the stages really run."""

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from kvb_avalanche.experiments.config import QUICK, ExperimentConfig, describe
from kvb_avalanche.experiments.identity import Stage, changes, undeclared
from kvb_avalanche.experiments.runner import (
    RunOptions,
    Workbench,
    data_identity,
    fit_bottleneck,
    key_identity,
    run_identity,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY = {**QUICK, "max_per_class": 20, "test_max_per_class": 10, "key_init_max_per_class": 5,
        "codebooks": 8, "num_pairs": 32, "dim_keys": 4, "kvb_epochs": 3, "epochs": 2,
        "kmeans_samples": 200, "buffer_size": 20, "device": "cpu", "seeds": [0]}
# a valid other value of every field (the tiny base is TINY over the defaults)
CHANGED = {
    "benchmark": ("split_cifar100", {"n_experiences": 5, "key_init_data": "cifar10"}),
    "n_experiences": (2, {}), "seeds": ([0, 1], {}), "strategies": (["kvb", "naive"], {}),
    "encoder": ("efficientnet_lite2", {}), "weights": (None, {}), "resolution": (40, {}),
    "device": ("auto", {}), "max_per_class": (15, {}), "test_max_per_class": (8, {}),
    "key_init_data": ("cifar10", {}), "key_init_max_per_class": (4, {}),
    "shuffle_classes": (True, {}), "codebooks": (16, {}), "num_pairs": (64, {}),
    "dim_keys": (6, {}), "dim_values": (None, {}), "topk": (2, {}), "kvb_lr": (1.0, {}),
    "kvb_epochs": (1, {}), "mask_unused_keys": (True, {}), "key_init": ("official", {}),
    "key_epochs": (1, {}), "kmeans_samples": (100, {}), "kmeans_iters": (1, {}),
    "epochs": (4, {}), "lr": (0.05, {}), "batch_size": (16, {}), "hidden": (8, {}),
    "buffer_size": (5, {}), "ewc_lambda": (1e6, {}), "lwf_alpha": (20.0, {}),
    "lwf_temperature": (0.25, {}), "ranpac_dim": (16, {}),
    "online": (True, {"epochs": 1, "kvb_epochs": 1}),
    "experience_size": (5, {"online": True, "epochs": 1, "kvb_epochs": 1}),
    "projection": ("chunk", {"codebooks": 320, "dim_keys": 4}),  # 320 x 4 = 1280 features
    "decoder": ("linear", {}),
}
# the baseline that reads each baseline field (linear_probe for the rest)
BASELINE = {"hidden": "naive", "buffer_size": "replay", "ewc_lambda": "ewc",
            "lwf_alpha": "lwf", "lwf_temperature": "lwf", "ranpac_dim": "ranpac"}
# fields whose other value cannot be tried on this machine, or by a real run here
NOT_RUN = {
    "weights": "needs a second weights file of the same encoder",
    "dim_values": "the voting decoder takes only the class count",
    "device": "one device here: 'auto' is the CPU (a GPU's autocast embeddings differ: "
              "results/gpu_check)",
}


def base() -> ExperimentConfig:
    return ExperimentConfig.from_dict({**TINY, "strategies": ["kvb", "linear_probe"]})


def changed(name: str) -> ExperimentConfig:
    value, also = CHANGED[name]
    if name == "weights" or name == "dim_values":  # only their default is valid here
        return base()
    return base().replace(**{name: value, **also})


def test_every_field_declares_the_stages_it_changes():
    assert undeclared(ExperimentConfig) == []
    assert set(CHANGED) == {f.name for f in dataclasses.fields(ExperimentConfig)}

    @dataclass(frozen=True)
    class Forgetful:
        declared: int = field(default=1, metadata=describe("x", stage=Stage.KEYS))
        forgotten: int = field(default=1, metadata=describe("y"))
        misspelt: int = field(default=1, metadata=describe("z", stage="keyz"))

    assert undeclared(Forgetful) == ["forgotten", "misspelt"]


def _identities(config: ExperimentConfig, baseline: str) -> dict[Stage, tuple]:
    return {Stage.EMBEDDINGS: data_identity(config), Stage.KEYS: key_identity(config, 0),
            Stage.BOTTLENECK_RUNS: run_identity(config, "kvb", 0),
            Stage.BASELINE_RUNS: run_identity(config, baseline, 0)}


@pytest.mark.parametrize("name", sorted(CHANGED))
def test_a_change_of_a_field_changes_exactly_the_identities_it_declares(name):
    if name in ("weights", "dim_values"):
        pytest.skip(NOT_RUN[name])
    before = _identities(base(), BASELINE.get(name, "linear_probe"))
    after = _identities(changed(name), BASELINE.get(name, "linear_probe"))
    moved = {stage for stage in before if before[stage] != after[stage]}
    expected = set(changes(ExperimentConfig, name))
    f = ExperimentConfig.__dataclass_fields__[name]
    if f.metadata.get("embedded"):  # the key-initialisation images: embedded, keys only
        expected.add(Stage.EMBEDDINGS)
    if name == "benchmark":  # it sets other fields too (its defaults)
        expected |= changes(ExperimentConfig, "n_experiences")
    assert moved == expected


def test_the_fields_deciding_the_first_experience_decide_keys_fitted_on_it():
    first = base().replace(key_init_data="none")
    for name in ("n_experiences", "shuffle_classes", "max_per_class"):
        value, also = CHANGED[name]
        assert key_identity(first, 0) != key_identity(first.replace(**{name: value}), 0)
    # with keys fitted on other data, the experiences do not decide them
    assert key_identity(base(), 0) == key_identity(base().replace(n_experiences=2), 0)


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def _outputs(config: ExperimentConfig, baseline: str, cache: Path) -> dict[Stage, object]:
    """Every stage's output, computed afresh (no sharing by identity): embeddings and
    key-initialisation embeddings, keys, a KVB run and a baseline run of seed 0."""
    bench = Workbench(RunOptions(cache_dir=cache, progress=False))
    data = bench.data(config.replace(strategies=["kvb", baseline]))
    bottleneck = fit_bottleneck(config, data, 0, progress=False)

    def run(strategy: str) -> tuple:
        record = Workbench(RunOptions(cache_dir=cache, progress=False)).run(
            config.replace(strategies=[strategy]), strategy, 0)
        return (tuple(r.accuracy for r in record.matrix),
                tuple(str(d) for d in record.extra.get("kvb_diagnostics", [])))

    return {Stage.EMBEDDINGS: _digest(data.train[0], data.test[0]),
            Stage.KEYS: (_digest(bottleneck.projection, bottleneck.keys),
                         _digest(data.key_init) if data.key_init is not None else None),
            Stage.BOTTLENECK_RUNS: run("kvb"), Stage.BASELINE_RUNS: run(baseline)}


@pytest.mark.skipif(not (SHARED / "cifar10").is_dir(), reason="needs CIFAR under ../shared/data")
def test_what_a_field_is_declared_not_to_change_stays_bitwise_equal(cifar_cache):
    # the outputs are computed afresh for every change, so sharing cannot hide a change:
    # a stage a field is not declared for must give the very same bits, and a run it is
    # declared for must give other numbers (else the declaration costs runs for nothing)
    reference: dict[str, dict] = {}
    wrong = []
    for name in sorted(CHANGED):
        if name in NOT_RUN:
            continue
        baseline = BASELINE.get(name, "linear_probe")
        if baseline not in reference:
            reference[baseline] = _outputs(base(), baseline, cifar_cache)
        before, after = reference[baseline], _outputs(changed(name), baseline, cifar_cache)
        declared = changes(ExperimentConfig, name) | (
            changes(ExperimentConfig, "n_experiences") if name == "benchmark" else set())
        for stage in before:
            if stage not in declared and before[stage] != after[stage]:
                wrong.append(f"{name} changed {stage} but does not declare it")
        runs = declared & {Stage.BOTTLENECK_RUNS, Stage.BASELINE_RUNS}
        if runs and all(before[s] == after[s] for s in runs):
            wrong.append(f"{name} declares {sorted(runs)} but changed none of them")
    assert not wrong, wrong


def test_a_strategy_that_does_not_say_what_it_reads_is_never_shared_across_a_field(
        monkeypatch):
    # a user's KVB variant reading the baselines' lr: unsaid, every run field decides it
    from kvb_avalanche.experiments.runner import is_reference
    from kvb_avalanche.experiments.strategies import STRATEGIES, StrategyRegistry

    registry = StrategyRegistry("test")
    registry.register("kvb_adam", uses_bottleneck=True)(lambda ctx: None)
    monkeypatch.setitem(STRATEGIES._specs, "kvb_adam", registry["kvb_adam"])  # noqa: SLF001
    config = base()
    for name, value in (("lr", 0.05), ("kvb_lr", 1.0), ("epochs", 4), ("codebooks", 16)):
        assert run_identity(config, "kvb_adam", 0) != run_identity(
            config.replace(**{name: value}), "kvb_adam", 0), name
        assert not is_reference("kvb_adam", name)
    assert is_reference("kvb", "lr") and is_reference("linear_probe", "kvb_lr")
    with pytest.raises(ValueError, match="reads must name run stages"):
        registry.register("odd", reads=Stage.KEYS)
    with pytest.raises(ValueError, match="uses the bottleneck: its reads must include"):
        registry.register("keyless", uses_bottleneck=True, reads=Stage.BASELINE_RUNS)


def test_an_engine_on_other_machines_fixes_the_device_auto_once_for_all_of_them():
    from kvb_avalanche.experiments.spec import parse_spec

    spec = parse_spec({"parameters": {"codebooks": {"values": [8, 16]}}})
    assert spec.with_device("cpu").fixed["device"] == "cpu"
    assert all(c.device == "cuda" for _, c in spec.with_device("cuda").points())
    swept = parse_spec({"parameters": {"device": {"values": ["auto", "cpu"]}}})
    assert swept.with_device("cuda").grid["device"] == ["cuda", "cpu"]
    fixed = parse_spec({"parameters": {"device": {"value": "cpu"}}})
    assert fixed.with_device("cuda").fixed["device"] == "cpu"  # what the user said stays


@pytest.mark.skipif(not (SHARED / "cifar10").is_dir(), reason="needs CIFAR under ../shared/data")
def test_keys_fitted_on_the_first_experience_change_with_the_fields_that_decide_it(
        cifar_cache):
    first = base().replace(key_init_data="none")
    data = Workbench(RunOptions(cache_dir=cifar_cache, progress=False)).data(first)
    keys = {name: fit_bottleneck(first.replace(**{name: value}), data, 0, progress=False).keys
            for name, value in (("n_experiences", 2), ("shuffle_classes", True))}
    reference = fit_bottleneck(first, data, 0, progress=False).keys
    assert all(not torch.equal(reference, k) for k in keys.values())
    # with keys fitted on other data, the experiences leave them as they are
    other = Workbench(RunOptions(cache_dir=cifar_cache, progress=False)).data(base())
    assert torch.equal(fit_bottleneck(base(), other, 0, progress=False).keys,
                       fit_bottleneck(base().replace(n_experiences=2), other, 0,
                                      progress=False).keys)
