"""KVBStrategy / KVBPlugin on Avalanche's own scenarios, next to Avalanche's baselines."""

from dataclasses import asdict

import pandas as pd
import pytest
import torch
from avalanche.benchmarks.utils.data_loader import TaskBalancedDataLoader
from avalanche.training.plugins import SupervisedPlugin
from avalanche.training.supervised import EWC, LwF, Naive, Replay
from conftest import blob_embeddings
from torch import nn
from torch.utils.data import DataLoader, WeightedRandomSampler

from kvb_avalanche import (
    KeyFitConfig,
    KeyValueBottleneck,
    KVBModel,
    KVBPlugin,
    KVBStrategy,
    VotingDecoder,
)
from kvb_avalanche.benchmarks import tensor_scenario
from kvb_avalanche.codes import CodesLoader, plain_loader_settings, read_dataset
from kvb_avalanche.experiments.reports import summarize
from kvb_avalanche.experiments.runner import make_evaluator, run_stream

DIM, CLASSES = 16, 4


@pytest.fixture(scope="module")
def scenario():
    # clusters close enough that a linear head trained on new classes overruns the old ones
    blobs = dict(spread=0.3, seed=1, scale=1.0, offset=2.0)
    x, y, _ = blob_embeddings(CLASSES, 60, DIM, noise_seed=1, **blobs)
    xt, yt, _ = blob_embeddings(CLASSES, 30, DIM, noise_seed=2, **blobs)
    return tensor_scenario((x, y), (xt, yt), class_order=[0, 1, 2, 3], num_experiences=2)


def kvb_model(seed=0):
    bn = KeyValueBottleneck(DIM, 8, 32, 4, CLASSES, seed=seed)
    return KVBModel(None, bn, VotingDecoder(CLASSES))


def test_kvb_runs_beside_avalanche_baselines_with_the_same_evaluator(scenario):
    common = dict(train_mb_size=32, train_epochs=20, eval_mb_size=256)
    strategies = {"kvb": KVBStrategy(model=kvb_model(), lr=3.0, evaluator=make_evaluator(),
                                     **common)}
    for cls, extra in [(Naive, {}), (EWC, {"ewc_lambda": 10.0}), (Replay, {"mem_size": 20}),
                       (LwF, {"alpha": 1.0, "temperature": 2.0})]:
        model = nn.Linear(DIM, CLASSES)
        strategies[cls.__name__.lower()] = cls(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
            criterion=nn.CrossEntropyLoss(), evaluator=make_evaluator(), **extra, **common)
    rows = []
    for name, strategy in strategies.items():
        rows += run_stream(strategy, scenario, name, seed=0)[0]
    summary = summarize(pd.DataFrame(map(asdict, rows))).set_index("strategy")
    assert set(summary.index) == set(strategies)
    # KVB learns both experiences and keeps the first; naive forgets (nearly) all of it
    assert summary.loc["kvb", "final_accuracy"] > 0.9
    assert summary.loc["kvb", "average_forgetting"] < 0.1
    assert summary.loc["naive", "average_forgetting"] > 0.8


def test_plugin_fits_keys_once_from_the_first_experience_and_freezes_them(scenario):
    model = kvb_model()
    strategy = KVBStrategy(model=model, train_mb_size=32, train_epochs=1, eval_mb_size=256,
                           evaluator=make_evaluator())
    assert not bool(model.bottleneck.keys_initialized)
    strategy.train(scenario.train_stream[0], eval_streams=[])
    assert bool(model.bottleneck.keys_frozen)
    keys = model.bottleneck.keys.clone()
    strategy.train(scenario.train_stream[1], eval_streams=[])
    assert torch.equal(model.bottleneck.keys, keys)
    # keys were fitted on the first experience only: every key lies near its classes 0, 1
    first = scenario.train_stream[0].dataset
    x0 = torch.stack([first[i][0] for i in range(len(first))])
    heads = model.bottleneck.project(x0)  # (n, codebooks, dim_keys)
    nearest = torch.cdist(model.bottleneck.keys, heads.transpose(0, 1)).min(-1).values
    assert nearest.max() < 1.0


class CountingLoader:
    def __init__(self, data):
        self.data, self.iterations = data, 0

    def __iter__(self):
        self.iterations += 1
        yield from self.data


def test_checkpointed_model_resumes_without_refitting(scenario):
    x, _, _ = blob_embeddings(CLASSES, 60, DIM, spread=0.3, seed=2)
    loader = CountingLoader([x[:120], x[120:]])
    model = kvb_model()
    plugin = KVBPlugin(key_init_loader=loader, key_fit=KeyFitConfig(epochs=2))
    strategy = Naive(model=model, optimizer=torch.optim.SGD([model.bottleneck.values], lr=1.0),
                     plugins=[plugin], train_mb_size=32, evaluator=make_evaluator())
    strategy.train(scenario.train_stream[0], eval_streams=[])
    fitted_passes = loader.iterations
    assert fitted_passes == 3  # the Lloyd start + 2 EMA epochs
    state = model.state_dict()

    resumed = kvb_model(seed=5)
    resumed.load_state_dict(state)
    strategy = Naive(model=resumed,
                     optimizer=torch.optim.SGD([resumed.bottleneck.values], lr=1.0),
                     plugins=[plugin], train_mb_size=32, evaluator=make_evaluator())
    strategy.train(scenario.train_stream[1], eval_streams=[])
    assert loader.iterations == fitted_passes, "resumed strategy refitted frozen keys"
    assert torch.equal(resumed.bottleneck.keys, model.bottleneck.keys)


@pytest.mark.parametrize("sparse", [False, True])
def test_gradient_norm_is_clipped(scenario, sparse):
    model = kvb_model()
    model.bottleneck.sparse_grad = sparse
    strategy = KVBStrategy(model=model, clip_grad_norm=1e-3, lr=1.0, train_mb_size=32,
                           evaluator=make_evaluator())
    strategy.kvb.prepare(model, scenario.train_stream[0])
    before = model.bottleneck.values.detach().clone()
    x = scenario.train_stream[0].dataset[0][0][None]
    y = torch.tensor([scenario.train_stream[0].dataset[0][1]])
    nn.functional.cross_entropy(model(x), y).backward()
    strategy.optimizer_step()
    assert (model.bottleneck.values.detach() - before).norm() == pytest.approx(1e-3, rel=1e-3)


def test_periodic_eval_before_the_first_experience(scenario):
    x = torch.cat([scenario.train_stream[i].dataset[j][0][None] for i in range(2)
                   for j in range(120)])
    with_loader = KVBStrategy(model=kvb_model(), train_mb_size=16, train_epochs=2, eval_every=1,
                              key_init_loader=[x], evaluator=make_evaluator())
    with_loader.train(scenario.train_stream[0], eval_streams=[scenario.test_stream])
    assert bool(with_loader.model.bottleneck.keys_frozen)
    (steps, accuracies), = [v for k, v in with_loader.evaluator.get_all_metrics().items()
                            if k.startswith("Top1_Acc_Stream/eval_phase/test_stream")]
    assert len(accuracies) >= 3  # before training, then after each of the 2 epochs
    assert accuracies[0] < accuracies[-1]  # values start at zero: nothing learnt yet


def test_bad_clip_value_is_refused():
    with pytest.raises(ValueError, match="clip_grad_norm"):
        KVBStrategy(model=kvb_model(), clip_grad_norm=0.0)


@pytest.mark.parametrize("sparse_grad", [False, True])
def test_training_from_cached_codes_is_exactly_training_from_embeddings(scenario, sparse_grad):
    trained = []
    for cache in (True, False):
        torch.manual_seed(3)
        model = kvb_model()
        model.bottleneck.mask_unused_keys = True
        model.bottleneck.sparse_grad = sparse_grad
        loaders = LoaderSpy()
        strategy = KVBStrategy(model=model, cache_codes=cache, lr=2.0, train_mb_size=16,
                               train_epochs=3, evaluator=make_evaluator(), plugins=[loaders])
        rows = run_stream(strategy, scenario, "kvb", seed=0)[0]
        trained.append((model.bottleneck.values.detach().clone(), rows))
        if cache:
            plugin = strategy.plugins[1]
            assert len(plugin._codes) >= 1
        # the fast loader is taken exactly when codes are cached
        assert loaders.seen == ({CodesLoader} if cache else {DataLoader})
    (cached_values, cached_rows), (plain_values, plain_rows) = trained
    assert torch.equal(cached_values, plain_values)
    assert cached_rows == plain_rows


def tensors(dataset):
    """(inputs, targets, task labels) of a whole dataset, in order."""
    batches = list(read_dataset(dataset, 64))
    return tuple(torch.cat([b[i] for b in batches]) for i in (0, 1, -1))


class LoaderSpy(SupervisedPlugin):
    def __init__(self):
        super().__init__()
        self.seen = set()

    def before_training_epoch(self, strategy, **kwargs):
        self.seen.add(type(strategy.dataloader))


@pytest.mark.parametrize("kind", ["DataLoader", "TaskBalancedDataLoader"])
@pytest.mark.parametrize("shuffle, drop_last", [(True, False), (True, True), (False, False)])
def test_codes_loader_yields_avalanches_batches_and_draws_the_same_randomness(
        scenario, kind, shuffle, drop_last):
    dataset = scenario.train_stream[1].dataset  # 120 samples: batches of 16 leave 8 over
    settings = dict(batch_size=16, shuffle=shuffle, drop_last=drop_last)
    avalanche_loader = {  # the two loaders SupervisedTemplate.make_train_dataloader builds
        "DataLoader": lambda: DataLoader(dataset, collate_fn=dataset.collate_fn, **settings),
        "TaskBalancedDataLoader": lambda: TaskBalancedDataLoader(
            dataset, oversample_small_groups=True, **settings),
    }[kind]
    assert plain_loader_settings(avalanche_loader(), dataset) == (16, shuffle, drop_last)
    runs = []
    for make in (avalanche_loader, lambda: CodesLoader(*tensors(dataset), **settings)):
        torch.manual_seed(11)
        loader = make()
        epochs = [[[t.clone() for t in batch] for batch in loader] for _ in range(2)]
        runs.append((len(loader), epochs, torch.rand(3)))
    (n_ref, ref, after_ref), (n_ours, ours, after_ours) = runs
    assert n_ours == n_ref == (7 if drop_last else 8)
    assert len(ours[0]) == len(ref[0]) == n_ref
    for ref_epoch, our_epoch in zip(ref, ours, strict=True):
        for ref_batch, our_batch in zip(ref_epoch, our_epoch, strict=True):
            assert all(torch.equal(a, b) for a, b in zip(ref_batch, our_batch, strict=True))
    assert not torch.equal(ref[0][0][1], ref[1][0][1]) or not shuffle  # epochs reshuffle
    assert torch.equal(after_ref, after_ours)  # the global RNG is left where Avalanche leaves it


def test_loaders_with_their_own_sampling_keep_avalanches_loader(scenario):
    dataset = scenario.train_stream[1].dataset
    weighted = WeightedRandomSampler(torch.ones(len(dataset)), len(dataset))
    plain = dict(batch_size=16, shuffle=True, collate_fn=dataset.collate_fn)
    for loader in (
        DataLoader(dataset, batch_size=16, sampler=weighted, collate_fn=dataset.collate_fn),
        DataLoader(dataset, **plain, generator=torch.Generator().manual_seed(0)),
        DataLoader(scenario.train_stream[0].dataset, **plain),  # another dataset
        # persistent workers draw their base seed once, not every epoch
        DataLoader(dataset, **plain, num_workers=1, persistent_workers=True),
        TaskBalancedDataLoader(dataset, batch_size=16, shuffle=True, num_workers=1,
                               persistent_workers=True),
        DataLoader(dataset, batch_size=16, shuffle=True, collate_fn=lambda b: b),  # own collate
        TaskBalancedDataLoader(dataset, batch_size=16, shuffle=True, collate_fn=lambda b: b),
    ):
        assert plain_loader_settings(loader, dataset) is None
    assert plain_loader_settings(DataLoader(dataset, **plain, num_workers=1), dataset) == (
        16, True, False)  # workers that are not persistent draw like the main process


def test_code_cache_is_recomputed_when_the_keys_change(scenario):
    model = kvb_model()
    strategy = KVBStrategy(model=model, train_mb_size=32, evaluator=make_evaluator())
    strategy.train(scenario.train_stream[0], eval_streams=[])
    plugin = strategy.plugins[1]
    (stale_key, stale_codes), = plugin._codes.items()
    model.bottleneck.keys.add_(torch.randn_like(model.bottleneck.keys))  # keys moved
    strategy.train(scenario.train_stream[0], eval_streams=[])
    assert stale_key not in plugin._codes
    (fresh_key, fresh_codes), = plugin._codes.items()
    x = torch.stack([scenario.train_stream[0].dataset[i][0] for i in range(120)])
    assert torch.equal(fresh_codes, model.codes(x)) and not torch.equal(fresh_codes, stale_codes)
