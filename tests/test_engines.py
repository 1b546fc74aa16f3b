"""Every engine under one contract, on real clusters: a local Ray cluster and a one-node
SLURM cluster on localhost (started here, stopped here; skipped, with the reason, where
SLURM cannot be installed).

- the same grid gives the same tables on local, Ray and SLURM (every column but timings);
- a failing run goes to failures.json with its log's last lines, the others go on, a run
  that fails once is retried, the reports cover what finished, the command exits 1;
- an option an engine cannot honour, or a request its cluster cannot meet, is refused
  before anything is written (exit 2, naming the flag).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from kvb_avalanche.cli import main as cli
from kvb_avalanche.experiments.strategies import STRATEGIES

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not (SHARED / "cifar10").is_dir(),
                                reason="needs CIFAR under ../shared/data")
TINY = {"max_per_class": {"value": 30}, "test_max_per_class": {"value": 15},
        "key_init_max_per_class": {"value": 5}, "kvb_epochs": {"value": 3},
        "seed": {"values": [0]}}
# a field of each stage: embeddings, keys, KVB's runs only, the baselines' only
PARITY = {"experiment": "split_cifar10", "preset": "quick", "parameters": {
    **TINY, "resolution": {"values": [32, 36]}, "codebooks": {"values": [8, 16]},
    "mask_unused_keys": {"values": [False, True]}, "epochs": {"values": [2, 3]},
    "strategy": {"values": ["kvb", "linear_probe"]}}}
# a smaller grid for the chaos cases: two key fits, three runs (the probe shared)
CHAOS = {"experiment": "split_cifar10", "preset": "quick", "parameters": {
    **TINY, "codebooks": {"values": [8, 16]}, "epochs": {"value": 2},
    "strategy": {"values": ["kvb", "linear_probe"]}}}
FAILING = {"experiment": "split_cifar10", "preset": "quick", "parameters": {
    **TINY, "epochs": {"value": 2}, "codebooks": {"value": 8},
    "strategy": {"values": ["linear_probe", "fails_once", "always_fails", "kvb",
                            "kvb_fails_once"]}}}


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def tables(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    timings = ["train_seconds", "key_fit_seconds"]  # wall times: the rest must be equal
    return (pd.read_csv(out / "summary.csv").drop(columns=timings),
            pd.read_csv(out / "accuracy_matrix.csv"))


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def slurm_cluster():
    pytest.importorskip("submitit")
    import slurm_cluster as cluster

    reason = cluster.available()
    if reason:
        pytest.skip(f"no SLURM cluster can be started here: {reason}")
    # short, and world-searchable above munged's socket (pytest's own folders are 0700)
    folder = Path(tempfile.mkdtemp(prefix="kvb-slurm-", dir="/tmp"))
    os.environ["SLURM_CLUSTER_MAX_TIME"] = "600"  # the partition's MaxTime, in minutes
    try:
        env = cluster.start(folder)
    finally:
        del os.environ["SLURM_CLUSTER_MAX_TIME"]
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield folder
    cluster.stop(folder)
    shutil.rmtree(folder, ignore_errors=True)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(params=["local", "ray", "slurm"])
def engine(request):
    """An engine with its cluster running."""
    if request.param == "ray":
        request.getfixturevalue("ray_cluster")
    elif request.param == "slurm":
        request.getfixturevalue("slurm_cluster")
    return request.param


def sweep(spec: Path, out: Path, cache: Path, *flags: str):
    return cli(["sweep", str(spec), "--out", str(out), "--no-progress", "--cache-dir",
                str(cache), *flags])


@pytest.fixture(scope="module")
def local_parity(tmp_path_factory, cifar_cache):
    out = tmp_path_factory.mktemp("parity") / "local"
    sweep(write_spec(out.parent / "spec.yaml", PARITY), out, cifar_cache)
    return out


def test_the_local_grid_has_a_row_per_run_and_mask_unused_keys_moves_kvb(local_parity):
    summary, matrix = tables(local_parity)
    assert len(summary) == 16 * 2 and len(matrix) == 16 * 2 * 25
    kvb = summary[summary.strategy == "kvb"]
    by_mask = kvb.groupby("mask_unused_keys").final_accuracy.apply(list)
    assert by_mask[True] != by_mask[False]  # the setting reached the runs
    # a baseline does not depend on the key or KVB fields: one run per (resolution, epochs)
    timed = pd.read_csv(local_parity / "summary.csv")
    probe = timed[timed.strategy == "linear_probe"]
    assert probe.groupby(["resolution", "epochs"]).train_seconds.nunique().eq(1).all()
    assert probe.train_seconds.nunique() == 4
    assert len(list(local_parity.glob("points/*/logs/*/run.log"))) == 8 + 4


@pytest.mark.parametrize("name", ["ray", "slurm"])
def test_every_engine_gives_the_tables_of_the_local_one(name, request, local_parity,
                                                       cifar_cache, tmp_path, monkeypatch):
    request.getfixturevalue(f"{name}_cluster")
    monkeypatch.chdir(tmp_path)  # a relative --out: workers must write under it, here
    sweep(write_spec(tmp_path / "spec.yaml", PARITY), Path("out"), cifar_cache,
          "--engine", name)
    for a, b in zip(tables(local_parity), tables(tmp_path / "out"), strict=True):
        pd.testing.assert_frame_equal(a, b)
    assert len(list((tmp_path / "out").glob("points/*/logs/*/run.log"))) == 8 + 4
    # runs on other machines: 'auto' was fixed once, for all of them (no GPU asked: cpu)
    fixed = json.loads((tmp_path / "out" / "config.json").read_text())["config"]["fixed"]
    assert fixed["device"] == "cpu"
    local = json.loads((local_parity / "config.json").read_text())["config"]["fixed"]
    assert "device" not in local  # one machine: 'auto' is what it has


@pytest.fixture
def plugins():
    """The user's strategy module, imported by the command (--import), forgotten after."""
    yield "sweep_plugins"
    for name in ("fails_once", "always_fails", "kvb_fails_once"):
        STRATEGIES._specs.pop(name, None)  # noqa: SLF001
    sys.modules.pop("sweep_plugins", None)


def test_a_failing_run_is_reported_the_others_go_on_and_a_flaky_one_is_retried(
        engine, plugins, cifar_cache, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        sweep(write_spec(tmp_path / "spec.yaml", FAILING), out, cifar_cache, "--engine",
              engine, "--import", plugins, "--retries", "1")
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "1 of 5 runs failed" in err and "1 of 5 table rows are missing" in err
    failures = json.loads((out / "failures.json").read_text())
    assert list(failures) == ["base/always_fails/0"]
    failure = failures["base/always_fails/0"]
    assert "always_fails breaks on every attempt" in failure["exception"]
    assert failure["attempts"] == 2  # the first try and its one retry
    assert any("always_fails: about to break" in line for line in failure["log_tail"])
    assert any("RuntimeError: always_fails breaks" in line for line in failure["log_tail"])
    # the flaky runs failed once, then ran (a baseline, and one on the seed's shared keys);
    # the others ran: all stored, all in the table
    assert sorted(p.name for p in out.glob("points/base/runs/*.json")) == [
        "fails_once-seed0.json", "kvb-seed0.json", "kvb_fails_once-seed0.json",
        "linear_probe-seed0.json"]
    summary = pd.read_csv(out / "summary.csv").set_index("strategy")
    # the same model, seed, data and keys: a retried run is its twin's run, bit for bit
    assert summary.final_accuracy["fails_once"] == summary.final_accuracy["linear_probe"]
    assert summary.final_accuracy["kvb_fails_once"] == summary.final_accuracy["kvb"]
    # the report command redraws the partial folder
    cli(["report", str(out)])
    assert len(pd.read_csv(out / "summary.csv")) == 4


def _refused(capsys, out: Path, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli(list(argv))
    assert exit_.value.code == 2
    assert not out.exists()
    return capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--cpus-per-run", "2"], "--cpus-per-run is not an option of --engine local (it is "
                              "one of --engine ray and slurm)"),
    (["--address", "auto"], "--address is not an option of --engine local"),
    (["--partition", "gpu"], "--partition is not an option of --engine local"),
    (["--retries", "-1"], "--retries must be an integer >= 0, got -1"),
    (["--import", "no_such_module_here"], "--import no_such_module_here: cannot import it"),
    (["--engine", "dask"], "--engine must be one of local, ray, slurm, got 'dask'"),
])
def test_an_option_the_engine_cannot_honour_is_refused_before_anything_is_written(
        tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    err = _refused(capsys, out, "sweep", str(write_spec(tmp_path / "s.yaml", FAILING)),
                   "--out", str(out), *flags)
    assert message in err


def test_ray_refuses_a_request_its_cluster_cannot_meet(ray_cluster, tmp_path, capsys,
                                                        cifar_cache):
    out = tmp_path / "out"
    spec = str(write_spec(tmp_path / "s.yaml", PARITY))
    err = _refused(capsys, out, "sweep", spec, "--out", str(out), "--engine", "ray",
                   "--gpus-per-run", "1", "--cache-dir", str(cifar_cache))
    assert "--gpus-per-run 1: no node of the Ray cluster has that many (GPU per node: at " \
           "most 0)" in err
    err = _refused(capsys, out, "sweep", spec, "--out", str(out), "--engine", "ray",
                   "--cpus-per-run", "64", "--cache-dir", str(cifar_cache))
    assert "--cpus-per-run 64: no node of the Ray cluster has that many" in err
    err = _refused(capsys, out, "sweep", spec, "--out", str(out), "--engine", "ray",
                   "--mem-gb", "4")
    assert "--mem-gb is not an option of --engine ray (it is one of --engine slurm)" in err


def test_slurm_refuses_a_request_its_cluster_cannot_meet(slurm_cluster, tmp_path, capsys,
                                                          cifar_cache):
    out = tmp_path / "out"
    spec = str(write_spec(tmp_path / "s.yaml", PARITY))
    common = ["sweep", spec, "--out", str(out), "--engine", "slurm", "--cache-dir",
              str(cifar_cache)]
    err = _refused(capsys, out, *common, "--gpus-per-run", "1")
    assert "--gpus-per-run 1: no node of partition" in err and "at most 0" in err
    err = _refused(capsys, out, *common, "--cpus-per-run", "512")
    assert "--cpus-per-run 512: no node of partition" in err
    err = _refused(capsys, out, *common, "--mem-gb", "100000")
    assert "--mem-gb 100000: no node of partition" in err
    err = _refused(capsys, out, *common, "--time-min", "601")
    assert "--time-min 601: partition 'debug' allows at most 600 minutes a job" in err
    err = _refused(capsys, out, *common, "--partition", "no_such_partition")
    assert "--partition 'no_such_partition': no such partition" in err
    err = _refused(capsys, out, *common, "--address", "auto")
    assert "--address is not an option of --engine slurm (it is one of --engine ray)" in err


@pytest.mark.parametrize("engine_name, module", [("ray", "ray"), ("slurm", "submitit")])
def test_an_engine_without_its_library_is_refused_naming_the_extra(tmp_path, capsys,
                                                                   monkeypatch, engine_name,
                                                                   module):
    monkeypatch.setitem(sys.modules, module, None)  # import -> ImportError
    out = tmp_path / "out"
    err = _refused(capsys, out, "sweep", str(write_spec(tmp_path / "s.yaml", FAILING)),
                   "--out", str(out), "--engine", engine_name)
    assert f"pip install 'kvb-avalanche[{engine_name}]'" in err


# ---------------------------------------------------------------------------- chaos
@pytest.fixture(scope="module")
def local_chaos(tmp_path_factory, cifar_cache):
    out = tmp_path_factory.mktemp("chaos") / "local"
    sweep(write_spec(out.parent / "spec.yaml", CHAOS), out, cifar_cache)
    return out


def _wait_for(predicate, seconds: float = 300.0) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("name", ["ray", "slurm"])
def test_a_driver_killed_mid_grid_resumes_to_the_tables_of_an_uninterrupted_one(
        name, request, local_chaos, cifar_cache, tmp_path):
    cluster = request.getfixturevalue(f"{name}_cluster")
    out, spec = tmp_path / "out", write_spec(tmp_path / "spec.yaml", CHAOS)
    flags = ["--engine", name]
    if name == "ray":  # the driver joins this test's cluster, which outlives it
        flags += ["--address", cluster.get_runtime_context().gcs_address]
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvb_avalanche.cli", "sweep", str(spec), "--out", str(out),
         "--no-progress", "--cache-dir", str(cifar_cache), *flags],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stored = lambda: len(list(out.glob("points/*/runs/*.json")))  # noqa: E731
    if _wait_for(lambda: stored() >= 1 or proc.poll() is not None):
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the sweep ended before it could be killed"
    assert 1 <= stored() < 4
    sweep(spec, out, cifar_cache, "--engine", name)
    for a, b in zip(tables(local_chaos), tables(out), strict=True):
        pd.testing.assert_frame_equal(a, b)


def _kill_one_run(name: str, out: Path) -> list:
    """In the background: once a run has started, kill it the way a cluster does (Ray: its
    worker process, SIGKILL; SLURM: scancel its job). Returns what was killed."""
    import psutil

    killed: list = []

    def kill() -> None:
        if not _wait_for(lambda: any(out.glob("points/*/logs/*/run.log"))):
            return
        if name == "ray":
            for p in psutil.process_iter(["cmdline"]):
                if any("ray::execute" in part for part in p.info["cmdline"] or []):
                    p.kill()
                    killed.append(p.pid)
                    return
        else:
            jobs = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i %k"],
                                  capture_output=True, text=True).stdout.split("\n")
            run = [line.split()[0] for line in jobs if line.strip().endswith("runs")]
            if run:
                subprocess.run(["scancel", run[0]], check=True)
                killed.append(run[0])

    threading.Thread(target=kill, daemon=True).start()
    return killed


@pytest.mark.parametrize("name", ["ray", "slurm"])
def test_a_run_killed_by_its_cluster_is_retried_to_the_tables_of_an_uninterrupted_one(
        name, request, local_chaos, cifar_cache, tmp_path):
    request.getfixturevalue(f"{name}_cluster")
    out = tmp_path / "out"
    killed = _kill_one_run(name, out)
    sweep(write_spec(tmp_path / "spec.yaml", CHAOS), out, cifar_cache, "--engine", name,
          "--retries", "1")
    assert killed, "no run was killed"
    assert not (out / "failures.json").exists()
    for a, b in zip(tables(local_chaos), tables(out), strict=True):
        pd.testing.assert_frame_equal(a, b)


MAIN_SCRIPT = '''
import sys
from pathlib import Path

from kvb_avalanche.experiments import STRATEGIES, RunOptions, parse_spec, run_sweep
from kvb_avalanche.experiments.engines import EngineOptions


@STRATEGIES.register("probe_from_main")
def probe_from_main(ctx):  # registered in __main__: no worker can import it by name
    return STRATEGIES["linear_probe"].build(ctx)


spec = {"experiment": "split_cifar10", "preset": "quick", "parameters": {
    "max_per_class": {"value": 30}, "test_max_per_class": {"value": 15},
    "epochs": {"value": 2}, "seed": {"values": [0]},
    "strategy": {"values": ["linear_probe", "probe_from_main"]}}}
out, cache, address = sys.argv[1:]
run_sweep(parse_spec(spec), Path(out), RunOptions(cache_dir=Path(cache), progress=False),
          engine="ray", engine_options=EngineOptions(address=address))
'''


def test_a_strategy_registered_in_the_drivers_main_reaches_ray_workers(ray_cluster, tmp_path,
                                                                       cifar_cache):
    script = tmp_path / "my_sweep.py"
    script.write_text(MAIN_SCRIPT)
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(script), str(out), str(cifar_cache),
                    ray_cluster.get_runtime_context().gcs_address], check=True,
                   capture_output=True, timeout=300)
    summary = pd.read_csv(out / "summary.csv").set_index("strategy")
    # the same head on the same seed: the worker built it from the driver's own function
    assert summary.final_accuracy["probe_from_main"] == summary.final_accuracy["linear_probe"]
