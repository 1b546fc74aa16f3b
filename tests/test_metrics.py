"""KVB's diagnostics as Avalanche metrics, checked on tiny bottlenecks by hand."""

import logging
import math

import pandas as pd
import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.logging import CSVLogger, InteractiveLogger
from avalanche.training.plugins import EvaluationPlugin
from conftest import blob_embeddings

from kvb_avalanche import KeyValueBottleneck, KVBModel, KVBStrategy, VotingDecoder
from kvb_avalanche.benchmarks import tensor_scenario
from kvb_avalanche.metrics import (
    COUNTING_REGIME,
    KeyFitChurn,
    KeySharing,
    KeysInUse,
    LearningRegime,
    MetricsCSVLogger,
    TrainLoss,
    ValueScale,
    kvb_metrics,
    regime,
)
from kvb_avalanche.strategy import CountingRegimeWarning


def frozen_model(codebooks: int, pairs: int, classes: int, dim: int = 4) -> KVBModel:
    bn = KeyValueBottleneck(dim, codebooks, pairs, 2, classes, key_init="random")
    bn.freeze_keys()
    return KVBModel(None, bn, VotingDecoder(classes))


def codes_stream(keys_by_experience: list[list[int]], codebooks: int = 2):
    """Two classes an experience; every sample of experience t fetches, in each codebook,
    one of the keys keys_by_experience[t] (cycling), as cached codes."""
    xs, ys = [], []
    for t, keys in enumerate(keys_by_experience):
        for i in range(8):
            xs.append(torch.full((codebooks, 1), keys[i % len(keys)]))
            ys.append(2 * t + i % 2)
    x, y = torch.stack(xs), torch.tensor(ys)
    return tensor_scenario((x, y), (x, y), list(range(2 * len(keys_by_experience))),
                           len(keys_by_experience))


def metric_values(strategy, prefix: str) -> dict[str, list]:
    return {name: values for name, (_, values) in strategy.evaluator.get_all_metrics().items()
            if name.startswith(prefix)}


def train(model, stream, metrics, **kwargs):
    evaluator = EvaluationPlugin(*metrics, loggers=[])
    strategy = KVBStrategy(model=model, evaluator=evaluator, train_mb_size=8,
                           **{"train_epochs": 1, **kwargs})
    for experience in stream.train_stream:
        strategy.train(experience, eval_streams=[])
    return strategy


def test_key_usage_and_sharing_on_a_stream_with_known_overlap():
    # 2 codebooks x 8 pairs; experience 0 fetches keys {0,1,2,3}, experience 1 {2,3,4,5}
    stream = codes_stream([[0, 1, 2, 3], [2, 3, 4, 5]])
    strategy = train(frozen_model(2, 8, 4), stream, [KeysInUse(), KeySharing()])
    use = metric_values(strategy, "KeysInUse")
    assert use["KeysInUse_Exp/train_phase/train_stream/Exp000"] == [0.5]
    assert use["KeysInUse_Exp/train_phase/train_stream/Exp001"] == [0.5]
    assert use["KeysInUse_Stream/train_phase/train_stream"] == [0.5, 0.75]  # 12 of 16 pairs
    sharing = metric_values(strategy, "Key")
    assert sharing["KeysSelected_Exp/train_phase/train_stream/Exp001"] == [8.0]
    assert sharing["KeySharing_Exp/train_phase/train_stream/Exp000"] == [0.0]
    assert sharing["KeySharing_Exp/train_phase/train_stream/Exp001"] == [0.5]  # keys 2, 3


def test_value_scale_after_a_known_sgd_step():
    # 1 codebook, 2 classes, one batch of 8 samples of class 0 all fetching key 0, values 0:
    # logits 0, p = (1/2, 1/2), the mean loss's gradient on the fetched value is
    # 8 x (p - onehot(0)) / 8 = (-1/2, 1/2); SGD at lr 1 makes value[0, 0] = (1/2, -1/2)
    x = torch.zeros(8, 1, 1, dtype=torch.long)
    stream = tensor_scenario((x, torch.zeros(8, dtype=torch.long)),
                             (x, torch.zeros(8, dtype=torch.long)), [0, 1], 1)
    model = frozen_model(1, 4, 2)
    strategy = train(model, stream, [ValueScale()], lr=1.0, label_smoothing=0.0,
                     clip_grad_norm=None)
    torch.testing.assert_close(model.bottleneck.values[0, 0], torch.tensor([0.5, -0.5]))
    scale = metric_values(strategy, "ValueScale")
    assert scale["ValueScale_Mean/train_phase/train_stream"] == [pytest.approx(0.5)]
    assert scale["ValueScale_Max/train_phase/train_stream"] == [pytest.approx(0.5)]
    assert scale["ValueScale_Growth/train_phase/train_stream"] == [pytest.approx(0.5)]


def test_train_loss_per_epoch_and_at_the_experiences_end_after_known_steps():
    # as above: epoch 1 at logits 0 has loss ln 2; its step makes the logits (1/2, -1/2), so
    # epoch 2's loss on class 0 is ln(1 + e^-1), and that is the experience's last epoch
    x = torch.zeros(8, 1, 1, dtype=torch.long)
    stream = tensor_scenario((x, torch.zeros(8, dtype=torch.long)),
                             (x, torch.zeros(8, dtype=torch.long)), [0, 1], 1)
    strategy = train(frozen_model(1, 4, 2), stream, [TrainLoss()], lr=1.0, train_epochs=2,
                     label_smoothing=0.0, clip_grad_norm=None)
    loss = metric_values(strategy, "TrainLoss")
    second = math.log(1 + math.exp(-1))
    assert loss["TrainLoss_Epoch/train_phase/train_stream"] == [
        pytest.approx(math.log(2)), pytest.approx(second)]
    assert loss["TrainLoss_Exp/train_phase/train_stream/Exp000"] == [pytest.approx(second)]


def test_regime_is_zero_at_equal_logits_one_saturated_and_a_half_between():
    assert regime(torch.zeros(3, 10)).tolist() == [0.0] * 3
    assert regime(torch.tensor([[100.0, 0, 0, 0]])).item() == pytest.approx(1.0)
    # p = (1/2, 1/2, 0): ||p - 1/3|| = sqrt(6)/6, over sqrt(2/3): exactly 1/2
    assert regime(torch.tensor([[0.0, 0.0, -1e4]])).item() == pytest.approx(0.5)
    assert regime(torch.tensor([[1.0, 0.0]])).item() == pytest.approx(
        (torch.sigmoid(torch.tensor(1.0)).item() - 0.5) * math.sqrt(2) / math.sqrt(0.5))


def blobs_stream():
    x, y, _ = blob_embeddings(4, 40, 8, spread=0.3, seed=1, scale=1.0, offset=2.0)
    return tensor_scenario((x, y), (x, y), [0, 1, 2, 3], 2)


def blob_model(reduction: str = "mean") -> KVBModel:
    bn = KeyValueBottleneck(8, 16, 32, 4, 4, key_init="random")
    return KVBModel(None, bn, VotingDecoder(4, reduction=reduction))


def test_counting_regime_warning_fires_at_the_papers_settings_and_not_when_learning(caplog):
    stream = blobs_stream()
    with caplog.at_level(logging.WARNING):
        counting = train(blob_model(), stream, [LearningRegime()], train_epochs=3)
    warnings = [r for r in caplog.records if "counting regime" in r.getMessage()]
    assert len(warnings) == 1  # once per run, however many experiences
    assert "experience 0 in the counting regime" in warnings[0].getMessage()
    assert "cannot forget" in warnings[0].getMessage()  # the why
    (said,) = [p for p in counting.plugins if isinstance(p, CountingRegimeWarning)]
    assert (said.experiences, said.trained) == (2, 2)
    assert said.summary().startswith("KVB ended 2 of 2 training experiences in the counting")
    last = metric_values(counting, "Regime")["Regime_Epoch/train_phase/train_stream"][-1]
    assert last < COUNTING_REGIME
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        learning = train(blob_model("sum"), stream, [LearningRegime()], train_epochs=3, lr=30.0)
    assert not [r for r in caplog.records if "counting regime" in r.getMessage()]
    last = metric_values(learning, "Regime")["Regime_Epoch/train_phase/train_stream"][-1]
    assert last > 0.5


def test_key_fit_churn_reports_the_keys_replaced_in_each_ema_epoch(tmp_path):
    from kvb_avalanche.keys import KeyFitConfig

    x, _, _ = blob_embeddings(4, 40, 8, spread=0.3, seed=1)
    bn = KeyValueBottleneck(8, 4, 64, 2, 4)  # 64 keys for 4 clusters: dead codes
    model = KVBModel(None, bn, VotingDecoder(4))
    # 80 EMA steps an epoch: an unused key's count decays below the dead-code threshold
    # (0.05 of a uniform share) after 59 (0.95^59 < 0.05)
    strategy = KVBStrategy(model=model, key_init_loader=list(x.split(2)),
                           key_fit=KeyFitConfig(epochs=3, kmeans_start=False, seed=0),
                           evaluator=EvaluationPlugin(KeyFitChurn(), loggers=[]))
    strategy.train(blobs_stream().train_stream[0], eval_streams=[])
    churn = metric_values(strategy, "KeysReplaced")["KeysReplaced_KeyFit/train_phase/train_stream"]
    assert churn == [float(n) for n in bn.fit_stats["keys_replaced_per_epoch"]]
    assert len(churn) == 3 and churn[0] > 0


def test_all_metrics_run_under_the_interactive_and_csv_loggers(tmp_path):
    loggers = [InteractiveLogger(), CSVLogger(str(tmp_path / "csv")),
               MetricsCSVLogger(tmp_path / "metrics.csv")]
    evaluator = EvaluationPlugin(accuracy_metrics(epoch=True, stream=True), *kvb_metrics(),
                                 loggers=loggers)
    strategy = KVBStrategy(model=blob_model(), evaluator=evaluator, train_mb_size=16,
                           train_epochs=2)
    stream = blobs_stream()
    for experience in stream.train_stream:
        strategy.train(experience, eval_streams=[])
        strategy.eval(stream.test_stream)
    loggers[1].close()
    loggers[2].close()
    logged = pd.read_csv(tmp_path / "metrics.csv")
    names = {n.split("/")[0] for n in logged.name}
    assert {"KeysInUse_Stream", "KeySharing_Exp", "ValueScale_Mean", "Regime_Epoch",
            "KeysReplaced_KeyFit", "Top1_Acc_Stream"} <= names
    # the CSV holds every value the evaluator computed, in order, not just their names
    for name, (xs, values) in strategy.evaluator.get_all_metrics().items():
        rows = logged[logged.name == name]
        if all(isinstance(v, int | float) for v in values):
            assert list(rows.value) == pytest.approx([float(v) for v in values], rel=1e-5), name
            assert list(rows.x) == list(xs), name
    churn = logged[logged.name.str.startswith("KeysReplaced_KeyFit")]
    fit = strategy.model.bottleneck.fit_stats["keys_replaced_per_epoch"]
    assert list(churn.value) == [float(n) for n in fit] and list(churn.x) == list(range(len(fit)))
    accuracy = logged[logged.name == "Top1_Acc_Stream/eval_phase/test_stream"].value
    assert len(accuracy) == 2 and accuracy.iloc[1] > accuracy.iloc[0] >= 0.45  # both halves
    training = pd.read_csv(tmp_path / "csv" / "training_results.csv")
    assert len(training) == 2 * 2  # Avalanche's CSV: a row per training epoch


def test_key_fit_churn_reports_a_fit_once_even_after_a_checkpoint_round_trip(tmp_path):
    """A resumed run restores equal copies of the metric and of the fit's stats: the key-fit
    rows must not be logged a second time (they were, keyed by the stats' id)."""
    from kvb_avalanche.checkpoint import maybe_load_checkpoint, save_checkpoint
    from kvb_avalanche.keys import KeyFitConfig

    x, _, _ = blob_embeddings(4, 40, 8, spread=0.3, seed=1)
    stream = blobs_stream()

    def build():
        model = KVBModel(None, KeyValueBottleneck(8, 4, 64, 2, 4), VotingDecoder(4))
        return KVBStrategy(model=model, key_init_loader=list(x.split(2)),
                           key_fit=KeyFitConfig(epochs=3, kmeans_start=False, seed=0),
                           evaluator=EvaluationPlugin(KeyFitChurn(), loggers=[]))

    first = build()
    first.train(stream.train_stream[0], eval_streams=[])
    save_checkpoint(first, tmp_path / "checkpoint.pt")
    resumed = build()
    assert maybe_load_checkpoint(resumed, tmp_path / "checkpoint.pt")[0] == 1
    resumed.train(stream.train_stream[1], eval_streams=[])
    churn = metric_values(resumed, "KeysReplaced")["KeysReplaced_KeyFit/train_phase/train_stream"]
    assert len(churn) == 3  # the three EMA epochs of the one fit, not six
