"""The fused voting step against autograd: the same training, the same hooks, the same
attributes, and the cases where it must stand aside."""

import logging

import numba
import pytest
import torch
from avalanche.training.plugins import EWCPlugin, SupervisedPlugin
from conftest import blob_embeddings

from kvb_avalanche import KeyValueBottleneck, KVBModel, KVBStrategy, SparseSGD, VotingDecoder
from kvb_avalanche.benchmarks import tensor_scenario
from kvb_avalanche.experiments.runner import make_evaluator

DIM, CLASSES = 12, 4


@pytest.fixture(scope="module")
def stream():
    blobs = dict(spread=0.4, seed=1, scale=1.0, offset=2.0)
    x, y, _ = blob_embeddings(CLASSES, 50, DIM, noise_seed=1, **blobs)
    xt, yt, _ = blob_embeddings(CLASSES, 25, DIM, noise_seed=2, **blobs)
    return tensor_scenario((x, y), (xt, yt), [0, 1, 2, 3], 2)


def model(topk=1, reduction="mean", sparse_grad=True, seed=0) -> KVBModel:
    bn = KeyValueBottleneck(DIM, 16, 64, 4, CLASSES, topk=topk, key_init="random", seed=seed,
                            sparse_grad=sparse_grad)
    bn.freeze_keys()
    return KVBModel(None, bn, VotingDecoder(CLASSES, reduction=reduction))


class Recorder(SupervisedPlugin):
    """Every hook of a training iteration, in order, and what a plugin reads at each."""

    HOOKS = ("before_training_iteration", "before_forward", "after_forward",
             "before_backward", "after_backward", "before_update", "after_update",
             "after_training_iteration")

    def __init__(self):
        super().__init__()
        self.calls, self.outputs, self.losses, self.inputs = [], [], [], []
        for hook in self.HOOKS:
            setattr(self, hook, self._recorder(hook))

    def _recorder(self, hook):
        def record(strategy, **kwargs):
            self.calls.append(hook)
            if hook == "after_forward":
                self.outputs.append(strategy.mb_output.detach().clone())
                self.inputs.append(strategy.mbatch[0].clone())
            if hook == "before_update":
                assert strategy.loss.dim() == 0 or strategy.loss.numel() == 1
                self.losses.append(float(strategy.loss))
        return record


def train(m, stream, fused, epochs=3, **kwargs):
    recorder = Recorder()
    torch.manual_seed(0)
    strategy = KVBStrategy(model=m, fused=fused, train_mb_size=16, train_epochs=epochs,
                           evaluator=make_evaluator(), plugins=[recorder], **kwargs)
    for experience in stream.train_stream:
        strategy.train(experience, eval_streams=[])
    return strategy, recorder


def predictions(m, stream):
    m.eval()
    x = torch.cat([torch.stack([e.dataset[i][0] for i in range(len(e.dataset))])
                   for e in stream.test_stream])
    with torch.no_grad():
        return m(x).argmax(1)


@pytest.mark.parametrize("settings", [
    dict(),  # the paper's: mean, lr 0.3, clip 1.0, label smoothing 0.1
    dict(lr=50.0),  # large enough that clipping acts at every step
    dict(lr=3.0, clip_grad_norm=None, label_smoothing=0.0),
    dict(topk=3, lr=20.0),
    dict(reduction="sum", lr=2.0),
    dict(sparse_grad=False, lr=20.0),
    dict(optimizer="torch_sgd", lr=20.0),
])
def test_fused_training_equals_autograd(stream, settings):
    settings = dict(settings)
    shape = {k: settings.pop(k) for k in ("topk", "reduction", "sparse_grad") if k in settings}
    runs = {}
    for fused in (True, False):
        m = model(**shape)
        kwargs = dict(settings)
        if kwargs.pop("optimizer", None) == "torch_sgd":
            kwargs["optimizer"] = torch.optim.SGD([m.bottleneck.values], lr=kwargs.pop("lr"))
        strategy, recorder = train(m, stream, fused, **kwargs)
        assert strategy.training_step == ("fused" if fused else "autograd")
        runs[fused] = (m, recorder)
    (fm, frec), (am, arec) = runs[True], runs[False]
    assert am.bottleneck.values.abs().max() > 0.01  # it learnt something
    # float32 rounding of another summation order, relative to the values' scale
    scale = float(am.bottleneck.values.abs().max())
    torch.testing.assert_close(fm.bottleneck.values, am.bottleneck.values, rtol=1e-5,
                               atol=1e-5 * scale)
    assert torch.equal(fm.bottleneck.key_usage, am.bottleneck.key_usage)
    assert torch.equal(predictions(fm, stream), predictions(am, stream))
    # every hook in the same order, with the same batches, logits and losses
    assert frec.calls == arec.calls and len(frec.calls) == 8 * len(frec.outputs)
    for f, a in zip(frec.inputs, arec.inputs, strict=True):
        assert torch.equal(f, a)
    for f, a in zip(frec.outputs, arec.outputs, strict=True):
        torch.testing.assert_close(f, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))
    assert frec.losses == pytest.approx(arec.losses, rel=1e-5)


def test_the_fused_step_is_the_same_bits_whatever_the_threads(stream):
    trained = []
    for threads in (1, 2):
        previous = numba.get_num_threads()
        numba.set_num_threads(threads)
        try:
            m = model()
            train(m, stream, True, lr=20.0)
        finally:
            numba.set_num_threads(previous)
        trained.append(m.bottleneck.values.detach().clone())
    assert torch.equal(*trained)


class ReadsGradients(SupervisedPlugin):
    def after_backward(self, strategy, **kwargs):
        self.norm = strategy.model.bottleneck.values.grad is not None


@pytest.mark.parametrize("change, why", [
    (lambda m: dict(optimizer=torch.optim.Adam([m.bottleneck.values])), "Adam"),  # dense grads
    (lambda m: dict(optimizer=torch.optim.SGD([m.bottleneck.values], lr=0.1, momentum=0.9)),
     "momentum"),
    (lambda m: dict(criterion=torch.nn.NLLLoss()), "criterion"),
    (lambda m: dict(plugins=[ReadsGradients()]), "ReadsGradients acts at after_backward"),
    (lambda m: dict(plugins=[EWCPlugin(ewc_lambda=1.0)]), "EWCPlugin acts at"),
    (lambda m: dict(fused=False), "fused=False"),
])
def test_anything_else_takes_the_autograd_step_and_says_why(stream, caplog, change, why):
    m = model(sparse_grad=False)
    kwargs = {"fused": None, **change(m)}
    with caplog.at_level(logging.INFO, logger="kvb_avalanche.strategy"):
        strategy = KVBStrategy(model=m, train_mb_size=16, evaluator=make_evaluator(), **kwargs)
        strategy.train(stream.train_stream[0], eval_streams=[])
    assert strategy.training_step == "autograd"
    assert [r for r in caplog.records if "autograd step" in r.getMessage()
            and why in r.getMessage()]


def test_fused_true_refuses_what_it_cannot_do(stream):
    m = model()
    strategy = KVBStrategy(model=m, fused=True,
                           optimizer=torch.optim.Adagrad([m.bottleneck.values]),
                           evaluator=make_evaluator())
    with pytest.raises(ValueError, match="fused=True, but the fused step does not apply: the "
                                         "optimizer is Adagrad"):
        strategy.train(stream.train_stream[0], eval_streams=[])
    with pytest.raises(ValueError, match="fused must be None"):
        KVBStrategy(model=m, fused="yes")


def test_fused_is_the_default_and_said_once(stream, caplog):
    with caplog.at_level(logging.INFO, logger="kvb_avalanche.strategy"):
        strategy = KVBStrategy(model=model(), train_mb_size=16, evaluator=make_evaluator(),
                               optimizer=None)
        for experience in stream.train_stream:
            strategy.train(experience, eval_streams=[])
    assert strategy.training_step == "fused"
    said = [r.getMessage() for r in caplog.records if "KVBStrategy trains with" in r.getMessage()]
    assert said == ["KVBStrategy trains with the fused voting step"]
    assert isinstance(strategy.optimizer, SparseSGD)
