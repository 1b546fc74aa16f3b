"""The frozen-feature baselines (NCM, SimpleCIL, FeCAM, RanPAC), each against its method
computed by hand in numpy on a small class-incremental stream."""

import numpy as np
import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.models import FeCAMClassifier
from avalanche.training.plugins import EvaluationPlugin

from kvb_avalanche.baselines import (
    RANPAC_HELD_OUT,
    RANPAC_RIDGES,
    FeCAMStrategy,
    NCMStrategy,
    RanPACStrategy,
    SimpleCILStrategy,
)
from kvb_avalanche.benchmarks.embedded import tensor_scenario

CLASSES, DIM, PER_CLASS, EXPERIENCES = 6, 12, 40, 3


@pytest.fixture(scope="module")
def stream():
    """Non-negative features (as pooled ReLU features are) of 6 overlapping classes, in 3
    experiences of 2 classes, class order shuffled."""
    g = torch.Generator().manual_seed(0)
    centres = torch.rand(CLASSES, DIM, generator=g) * 2

    def sample(n):
        y = torch.arange(CLASSES).repeat_interleave(n)
        return (centres[y] + torch.randn(len(y), DIM, generator=g)).clamp(min=0), y

    train, test = sample(PER_CLASS), sample(15)
    order = [3, 0, 5, 1, 4, 2]
    return train, test, order, tensor_scenario(train, test, order, EXPERIENCES)


def trained(build, stream, through=EXPERIENCES - 1, **kwargs):
    """The strategy after training on experiences 0..through."""
    evaluator = EvaluationPlugin(accuracy_metrics(stream=True), loggers=[])
    strategy = build(num_classes=CLASSES, evaluator=evaluator, train_mb_size=16, **kwargs)
    for experience in stream[3].train_stream[: through + 1]:
        strategy.train(experience)
    strategy.model.eval()
    return strategy


def seen_data(stream, through):
    (x, y), _, order, _ = stream
    seen = order[: 2 * (through + 1)]
    keep = np.isin(y.numpy(), seen)
    return x.numpy()[keep].astype(np.float64), y.numpy()[keep], seen


def check_predictions(strategy, stream, seen, expected):
    _, (xt, _), _, _ = stream
    with torch.no_grad():
        scores = strategy.model(xt)
    assert scores.shape == (len(xt), CLASSES) and torch.isfinite(scores).all()
    predicted = scores.argmax(1).numpy()
    assert set(predicted) <= set(seen)  # a class not shown yet is never predicted
    np.testing.assert_array_equal(predicted, expected)


@pytest.mark.parametrize("through", [0, 2])
def test_ncm_is_nearest_normalised_class_mean(stream, through):
    x, y, seen = seen_data(stream, through)
    strategy = trained(NCMStrategy, stream, through)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    means = {c: xn[y == c].mean(0) for c in seen}
    means = {c: m / np.linalg.norm(m) for c, m in means.items()}
    xt = stream[1][0].numpy().astype(np.float64)
    xt = xt / np.linalg.norm(xt, axis=1, keepdims=True)
    dist = np.stack([np.linalg.norm(xt - means[c], axis=1) for c in seen], 1)
    check_predictions(strategy, stream, seen, np.array(seen)[dist.argmin(1)])


@pytest.mark.parametrize("through", [0, 2])
def test_simplecil_is_cosine_to_raw_prototypes(stream, through):
    x, y, seen = seen_data(stream, through)
    strategy = trained(SimpleCILStrategy, stream, through, dim=DIM)
    protos = np.stack([x[y == c].mean(0) for c in seen])
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    xt = stream[1][0].numpy().astype(np.float64)
    cos = (xt / np.linalg.norm(xt, axis=1, keepdims=True)) @ protos.T
    check_predictions(strategy, stream, seen, np.array(seen)[cos.argmax(1)])


def fecam_by_hand(x, y, seen, xt):
    """FeCAM's paper with Avalanche's defaults: Tukey x^0.5; per class the covariance shrunk
    twice (+ mean diagonal on the diagonal, + mean off-diagonal off it) and normalised to a
    correlation; the Mahalanobis distance between L2-normalised vectors."""
    x, xt = np.sqrt(x), np.sqrt(xt)

    def shrink(cov):
        d = len(cov)
        off = cov[~np.eye(d, dtype=bool)]
        off_mean = off[off != 0].mean()
        return cov + np.diag(cov).mean() * np.eye(d) + off_mean * (1 - np.eye(d))

    xtn = xt / np.linalg.norm(xt, axis=1, keepdims=True)
    dists = []
    for c in seen:
        cov = shrink(shrink(np.cov(x[y == c].T)))
        sd = np.sqrt(np.diag(cov))
        cov = cov / np.outer(sd, sd)
        mean = x[y == c].mean(0)
        diff = xtn - mean / np.linalg.norm(mean)
        dists.append(np.einsum("nd,de,ne->n", diff, np.linalg.pinv(cov), diff))
    return np.stack(dists, 1)


@pytest.mark.parametrize("through", [0, 2])
def test_fecam_is_mahalanobis_under_shrunk_covariances(stream, through):
    x, y, seen = seen_data(stream, through)
    strategy = trained(FeCAMStrategy, stream, through)
    xt = stream[1][0].numpy().astype(np.float64)
    dist = fecam_by_hand(x, y, seen, xt)
    check_predictions(strategy, stream, seen, np.array(seen)[dist.argmin(1)])
    # and the cached inverses give Avalanche's own FeCAMClassifier's scores
    ours = strategy.model.eval_classifier
    reference = FeCAMClassifier()
    reference.class_means_dict = dict(ours.class_means_dict)
    reference.class_cov_dict = dict(ours.class_cov_dict)
    reference.max_class = ours.max_class
    with torch.no_grad():
        theirs = reference(stream[1][0])[:, seen]
        mine = ours(stream[1][0])[:, seen]
    torch.testing.assert_close(mine, theirs.float(), rtol=1e-4, atol=1e-4)


def test_fecam_refuses_negative_features(stream):
    strategy = trained(FeCAMStrategy, stream, 0)
    with pytest.raises(ValueError, match="non-negative features"):
        strategy.model(-torch.ones(2, DIM))


def test_ranpac_is_ridge_on_random_relu_features(stream):
    x, y, seen = seen_data(stream, EXPERIENCES - 1)
    strategy = trained(RanPACStrategy, stream, dim=DIM, projection_dim=50, seed=7)
    head = strategy.model.eval_classifier
    w = head.projection.numpy().astype(np.float64)
    (xtr, ytr), _, order, _ = stream

    def features(a):
        return np.maximum(np.asarray(a, np.float64) @ w, 0)

    gram, q = np.zeros((50, 50)), np.zeros((50, CLASSES))
    for t in range(EXPERIENCES):  # λ of the last experience, on its own held-out 20 %
        rows = np.flatnonzero(np.isin(ytr.numpy(), order[2 * t: 2 * t + 2]))
        h, onehot = features(xtr.numpy()[rows]), np.eye(CLASSES)[ytr.numpy()[rows]]
        gram += h.T @ h
        q += h.T @ onehot
    g = torch.Generator().manual_seed(7 * 100_003 + EXPERIENCES - 1)
    held = np.zeros(len(rows), bool)
    held[torch.randperm(len(rows), generator=g)[: int(RANPAC_HELD_OUT * len(rows))].numpy()] = 1
    fit, val = h[~held], h[held]
    losses = [np.mean((val @ np.linalg.solve(fit.T @ fit + r * np.eye(50),
                                             fit.T @ onehot[~held]) - onehot[held]) ** 2)
              for r in RANPAC_RIDGES]
    ridge = RANPAC_RIDGES[int(np.argmin(losses))]
    assert head.ridge == pytest.approx(ridge)
    weights = np.linalg.solve(gram + ridge * np.eye(50), q)
    np.testing.assert_allclose(head.weights.numpy(), weights, rtol=1e-4, atol=1e-6)
    scores = features(stream[1][0].numpy()) @ weights
    check_predictions(strategy, stream, seen, np.array(seen)[scores[:, seen].argmax(1)])


@pytest.mark.parametrize("build,extra", [(NCMStrategy, {}), (SimpleCILStrategy, {"dim": DIM}),
                                          (FeCAMStrategy, {}),
                                          (RanPACStrategy, {"dim": DIM, "projection_dim": 40})])
def test_baselines_learn_the_stream_without_gradient_steps(stream, build, extra):
    strategy = trained(build, stream, **extra)
    metrics = strategy.eval(stream[3].test_stream)
    assert metrics["Top1_Acc_Stream/eval_phase/test_stream"] >= 0.5  # chance: 1/6
    assert strategy.optimizer is None


@pytest.mark.parametrize("name,value", [("num_classes", 0), ("dim", -1),
                                        ("projection_dim", 2.5)])
def test_bad_sizes_are_refused_naming_them(name, value):
    kwargs = {"num_classes": 4, "dim": 8, "projection_dim": 16, name: value}
    with pytest.raises(ValueError, match=name):
        RanPACStrategy(**kwargs)


@pytest.mark.parametrize("build,theirs", [(NCMStrategy, "CurrentDataNCMUpdate"),
                                          (FeCAMStrategy, "CurrentDataFeCAMUpdate")])
def test_running_statistics_equal_avalanches_updates_class_incrementally(stream, build,
                                                                         theirs):
    from avalanche.training import plugins

    ours = trained(build, stream)
    reference = build(num_classes=CLASSES, train_mb_size=16,
                      evaluator=EvaluationPlugin(loggers=[]))
    reference.plugins[0] = getattr(plugins, theirs)()  # our head, Avalanche's update
    for experience in stream[3].train_stream:
        reference.train(experience)
    a, b = ours.model.eval_classifier, reference.model.eval_classifier
    for c in stream[2]:
        torch.testing.assert_close(a.class_means_dict[c], b.class_means_dict[c].float(),
                                   rtol=1e-5, atol=1e-6)
        if hasattr(a, "class_cov_dict"):
            torch.testing.assert_close(a.class_cov_dict[c], b.class_cov_dict[c].float(),
                                       rtol=1e-4, atol=1e-5)


def test_a_class_that_comes_back_gets_its_exact_mean():
    """Domain-incremental: class 0 in two experiences (10, then 12 features); its prototype
    is the mean of all 22 (Avalanche's update would average the two means 0.5 / 0.5)."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(30, 4, generator=g)
    y = torch.tensor([0] * 10 + [1] * 5 + [0] * 12 + [1] * 3)
    first = tensor_scenario((x[:15], y[:15]), (x, y), [0, 1], 1).train_stream[0]
    second = tensor_scenario((x[15:], y[15:]), (x, y), [0, 1], 1)
    strategy = NCMStrategy(num_classes=2, evaluator=EvaluationPlugin(loggers=[]))
    strategy.train(first)
    strategy.train(second.train_stream[0])
    xn = torch.nn.functional.normalize(x[y == 0], dim=1).double().mean(0)
    torch.testing.assert_close(strategy.model.eval_classifier.class_means_dict[0],
                               (xn / xn.norm()).float())


def test_fecam_keeps_a_batchs_distances_only_while_their_classes_statistics_stay(stream):
    """The test stream is scored after every experience; the distances to classes whose
    statistics did not change are kept, and equal those computed afresh."""
    strategy = trained(FeCAMStrategy, stream, 0)
    head = strategy.model.eval_classifier
    xt = stream[1][0]
    before = head(xt)
    for experience in stream[3].train_stream[1:]:
        strategy.train(experience)
    strategy.model.eval()
    kept = head(xt)
    head._scores.clear()  # noqa: SLF001 (computed afresh)
    torch.testing.assert_close(kept, head(xt), rtol=0, atol=0)
    first = stream[2][:2]
    assert not torch.equal(before, kept)  # the new classes are scored, the old ones kept
    torch.testing.assert_close(before[:, first], kept[:, first], rtol=0, atol=0)


def test_a_pickled_fecam_leaves_its_kept_inverses_and_scores_behind_and_scores_the_same(stream):
    """A checkpoint pickles the strategy: the derived caches stay out of it (on split
    CIFAR-100 they passed pickle's 4 GiB limit), and the copy recomputes equal scores."""
    import pickle

    head = trained(FeCAMStrategy, stream).model.eval_classifier
    xt = stream[1][0]
    scores = head(xt)
    assert head._inverse and head._scores  # noqa: SLF001
    copy = pickle.loads(pickle.dumps(head))
    assert copy._inverse == {} and copy._scores == {}  # noqa: SLF001
    assert head._inverse and head._scores  # noqa: SLF001 (the original keeps them)
    torch.testing.assert_close(copy(xt), scores, rtol=0, atol=0)


@pytest.mark.parametrize("batch", [7, 32, 2000])
def test_batched_slda_keeps_avalanches_streaming_lda_statistics(stream, batch):
    """Avalanche's StreamingLDA, one sample at a time, is the reference: the batched update
    gives its class means, counts and covariance on the same stream, and its predictions."""
    from avalanche.training.supervised import StreamingLDA

    from kvb_avalanche.baselines import BatchedStreamingLDA

    train, test, _, scenario = stream

    def run(cls):
        torch.manual_seed(0)  # the same shuffled order: the streaming estimate depends on it
        strategy = cls(slda_model=torch.nn.Identity(), criterion=torch.nn.CrossEntropyLoss(),
                       input_size=DIM, num_classes=CLASSES, shrinkage_param=1e-4,
                       train_mb_size=batch, eval_mb_size=64, train_epochs=1,
                       evaluator=EvaluationPlugin(loggers=[]))
        for experience in scenario.train_stream[:2]:  # a class comes in mid-stream
            strategy.train(experience)
        return strategy

    ours, reference = run(BatchedStreamingLDA), run(StreamingLDA)
    assert ours.num_updates == reference.num_updates == 4 * PER_CLASS
    assert torch.equal(ours.cK, reference.cK) and ours.cK.sum() == 4 * PER_CLASS
    torch.testing.assert_close(ours.muK, reference.muK, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.Sigma, reference.Sigma, rtol=1e-4, atol=1e-5)
    assert ours.Sigma.abs().max() > 0.1  # a real covariance, not the initial ones or zeros
    x = test[0]
    scores, expected = ours.predict(x), reference.predict(x)
    torch.testing.assert_close(ours.Lambda, reference.Lambda, rtol=1e-3, atol=1e-2)
    assert torch.equal(scores.argmax(1), expected.argmax(1))
    torch.testing.assert_close(scores, expected, rtol=1e-3, atol=1e-2)
