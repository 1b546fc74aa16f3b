"""The benchmark registry: built-in benchmarks past CIFAR (Fashion-MNIST, the CIFAR-100
superclasses' domains, the standard CIFAR-100 splits), a user's image folder at any size
registered from its own module and run through the runner and a sweep, online streams,
and KVB's decoder and splitting as configuration fields."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from kvb_avalanche.benchmarks.cifar import DataError
from kvb_avalanche.benchmarks.cifar100_superclasses import FINE, SUPERCLASSES
from kvb_avalanche.benchmarks.embedded import DataOptions
from kvb_avalanche.benchmarks.fmnist import DEBIAN, load_fmnist
from kvb_avalanche.benchmarks.registry import (
    BENCHMARKS,
    DATASETS,
    Benchmark,
    register_benchmark,
)
from kvb_avalanche.experiments.config import QUICK, ConfigError, ExperimentConfig

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SMALL = {**QUICK, "max_per_class": 12, "test_max_per_class": 6, "codebooks": 8,
         "num_pairs": 16, "dim_keys": 4, "kvb_epochs": 2, "epochs": 2, "kmeans_samples": 40,
         "device": "cpu", "seeds": [0], "key_init_data": "none", "ranpac_dim": 32}


# ---------------------------------------------------------------------------- the registry
def test_the_builtin_benchmarks_are_registered_with_their_declarations():
    expected = {"split_cifar10": ("cifar10", 10, 5, "class-incremental", "cifar100"),
                "split_cifar100": ("cifar100", 100, 50, "class-incremental", "cifar10"),
                "split_cifar100_10x10": ("cifar100", 100, 10, "class-incremental", "cifar10"),
                "split_cifar100_20x5": ("cifar100", 100, 20, "class-incremental", "cifar10"),
                "split_fmnist": ("fmnist", 10, 5, "class-incremental", "cifar100"),
                "cifar100_superclasses": ("cifar100", 20, 5, "domain-incremental", "cifar10")}
    for name, (dataset, classes, experiences, setting, keys) in expected.items():
        b = BENCHMARKS[name]
        assert (b.dataset, b.num_classes, b.n_experiences, b.setting, b.key_init_data) == (
            dataset, classes, experiences, setting, keys), name
        config = ExperimentConfig.for_benchmark(name)
        assert (config.n_experiences, config.key_init_data, config.num_classes) == (
            experiences, keys, classes)
    assert DATASETS["fmnist"].image_shape == (28, 28, 1)


def test_the_command_lists_every_registered_benchmark():
    out = subprocess.run([sys.executable, "-m", "kvb_avalanche", "benchmarks"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert set(rows) == set(BENCHMARKS)
    assert rows["cifar100_superclasses"][1:4] == ["domain-incremental", "20", "5"]
    assert rows["split_fmnist"][-2:] == ["fmnist", "(28x28)"]


def test_an_unknown_benchmark_is_refused_naming_the_field_and_the_closest_name():
    with pytest.raises(ConfigError, match=r"benchmark must be a registered benchmark \(did "
                                          r"you mean split_fmnist") as e:
        ExperimentConfig(benchmark="split_fmnst")
    assert e.value.field == "benchmark"
    with pytest.raises(ConfigError, match="key_init_data must be a registered data set"):
        ExperimentConfig(key_init_data="imagenet")


def test_a_benchmark_that_cannot_be_run_is_refused_at_registration():
    class TaskIncremental(Benchmark):
        name, dataset, num_classes, n_experiences = "task_il", "cifar10", 10, 5
        setting = "task-incremental"

    with pytest.raises(ValueError, match="task-incremental benchmarks are not supported"):
        register_benchmark(TaskIncremental)

    class Uneven(Benchmark):
        name, dataset, num_classes, n_experiences = "uneven", "cifar10", 10, 3

    with pytest.raises(ValueError, match="n_experiences must divide the 10 classes, got 3"):
        register_benchmark(Uneven)
    assert "task_il" not in BENCHMARKS and "uneven" not in BENCHMARKS


def test_a_domain_benchmark_refuses_a_split_other_than_its_domains():
    with pytest.raises(ConfigError, match="n_experiences of cifar100_superclasses must be its "
                                          "5 domains, got 4"):
        ExperimentConfig.for_benchmark("cifar100_superclasses", n_experiences=4)


# ---------------------------------------------------------------------------- Fashion-MNIST
def _idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fmnist_idx_files_are_read_and_checked(tmp_path):
    root = tmp_path / "fashion-mnist"
    root.mkdir()
    images = np.arange(6 * 28 * 28, dtype=np.uint8).reshape(6, 28, 28)
    labels = np.array([3, 1, 3, 0, 9, 1])
    _idx(root / "t10k-images-idx3-ubyte.gz", images, 0x803)
    _idx(root / "t10k-labels-idx1-ubyte.gz", labels, 0x801)
    got = load_fmnist("test", max_per_class=1, options=DataOptions(root=tmp_path))
    assert got.images.shape == (4, 28, 28, 3) and got.labels.tolist() == [3, 1, 0, 9]
    np.testing.assert_array_equal(got.images[1, ..., 2], images[1])  # grey in every channel
    assert got.classes[9] == "Ankle boot" and str(root) in got.source
    _idx(root / "t10k-labels-idx1-ubyte.gz", labels, 0x803)  # a wrong magic number
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz is not an idx file of 1"):
        load_fmnist("test", options=DataOptions(root=tmp_path))


@pytest.mark.skipif(not DEBIAN.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_fmnist_reads_debians_copy_whole():
    train = load_fmnist("train", options=DataOptions())
    test = load_fmnist("test", options=DataOptions())
    assert train.images.shape == (60000, 28, 28, 3) and test.images.shape == (10000, 28, 28, 3)
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10


# ---------------------------------------------------------------------------- domains
def test_cifar100_superclasses_map_every_subclass_to_its_superclass_and_domain():
    spec = BENCHMARKS["cifar100_superclasses"]
    assert len(FINE) == 100 and FINE[:3] == ["apple", "aquarium_fish", "baby"]
    labels = torch.tensor([FINE.index(n) for n in ("beaver", "whale", "orchid", "tractor")])
    coarse, domain = spec.targets(labels)
    assert coarse.tolist() == [0, 0, 2, 19] and domain.tolist() == [0, 4, 0, 4]
    everything = spec.targets(torch.arange(100))
    for d in range(5):  # every domain holds one subclass of every superclass
        assert sorted(everything[0][everything[1] == d].tolist()) == list(range(20))
    assert list(SUPERCLASSES)[14] == "people"


def test_a_domain_stream_has_every_class_in_every_experience_in_the_seeds_order():
    spec = BENCHMARKS["cifar100_superclasses"]
    labels = torch.arange(100).repeat_interleave(2)
    x = torch.randn(len(labels), 3)
    stream = spec.stream((x, labels), (x, labels), [2, 0, 4, 1, 3], 5)
    assert len(stream.train_stream) == 5
    for i, experience in enumerate(stream.train_stream):
        assert sorted(experience.classes_in_this_experience) == list(range(20))
        domain = spec.targets(labels)[1]
        expected = x[domain == [2, 0, 4, 1, 3][i]]
        torch.testing.assert_close(torch.stack([s[0] for s in experience.dataset]), expected)
    first = spec.first_experience(labels, [2, 0, 4, 1, 3], 5)
    assert first.sum() == 40 and (spec.targets(labels)[1][first] == 2).all()


# ---------------------------------------------------------------------------- a user's tree
def _shapes_tree(root: Path, per_class: int = 8) -> None:
    """Four classes of shapes, in images of mixed sizes and modes (grey, RGB, RGBA)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", per_class // 2)):
        for c, name in enumerate(["circle", "cross", "square", "stripes"]):
            folder = root / "split_shapes" / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                size = int(rng.integers(20, 90))
                yy, xx = np.mgrid[:size, :size] / size
                base = [((xx - .5) ** 2 + (yy - .5) ** 2 < .1), (abs(xx - yy) < .1),
                        (abs(xx - .5) < .3) & (abs(yy - .5) < .3), (yy * 8 % 2 < 1)][c]
                img = (base * 200 + rng.integers(0, 40, (size, size))).astype(np.uint8)
                mode = ["L", "RGB", "RGBA"][i % 3]
                Image.fromarray(img).convert(mode).save(folder / f"{i}.png")


def test_a_users_image_folder_benchmark_runs_end_to_end_through_the_runner(tmp_path):
    import user_benchmarks  # noqa: F401  (registers split_shapes)

    from kvb_avalanche.experiments.runner import RunOptions, run_experiment

    _shapes_tree(tmp_path / "data")
    config = ExperimentConfig.for_benchmark("split_shapes", **SMALL,
                                            strategies=["kvb", "ncm", "naive", "joint_linear"])
    assert config.shuffle_classes  # its declared default: a seeded class order
    options = RunOptions(data_root=tmp_path / "data", cache_dir=tmp_path / "cache",
                         progress=False)
    run_experiment(config, tmp_path / "out", options)
    summary = pd.read_csv(tmp_path / "out" / "summary.csv").set_index("strategy")
    matrix = pd.read_csv(tmp_path / "out" / "accuracy_matrix.csv")
    assert list(summary.index) == ["kvb", "naive", "ncm", "joint_linear"]
    assert len(matrix) == 3 * 4 + 2 and set(matrix.evaluated_on) == {0, 1}
    assert summary.loc["ncm", "final_accuracy"] > 0.5  # chance 0.25: the shapes are learnt
    record = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "split_shapes/train (ImageFolder tree)" in record["data"]["split_shapes_train"]["source"]
    order = json.loads((tmp_path / "out" / "runs" / "kvb-seed0.json").read_text())["class_order"]
    assert sorted(order) == [0, 1, 2, 3]


def test_a_users_benchmark_runs_through_a_sweep_and_the_command(tmp_path):
    _shapes_tree(tmp_path / "data")
    spec = tmp_path / "shapes.yaml"
    spec.write_text("experiment: split_shapes\nparameters:\n  decoder: {values: [voting, linear]}\n"
                    "  strategy: {values: [kvb]}\n" + "".join(
                        f"  {k}: {{value: {json.dumps(v)}}}\n" for k, v in SMALL.items()
                        if k != "seeds"))
    command = [sys.executable, "-m", "kvb_avalanche", "sweep", str(spec), "--out",
               str(tmp_path / "sweep"), "--import", "user_benchmarks", "--data-root",
               str(tmp_path / "data"), "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO / "tests")}
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    table = pd.read_csv(tmp_path / "sweep" / "summary.csv")
    assert set(table.decoder) == {"linear", "voting"} and set(table.strategy) == {"kvb"}
    by_decoder = table.groupby("decoder").final_accuracy.mean()
    assert by_decoder["linear"] != by_decoder["voting"]  # the field reaches the model
    # the command runs it too, and refuses it without the module that registers it
    listed = subprocess.run([sys.executable, "-m", "kvb_avalanche", "benchmarks", "--import",
                             "user_benchmarks"], cwd=REPO, capture_output=True, text=True,
                            env=env, check=True).stdout
    assert "split_shapes" in listed
    bad = subprocess.run([sys.executable, "-m", "kvb_avalanche", "split-shapes", "--out",
                          str(tmp_path / "x")], cwd=REPO, capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "invalid choice: 'split-shapes'" in bad.stderr


def test_an_image_folder_with_another_class_count_is_refused_naming_both(tmp_path):
    import user_benchmarks  # noqa: F401

    _shapes_tree(tmp_path / "data", per_class=2)
    (tmp_path / "data" / "split_shapes" / "train" / "extra").mkdir()
    Image.new("RGB", (5, 7)).save(tmp_path / "data" / "split_shapes" / "train" / "extra" / "a.png")
    with pytest.raises(DataError, match="declares 4 classes; .* has 5: circle, cross, extra"):
        DATASETS["split_shapes"].load("train", max_per_class=None, size=32,
                                      options=DataOptions(root=tmp_path / "data"))


# ---------------------------------------------------------------------------- online
def test_online_configurations_are_one_pass():
    config = ExperimentConfig.for_benchmark("split_cifar10", online=True, experience_size=50)
    assert (config.epochs, config.kvb_epochs) == (1, 1)
    with pytest.raises(ConfigError, match="an online stream is seen once: epochs and "
                                          "kvb_epochs must be 1, got 10 and 1"):
        ExperimentConfig.for_benchmark("split_cifar10", online=True, epochs=10)
    with pytest.raises(ConfigError, match="experience_size must be a positive integer"):
        ExperimentConfig(experience_size=0)


def test_an_online_run_trains_on_mini_experiences_and_evaluates_at_the_boundaries():
    from avalanche.training.supervised import Naive
    from torch import nn

    from kvb_avalanche.benchmarks.embedded import tensor_scenario
    from kvb_avalanche.experiments.runner import make_evaluator, run_stream

    y = torch.arange(4).repeat_interleave(25)
    x = torch.randn(100, 6) + y[:, None].float()
    stream = tensor_scenario((x, y), (x, y), [0, 1, 2, 3], 2)
    model = nn.Linear(6, 4)
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                     criterion=nn.CrossEntropyLoss(), train_epochs=1, train_mb_size=100,
                     evaluator=make_evaluator())
    sizes = []
    strategy.train = (lambda train: lambda e, **kw: (sizes.append(len(e.dataset)),
                                                     train(e, **kw)))(strategy.train)
    rows, _ = run_stream(strategy, stream, "naive", 0, online=15)
    assert sizes == [15, 15, 15, 5] * 2  # 50 examples an experience, in minis of 15
    assert [(r.trained_through, r.evaluated_on) for r in rows] == [(0, 0), (0, 1), (1, 0),
                                                                   (1, 1)]


@pytest.mark.skipif(not (SHARED / "cifar10").is_dir(), reason="needs CIFAR under ../shared/data")
@pytest.mark.parametrize("projection", ["chunk", "learned"])
def test_the_projection_field_refuses_a_chunking_that_does_not_fit_before_any_work(tmp_path,
                                                                                   projection):
    from kvb_avalanche.experiments.runner import RunOptions, run_experiment

    config = ExperimentConfig(**{**SMALL, "projection": projection, "codebooks": 8})
    with pytest.raises(ConfigError, match=rf"projection {projection} splits the encoder's "
                                          r"1280 features: codebooks x dim_keys must be 1280"):
        run_experiment(config, tmp_path / "out", RunOptions(data_root=SHARED, progress=False))
    assert not (tmp_path / "out").exists()


def test_a_users_benchmark_travels_with_a_pickled_configuration_to_a_worker(tmp_path):
    """What a Ray task or a SLURM job gets: a worker that never imported the module that
    registered the benchmark still runs its configuration."""
    import cloudpickle
    import user_benchmarks

    cloudpickle.register_pickle_by_value(user_benchmarks)  # as --import modules travel
    try:
        blob = cloudpickle.dumps(ExperimentConfig.for_benchmark("split_shapes", **SMALL))
    finally:
        cloudpickle.unregister_pickle_by_value(user_benchmarks)
    (tmp_path / "config.pkl").write_bytes(blob)
    worker = ("import pickle, sys; c = pickle.load(open(sys.argv[1], 'rb')); "
              "assert 'user_benchmarks' not in sys.modules; "
              "print(c.benchmark, c.num_classes, c.spec.setting, c.n_experiences)")
    done = subprocess.run([sys.executable, "-c", worker, str(tmp_path / "config.pkl")],
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["split_shapes", "4", "class-incremental", "2"]
