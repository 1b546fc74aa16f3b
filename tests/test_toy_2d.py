"""The paper's 2-D toy on a short schedule: KVB keeps the classes, naive learners forget."""

import pandas as pd
import pytest

from benchmarks import toy_2d


def ARGS(out):  # noqa: N802
    return ["--out", str(out), "--seeds", "0", "--steps", "400", "--key-steps", "300",
            "--strategies", "kvb_20x20", "kvb_1x400", "kvb_1x400_masked", "linear_probe",
            "naive_mlp"]


def test_toy_kvb_keeps_all_classes_while_naive_forgets(tmp_path):
    out = tmp_path / "toy"
    toy_2d.main(ARGS(out))
    summary = pd.read_csv(out / "summary.csv").set_index("strategy")
    matrix = pd.read_csv(out / "accuracy_matrix.csv")
    assert list(matrix.columns) == ["strategy", "seed", "trained_through", "evaluated_on",
                                    "accuracy"]
    assert len(matrix) == 5 * 4 * 4
    assert {"final_accuracy", "average_forgetting", "train_seconds"} <= set(summary.columns)
    assert summary.loc["kvb_20x20", "final_accuracy"] >= 0.95
    assert summary.loc["kvb_1x400_masked", "final_accuracy"] >= 0.95
    assert summary.loc["kvb_1x400", "final_accuracy"] >= 0.85  # no collapse (PyPI: 0.54-0.80)
    assert summary.loc["naive_mlp", "final_accuracy"] <= 0.40
    assert summary.loc["linear_probe", "final_accuracy"] <= 0.40
    assert (out / "accuracy_curves.png").stat().st_size > 10_000
    assert (out / "decision_regions.png").stat().st_size > 10_000

    # re-running the same command serves every finished run from OUT/runs: same tables
    toy_2d.main(ARGS(out))
    pd.testing.assert_frame_equal(pd.read_csv(out / "summary.csv").set_index("strategy"),
                                  summary)
    # another configuration is refused before anything is written
    with pytest.raises(SystemExit) as exit_:
        toy_2d.main([*ARGS(out), "--lr", "0.01"])
    assert exit_.value.code == 2
    # `report` redraws the toy's own tables (not the split CIFAR claims)
    (out / "summary.csv").unlink()
    from kvb_avalanche.cli import main as cli

    cli(["report", str(out)])
    pd.testing.assert_frame_equal(pd.read_csv(out / "summary.csv").set_index("strategy"),
                                  summary)
    assert not (out / "expectations.csv").exists()


def test_a_folder_of_an_older_version_is_reported_as_the_toy_and_not_resumed(tmp_path, capsys):
    """Before the experiment layer, config.json held the flags under "arguments"."""
    import json
    import shutil

    from kvb_avalanche.cli import main as cli

    out = tmp_path / "old"
    args = ["--out", str(out), "--seeds", "0", "--steps", "20", "--key-steps", "20",
            "--strategies", "kvb_20x20", "naive_mlp", "--no-progress"]
    toy_2d.main(args)
    config = json.loads((out / "config.json").read_text())["config"]
    (out / "config.json").write_text(json.dumps({"arguments": config}))
    for table in ("summary.csv", "accuracy_matrix.csv"):
        shutil.move(out / table, tmp_path / table)
    cli(["report", str(out)])
    for table in ("summary.csv", "accuracy_matrix.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(out / table), pd.read_csv(tmp_path / table))
    assert not (out / "expectations.csv").exists()
    with pytest.raises(SystemExit) as exit_:
        toy_2d.main(args)
    assert exit_.value.code == 2
    assert "written by an older kvb-avalanche" in capsys.readouterr().err


def test_a_packed_folder_is_resumed_from_its_archive_not_retrained(tmp_path):
    from kvb_avalanche.experiments.records import pack_raw

    out = tmp_path / "packed"
    args = ["--out", str(out), "--seeds", "0", "--steps", "20", "--key-steps", "20",
            "--strategies", "kvb_20x20", "naive_mlp", "--no-progress"]
    toy_2d.main(args)
    before = pd.read_csv(out / "summary.csv")
    assert pack_raw(out) is not None and not (out / "runs").exists()
    toy_2d.main(args)
    # the finished runs came back from raw.tar.xz: their own training seconds, not new ones
    pd.testing.assert_frame_equal(pd.read_csv(out / "summary.csv"), before)
    assert len(list((out / "runs").glob("*.json"))) == 2
