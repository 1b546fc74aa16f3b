"""The measurement scripts run end to end and write their tables (tiny settings)."""

from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from benchmarks import bench_bottleneck, cached_step_breakdown, dead_units, gpu_check, kvb_epochs
from kvb_avalanche.experiments import ExperimentConfig

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def test_bench_bottleneck_small_case_writes_bench_and_targets(tmp_path):
    bench_bottleneck.main(["--out", str(tmp_path), "--cases", "small", "--repeats", "1"])
    bench = pd.read_csv(tmp_path / "bench.csv")
    assert {"case", "impl", "median_ms", "min_ms", "max_ms", "peak_mb",
            "ratio_to_floor"} <= set(bench.columns)
    ours = bench[(bench.impl == "ours") & (bench.case == "small")].set_index("measure")
    assert {"forward", "forward_backward", "key_update", "epoch_cached_codes",
            "epoch_cached_codes_autograd", "epoch_recomputed_lookups", "replay_epoch_memo",
            "replay_epoch_recomputed_lookups"} <= set(ours.index)
    assert (ours.median_ms > 0).all()
    official = bench[bench.impl == "official"].set_index("measure")
    assert list(official.index) == ["key_update"] and official.median_ms.iloc[0] > 0
    floor = bench[(bench.impl == "floor") & (bench.case == "small")]
    assert (floor.ratio_to_floor == 1).all()
    targets = pd.read_csv(tmp_path / "targets.csv", keep_default_na=False)
    assert list(targets.columns) == ["target", "value", "goal", "status", "cpu"]
    assert set(targets.status) <= {"PASS", "FAIL", "n/a", "INFO"}
    assert targets.cpu.nunique() == 1 and targets.cpu.iloc[0]  # the CPU every timing ran on
    speedup = targets[targets.target.str.contains("EMA key update step, official")]
    assert len(speedup) == 1 and speedup.status.iloc[0] in {"PASS", "FAIL"}
    limit = targets[targets.target.str.contains("EMA key update step, fused .*/ FLOP limit$")]
    assert len(limit) == 1 and float(limit.value.iloc[0]) > 0  # ratio to the same run's matmul
    assert limit.status.iloc[0] in {"PASS", "FAIL"}


@pytest.mark.skipif(not (SHARED / "cifar10").is_dir(), reason="needs CIFAR under ../shared/data")
def test_kvb_epochs_quick_curve(tmp_path):
    kvb_epochs.main(["--out", str(tmp_path), "--epoch-grid", "1", "2", "--quick",
                     "--no-progress", "--cache-dir", str(tmp_path / "cache")])
    curve = pd.read_csv(tmp_path / "curve.csv")
    assert len(curve) == 2 * 2 * 2  # (kvb, kvb_joint) x epochs x (masked or not)
    assert (curve.final_accuracy > 0.15).all()  # ten classes: chance is 0.1
    # values only grow with training
    kvb = curve[(curve.strategy == "kvb") & ~curve.masked].set_index("epochs")
    assert kvb.mean_abs_value[2] > kvb.mean_abs_value[1] > 0


def test_cached_step_breakdown_parts_add_up(tmp_path):
    cached_step_breakdown.main(["--out", str(tmp_path), "--epochs", "1"])
    table = pd.read_csv(tmp_path / "breakdown.csv")
    assert list(table.columns) == ["step", "part", "ms_per_step"]
    for step, parts in (("autograd", 6), ("fused", 5)):
        rows = table[table.step == step].set_index("part").ms_per_step
        assert len(rows) == parts + 1 and (rows > 0).all()
        # the csv keeps 6 digits
        assert rows["total"] == pytest.approx(rows.drop("total").sum(), rel=1e-4)
    assert (table[table.step == "reference"].ms_per_step > 0).all()


def test_hidden_activity_counts_units_no_input_activates():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 4))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        model[0].bias.zero_()
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # unit 2 never fires; unit 1 on one row
    dead, active = dead_units.hidden_activity(model, x)
    assert dead == pytest.approx(1 / 3) and active == pytest.approx(1.5)


@pytest.mark.skipif(not (SHARED / "cifar10").is_dir(), reason="needs CIFAR under ../shared/data")
def test_dead_units_quick_writes_one_row_per_experience(tmp_path, cifar_cache):
    out = tmp_path / "dead.csv"
    table = dead_units.main(["--out", str(out), "--benchmark", "split_cifar10", "--quick",
                             "--strategies", "naive", "--no-progress",
                             "--cache-dir", str(cifar_cache)])
    pd.testing.assert_frame_equal(pd.read_csv(out), table)
    assert list(table.trained_through) == [0, 1, 2, 3, 4]
    # a dead unit is never active, so an image has at most the live units active
    hidden = ExperimentConfig.for_benchmark("split_cifar10").hidden
    assert (table.mean_active_units <= (1 - table.dead_fraction) * hidden + 1e-9).all()
    assert (table.mean_active_units > 0).all()


@pytest.mark.skipif(not (SHARED / "cifar10").is_dir(), reason="needs CIFAR under ../shared/data")
def test_gpu_check_dry_run_on_the_cpu_compares_both_runs(tmp_path, cifar_cache):
    """--device cpu runs the check's whole path: both experiments agree exactly."""
    import json

    out = tmp_path / "check"
    code = gpu_check.main(["--out", str(out), "--device", "cpu", "--data-root", str(SHARED),
                           "--cache-dir", str(cifar_cache), "--encoder", "efficientnet_lite0",
                           "--resolution", "32", "--max-per-class", "10", "--codebooks", "4",
                           "--num-pairs", "16", "--key-init-data", "cifar10", "--compare", "10"])
    report = json.loads((out / "gpu_check.json").read_text())
    assert code == 0 and report["passed"] and all(report["checks"].values())
    assert set(report["final_accuracy"]["device"]) == set(gpu_check.STRATEGIES)
    assert report["final_accuracy"]["device"] == report["final_accuracy"]["cpu"]
    assert set(report["final_accuracy_gap"].values()) == {0.0}
    assert report["min_cosine_device_vs_cpu_float32"] > 0.999
    for device in ("device", "cpu"):
        summary = pd.read_csv(out / device / "summary.csv").set_index("strategy")
        assert summary.final_accuracy.to_dict() == pytest.approx(report["final_accuracy"]["cpu"])


def test_gpu_check_random_weights_need_a_torchvision_encoder(tmp_path):
    with pytest.raises(SystemExit, match="--encoder 'efficientnet_lite0'"):
        gpu_check.main(["--out", str(tmp_path / "x"), "--device", "cpu", "--random-weights",
                        "--encoder", "efficientnet_lite0"])
    assert not (tmp_path / "x").exists()
