"""benchmarks/split_cifar100.py end to end on a small slice of CIFAR-100 (../shared/data)."""

import json
from pathlib import Path

import pandas as pd
import pytest

from benchmarks import split_cifar100
from kvb_avalanche.experiments import ExperimentConfig

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_split_cifar100_defaults_are_the_papers():
    config = ExperimentConfig.for_benchmark("split_cifar100")
    assert (config.n_experiences, config.key_init_data, config.values_dim) == (50, "cifar10", 100)
    assert ExperimentConfig.for_benchmark("split_cifar10") == ExperimentConfig()
    with pytest.raises(ValueError, match="benchmark"):
        ExperimentConfig.for_benchmark("split_mnist")


@pytest.mark.skipif(not (SHARED / "cifar100").is_dir(), reason="needs CIFAR under ../shared/data")
def test_split_cifar100_quick_run_draws_heat_maps(tmp_path, cifar_cache):
    out = tmp_path / "c100"
    split_cifar100.main(["--out", str(out), "--quick", "--seeds", "0", "--no-progress",
                         "--cache-dir", str(cifar_cache), "--n-experiences", "20",
                         "--max-per-class", "30", "--test-max-per-class", "20",
                         "--strategies", "kvb", "naive"])
    config = json.loads((out / "config.json").read_text())["config"]
    assert (config["benchmark"], config["key_init_data"]) == ("split_cifar100", "cifar10")
    matrix = pd.read_csv(out / "accuracy_matrix.csv")
    assert matrix.groupby("strategy").size().to_dict() == {"kvb": 400, "naive": 400}
    assert (out / "accuracy_heatmaps.png").stat().st_size > 0
    assert not (out / "forgetting_curves.png").exists()
    summary = pd.read_csv(out / "summary.csv").set_index("strategy")
    # naive fine-tuning forgets its earlier experiences; KVB's votes keep them
    assert summary.loc["kvb", "average_forgetting"] < summary.loc["naive", "average_forgetting"]
