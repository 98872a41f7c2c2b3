"""A run keeps the classes of its splits (RUN_DIR/splits.json): a folder that gains classes after training would
otherwise be re-split by its seed, and `evaluate` could score the run on classes it chose its checkpoint with, or
`--resume` train on other classes."""

import json
import re
import shutil
import warnings

import numpy as np
import pytest
from cli_helpers import make_image_folder, run_cli, train_args

from keras_metalstm.config import RunConfig
from keras_metalstm.data import load_dataset
from keras_metalstm.evaluation import evaluation_dataset
from keras_metalstm.runs import SPLITS_FILE, load_run_config, load_splits


def test_a_run_keeps_its_splits_when_its_folder_gains_or_loses_classes(tmp_path):
    data_dir = make_image_folder(tmp_path / "data", num_classes=12, per_class=5)
    run_dir = tmp_path / "run"
    started = run_cli(train_args(data_dir, run_dir, "--episodes", "2"))
    assert started.exit_code == 0, started.output
    recorded = json.loads((run_dir / SPLITS_FILE).read_text())
    assert recorded == load_dataset("folder", data_dir).class_names()
    counts = " / ".join(f"{len(recorded[split])} {split}" for split in ("train", "val", "test"))
    assert f"data: folder {data_dir}: 12 classes split {counts}, images 28x28x1" in started.output

    more = make_image_folder(tmp_path / "more", num_classes=6, per_class=5, seed=1)
    for folder in sorted(more.iterdir()):
        folder.rename(data_dir / f"new_{folder.name}")
    resplit = load_dataset("folder", data_dir).class_names()
    assert resplit["test"] != recorded["test"] and resplit["val"] != recorded["val"]  # what a re-split would use

    config = load_run_config(run_dir)
    notes = []
    test_classes = evaluation_dataset(config, run_dir=run_dir, report=notes.append)
    assert list(test_classes.class_names) == recorded["test"]
    loaded = {name: part for part in load_dataset("folder", data_dir) for name in part.class_names}
    for name in recorded["test"]:  # each class keeps its own images and their files
        np.testing.assert_array_equal(test_classes[name], loaded[name][name])
        assert test_classes.sources_of(name) == loaded[name].sources_of(name)
    assert notes == [
        "the data set's classes changed since the run started: the run's own splits are used (splits.json; "
        "6 class(es) it did not see are left out)"
    ]
    evaluated = run_cli(["evaluate", run_dir, "--episodes", "2", "--no-progress"])
    assert evaluated.exit_code == 0, evaluated.output
    assert "the run's own splits are used" in evaluated.output
    (report,) = (run_dir / "evaluation").glob("*.json")
    assert json.loads(report.read_text())["details"]["test_classes"] == len(recorded["test"])
    resumed = run_cli(train_args(data_dir, run_dir, "--episodes", "4", "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert "the run's own splits are used" in resumed.output
    assert json.loads((run_dir / SPLITS_FILE).read_text()) == recorded

    shutil.rmtree(data_dir / recorded["test"][0])
    lost = run_cli(["evaluate", run_dir, "--episodes", "2", "--no-progress"], catch_exceptions=True)
    assert lost.exit_code != 0 and "Traceback" not in lost.output
    assert "1 class(es) of the run's splits" in lost.output and "are no longer in the data set" in lost.output


def test_a_split_file_given_to_train_splits_the_folder_and_stays_the_runs(tmp_path):
    """--split-file: the run's classes are the file's (classes it leaves out are not used), fixed on --resume;
    refused for a data set whose split is fixed, and a missing file is named."""
    data_dir = make_image_folder(tmp_path / "data", num_classes=12, per_class=5)
    names = sorted(path.name for path in data_dir.iterdir())
    chosen = {"train": names[2:8], "val": names[8:10], "test": names[10:]}
    (tmp_path / "split.json").write_text(json.dumps(chosen))
    run_dir = tmp_path / "run"
    result = run_cli(train_args(data_dir, run_dir, "--episodes", "2", "--split-file", tmp_path / "split.json"))
    assert result.exit_code == 0, result.output
    assert json.loads((run_dir / SPLITS_FILE).read_text()) == chosen
    assert f"10 classes split 6 train / 2 val / 2 test, images 28x28x1 (which classes: {run_dir / SPLITS_FILE})" in (
        result.output
    )
    assert load_run_config(run_dir).split_file == str(tmp_path / "split.json")

    (tmp_path / "other.json").write_text(json.dumps({**chosen, "train": names[:8]}))
    changed = run_cli(train_args(data_dir, run_dir, "--episodes", "4", "--resume", "--split-file",
                                 tmp_path / "other.json"), catch_exceptions=True)
    assert changed.exit_code != 0 and "split_file: run has" in changed.output
    fixed = run_cli(["train", "--split-file", tmp_path / "split.json", "--run-dir", tmp_path / "fontglot",
                     "--episodes", "2", "--no-progress"], catch_exceptions=True)
    assert fixed.exit_code != 0 and "not fontglot (its split is fixed): leave out --split-file" in fixed.output
    assert not (tmp_path / "fontglot").exists()
    missing = run_cli(train_args(data_dir, tmp_path / "missing", "--split-file", tmp_path / "gone.json"),
                      catch_exceptions=True)
    assert missing.exit_code != 0 and "gone.json" in missing.output and "Traceback" not in missing.output


def test_a_run_whose_splits_file_is_gone_warns_and_records_its_splits_again(tmp_path):
    """Without RUN_DIR/splits.json a folder run's splits come from the folder as it is now, the run's own only if
    no class changed since: evaluate and --resume say so, and the resume writes the file again. A data set whose
    split is fixed (fontglot) splits the same whatever happened, and needs no warning."""
    data_dir = make_image_folder(tmp_path / "data", num_classes=12, per_class=5)
    run_dir = tmp_path / "run"
    started = run_cli(train_args(data_dir, run_dir, "--episodes", "2"))
    assert started.exit_code == 0, started.output
    recorded = json.loads((run_dir / SPLITS_FILE).read_text())
    (run_dir / SPLITS_FILE).unlink()
    missing = rf"{re.escape(str(run_dir / SPLITS_FILE))} is missing: the run's splits are taken from the data set "
    with pytest.warns(RuntimeWarning, match=missing + r"as it is now.*restore the file from a copy of the run"):
        evaluated = run_cli(["evaluate", run_dir, "--episodes", "2", "--no-progress"])
    assert evaluated.exit_code == 0, evaluated.output
    assert not (run_dir / SPLITS_FILE).exists()
    with pytest.warns(RuntimeWarning, match=missing):
        resumed = run_cli(train_args(data_dir, run_dir, "--episodes", "4", "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((run_dir / SPLITS_FILE).read_text()) == recorded  # the folder did not change

    empty_run = tmp_path / "fontglot-run"
    empty_run.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_splits(RunConfig(dataset="fontglot"), run_dir=empty_run).train.num_classes > 0
