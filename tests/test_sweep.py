"""Sweeps: a --quick-sized 2 x 2 grid x 2 seeds in this process; the committed sweep files;
bad specs. The engines (Ray, SLURM) are tested in test_engines.py."""

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from kvb_avalanche.cli import main as cli
from kvb_avalanche.experiments.sweep import load_spec

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not (SHARED / "cifar10").is_dir(),
                                reason="needs CIFAR under ../shared/data")
SPEC = {
    "experiment": "split_cifar10",
    "preset": "quick",
    "parameters": {
        "codebooks": {"values": [16, 32]},
        "kvb_lr": {"values": [3.0, 10.0]},
        "kvb_epochs": {"value": 5},
        "epochs": {"value": 3},
        "seed": {"values": [0, 1]},
        "strategy": {"values": ["kvb", "linear_probe"]},
    },
}
RUNS = 2 * 2 * 2 * 2


def write_spec(path: Path, spec: dict = SPEC) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def cache(cifar_cache):
    return cifar_cache


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("local")
    spec = write_spec(out.parent / "local-spec.yaml")
    cli(["sweep", str(spec), "--out", str(out), "--no-progress", "--cache-dir", str(cache)])
    return out


def tables(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    timings = ["train_seconds", "key_fit_seconds"]  # wall times: the rest must be equal
    return (pd.read_csv(out / "summary.csv").drop(columns=timings),
            pd.read_csv(out / "accuracy_matrix.csv"))


def test_local_sweep_writes_the_grid_with_a_column_per_swept_field(local_sweep):
    summary, matrix = tables(local_sweep)
    assert list(summary.columns) == ["codebooks", "kvb_lr", "strategy", "seed",
                                     "final_accuracy", "average_forgetting", "keys_in_use",
                                     "value_scale_mean", "train_loss"]
    assert len(summary) == RUNS and set(summary.codebooks) == {16, 32}
    assert set(summary.kvb_lr) == {3.0, 10.0} and set(summary.seed) == {0, 1}
    assert len(matrix) == RUNS * 5 * 5  # every run: 5 x 5 accuracy matrix
    assert list(matrix.columns[:2]) == ["codebooks", "kvb_lr"]
    # the swept values reached the runs: more codebooks, other keys, other KVB numbers
    kvb = summary[summary.strategy == "kvb"].set_index(["codebooks", "kvb_lr", "seed"])
    assert kvb.final_accuracy.nunique() > 1
    probe = summary[summary.strategy == "linear_probe"]
    assert probe.groupby("seed").final_accuracy.nunique().eq(1).all()  # KVB fields only
    # ... so the probe ran once per seed, its record stored at all four points
    timed = pd.read_csv(local_sweep / "summary.csv")
    seconds = timed[timed.strategy == "linear_probe"].groupby("seed").train_seconds
    assert seconds.nunique().eq(1).all() and seconds.size().eq(4).all()
    assert (timed[timed.strategy == "kvb"].key_fit_seconds > 0).all()
    # KVB's state at the end of each run; none for the probe
    assert kvb.keys_in_use.between(0.01, 1).all()
    assert (kvb.train_loss > 0).all() and (kvb.value_scale_mean > 0).all()
    # a higher value learning rate, larger values (the codebooks held fixed)
    scale = kvb.value_scale_mean.groupby(["codebooks", "seed"]).agg(list)
    assert all(a < b for a, b in scale)  # kvb_lr 3.0 before 10.0 in the grid
    assert probe[["keys_in_use", "train_loss"]].isna().all().all()
    assert (local_sweep / "sweep.png").stat().st_size > 10_000
    assert (local_sweep / "sweep_diagnostics.png").stat().st_size > 10_000
    runs = sorted(p.relative_to(local_sweep).as_posix()
                  for p in local_sweep.glob("points/*/runs/*.json"))
    assert len(runs) == RUNS and runs[0] == "points/codebooks=16,kvb_lr=10.0/runs/kvb-seed0.json"
    point = json.loads((local_sweep / "points" / "codebooks=16,kvb_lr=3.0" / "config.json")
                       .read_text())
    assert point["config"]["codebooks"] == 16 and point["config"]["num_pairs"] == 256  # quick


COMMITTED = sorted((Path(__file__).resolve().parents[1] / "sweeps").rglob("*.yaml"))


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_committed_sweep_file_gives_valid_configs(path):
    # a typo in a sweep file would otherwise surface hours into a real run
    spec = load_spec(path)
    points = spec.points()
    assert len(points) == math.prod(len(v) for v in spec.grid.values())
    for point, config in points:
        assert config.benchmark == spec.experiment
        assert all(getattr(config, name) == value for name, value in point.items())


def test_a_committed_sweep_file_runs_quick_end_to_end(cache, tmp_path):
    # the key-initialisation ablation, on the --quick preset and its first seed: ours
    # against the official procedure, the references run once and shared by both points
    spec = Path(__file__).resolve().parents[1] / "sweeps" / "ablations" / "key_init.yaml"
    out = tmp_path / "key_init"
    summary = cli(["sweep", str(spec), "--quick", "--out", str(out), "--no-progress",
                   "--cache-dir", str(cache)])
    assert len(summary) == 2 * 4 and set(summary.seed) == {0}
    assert list(summary.key_init.unique()) == ["ours", "official"]
    by = summary.set_index(["strategy", "key_init"])
    for reference in ("joint_linear", "linear_probe"):
        assert by.train_seconds[reference, "ours"] == by.train_seconds[reference, "official"]
    for strategy in ("kvb", "kvb_joint"):  # other keys, other numbers
        assert by.final_accuracy[strategy, "ours"] != by.final_accuracy[strategy, "official"]
        assert by.key_fit_seconds[strategy, "ours"] > 0
    # the preset reached the runs; the official keys are fitted without a k-means start
    point = json.loads((out / "points" / "key_init=official" / "config.json").read_text())
    assert point["config"]["key_init"] == "official" and point["config"]["codebooks"] == 32
    assert (out / "sweep.png").is_file() and (out / "sweep_diagnostics.png").is_file()


def test_a_killed_sweep_resumes_to_the_tables_of_an_uninterrupted_one(local_sweep, cache,
                                                                        tmp_path):
    out = tmp_path / "killed"
    spec = write_spec(tmp_path / "spec.yaml")
    command = ["sweep", str(spec), "--out", str(out), "--no-progress", "--cache-dir", str(cache)]
    proc = subprocess.Popen([sys.executable, "-m", "kvb_avalanche.cli", *command],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if len(list(out.glob("points/*/runs/*.json"))) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the sweep ended before it could be killed"
    assert 3 <= len(list(out.glob("points/*/runs/*.json"))) < RUNS
    cli(command)
    for a, b in zip(tables(local_sweep), tables(out), strict=True):
        pd.testing.assert_frame_equal(a, b)


def test_a_sweep_grows_more_values_over_its_folder_and_refuses_another_setting(
        local_sweep, cache, tmp_path, capsys, monkeypatch):
    from kvb_avalanche.experiments import runner

    out = tmp_path / "grown"
    shutil.copytree(local_sweep, out)
    # the keys of each (codebooks, seed), stored as fitted: the new kvb_lr reuses them
    assert len(list((out / "checkpoints" / "keys").glob("keys-*.pt"))) == 2 * 2
    monkeypatch.setattr(runner, "fit_bottleneck", lambda *a, **k: pytest.fail("keys refitted"))
    stored = {p: p.read_bytes() for p in out.glob("points/*/runs/*.json")}
    grown = {**SPEC, "parameters": {**SPEC["parameters"], "kvb_lr": {"values": [3.0, 10.0, 30.0]},
                                    "seed": {"values": [0]}}}
    cli(["sweep", str(write_spec(tmp_path / "grown.yaml", grown)), "--out", str(out),
         "--no-progress", "--cache-dir", str(cache)])
    assert all(p.read_bytes() == b for p, b in stored.items())  # resumed, not run again
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 2 * 3 * 2 and set(summary.kvb_lr) == {3.0, 10.0, 30.0}  # seed 0
    kvb = summary[summary.strategy == "kvb"].set_index(["codebooks", "kvb_lr"])
    before = pd.read_csv(local_sweep / "summary.csv").query("seed == 0 and strategy == 'kvb'")
    for row in before.itertuples():  # the stored runs' numbers, unchanged
        assert kvb.final_accuracy[row.codebooks, row.kvb_lr] == row.final_accuracy
    assert (kvb.value_scale_mean.xs(30.0, level="kvb_lr")
            > kvb.value_scale_mean.xs(10.0, level="kvb_lr")).all()  # the new value ran
    assert json.loads((out / "config.json").read_text())["config"]["grid"]["kvb_lr"] == [
        3.0, 10.0, 30.0]
    # another fixed value is another experiment: refused, naming it, and nothing written
    other = {**SPEC, "parameters": {**SPEC["parameters"], "epochs": {"value": 4}}}
    config = (out / "config.json").read_bytes()
    with pytest.raises(SystemExit) as exit_:
        cli(["sweep", str(write_spec(tmp_path / "other.yaml", other)), "--out", str(out),
             "--no-progress", "--cache-dir", str(cache)])
    assert exit_.value.code == 2
    assert "holds results of a different configuration: fixed" in capsys.readouterr().err
    assert (out / "config.json").read_bytes() == config
    assert all(p.read_bytes() == b for p, b in stored.items())


@pytest.mark.parametrize("change, message", [
    ({"parameters": {"codebookz": {"values": [1, 2]}}},
     "parameters.codebookz: unknown field (did you mean codebooks?)"),
    ({"parameters": {"codebooks": {"values": []}}},
     "parameters.codebooks.values must be a non-empty list"),
    ({"parameters": {"codebooks": {"values": [16, 16]}}},
     "parameters.codebooks.values lists a value twice: [16, 16]"),
    ({"parameters": {"codebooks": {"values": [16, "many"]}}},
     "parameters at codebooks=many: codebooks must be an integer, got 'many'"),
    ({"parameters": {"codebooks": {"values": [16, 0]}}},
     "parameters at codebooks=0: codebooks must be a positive integer, got 0"),
    ({"parameters": {"strategy": {"values": ["kvb", "icarl"]}}},
     "parameters at base: unknown strategy 'icarl' in strategies"),
    ({"method": "bayes"}, "only method 'grid' is supported"),
    ({"paramters": {}}, "unknown entry 'paramters'"),
])
def test_a_bad_spec_exits_2_naming_the_field_and_writes_nothing(tmp_path, capsys, change,
                                                                 message):
    spec = {**SPEC, **change}
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        cli(["sweep", str(write_spec(tmp_path / "spec.yaml", spec)), "--out", str(out)])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_partial_grid_draws_where_a_point_holds_only_baseline_runs(tmp_path):
    # a grid whose KVB run failed at one point: that point has baseline records only, so
    # its KVB columns are all missing; the tables and both figures still come out
    from kvb_avalanche.experiments.records import MatrixRow, RunRecord
    from kvb_avalanche.experiments.spec import parse_spec, point_name
    from kvb_avalanche.experiments.sweep_reports import write_sweep_reports

    spec = parse_spec({"parameters": {"codebooks": {"values": [8, 16]},
                                      "strategy": {"values": ["kvb", "linear_probe"]},
                                      "seed": {"values": [0]}}})

    def record(strategy: str, accuracy: float) -> RunRecord:
        matrix = [MatrixRow(strategy, 0, t, j, accuracy if j <= t else 0.0)
                  for t in range(5) for j in range(5)]
        extra = ({"kvb_diagnostics": [{"experience": 4, "keys_in_use_stream": 0.5,
                                       "value_scale_mean": 0.01, "train_loss": 2.3}],
                  "key_fit": {"seconds": 1.0}} if strategy == "kvb" else {})
        return RunRecord(strategy, 0, 1.0, matrix, extra=extra)

    first, second = (point_name(p) for p, _ in spec.points())
    records = {(first, "kvb", 0): record("kvb", 0.5),
               (first, "linear_probe", 0): record("linear_probe", 0.3),
               (second, "linear_probe", 0): record("linear_probe", 0.3)}
    summary = write_sweep_reports(tmp_path, spec, records)
    assert len(summary) == 3 and summary.keys_in_use.dtype == float
    assert summary.keys_in_use.isna().sum() == 2  # the probes' rows
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
    assert (tmp_path / "sweep_diagnostics.png").stat().st_size > 10_000
