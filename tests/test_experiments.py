"""The experiment layer's parts: typed configurations, the strategy registry, the embedded
benchmark generators, the decoded-image cache, reports from stored runs, the wheel."""

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from kvb_avalanche.benchmarks import cifar
from kvb_avalanche.cli import main as cli
from kvb_avalanche.experiments import (
    QUICK,
    STRATEGIES,
    TOY,
    ConfigError,
    ExperimentConfig,
    ToyConfig,
)
from kvb_avalanche.experiments.config import flag
from kvb_avalanche.experiments.strategies import StrategySpec

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
needs_cifar = pytest.mark.skipif(not (SHARED / "cifar10").is_dir(),
                                 reason="needs CIFAR under ../shared/data")


# ---------------------------------------------------------------------------- configuration
def test_config_round_trips_through_json():
    config = ExperimentConfig(**{**QUICK, "kvb_lr": 3}, seeds=[3, 4], strategies=["kvb", "slda"],
                              weights=None, shuffle_classes=True)
    again = ExperimentConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert again.seeds == (3, 4) and again.kvb_lr == 3.0 and isinstance(again.kvb_lr, float)
    assert config.to_dict()["seeds"] == [3, 4]  # plain JSON types
    toy = ToyConfig(steps=5)
    assert ToyConfig.from_dict(json.loads(json.dumps(toy.to_dict()))) == toy


def test_defaults_are_the_papers_bottleneck_and_every_registered_strategy():
    config = ExperimentConfig()
    assert (config.codebooks, config.num_pairs, config.dim_keys, config.kvb_lr) == (
        256, 4096, 14, 0.3)
    assert config.strategies == tuple(STRATEGIES) and config.values_dim == 10
    assert ExperimentConfig(benchmark="split_cifar100", n_experiences=50).values_dim == 100


@pytest.mark.parametrize("values, field, message", [
    ({"kvb_epochs": 0}, "kvb_epochs", "kvb_epochs must be a positive integer, got 0"),
    ({"codebooks": "many"}, "codebooks", "codebooks must be an integer, got 'many'"),
    ({"kvb_lr": True}, "kvb_lr", "kvb_lr must be a number, got True"),
    ({"seeds": []}, "seeds", "seeds must be a non-empty list, got []"),
    ({"seeds": "0"}, "seeds", "seeds must be a list of int, got '0'"),
    ({"key_init_data": "imagenet"}, "key_init_data",
     "key_init_data must be a registered data set or 'none' (cifar10, cifar100, fmnist, "),
    ({"strategies": ["kvb", "icarl"]}, "strategies", "unknown strategy 'icarl' in strategies"),
    ({"strategies": ["kvb", "kvb"]}, "strategies", "strategies lists a strategy twice"),
    ({"n_experiences": 3}, "n_experiences",
     "n_experiences of split_cifar10 must divide the 10 classes, got 3"),
    ({"topk": 5000}, "topk", "topk (5000) must be <= num_pairs (4096)"),
    ({"dim_values": 12}, "dim_values", "dim_values must equal the number of classes (10)"),
    ({"encoder": "vit"}, "encoder", "encoder: unknown encoder 'vit'"),
    ({"weights": "/no/such/file.pt"}, "weights", "weights /no/such/file.pt: no such file"),
    ({"num_pairz": 4}, "num_pairz", "num_pairz is not a field of ExperimentConfig (did you "
                                    "mean num_pairs?)"),
])
def test_bad_values_are_refused_naming_the_field(values, field, message):
    with pytest.raises(ConfigError) as err:
        ExperimentConfig.from_dict(values)
    assert err.value.field == field
    assert message in str(err.value)


def test_errors_render_with_the_command_lines_flags():
    with pytest.raises(ConfigError) as err:
        ExperimentConfig(topk=5000)
    assert err.value.render(flag).startswith("--topk (5000) must be <= --num-pairs (4096)")


def test_quick_flag_keeps_the_flags_given_from_a_shell(tmp_path):
    """`--quick --kvb-epochs 5` from a shell (argv None) runs 5 epochs, not --quick's 30."""
    script = ("import sys; from kvb_avalanche.cli import build_parser, config_from; "
              "from kvb_avalanche.experiments.config import QUICK, ExperimentConfig; "
              "args = build_parser().parse_args(); "
              "print(config_from(args, ExperimentConfig, QUICK).kvb_epochs)")
    out = subprocess.run([sys.executable, "-c", script, "split-cifar10", "--out", str(tmp_path),
                          "--quick", "--kvb-epochs", "5"], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip().splitlines()[-1] == "5"


def test_the_command_starts_without_avalanches_qp_solver_warning():
    """Avalanche imports qpsolvers (for GEM), which warns at import when no QP solver is
    installed; `kvb-avalanche` does not use GEM, so its users should not see that on every run."""
    qpsolvers = pytest.importorskip("qpsolvers")
    if qpsolvers.available_solvers:
        pytest.skip("a QP solver is installed, so qpsolvers does not warn")
    out = subprocess.run([sys.executable, "-W", "always", "-m", "kvb_avalanche.cli", "--help"],
                         capture_output=True, text=True, check=True)
    assert "kvb-avalanche" in out.stdout
    assert "QP solver" not in out.stderr
    assert "Warning" not in out.stderr, out.stderr


# ---------------------------------------------------------------------------- registry
def test_registry_says_which_strategies_are_joint_and_use_the_bottleneck():
    assert {s for s in STRATEGIES if STRATEGIES[s].joint} == {"joint_linear", "kvb_joint"}
    assert {s for s in STRATEGIES if STRATEGIES[s].uses_bottleneck} == {"kvb", "kvb_joint"}
    assert list(TOY)[:3] == ["kvb_20x20", "kvb_1x400", "kvb_1x400_masked"]
    with pytest.raises(KeyError, match="unknown split CIFAR strategy 'icarl'; choose from kvb,"):
        STRATEGIES["icarl"]
    with pytest.raises(ValueError, match="strategy 'kvb' is registered already"):
        STRATEGIES.register("kvb")(lambda ctx: None)


def _config_fields_read(node: ast.AST) -> set[str]:
    """Fields read as ``cfg.X`` or ``ctx.config.X`` under ``node``."""
    return {a.attr for a in ast.walk(node) if isinstance(a, ast.Attribute) and (
        (isinstance(a.value, ast.Name) and a.value.id == "cfg")
        or (isinstance(a.value, ast.Attribute) and a.value.attr == "config"))}


def test_every_field_a_builder_reads_is_declared_to_change_its_runs():
    # a sweep shares a run across points that differ only in fields not declared for its
    # stage: a builder reading an undeclared field would silently share a wrong run
    from kvb_avalanche.experiments import strategies
    from kvb_avalanche.experiments.identity import Stage, changes
    from kvb_avalanche.experiments.runner import run_identity
    from kvb_avalanche.experiments.strategies import BUILTIN

    tree = ast.parse(Path(strategies.__file__).read_text())
    functions = {f.name: f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)}
    kvb = _config_fields_read(functions["_kvb"])
    assert kvb == {"kvb_lr", "kvb_epochs"}
    # each of ours says which run stage it reads; a registration that does not, reads all
    assert STRATEGIES["kvb"].reads == STRATEGIES["kvb_joint"].reads == {Stage.BOTTLENECK_RUNS}
    assert all(STRATEGIES[s].reads == {Stage.BASELINE_RUNS} for s in BUILTIN
               if not STRATEGIES[s].uses_bottleneck)
    assert all(Stage.BOTTLENECK_RUNS in changes(ExperimentConfig, f) for f in kvb)
    baseline_code = [f for name, f in functions.items()
                     if name not in ("_kvb", "common", "build") and not name.startswith("_toy")]
    read = set().union(*map(_config_fields_read, baseline_code))
    assert {"lr", "epochs", "hidden", "ewc_lambda", "lwf_alpha"} <= read  # + buffer_size
    assert all(Stage.BASELINE_RUNS in changes(ExperimentConfig, f) for f in read), read
    # common(): every strategy reads the batch size
    assert _config_fields_read(functions["common"]) == {"batch_size"}
    assert changes(ExperimentConfig, "batch_size") >= {Stage.BOTTLENECK_RUNS,
                                                       Stage.BASELINE_RUNS}
    config = ExperimentConfig()
    wider = config.replace(codebooks=64, kvb_lr=3.0, key_init="official")
    assert run_identity(config, "linear_probe", 0) == run_identity(wider, "linear_probe", 0)
    assert run_identity(config, "kvb", 0) != run_identity(wider, "kvb", 0)
    assert run_identity(config, "linear_probe", 0) != run_identity(config, "linear_probe", 1)
    assert (run_identity(config, "linear_probe", 0)
            != run_identity(config.replace(epochs=3), "linear_probe", 0))


def test_a_package_registers_strategies_through_the_entry_point_group(tmp_path, monkeypatch,
                                                                     caplog):
    # what `pip install my-package` with [project.entry-points."kvb_avalanche.strategies"]
    # leaves on sys.path: a dist-info naming the module, loaded at the registry's first use
    from kvb_avalanche.experiments.strategies import StrategyRegistry

    registry = StrategyRegistry("test", entry_points="kvb_test.strategies")
    (tmp_path / "my_strategies.py").write_text(
        "import builtins\nbuiltins._kvb_registry.register('mine')(lambda ctx: None)\n")
    info = tmp_path / "my_package-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-package\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[kvb_test.strategies]\nmine = my_strategies\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("builtins._kvb_registry", registry, raising=False)
    assert list(registry) == ["mine"] and registry["mine"].name == "mine"
    # a broken package is named in a warning, and does not take the others down with it
    (info / "entry_points.txt").write_text("[kvb_test.strategies]\nbroken = no_such_mod\n"
                                           "mine = my_strategies\n")
    monkeypatch.delitem(sys.modules, "my_strategies")
    again = StrategyRegistry("test", entry_points="kvb_test.strategies")
    monkeypatch.setattr("builtins._kvb_registry", again, raising=False)
    with caplog.at_level("WARNING"):
        assert list(again) == ["mine"]
    assert "entry point 'broken' = 'no_such_mod' of group 'kvb_test.strategies' failed to " \
           "load, its strategies are missing: ModuleNotFoundError" in caplog.text


def test_registering_a_strategy_leaves_the_default_configuration_alone(monkeypatch):
    # else every result stored before a package was installed would be refused as "another
    # configuration" (its default strategies would differ)
    before = ExperimentConfig()
    spec = StrategySpec("mine", lambda ctx: None, joint=False, uses_bottleneck=False)
    monkeypatch.setitem(STRATEGIES._specs, "mine", spec)
    assert ExperimentConfig().strategies == before.strategies and "mine" in STRATEGIES
    assert ExperimentConfig().to_dict() == before.to_dict()


def test_quick_is_the_same_preset_for_an_experiment_and_a_sweep():
    from kvb_avalanche.cli import build_parser, split_config
    from kvb_avalanche.experiments.config import quick
    from kvb_avalanche.experiments.spec import parse_spec

    for benchmark in ("split_cifar10", "split_cifar100"):
        args = build_parser().parse_args([benchmark.replace("_", "-"), "--out", "x", "--quick"])
        cli_config = split_config(args, benchmark)
        spec = parse_spec({"experiment": benchmark, "preset": "quick",
                           "parameters": {"seeds": {"values": list(cli_config.seeds)}}})
        (_, sweep_config), = spec.points()
        assert sweep_config == cli_config, benchmark
    assert quick("split_cifar100")["n_experiences"] == 10


def test_a_registered_strategy_is_a_valid_configuration_value(monkeypatch):
    spec = StrategySpec("mine", lambda ctx: None, joint=False, uses_bottleneck=False)
    monkeypatch.setitem(STRATEGIES._specs, "mine", spec)
    assert ExperimentConfig(strategies=["kvb", "mine"]).strategies == ("kvb", "mine")


def test_stored_keys_load_as_the_fitted_bottleneck_and_a_mismatch_names_the_file(tmp_path):
    from kvb_avalanche.benchmarks.embedded import EmbeddedSplits
    from kvb_avalanche.experiments.runner import fit_bottleneck, keys_path, load_keys, save_keys

    x = torch.randn(600, 24, generator=torch.Generator().manual_seed(0))
    y = torch.arange(600) % 10
    record = {"key_init": {"embedding_cache_identity": "a"}}
    data = EmbeddedSplits((x, y), (x[:100], y[:100]), x, 10, {}, record)
    config = ExperimentConfig(**QUICK)
    fitted = fit_bottleneck(config, data, seed=3, progress=False)
    path = keys_path(tmp_path, config, data, 3)
    save_keys(fitted, path)
    loaded = load_keys(config, data, 3, path)
    assert bool(loaded.keys_frozen) and loaded.fingerprint() == fitted.fingerprint()
    assert torch.equal(loaded.keys, fitted.keys) and not torch.equal(
        loaded.keys, fit_bottleneck(config, data, seed=4, progress=False).keys)
    assert loaded.fit_stats == fitted.fit_stats and loaded.fit_stats["ema_steps"] > 0
    assert path.stat().st_size < 1.2 * (fitted.keys.numel() + fitted.projection.numel()) * 4
    # what decides the keys names the file: another seed, key field or embedding differs
    other_data = EmbeddedSplits((x, y), (x, y), x, 10, {},
                                {"key_init": {"embedding_cache_identity": "b"}})
    others = {keys_path(tmp_path, config, data, 4),
              keys_path(tmp_path, config.replace(num_pairs=128), data, 3),
              keys_path(tmp_path, config, other_data, 3)}
    assert path not in others and len(others) == 3
    assert keys_path(tmp_path, config.replace(kvb_lr=1.0, epochs=3), data, 3) == path
    with pytest.raises(ValueError, match=re.escape(f"stored keys {path} hold projection of "
                                                   "shape (32, 24, 8), not (32, 24, 4)")):
        load_keys(config.replace(dim_keys=4), data, 3, path)


# ---------------------------------------------------------------------------- data
def test_decoded_archive_images_are_cached_and_served_the_next_time(tmp_path, monkeypatch):
    from test_cifar import make_images, write_archives, write_tree

    images, labels = make_images()
    tree = tmp_path / "tree"
    write_archives(tmp_path / "root", tree, [write_tree(tree, images, labels)])
    first = cifar.load_cifar("cifar10", "train", root=tmp_path / "root", progress=False,
                             cache_dir=tmp_path / "cache")
    (entry,) = (tmp_path / "cache").glob("cifar10-train-decoded-*.npz")

    def no_reading(*args, **kwargs):
        raise AssertionError("read the archives again")

    monkeypatch.setattr(cifar, "_read_archives", no_reading)
    again = cifar.load_cifar("cifar10", "train", root=tmp_path / "root", progress=False,
                             cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(again.images, first.images)
    assert again.identity == first.identity and again.source == first.source
    entry.write_bytes(entry.read_bytes()[:200])  # a truncated entry is not served
    monkeypatch.undo()
    rebuilt = cifar.load_cifar("cifar10", "train", root=tmp_path / "root", progress=False,
                               cache_dir=tmp_path / "cache")
    assert rebuilt.identity == first.identity


@needs_cifar
def test_split_cifar10_embedded_is_an_avalanche_benchmark_with_key_init_data(tmp_path):
    from kvb_avalanche.benchmarks import SplitCIFAR10Embedded

    bench = SplitCIFAR10Embedded(5, resolution=32, max_per_class=10, seed=3,
                                 key_init_data="cifar100", key_init_max_per_class=2,
                                 cache_dir=tmp_path, progress=False)
    assert len(bench.train_stream) == len(bench.test_stream) == 5
    order = torch.randperm(10, generator=torch.Generator().manual_seed(3)).tolist()
    assert [sorted(e.classes_in_this_experience) for e in bench.train_stream] == [
        sorted(order[i : i + 2]) for i in range(0, 10, 2)]
    x, y = bench.train_stream[0].dataset[0][:2]
    assert x.shape == (1280,) and x.dtype == torch.float32 and int(y) in order[:2]
    assert len(bench.train_stream[0].dataset) == 20 and len(bench.test_stream[0].dataset) == 10
    assert bench.key_init_data.shape == (200, 1280)  # 2 of each of CIFAR-100's classes
    assert bench.embeddings.record["cifar10_train"]["images"] == 100
    with pytest.raises(ValueError, match="n_experiences must divide the 10 classes, got 3"):
        SplitCIFAR10Embedded(3, cache_dir=tmp_path)


# ---------------------------------------------------------------------------- reports
def test_report_redraws_the_committed_split_cifar10_tables_from_its_packed_runs(tmp_path):
    committed = REPO / "results" / "split_cifar10"
    assert not (committed / "runs").exists()  # committed results keep them packed
    shutil.copy(committed / "raw.tar.xz", tmp_path / "raw.tar.xz")
    shutil.copy(committed / "config.json", tmp_path / "config.json")
    cli(["report", str(tmp_path)])
    assert len(list((tmp_path / "runs").glob("*.json"))) == 39  # 13 strategies x 3 seeds
    for table in ("summary.csv", "accuracy_matrix.csv", "key_sharing.csv", "expectations.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / table),
                                      pd.read_csv(committed / table), check_exact=False,
                                      rtol=1e-5)
    assert (tmp_path / "forgetting_curves.png").stat().st_size > 10_000


def test_report_of_a_folder_without_runs_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli(["report", str(tmp_path)])
    assert exit_.value.code == 2 and "holds no config.json" in capsys.readouterr().err


def test_the_registry_docstring_example_trains_on_the_runners_sparse_bottleneck():
    """The example in ``strategies``' docstring, run as written, on a bottleneck built as
    the runner builds it (sparse value gradients, keys fitted and frozen)."""
    import inspect
    import textwrap

    from avalanche.training.templates import SupervisedTemplate
    from conftest import blob_embeddings

    import kvb_avalanche
    from kvb_avalanche.benchmarks import tensor_scenario
    from kvb_avalanche.experiments import strategies
    from kvb_avalanche.experiments.identity import Stage
    from kvb_avalanche.experiments.runner import make_evaluator
    from kvb_avalanche.experiments.strategies import BuildContext, StrategyRegistry

    doc = inspect.getdoc(strategies)
    example = textwrap.dedent(doc.split("entry-point group:\n\n", 1)[1].split("\n\n(")[0])
    registry = StrategyRegistry("docstring")
    exec(example, {"STRATEGIES": registry, "Stage": Stage, "BuildContext": BuildContext,  # noqa: S102
                   "SupervisedTemplate": SupervisedTemplate, "torch": torch,
                   "KVBModel": kvb_avalanche.KVBModel, "VotingDecoder": kvb_avalanche.VotingDecoder,
                   "KVBStrategy": kvb_avalanche.KVBStrategy})
    x, y, _ = blob_embeddings(4, 30, 16, spread=0.3, seed=1)
    bottleneck = kvb_avalanche.KeyValueBottleneck(16, 8, 32, 4, 4, sparse_grad=True)
    kvb_avalanche.fit_keys(bottleneck, [x], progress=False)
    bottleneck.freeze_keys()
    config = ExperimentConfig.for_benchmark("split_cifar10", batch_size=16)
    strategy = registry["kvb_adam"].build(BuildContext(config, 0, 16, 4, make_evaluator(),
                                                       bottleneck=bottleneck))
    before = bottleneck.values.detach().clone()
    strategy.train(tensor_scenario((x, y), (x, y), [0, 1, 2, 3], 2).train_stream[0],
                   eval_streams=[])
    assert not torch.equal(before, strategy.model.bottleneck.values)


def test_packing_a_results_folder_keeps_its_tables_and_unpacks_to_the_same_files(tmp_path):
    from kvb_avalanche.experiments.records import RAW_ARCHIVE, pack_raw, unpack_raw

    folder = tmp_path / "exp"
    for name, text in {"runs/kvb-seed0.json": '{"a": 1}', "logs/kvb-seed0/metrics.csv": "x\n1\n",
                       "points/p=1/runs/naive-seed0.json": "{}", "summary.csv": "s\n"}.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert pack_raw(folder) == folder / RAW_ARCHIVE
    assert sorted(p.name for p in folder.iterdir()) == [RAW_ARCHIVE, "summary.csv"]
    assert pack_raw(folder) is None  # nothing left to pack
    assert unpack_raw(folder) and not unpack_raw(folder)  # only where the folders are gone
    after = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*")
             if p.is_file() and p.name != RAW_ARCHIVE}
    assert after == before
    # a folder that lost one of them gets that one back, the others untouched
    shutil.rmtree(folder / "logs")
    (folder / "runs" / "new-seed1.json").write_text("{}")
    assert unpack_raw(folder)
    assert (folder / "logs/kvb-seed0/metrics.csv").read_text() == "x\n1\n"
    assert (folder / "runs" / "new-seed1.json").exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".unpacking")]


def test_the_record_names_the_machine_whose_kernels_decide_an_mlp_heads_bits():
    from kvb_avalanche.experiments.runner import versions

    record = versions()
    assert record["torch threads"] == torch.get_num_threads()
    assert record["torch cpu capability"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(record["cpu"], str) and record["cpu"]
