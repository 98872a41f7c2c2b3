"""`metalstm evaluate` through click's CliRunner on a tiny trained run: reports and their files, the baselines
on the same episodes, test-time changes, cross-domain data, and the errors."""

import json
import shutil

import numpy as np
import pytest
from cli_helpers import make_image_folder, run_cli, train_args


def test_evaluate_json_output(trained):
    run_dir, _ = trained
    result = run_cli(["evaluate", run_dir, "--episodes", "6", "--json", "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) == {"meta_lstm"}
    assert report["meta_lstm"]["episodes"] == 6
    # 2-way 2-query episodes: every episode accuracy is a multiple of 25%, the mean a multiple of 25/6
    assert 0 <= report["meta_lstm"]["mean"] <= 100
    assert (report["meta_lstm"]["mean"] * 6 / 25) == pytest.approx(round(report["meta_lstm"]["mean"] * 6 / 25))
    saved = list((run_dir / "evaluation").glob("*.json"))
    assert saved and json.loads(saved[0].read_text())["results"]["meta_lstm"]["episodes"] == 6


def test_a_run_without_a_best_checkpoint_is_evaluated_and_inspected_under_the_name_of_its_latest(trained, tmp_path):
    """No validation ran (best/ is missing): the latest checkpoint is read, and the report and messages say so
    rather than calling it the best."""
    run_dir = tmp_path / "unvalidated"
    shutil.copytree(trained[0], run_dir)
    shutil.rmtree(run_dir / "best")
    shutil.rmtree(run_dir / "evaluation", ignore_errors=True)  # reports of the other tests' evaluations
    evaluated = run_cli(["evaluate", run_dir, "--episodes", "2", "--no-progress"])
    assert evaluated.exit_code == 0, evaluated.output
    assert f"evaluated {run_dir} (latest checkpoint)" in evaluated.output
    (report,) = (run_dir / "evaluation").glob("*.json")
    assert report.name.endswith("-latest.json") and json.loads(report.read_text())["details"]["checkpoint"] == "latest"
    inspected = run_cli(["inspect", run_dir, "--episodes", "1", "--no-progress"])
    assert inspected.exit_code == 0, inspected.output
    assert f"inspected {run_dir} (latest checkpoint)" in inspected.output


def test_evaluate_with_baselines_prints_table_1_on_the_same_episodes(trained, data_dir, monkeypatch):
    import keras_metalstm.evaluation as evaluation
    from keras_metalstm import runs
    from keras_metalstm.data import episode_dataset
    from keras_metalstm.runs import load_run_config

    run_dir, _ = trained
    seen = {"meta_lstm": [], "baselines": []}
    reports = []
    original = evaluation.evaluate_run

    def recording(*args, **kwargs):
        def on_batch(method, batch):
            seen[method].append({k: v.numpy() for k, v in batch.items()})

        reports.append(original(*args, on_batch=on_batch, **kwargs))
        return reports[-1]

    monkeypatch.setattr(evaluation, "evaluate_run", recording)
    loaded = []
    original_load_splits = runs.load_splits

    def counting_load_splits(*args, **kwargs):
        loaded.append(1)
        return original_load_splits(*args, **kwargs)

    monkeypatch.setattr(runs, "load_splits", counting_load_splits)
    result = run_cli(["evaluate", run_dir, "--episodes", "4", "--baselines", "--pretrain-epochs", "1",
                      "--finetune-val-episodes", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert len(loaded) == 1  # the run's splits (a folder: listed and decoded) serve the episodes and the baselines
    lines = result.output.splitlines()
    # by default the authors' protocol, each row labelled with it
    authors = ("finetune_authors", "nearest_neighbour_authors", "pixel_nearest_neighbour")
    row = {method: next(line for line in lines if line.startswith(f"| {evaluation.METHOD_LABELS[method]} "))
           for method in (*authors, "meta_lstm")}
    assert row["finetune_authors"].startswith("| Baseline fine-tune (authors)")
    assert row["pixel_nearest_neighbour"].startswith("| Baseline pixel nearest neighbour (authors)")
    assert all("+-" in line for line in row.values())
    assert "2-way 1-shot" in result.output and "4 episodes" in result.output
    info = json.loads((run_dir / "baselines" / "baselines.json").read_text())
    chosen = info["authors/finetune_authors_2way_1shot_q2_val2_seed0"]
    assert chosen["val_accuracy"] == max(chosen["grid"].values())  # best on the validation classes
    assert len(chosen["grid"]) == 42 and set(chosen["settings"]) == {"learning_rate", "decay"}

    # the baselines saw exactly the meta-learner's batches ...
    assert len(seen["meta_lstm"]) == len(seen["baselines"]) > 0
    for a, b in zip(seen["meta_lstm"], seen["baselines"], strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    # ... which are the documented test episodes: seed 1000 of the run's test classes
    config = load_run_config(run_dir)
    expected = next(iter(episode_dataset(evaluation.evaluation_dataset(config), 2, 1, 2, batch_size=4,
                                         seed=1000)))
    np.testing.assert_array_equal(seen["meta_lstm"][0]["support_images"], expected["support_images"].numpy())
    report = reports[0]
    assert {m: r["episodes"] for m, r in report.results.items()} == {"meta_lstm": 4, **dict.fromkeys(authors, 4)}
    for method, values in report.accuracies.items():
        assert report.results[method]["mean"] == pytest.approx(100 * np.mean(values))
        assert f"{report.results[method]['mean']:.2f}" in row[method]
    # the paired differences are printed and saved with the report, each row with its protocol
    saved = json.loads((run_dir / "evaluation" / f"{source_name(data_dir)}-test-2way1shot-4ep-baselines-authors.json")
                       .read_text())
    assert saved["details"]["baselines"]["protocols"] == ["authors"]
    for method in authors:
        difference = report.paired_differences[method]
        assert saved["paired_differences"][method] == pytest.approx(difference)
        assert saved["results"][method]["protocol"] == "authors"
        assert saved["results"][method]["paired_difference"] == pytest.approx(difference)
        label = evaluation.METHOD_LABELS[method]
        assert f"Meta-Learner LSTM - {label}: {difference['mean']:+.2f} +- {difference['ci95']:.2f}" in result.output


def test_evaluate_baselines_of_both_protocols_and_baseline_plus_in_json(trained, data_dir):
    run_dir, _ = trained
    result = run_cli(["evaluate", run_dir, "--episodes", "2", "--baselines", "--baseline-protocol", "ours",
                      "--baseline-protocol", "authors", "--baseline-plus", "--pretrain-epochs", "1",
                      "--finetune-val-episodes", "2", "--json", "--no-progress"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    protocols = {"finetune": "ours", "nearest_neighbour": "ours", "finetune_authors": "authors",
                 "nearest_neighbour_authors": "authors", "pixel_nearest_neighbour": "authors",
                 "baseline_plus": "chen2019"}
    assert set(rows) == {"meta_lstm", *protocols}
    assert "protocol" not in rows["meta_lstm"] and rows["meta_lstm"]["episodes"] == 2
    for method, protocol in protocols.items():
        row = rows[method]
        assert row["protocol"] == protocol and row["episodes"] == 2
        difference = row["paired_difference"]
        assert difference["episodes"] == 2
        # paired over the same episodes: the mean difference is the difference of the means
        assert difference["mean"] == pytest.approx(rows["meta_lstm"]["mean"] - row["mean"])
    info = json.loads((run_dir / "baselines" / "baselines.json").read_text())
    ours = info["ours/finetune_2way_1shot_q2_val2_seed0"]
    assert set(ours["settings"]) == {"learning_rate", "steps"} and len(ours["grid"]) == 20
    plus = info["chen2019/baseline_plus_2way_1shot_q2_val2_seed0"]
    assert set(plus["settings"]) == {"learning_rate", "scale", "steps"} and len(plus["grid"]) == 64
    assert plus["val_accuracy"] == max(plus["grid"].values())
    saved = run_dir / "evaluation" / f"{source_name(data_dir)}-test-2way1shot-2ep-baselines-authors-ours-chen2019.json"
    assert json.loads(saved.read_text())["results"] == rows


def test_test_time_inner_steps_query_statistics_and_queries_equal_a_meta_learner_built_with_them(trained, data_dir):
    """`evaluate --inner-steps/--query-statistics` (ablations) score what a meta-learner built with those settings
    and the run's weights scores, and their reports are saved beside the unchanged one."""
    import dataclasses

    from keras_metalstm import MetaTrainer, evaluation, report_comparison
    from keras_metalstm.data import episode_dataset
    from keras_metalstm.learner_architecture import read_architecture
    from keras_metalstm.runs import (
        build_meta_learner,
        checkpoint_object,
        latest_checkpoint,
        load_run_config,
        restore_checkpoint,
    )

    run_dir, _ = trained
    config = load_run_config(run_dir)
    assert config.inner_steps != 1 and config.query_statistics == "query"
    assert config.query == 2
    for flags, changed in (([], {}), (["--inner-steps", "1"], {"inner_steps": 1}),
                           (["--query-statistics", "support"], {"query_statistics": "support"}),
                           (["--query", "1"], {"query": 1})):
        result = run_cli(["evaluate", run_dir, "--episodes", "4", "--json", "--no-progress", *flags])
        assert result.exit_code == 0, result.output
        suffix = "".join({"inner_steps": f"-T{v}", "query": f"-{v}q"}.get(k, f"-{v}-statistics")
                         for k, v in changed.items())
        saved = json.loads((run_dir / "evaluation" / f"{source_name(data_dir)}-test-2way1shot-4ep{suffix}.json")
                           .read_text())
        assert saved["details"].get("test_time", {}) == changed
        assert saved["inner_steps"] == changed.get("inner_steps", config.inner_steps)
        assert saved["query"] == changed.get("query", config.query)
        episodes = next(iter(episode_dataset(evaluation.evaluation_dataset(config), 2, 1, saved["query"],
                                             batch_size=4, seed=1000)))
        # the same checkpoint, in a meta-learner built with the changed settings
        meta = build_meta_learner(dataclasses.replace(config, **changed), read_architecture(run_dir))
        assert episodes["query_images"].shape[1] == 2 * saved["query"]
        restore_checkpoint(checkpoint_object(meta), latest_checkpoint(run_dir, "best") or latest_checkpoint(run_dir))
        expected = MetaTrainer(meta).evaluate_step(episodes)["accuracy"].numpy()
        assert saved["results"]["meta_lstm"]["mean"] == pytest.approx(100 * np.mean(expected), abs=1e-4)
        np.testing.assert_allclose(saved["episode_accuracies"]["meta_lstm"], expected, atol=1e-6)
    # an ablation against the run as trained, paired episode by episode
    as_trained, ablation = (run_dir / "evaluation" / f"{source_name(data_dir)}-test-2way1shot-4ep{suffix}.json"
                            for suffix in ("", "-T1"))
    compared = run_cli(["compare", ablation, as_trained])
    assert compared.exit_code == 0, compared.output
    difference = report_comparison.compare_reports(*(json.loads(path.read_text()) for path in (ablation, as_trained)))
    assert f"{difference['mean']:+.2f} +- {difference['ci95']:.2f} points (paired over the same 4 episodes)" in (
        compared.output)
    refused = run_cli(["compare", ablation, run_dir / "config.yaml"])
    assert refused.exit_code != 0 and "is not an evaluation report" in refused.output


def test_an_interrupted_evaluation_keeps_the_baseline_settings_it_had_chosen(trained, monkeypatch):
    """Choosing a baseline's settings can take many minutes: each choice is saved as soon as it is made."""
    from keras_metalstm import baselines

    run_dir, _ = trained
    args = ["evaluate", run_dir, "--episodes", "2", "--baselines", "--baseline-protocol", "authors",
            "--baseline-protocol", "ours", "--baseline-plus", "--pretrain-epochs", "1", "--finetune-val-episodes",
            "3", "--no-progress"]

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(baselines.BaselinePlus, "grid_accuracies", ctrl_c)  # chosen last
    assert run_cli(args).exit_code != 0
    info = json.loads((run_dir / "baselines" / "baselines.json").read_text())
    chosen = {key.split("/")[0] for key in info if key.endswith("_val3_seed0")}
    assert chosen == {"authors", "ours"}
    monkeypatch.undo()
    again = run_cli(args)
    assert again.exit_code == 0, again.output
    assert "choosing the settings of baseline_plus on 3 validation episodes" in again.output


@pytest.mark.parametrize("flag", [["--baseline-plus"], ["--baseline-protocol", "ours"]])
def test_baselines_options_need_baselines(trained, flag):
    run_dir, _ = trained
    result = run_cli(["evaluate", run_dir, "--episodes", "2", *flag, "--no-progress"])
    assert result.exit_code != 0 and f"{flag[0]} needs --baselines" in result.output
    assert "Traceback" not in result.output


def test_cross_domain_evaluation_converts_the_images_and_keeps_one_report_per_folder(trained, tmp_path):
    run_dir, _ = trained
    folders = [make_image_folder(tmp_path / name / "rgb", num_classes=3, per_class=4, size=(36, 36), mode="RGB",
                                 seed=seed) for name, seed in (("first", 5), ("second", 6))]
    for folder in folders:
        result = run_cli(["evaluate", run_dir, "--dataset", "folder", "--data-dir", folder, "--split", "all",
                          "--episodes", "2", "--json", "--no-progress"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["meta_lstm"]["episodes"] == 2
    # two folders of the same name: two reports, each naming its own data source
    for folder in folders:
        saved = json.loads((run_dir / "evaluation" / f"{source_name(folder)}-all-2way1shot-2ep.json").read_text())
        assert saved["details"]["test_classes"] == 3 and saved["details"]["data"] == "folder/all"
        assert (saved["dataset"], saved["data_dir"], saved["split"]) == ("folder", str(folder.resolve()), "all")
    # Without --split all, a small folder's default test split is too small, and the message says what to do.
    refused = run_cli(["evaluate", run_dir, "--dataset", "folder", "--data-dir", folders[0], "--episodes", "2",
                       "--no-progress"])
    assert refused.exit_code != 0 and "Traceback" not in refused.output
    assert "fewer than the run's 2-way episodes: --split all draws them from all 3 classes of folder" in refused.output


def source_name(folder):
    """The data-source part of a report's file name, computed here from the documented rule."""
    import hashlib

    folder = folder.resolve()
    return f"folder-{folder.name}-{hashlib.sha1(str(folder).encode()).hexdigest()[:8]}"


def test_conversion_to_the_runs_image_shape_follows_the_rule():
    import tensorflow as tf

    from keras_metalstm.config import RunConfig
    from keras_metalstm.data import ClassIndexedDataset, convert_dataset, convert_images

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(4, 36, 36, 3), dtype=np.uint8)
    data = ClassIndexedDataset(images, [2, 2], ["a", "b"], name="rgb")
    converted = convert_dataset(data, (28, 28, 1))
    assert converted.image_shape == (28, 28, 1) and converted.class_names == ("a", "b")
    expected = tf.cast(tf.round(convert_images(images, (28, 28, 1)) * 255), tf.uint8).numpy()
    np.testing.assert_array_equal(converted.images, expected)
    assert RunConfig(image_shape=[28, 28, 1]).image_shape == [28, 28, 1]


def test_evaluate_errors(trained, tmp_path, data_dir):
    run_dir, _ = trained
    result = run_cli(["evaluate", tmp_path / "missing"])
    assert result.exit_code != 0 and "does not exist" in result.output
    (tmp_path / "empty").mkdir()
    result = run_cli(["evaluate", tmp_path / "empty"])
    assert result.exit_code != 0 and "holds no training run" in result.output
    result = run_cli(["evaluate", run_dir, "--dataset", "folder"])
    assert result.exit_code != 0 and "--data-dir" in result.output
    result = run_cli(["evaluate", run_dir, "--dataset", "folder", "--data-dir", tmp_path / "nope"])
    assert result.exit_code != 0 and "not found" in result.output
    # the episodes' bar opens at the first episode: an error before it is not printed under an empty bar
    assert "evaluate:" not in result.output and "0/600" not in result.output, result.output


def test_a_run_directory_that_cannot_be_written_still_gets_its_results_shown(trained, monkeypatch):
    """A read-only run folder: every episode was evaluated, then the report's write failed and the command printed
    only that error (600 episodes and the baselines' work lost)."""
    import errno

    from keras_metalstm import evaluation

    def read_only(report, run_dir):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(evaluation, "save_report", read_only)
    run_dir, _ = trained
    result = run_cli(["evaluate", run_dir, "--episodes", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "warning: the report cannot be saved in" in result.output and "Read-only file system" in result.output
    assert "| Meta-Learner LSTM " in result.output and "report not saved (see above)" in result.output


def test_evaluate_shows_the_episodes_bar_when_episodes_run(trained):
    run_dir, _ = trained
    result = run_cli(["evaluate", run_dir, "--episodes", "3"])
    assert result.exit_code == 0, result.output
    assert "evaluate: 100%" in result.output and "3/3" in result.output, result.output


def test_checkpoint_of_another_learner_shape_is_refused(trained, tmp_path, data_dir):
    run_dir, _ = trained
    other = tmp_path / "other"
    assert run_cli(train_args(data_dir, other, "--episodes", "2", "--n-way", "3", "--val-episodes", "0")).exit_code == 0
    mixed = tmp_path / "mixed"
    shutil.copytree(run_dir, mixed)
    shutil.rmtree(mixed / "best")
    shutil.rmtree(mixed / "checkpoints")
    shutil.copytree(other / "checkpoints", mixed / "checkpoints")
    result = run_cli(["evaluate", mixed, "--episodes", "2"])
    assert result.exit_code != 0 and "does not fit this meta-learner" in result.output


def test_image_files_read_by_evaluate_show_a_bar_unless_no_progress(trained, monkeypatch):
    """The run's image folder is decoded at every command: a large one takes minutes, so it shows a bar."""
    import keras_metalstm.data.images as images
    from keras_metalstm.data import progress

    factories, reading = [], images.reading

    def recorded_reading(total):
        factories.append(progress._FACTORY.get())
        return reading(total)

    monkeypatch.setattr(images, "reading", recorded_reading)
    run_dir, _ = trained
    for flag in ("--progress", "--no-progress"):
        result = run_cli(["evaluate", run_dir, "--episodes", "2", flag])
        assert result.exit_code == 0, result.output
        assert len(factories) == 1
        shown = factories.pop()
        if flag == "--progress":
            bar = shown(60)
            assert bar.total == 60 and bar.desc == "read images"
            bar.close()
        else:
            assert shown is None


def test_a_checkpoint_deleted_by_a_running_training_before_it_is_read_gives_way_to_the_newer(trained, monkeypatch):
    """Evaluating while the run trains: the checkpoint found newest can be deleted by the training before it is
    read (seen: 2 of 12 evaluations with --keep-checkpoints 1); the newer one is read instead."""
    from pathlib import Path

    import keras_metalstm.runs as runs

    run_dir, _ = trained
    _, expected = runs.load_meta_learner(run_dir, which="latest")
    gone = str(Path(runs.latest_checkpoint(run_dir)).with_name("ckpt-1"))  # newest a moment ago, deleted since
    found, latest_checkpoint = [gone], runs.latest_checkpoint
    monkeypatch.setattr(runs, "latest_checkpoint", lambda *args: found.pop() if found else latest_checkpoint(*args))
    _, meta = runs.load_meta_learner(run_dir, which="latest")
    for variable, reference in zip(meta.weights, expected.weights, strict=True):
        np.testing.assert_array_equal(variable.numpy(), reference.numpy(), err_msg=variable.path)
    monkeypatch.setattr(runs, "latest_checkpoint", lambda *args: gone)  # still the newest: a real error
    with pytest.raises(runs.CheckpointMismatchError, match="cannot read the checkpoint at .*ckpt-1"):
        runs.load_meta_learner(run_dir, which="latest")


def test_a_damaged_newest_checkpoint_names_the_older_ones_to_fall_back_on(trained, tmp_path):
    import shutil

    import keras_metalstm.runs as runs

    run_dir = tmp_path / "run"
    shutil.copytree(trained[0], run_dir)
    (data,) = (run_dir / "checkpoints").glob("ckpt-8.data-*")
    whole = data.read_bytes()
    flipped = bytes(byte ^ 0xFF for byte in whole[:64]) + whole[64:]
    for damaged in (whole[:100], flipped):  # a disk error, an interrupted copy; bytes changed in place
        data.write_bytes(damaged)
        fallback = r"; the older ckpt-4 beside it may be whole: move ckpt-8\.\* away to use the newest of them"
        damaged_message = r"cannot read the checkpoint at .*ckpt-8: .*" + fallback
        with pytest.raises(runs.CheckpointMismatchError, match=damaged_message) as raised:
            runs.load_meta_learner(run_dir, which="latest")
        assert "{{function_node" not in str(raised.value) and "[Op:" not in str(raised.value)  # TensorFlow's wrapping
    for path in (run_dir / "checkpoints").glob("ckpt-8.*"):
        path.rename(tmp_path / path.name)
    runs.load_meta_learner(run_dir, which="latest")  # the fix the message gives works
