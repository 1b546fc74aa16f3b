"""benchmarks/split_cifar10.py end to end on its --quick path (real CIFAR from ../shared/data)."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from benchmarks import split_cifar10
from kvb_avalanche.experiments.strategies import STRATEGIES

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not (SHARED / "cifar10").is_dir(),
                                reason="needs CIFAR under ../shared/data")
RESUME_STRATEGIES = ["linear_probe", "kvb", "naive"]


def command(out: Path, cache: Path, *extra: str) -> list[str]:
    return ["--out", str(out), "--quick", "--seeds", "0", "--no-progress",
            "--cache-dir", str(cache), *extra]


def tables(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    summary = pd.read_csv(out / "summary.csv").drop(columns="train_seconds")
    return summary, pd.read_csv(out / "accuracy_matrix.csv")


@pytest.fixture(scope="module")
def cache(cifar_cache):
    return cifar_cache


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("quick")
    split_cifar10.main(command(out, cache))
    return out


def strongest_frozen(out: Path) -> str:
    """The frozen-feature baseline of highest mean final accuracy, from summary.csv."""
    from kvb_avalanche.experiments.strategies import FROZEN_FEATURE

    final = pd.read_csv(out / "summary.csv").groupby("strategy").final_accuracy.mean()
    return final[list(FROZEN_FEATURE)].idxmax()


def test_quick_run_writes_every_output(quick_run):
    summary = pd.read_csv(quick_run / "summary.csv")
    matrix = pd.read_csv(quick_run / "accuracy_matrix.csv")
    assert list(summary.columns[:5]) == ["strategy", "seed", "final_accuracy",
                                         "average_forgetting", "train_seconds"]
    assert list(matrix.columns) == ["strategy", "seed", "trained_through", "evaluated_on",
                                    "accuracy"]
    assert list(summary.strategy) == list(STRATEGIES)
    joint = [s for s in STRATEGIES if STRATEGIES[s].joint]
    assert len(matrix) == (len(STRATEGIES) - len(joint)) * 25 + len(joint) * 5
    sharing = pd.read_csv(quick_run / "key_sharing.csv")
    assert list(sharing.experience) == [0, 1, 2, 3, 4]
    assert sharing.fraction_shared_with_earlier.iloc[0] == 0
    assert sharing.fraction_ever_selected.is_monotonic_increasing
    for png in ("forgetting_curves.png", "final_accuracy.png"):
        assert (quick_run / png).stat().st_size > 10_000
    config = (quick_run / "config.json").read_text()
    checks = pd.read_csv(quick_run / "expectations.csv")
    assert list(checks.columns) == ["claim", "value", "goal", "status"] and len(checks) == 10
    assert checks.claim.iloc[-1].endswith(f"baseline's ({strongest_frozen(quick_run)})")
    assert set(checks.status) <= {"PASS", "FAIL"}
    for needle in ("avalanche-lib", "git commit", "uncommitted changes", "data_identity",
                   "embedding_cache_identity", '"num_pairs": 256'):
        assert needle in config
    assert (quick_run / "logs" / "kvb-seed0" / "eval_results.csv").exists()


def test_quick_run_kvb_forgets_less_than_naive(quick_run):
    summary = pd.read_csv(quick_run / "summary.csv").set_index("strategy")
    matrix = pd.read_csv(quick_run / "accuracy_matrix.csv")
    assert summary.loc["kvb", "average_forgetting"] < 0.5 * summary.loc["naive",
                                                                       "average_forgetting"]
    first_exp_final = matrix.query("trained_through == 4 and evaluated_on == 0").set_index(
        "strategy").accuracy
    assert first_exp_final["naive"] <= 0.10 < first_exp_final["kvb"]


def test_same_seed_and_configuration_give_identical_tables(quick_run, tmp_path, cache):
    split_cifar10.main(command(tmp_path, cache))
    for a, b in zip(tables(quick_run), tables(tmp_path), strict=True):
        pd.testing.assert_frame_equal(a, b)


def _experiences_done(checkpoint: Path) -> int:
    try:
        rows = torch.load(checkpoint, weights_only=False)["extra"]["rows"]
    except (OSError, EOFError, RuntimeError, KeyError):  # not there (yet)
        return 0
    return len(rows) // 5  # a row per test experience after each trained experience


def test_killed_run_resumes_finished_runs_and_kvb_mid_stream_to_the_clean_tables(tmp_path,
                                                                                   cache):
    """SIGKILL after KVB's second experience (a finished linear probe before it): the rerun
    loads the probe, resumes KVB from its checkpoint, runs naive, and ends with the tables
    and logs of an uninterrupted run."""
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    args = ["--strategies", *RESUME_STRATEGIES, "--kvb-epochs", "150",  # ~2 s an experience
            "--checkpoint-every", "0"]
    split_cifar10.main(command(clean, cache, *args))
    script = str(REPO / "benchmarks" / "split_cifar10.py")
    proc = subprocess.Popen([sys.executable, script, *command(killed, cache, *args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = killed / "checkpoints" / "kvb-seed0.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if _experiences_done(checkpoint) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert 2 <= _experiences_done(checkpoint) < 5
    assert sorted(p.name for p in (killed / "runs").glob("*.json")) == ["linear_probe-seed0.json"]
    assert len(list((killed / "checkpoints" / "keys").glob("keys-*.pt"))) == 1  # as fitted
    split_cifar10.main(command(killed, cache, *args))
    for a, b in zip(tables(clean), tables(killed), strict=True):
        pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(pd.read_csv(clean / "key_sharing.csv"),
                                  pd.read_csv(killed / "key_sharing.csv"))
    assert not checkpoint.exists()  # gone once the run's record is written
    assert not (killed / "checkpoints" / "keys").exists()  # and the keys once every run's is
    # the resumed KVB logged every experience once, into the logs it had started
    logs = [pd.read_csv(out / "logs" / "kvb-seed0" / "eval_results.csv") for out in (clean, killed)]
    pd.testing.assert_frame_equal(logs[0], logs[1])


def test_other_configuration_in_the_same_out_is_refused(quick_run, cache, capsys):
    with pytest.raises(SystemExit) as exit_:
        split_cifar10.main(command(quick_run, cache, "--kvb-epochs", "3"))
    assert exit_.value.code == 2
    assert "--kvb-epochs (30 -> 3)" in capsys.readouterr().err


def _bad_weights(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(nn.Linear(2, 2).state_dict(), path)
    return ["--weights", str(path)]


@pytest.mark.parametrize("extra, message", [
    (["--strategies", "kvb", "icarl"], "unknown strategy 'icarl'"),
    (["--encoder", "vit"], "--encoder: unknown encoder 'vit'"),
    (["--key-init-data", "imagenet"], "--key-init-data must be a registered data set or "
                                      "'none' (cifar10, cifar100, fmnist, "),
    (["--epochs", "0"], "--epochs must be a positive integer, got 0"),
    (["--batch-size", "-4"], "--batch-size must be a positive integer, got -4"),
    (["--buffer-size", "0"], "--buffer-size must be a positive integer"),
    (["--topk", "300"], "--topk (300) must be <= --num-pairs (256)"),
    (["--dim-values", "12"], "--dim-values must equal the number of classes (10)"),
    ("EMPTY_ROOT", "no copy of cifar10 train found"),
    ("BAD_WEIGHTS", "does not match encoder 'efficientnet_lite0'"),
])
def test_bad_input_exits_2_with_a_message_and_writes_nothing(tmp_path, cache, capsys, extra,
                                                             message):
    if extra == "EMPTY_ROOT":
        (tmp_path / "empty").mkdir()
        extra = ["--data-root", str(tmp_path / "empty")]
    elif extra == "BAD_WEIGHTS":
        extra = _bad_weights(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        split_cifar10.main(command(out, cache, *extra))
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_unwritable_out_is_refused(tmp_path, cache, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_:
        split_cifar10.main(command(blocker / "out", cache))
    assert exit_.value.code == 2 and "is not a writable folder" in capsys.readouterr().err


def test_keys_fitted_on_the_first_experience_run_end_to_end(tmp_path, cache):
    """--key-init-data none: no key-initialisation split; the keys (and their stored file's
    name) come from the first experience's embeddings."""
    import json

    out = tmp_path / "none"
    split_cifar10.main(command(out, cache, "--strategies", "kvb", "kvb_joint",
                               "--key-init-data", "none"))
    record = json.loads((out / "config.json").read_text())
    assert record["config"]["key_init_data"] == "none"
    assert record["data"].get("key_init") is None and record["data"]["cifar10_train"]
    summary = pd.read_csv(out / "summary.csv").set_index("strategy")
    assert set(summary.index) == {"kvb", "kvb_joint"}
    assert (summary.final_accuracy > 0.15).all()  # chance is 0.1
    run = json.loads((out / "runs" / "kvb-seed0.json").read_text())
    assert 0 < run["key_fit"]["keys_in_use"] <= 1
