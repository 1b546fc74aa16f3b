"""KVBStrategy / KVBPlugin dropped into everyday Avalanche set-ups: replay and other plugins,
periodic evaluation, random transforms, wrong inputs, checkpoints.

Two scenario shapes: a tensor scenario built by ``class_incremental_benchmark`` and an image
scenario with transforms built by ``nc_benchmark`` over a torchvision-style dataset
(scikit-learn's 8x8 digits) behind a frozen conv encoder.
"""

import logging
from dataclasses import asdict

import pandas as pd
import pytest
import torch
from avalanche.logging import InteractiveLogger
from avalanche.training.plugins import (
    EarlyStoppingPlugin,
    GDumbPlugin,
    LRSchedulerPlugin,
    ReplayPlugin,
    SupervisedPlugin,
)
from avalanche.training.supervised import Naive
from conftest import blob_embeddings, digits_benchmark, final_accuracy_by_hand, frozen_conv_encoder
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms

from kvb_avalanche import (
    CodesLoader,
    FrozenCodesPlugin,
    KeyValueBottleneck,
    KVBModel,
    KVBPlugin,
    KVBStrategy,
    VotingDecoder,
)
from kvb_avalanche.benchmarks import tensor_scenario
from kvb_avalanche.checkpoint import maybe_load_checkpoint, save_checkpoint
from kvb_avalanche.codes import random_transforms
from kvb_avalanche.experiments.config import ConfigError
from kvb_avalanche.experiments.reports import summarize
from kvb_avalanche.experiments.runner import RunOptions, make_evaluator, run_stream

DIM, CLASSES = 16, 4


@pytest.fixture(scope="module")
def tensor_bench():
    blobs = dict(spread=0.3, seed=1, scale=1.0, offset=2.0)
    x, y, _ = blob_embeddings(CLASSES, 60, DIM, noise_seed=1, **blobs)
    xt, yt, _ = blob_embeddings(CLASSES, 30, DIM, noise_seed=2, **blobs)
    return tensor_scenario((x, y), (xt, yt), class_order=[0, 1, 2, 3], num_experiences=2)


@pytest.fixture(scope="module")
def image_bench():
    return digits_benchmark(CLASSES)


ENCODERS = {"none": lambda: None, "conv": lambda: frozen_conv_encoder(DIM)}


def kvb_model(encoder: str = "none", seed: int = 0) -> KVBModel:
    bn = KeyValueBottleneck(DIM, 8, 32, 4, CLASSES, seed=seed)
    return KVBModel(ENCODERS[encoder](), bn, VotingDecoder(CLASSES))


def kvb_strategy(encoder="none", **kwargs) -> KVBStrategy:
    settings = dict(lr=2.0, train_mb_size=16, train_epochs=3, eval_mb_size=64,
                    evaluator=make_evaluator())
    return KVBStrategy(model=kvb_model(encoder), **{**settings, **kwargs})


def share_of_class_0(bench) -> float:
    targets = [int(y) for e in bench.test_stream for y in e.dataset.targets]
    return targets.count(0) / len(targets)


def accuracies(rows):
    return [r.accuracy for r in rows]


class Spy(SupervisedPlugin):
    """Records the codes the model sees: the first batch of every epoch, as codes."""

    def __init__(self):
        super().__init__()
        self.first_batches, self.modes, self._new_epoch = [], [], False

    def before_training_epoch(self, strategy, **kwargs):
        self._new_epoch = True

    def after_forward(self, strategy, **kwargs):  # after every before_forward hook
        if self._new_epoch:
            x = strategy.mbatch[0]
            self.first_batches.append(x if strategy.model.is_codes(x) else
                                      strategy.model.codes(x))
            self._new_epoch = False

    def after_training_exp(self, strategy, **kwargs):
        codes = [p for p in strategy.plugins if isinstance(p, FrozenCodesPlugin)]
        self.modes.append(codes[0].mode if codes else None)


# ---------------------------------------------------------------------------- replay
def test_gdumb_plugin_composes_with_the_code_cache(tensor_bench):
    """GDumb swaps the adapted dataset for its buffer: the template's loader over it is
    plain, so the buffer's codes are cached; the same result as without a cache."""
    trained = []
    for cache in ("auto", False):
        torch.manual_seed(0)
        spy = Spy()
        strategy = kvb_strategy(cache_codes=cache, plugins=[spy, GDumbPlugin(mem_size=60)])
        rows = run_stream(strategy, tensor_bench, "kvb_gdumb", seed=0)[0]
        trained.append((strategy.model.bottleneck.values.detach().clone(), rows, spy.modes))
    (cached, cached_rows, modes), (plain, plain_rows, _) = trained
    assert modes == ["cached codes", "cached codes"]
    assert torch.equal(cached, plain) and accuracies(cached_rows) == accuracies(plain_rows)


@pytest.mark.parametrize("shape", ["tensor", "image"])
def test_replay_plugin_composes_with_the_code_cache(tensor_bench, image_bench, shape):
    bench = tensor_bench if shape == "tensor" else image_bench
    runs = {}
    for name, cache, replay in [("kvb", "auto", False), ("kvb_replay", "auto", True),
                                ("kvb_replay_nocache", False, True)]:
        torch.manual_seed(0)
        spy = Spy()
        plugins = [spy] + ([ReplayPlugin(mem_size=40)] if replay else [])
        strategy = kvb_strategy("none" if shape == "tensor" else "conv", cache_codes=cache,
                                plugins=plugins)
        rows = run_stream(strategy, bench, name, seed=0)[0]
        runs[name] = (rows, strategy.model.bottleneck.values.detach().clone(), spy)
    # the first experience has an empty buffer: the plain loader, cached; then the replay
    # loader mixes raw buffer inputs in, served through the content-keyed memo
    assert runs["kvb_replay"][2].modes == ["cached codes", "content-keyed memo"]
    assert runs["kvb"][2].modes == ["cached codes", "cached codes"]
    # the memo is exact: the same training as looking every batch up
    assert torch.equal(runs["kvb_replay"][1], runs["kvb_replay_nocache"][1])
    assert accuracies(runs["kvb_replay"][0]) == accuracies(runs["kvb_replay_nocache"][0])
    # replay trains on more data in the second experience than plain KVB
    assert not torch.equal(runs["kvb_replay"][1], runs["kvb"][1])
    matrix = pd.DataFrame(map(asdict, runs["kvb"][0] + runs["kvb_replay"][0]))
    summary = summarize(matrix)
    logging.getLogger(__name__).info("KVB with and without replay (%s):\n%s", shape, summary)
    assert summary.set_index(["strategy", "seed"]).final_accuracy.to_dict() == (
        pytest.approx(final_accuracy_by_hand(matrix)))


def test_memo_serves_rows_seen_before_and_looks_up_only_new_ones(tensor_bench):
    model = kvb_model()
    strategy = kvb_strategy(plugins=[ReplayPlugin(mem_size=40)])
    run_stream(strategy, tensor_bench, "kvb", seed=0)
    memo = next(p for p in strategy.plugins if isinstance(p, FrozenCodesPlugin))._memo
    # 3 epochs over 120 new samples and 40 buffered ones: each distinct row looked up once
    assert memo.misses == 160 and memo.hits >= 2 * 160
    x = torch.stack([tensor_bench.train_stream[1].dataset[i][0] for i in range(5)])
    model = strategy.model
    assert torch.equal(memo.codes(model, x), model.codes(x).to(memo.table.dtype))
    assert memo.misses == 160  # served from the memo


# ---------------------------------------------------------------------------- periodic eval
@pytest.mark.parametrize("shape", ["tensor", "image"])
def test_periodic_eval_fits_keys_on_the_first_experience_before_evaluating(
        tensor_bench, image_bench, shape):
    bench = tensor_bench if shape == "tensor" else image_bench
    strategy = kvb_strategy("none" if shape == "tensor" else "conv", eval_every=1,
                            train_epochs=2)
    strategy.train(bench.train_stream[0], eval_streams=[bench.test_stream])
    (_, accuracies), = [v for k, v in strategy.evaluator.get_all_metrics().items()
                        if k.startswith("Top1_Acc_Stream/eval_phase/test_stream")]
    assert len(accuracies) == 3  # before training, then after each of the 2 epochs
    # values zero: the same logits for all, every prediction class 0
    assert accuracies[0] == pytest.approx(share_of_class_0(bench))
    assert accuracies[-1] > 0.45  # half the classes learnt
    # keys were fitted on the first experience only: every key lies near classes 0, 1
    if shape == "tensor":
        first = bench.train_stream[0].dataset
        x0 = torch.stack([first[i][0] for i in range(len(first))])
        heads = strategy.model.bottleneck.project(x0)
        nearest = torch.cdist(strategy.model.bottleneck.keys, heads.transpose(0, 1)).min(-1)
        assert nearest.values.max() < 1.0


def test_periodic_eval_under_another_template_reports_chance_without_raising(
        tensor_bench, caplog):
    model = kvb_model()
    strategy = Naive(model=model, optimizer=torch.optim.SGD([model.bottleneck.values], lr=2.0),
                     plugins=[KVBPlugin(), FrozenCodesPlugin()], train_mb_size=16,
                     train_epochs=2, eval_every=1, evaluator=make_evaluator())
    with caplog.at_level(logging.WARNING):
        strategy.train(tensor_bench.train_stream[0], eval_streams=[tensor_bench.test_stream])
    (_, accuracies), = [v for k, v in strategy.evaluator.get_all_metrics().items()
                        if k.startswith("Top1_Acc_Stream/eval_phase/test_stream")]
    # all inputs get the same zero logits: every prediction is class 0
    assert accuracies[0] == pytest.approx(share_of_class_0(tensor_bench))
    assert accuracies[-1] > 0.45
    assert caplog.text.count("evaluating before any key was fitted") == 1


# ---------------------------------------------------------------------------- transforms
def random_crop_bench():
    crop = transforms.Compose([transforms.RandomCrop(8, padding=2), transforms.ToTensor()])
    return digits_benchmark(CLASSES, train_transform=crop)


def test_random_transforms_are_detected_by_name_and_by_reading_twice(image_bench):
    random_bench = random_crop_bench()
    assert random_transforms(image_bench.train_stream[0].dataset) is None
    assert random_transforms(image_bench.train_stream[0].dataset.eval()) is None
    assert "RandomCrop" in random_transforms(random_bench.train_stream[0].dataset)
    # the eval group of the same data has no random transform
    assert random_transforms(random_bench.train_stream[0].dataset.eval()) is None

    class Jitter:  # random, but with a name nobody could recognise
        def __call__(self, x):
            return x + torch.rand(())

    jitter = digits_benchmark(CLASSES, train_transform=transforms.Compose(
        [transforms.ToTensor(), Jitter()]))
    before = torch.get_rng_state()
    assert random_transforms(jitter.train_stream[0].dataset) == "two reads of its sample 0 differ"
    assert torch.equal(torch.get_rng_state(), before)  # the probe draws nothing for good


def test_random_crop_is_looked_up_per_batch_and_equals_no_cache(caplog):
    bench = random_crop_bench()
    trained = {}
    for cache in ("auto", False, True):
        torch.manual_seed(0)
        spy = Spy()
        strategy = kvb_strategy("conv", cache_codes=cache, plugins=[spy])
        with caplog.at_level(logging.INFO):
            strategy.train(bench.train_stream[0], eval_streams=[], shuffle=False)
        trained[cache] = (strategy.model.bottleneck.values.detach().clone(), spy)
    auto, off, forced = trained["auto"], trained[False], trained[True]
    assert auto[1].modes == ["lookup per batch"]
    # the same inputs, cropped anew each epoch: their codes change between epochs
    first = auto[1].first_batches
    assert len(first) == 3 and not torch.equal(first[0], first[1])
    assert torch.equal(auto[0], off[0])  # exactly what no cache gives
    assert "not repeatable (RandomCrop among its transforms)" in caplog.text
    # forcing the cache freezes one crop per sample, with a warning
    assert forced[1].modes == ["cached codes"]
    frozen = forced[1].first_batches
    assert torch.equal(frozen[0], frozen[1]) and torch.equal(frozen[1], frozen[2])
    assert "cache_codes=True although the training data are not repeatable" in caplog.text


def test_deterministic_image_transforms_are_cached_with_the_same_result(image_bench):
    trained = []
    for cache in ("auto", False):
        torch.manual_seed(0)
        spy = Spy()
        strategy = kvb_strategy("conv", cache_codes=cache, plugins=[spy])
        rows = run_stream(strategy, image_bench, "kvb", seed=0)[0]
        trained.append((strategy.model.bottleneck.values.detach().clone(), rows, spy.modes))
    (cached, cached_rows, modes), (plain, plain_rows, _) = trained
    assert modes == ["cached codes", "cached codes"]
    assert torch.equal(cached, plain) and accuracies(cached_rows) == accuracies(plain_rows)


# ---------------------------------------------------------------------------- wrong inputs
def test_integer_images_without_an_encoder_are_refused_with_the_expected_form():
    model = kvb_model()
    model.bottleneck.keys_initialized.fill_(True)
    with pytest.raises(ValueError, match=r"KVBModel input x is an integer tensor of shape "
                       r"\(2, 1, 8, 8\) \(torch.uint8\).*Without an encoder the inputs are "
                       r"embeddings: float \(batch, 16\)"):
        model(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))


def test_integer_images_into_a_float_encoder_are_refused_naming_the_fix():
    model = kvb_model("conv")
    model.bottleneck.keys_initialized.fill_(True)
    with pytest.raises(ValueError, match=r"x is an integer tensor .*The encoder failed on it.*"
                       r"ToTensor\(\)"):
        model(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))


@pytest.mark.parametrize("codes, message", [
    (torch.full((2, 8, 1), 32), r"x \(cached codes\) must lie in \[0, num_pairs=32\), got "
                                r"values from 32 to 32"),
    (torch.zeros(2, 5, 1, dtype=torch.long), r"integer tensor of shape \(2, 5, 1\).*cached "
                                             r"codes: integer \(batch, 8, topk\) key indices"),
])
def test_codes_that_do_not_fit_the_bottleneck_are_refused(codes, message):
    with pytest.raises(ValueError, match=message):
        kvb_model()(codes)


def test_a_model_that_is_not_a_kvbmodel_is_refused(tensor_bench):
    with pytest.raises(TypeError, match=r"KVBStrategy needs model=KVBModel\(encoder, "
                       r"KeyValueBottleneck\(...\), decoder\), got Linear"):
        KVBStrategy(model=nn.Linear(DIM, CLASSES))
    model = nn.Linear(DIM, CLASSES)
    naive = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                  plugins=[KVBPlugin()], evaluator=make_evaluator())
    with pytest.raises(TypeError, match="KVBPlugin needs model=KVBModel"):
        naive.train(tensor_bench.train_stream[0], eval_streams=[])
    with pytest.raises(ValueError, match="cache_codes must be 'auto', True or False, got 'yes'"):
        FrozenCodesPlugin(cache_codes="yes")


# ---------------------------------------------------------------------------- other plugins
def test_codes_loader_carries_the_dataloader_attributes(tensor_bench):
    dataset = tensor_bench.train_stream[1].dataset
    reference = DataLoader(dataset, batch_size=16, shuffle=True, drop_last=True,
                           collate_fn=dataset.collate_fn)
    codes = torch.zeros(len(dataset), 8, 1, dtype=torch.long)
    ours = CodesLoader(codes, torch.zeros(len(dataset)), torch.zeros(len(dataset)), 16,
                       shuffle=True, drop_last=True, dataset=dataset)
    for attr in ("dataset", "batch_size", "drop_last", "num_workers", "pin_memory",
                 "generator", "timeout", "collate_fn"):
        assert getattr(ours, attr) == getattr(reference, attr), attr
    assert type(ours.sampler) is type(reference.sampler)
    assert len(ours.sampler) == len(reference.sampler) == len(dataset)
    assert len(ours.batch_sampler) == len(reference.batch_sampler) == len(ours) == 7


def test_lr_scheduler_early_stopping_and_the_interactive_logger_run_on_cached_codes(
        tensor_bench):
    strategy = kvb_strategy(cache_codes="auto")
    scheduler = torch.optim.lr_scheduler.StepLR(strategy.optimizer, step_size=1, gamma=0.5)
    spy = Spy()
    strategy = kvb_strategy(
        cache_codes="auto", optimizer=strategy.optimizer, eval_every=1,
        plugins=[spy, LRSchedulerPlugin(scheduler, reset_lr=False),
                 EarlyStoppingPlugin(patience=5, val_stream_name="test_stream")],
        evaluator=make_evaluator([InteractiveLogger()]))
    strategy.train(tensor_bench.train_stream[0], eval_streams=[tensor_bench.test_stream])
    assert spy.modes == ["cached codes"]
    assert strategy.optimizer.param_groups[0]["lr"] == pytest.approx(2.0 * 0.5**3)


# ---------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("kind", ["kvb", "naive_adam"])
def test_checkpoint_after_an_experience_resumes_to_the_same_result(tensor_bench, tmp_path,
                                                                    kind):
    def build():
        torch.manual_seed(0)
        if kind == "kvb":
            return kvb_strategy(plugins=[ReplayPlugin(mem_size=20)])
        model = nn.Sequential(nn.Linear(DIM, 32), nn.ReLU(), nn.Linear(32, CLASSES))
        return Naive(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
                     plugins=[ReplayPlugin(mem_size=20)], train_mb_size=16, train_epochs=3,
                     evaluator=make_evaluator())

    straight = build()
    straight_rows = run_stream(straight, tensor_bench, kind, seed=0)[0]

    path = tmp_path / "checkpoint.pt"
    first = build()
    first.train(tensor_bench.train_stream[0], eval_streams=[])
    first_rows = first.eval(tensor_bench.test_stream)
    save_checkpoint(first, path, extra={"done": 1})
    torch.rand(5)  # whatever the killed process drew afterwards is forgotten

    resumed = build()
    done, extra = maybe_load_checkpoint(resumed, path)
    assert (done, extra) == (1, {"done": 1})
    resumed.train(tensor_bench.train_stream[1], eval_streams=[])
    resumed.eval(tensor_bench.test_stream)
    params = dict(resumed.model.named_parameters())
    for name, p in straight.model.named_parameters():
        assert torch.equal(p, params[name]), name
    assert resumed.optimizer.param_groups[0]["params"][0] is next(resumed.model.parameters())
    assert [r.accuracy for r in straight_rows if r.trained_through == 1] == [
        resumed.evaluator.get_last_metrics()[f"Top1_Acc_Exp/eval_phase/test_stream/Exp{j:03d}"]
        for j in range(2)]
    # the evaluator came back too: its history holds the evaluation before the checkpoint
    key = "Top1_Acc_Stream/eval_phase/test_stream"
    history = resumed.evaluator.get_all_metrics()[key][1]
    assert history == [first_rows[key], resumed.evaluator.get_last_metrics()[key]]
    assert maybe_load_checkpoint(build(), tmp_path / "none.pt") == (0, None)


def test_run_stream_saves_no_more_often_than_checkpoint_every(tensor_bench, tmp_path,
                                                              monkeypatch):
    from kvb_avalanche.experiments import runner

    saves = []
    monkeypatch.setattr(runner, "save_checkpoint",
                        lambda strategy, path, extra: saves.append(len(extra["rows"])))
    path = tmp_path / "checkpoint.pt"
    run_stream(kvb_strategy(), tensor_bench, "kvb", seed=0, checkpoint=path, checkpoint_every=0)
    assert saves == [2]  # after experience 0 (2 test rows); the finished run is the caller's
    saves.clear()
    run_stream(kvb_strategy(), tensor_bench, "kvb", seed=0, checkpoint=path,
               checkpoint_every=3600)
    assert saves == []  # an experience took less than an hour


def test_a_negative_checkpoint_interval_is_refused_by_name():
    with pytest.raises(ConfigError, match="checkpoint_every must be seconds >= 0, got -1"):
        RunOptions(checkpoint_every=-1)


# ---------------------------------------------------------------------------- bad targets
def stream_of(x, y, tasks=None):
    """One-experience Avalanche stream over tensors (with optional task labels)."""
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets

    from kvb_avalanche.avalanche_api import tensor_classification_dataset

    data = tensor_classification_dataset(
        x, y, task_labels=tasks if tasks is not None else 0)
    return benchmark_from_datasets(train=[data], test=[data]).train_stream


@pytest.mark.parametrize("fused", [True, False])
def test_labels_at_or_above_num_classes_are_refused_before_the_keys_are_fitted(fused):
    x, y, _ = blob_embeddings(CLASSES + 1, 10, DIM, spread=0.3, seed=1)
    strategy = kvb_strategy(fused=None if fused else False)
    with pytest.raises(ValueError, match=r"experience 0's targets must lie in \[0, 4\) "
                                         r"\(the decoder's num_classes\), got 0 to 4"):
        strategy.train(stream_of(x, y)[0], eval_streams=[])
    assert not bool(strategy.model.bottleneck.keys_initialized)  # refused before any work


class ShiftTargets(SupervisedPlugin):
    """Moves every training batch's targets out of range after the dataset check."""

    def before_forward(self, strategy, **kwargs):
        strategy.mbatch[1] = strategy.mbatch[1] + CLASSES


@pytest.mark.parametrize("fused", [None, False])
def test_a_batch_with_out_of_range_targets_is_refused_on_either_step(tensor_bench, fused):
    strategy = kvb_strategy(fused=fused, plugins=[ShiftTargets()])
    with pytest.raises(ValueError, match=r"mb_y \(the batch's targets\) must lie in \[0, 4\)"):
        strategy.train(tensor_bench.train_stream[0], eval_streams=[])
    assert strategy.training_step == ("fused" if fused is None else "autograd")


class Int32Targets(SupervisedPlugin):
    def before_forward(self, strategy, **kwargs):
        strategy.mbatch[1] = strategy.mbatch[1].int()


@pytest.mark.parametrize("fused", [None, False])
def test_int32_targets_train_on_either_step_as_int64_do(tensor_bench, fused):
    values = {}
    for plugins in ([], [Int32Targets()]):
        torch.manual_seed(0)
        strategy = kvb_strategy(fused=fused, plugins=plugins)
        strategy.train(tensor_bench.train_stream[0], eval_streams=[])
        values[len(plugins)] = strategy.model.bottleneck.values.detach().clone()
    assert torch.equal(values[0], values[1])


def test_float_targets_are_refused_before_training_naming_the_fix():
    x, y, _ = blob_embeddings(CLASSES, 10, DIM, spread=0.3, seed=1)
    strategy = kvb_strategy()
    with pytest.raises(ValueError, match=r"experience 0's targets must be integer class "
                                         r"indices, got torch.float32 .*\.long\(\)"):
        strategy.train(stream_of(x, y.float() + 0.5)[0], eval_streams=[])
    assert not bool(strategy.model.bottleneck.keys_initialized)


def test_task_labels_are_refused_unless_ignored_on_purpose():
    x, y, _ = blob_embeddings(CLASSES, 10, DIM, spread=0.3, seed=1)
    experience = stream_of(x, y, tasks=1)[0]
    with pytest.raises(ValueError, match=r"experience 0 has task labels \[1\]: KVBStrategy is "
                                         r"single-head.*ignore_task_labels=True"):
        kvb_strategy().train(experience, eval_streams=[])
    strategy = kvb_strategy(ignore_task_labels=True)
    strategy.train(experience, eval_streams=[])
    assert bool(strategy.model.bottleneck.keys_frozen)


@pytest.mark.parametrize("kwargs, message", [
    (dict(train_mb_size=0), "train_mb_size must be a positive integer, got 0"),
    (dict(train_epochs=1.5), "train_epochs must be a positive integer, got 1.5"),
    (dict(eval_mb_size=-1), "eval_mb_size must be a positive integer, got -1"),
    (dict(lr=0), "lr must be a number > 0, got 0"),
    (dict(train_mb_size=True), "train_mb_size must be a positive integer, got True"),
    (dict(label_smoothing=1.0), r"label_smoothing must be in \[0, 1\), got 1.0"),
])
def test_bad_sizes_and_rates_are_refused_at_construction_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kvb_strategy(**kwargs)


def test_numpy_scalars_are_valid_sizes_and_rates():
    import numpy as np

    strategy = kvb_strategy(train_mb_size=np.int64(16), train_epochs=np.int32(2),
                            lr=np.float32(2.0))
    assert strategy.train_mb_size == 16


def test_an_empty_first_experience_is_named_when_the_keys_need_it():
    strategy = kvb_strategy()
    empty = stream_of(torch.empty(0, DIM), torch.empty(0, dtype=torch.long))[0]
    with pytest.raises(ValueError, match=r"experience 0 is empty: the keys are fitted on the "
                                         r"first training experience.*key_init_loader"):
        strategy.train(empty, eval_streams=[])


def test_keys_fitted_on_fewer_inputs_than_keys_are_warned_about(caplog):
    x, y, _ = blob_embeddings(CLASSES, 5, DIM, spread=0.3, seed=1)  # 20 inputs, 32 keys
    with caplog.at_level(logging.WARNING, logger="kvb_avalanche.keys"):
        kvb_strategy().train(stream_of(x, y)[0], eval_streams=[])
    (said,) = [r.getMessage() for r in caplog.records if "fewer than" in r.getMessage()]
    assert said.startswith("keys fitted on 20 inputs, fewer than the 32 keys of each codebook: "
                           "at least 12 keys")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kvb_avalanche.keys"):
        x, y, _ = blob_embeddings(CLASSES, 10, DIM, spread=0.3, seed=1)  # 40 inputs
        kvb_strategy().train(stream_of(x, y)[0], eval_streams=[])
    assert not [r for r in caplog.records if "fewer than" in r.getMessage()]


# ---------------------------------------------------------------------------- optimizers
def test_an_optimizer_that_cannot_take_sparse_gradients_is_refused_naming_sparse_grad(
        tensor_bench):
    model = kvb_model()
    assert model.bottleneck.sparse_grad is False
    sparse = KVBModel(None, KeyValueBottleneck(DIM, 8, 32, 4, CLASSES, sparse_grad=True),
                      VotingDecoder(CLASSES))
    with pytest.raises(ValueError, match=r"optimizer: Adam cannot take the sparse value "
                                         r"gradients of KeyValueBottleneck\(sparse_grad=True\)"):
        KVBStrategy(model=sparse, optimizer=torch.optim.Adam([sparse.bottleneck.values]))
    # what the message offers works: SparseAdam on the sparse values, Adam on dense ones
    for m, optimizer in ((sparse, torch.optim.SparseAdam([sparse.bottleneck.values], lr=0.1)),
                         (model, torch.optim.Adam([model.bottleneck.values], lr=0.1))):
        strategy = KVBStrategy(model=m, optimizer=optimizer, train_mb_size=16,
                               evaluator=make_evaluator())
        before = m.bottleneck.values.detach().clone()
        strategy.train(tensor_bench.train_stream[0], eval_streams=[])
        assert strategy.training_step == "autograd"
        assert not torch.equal(before, m.bottleneck.values)


def test_a_frozen_encoder_with_parameters_keeps_the_fused_step(image_bench):
    strategy = kvb_strategy("conv")
    assert any(True for _ in strategy.model.encoder.parameters())
    strategy.train(image_bench.train_stream[0], eval_streams=[])
    assert strategy.training_step == "fused"
