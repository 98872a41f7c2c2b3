"""`metalstm train / quickstart` through click's CliRunner, on a tiny generated image folder (`evaluate`:
test_evaluate_cli.py). In-process runs pass --no-deterministic (`cli_helpers.train_args`)."""

import json
import math
import re

import pytest
import yaml
from cli_helpers import TINY_FLAGS, run_cli, train_args
from PIL import Image


def snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_help_lists_every_command():
    result = run_cli(["--help"])
    assert result.exit_code == 0
    for command in ("train", "evaluate", "quickstart"):
        assert command in result.output
    for command in ("train", "evaluate", "quickstart"):
        assert run_cli([command, "--help"]).exit_code == 0
    train_help = run_cli(["train", "--help"]).output
    for flag in ("--dataset", "--data-dir", "--n-way", "--k-shot", "--query", "--inner-steps", "--meta-batch",
                 "--episodes", "--learning-rate", "--clip-norm", "--xla / --no-xla", "--seed", "--run-dir",
                 "--resume", "--config"):
        assert flag in train_help


def test_train_writes_checkpoints_config_metrics_and_curves(trained, data_dir):
    run_dir, output = trained
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (config["n_way"], config["k_shot"], config["query"], config["inner_steps"]) == (2, 1, 2, 2)
    assert config["image_shape"] == [28, 28, 1] and config["data_dir"] == str(data_dir)
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.index")) == ["ckpt-4.index", "ckpt-8.index"]
    assert any((run_dir / "best").glob("ckpt-*.index"))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["episode"] for r in rows if r["kind"] == "train"] == [2, 4, 6, 8]
    assert [r["episode"] for r in rows if r["kind"] == "val"] == [4, 8]
    assert all(0 <= r["accuracy"] <= 1 and math.isfinite(r.get("loss", 0)) for r in rows)
    assert (run_dir / "metrics.csv").read_text().splitlines()[0].startswith("kind,episode,loss,accuracy")
    with Image.open(run_dir / "curves.png") as image:
        assert image.format == "PNG" and image.size[0] > 500
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "finished" and state["episode"] == 8
    assert (run_dir / "best.keras").is_file()
    assert "finished: 8 episodes" in output and str(run_dir) in output
    assert re.search(r"^episode 8: validation accuracy \d+\.\d\d \+- \d+\.\d\d%", output, re.MULTILINE), output
    assert f"{run_dir} (config.yaml, checkpoints/, best/, best.keras, metrics.jsonl, curves.png)" in output


def test_a_meta_batch_that_does_not_divide_the_intervals_acts_at_the_first_update_past_each_multiple(
        tmp_path, data_dir):
    # Updates of 2 episodes reach 2, 4, 6, 8: past a multiple of 3 at 4 (3) and 6 (6), and 8 ends the run.
    run_dir = tmp_path / "run"
    result = run_cli(train_args(data_dir, run_dir, "--meta-batch", "2", "--episodes", "8", "--log-every", "3",
                                "--checkpoint-every", "3", "--validate-every", "3", "--keep-checkpoints", "5"))
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["episode"] for r in rows if r["kind"] == "train"] == [4, 6, 8]
    assert [r["episode"] for r in rows if r["kind"] == "val"] == [4, 6, 8]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.index")) == [
        "ckpt-4.index", "ckpt-6.index", "ckpt-8.index"]


def test_a_validation_of_one_episode_claims_no_interval(tmp_path, data_dir):
    result = run_cli(train_args(data_dir, tmp_path / "run", "--episodes", "2", "--val-episodes", "1",
                                "--validate-every", "2"))
    assert result.exit_code == 0, result.output
    assert re.search(r"^episode 2: validation accuracy \d+\.\d\d% \(one episode: no interval\)", result.output,
                     re.MULTILINE), result.output


def test_existing_run_without_resume_is_refused_and_untouched(trained, data_dir):
    run_dir, _ = trained
    before = snapshot(run_dir)
    result = run_cli(train_args(data_dir, run_dir, "--episodes", "4"))
    assert result.exit_code != 0
    assert "already holds a training run" in result.output and "--resume" in result.output
    assert snapshot(run_dir) == before


def test_non_empty_directory_is_refused(tmp_path, data_dir):
    (tmp_path / "notes.txt").write_text("mine")
    result = run_cli(train_args(data_dir, tmp_path, "--episodes", "2"))
    assert result.exit_code != 0 and "not empty" in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_resume_with_another_episode_shape_is_refused(trained, data_dir):
    run_dir, _ = trained
    before = snapshot(run_dir)
    result = run_cli(train_args(data_dir, run_dir, "--episodes", "10", "--k-shot", "2", "--resume"))
    assert result.exit_code != 0
    assert "different learner, episode shape, step schedule or start" in result.output and "k_shot" in result.output
    assert snapshot(run_dir) == before
    # how theta_0 started is used once: a resume recording another would misdescribe the run in config.yaml
    result = run_cli(train_args(data_dir, run_dir, "--episodes", "10", "--theta0-init", "pretrained", "--resume"))
    assert result.exit_code != 0 and "theta0_init: run has 'scratch', requested 'pretrained'" in result.output
    assert snapshot(run_dir) == before
    # the best checkpoint is the best of validations on the same episodes; 0 stops validating
    result = run_cli(train_args(data_dir, run_dir, "--episodes", "10", "--val-episodes", "3", "--resume"))
    assert result.exit_code != 0 and f"cannot resume {run_dir} with --val-episodes 3: its validations ran 2 " in (
        result.output
    )
    assert "keep --val-episodes 2 (or pass 0 to stop validating)" in result.output
    assert snapshot(run_dir) == before


@pytest.mark.parametrize(
    ("flag", "key", "value", "other_flag"),
    [
        (["--query-statistics", "support"], "query_statistics", "support", ["--query-statistics", "query"]),
        (["--learn-logit-scale"], "learn_logit_scale", True, ["--no-learn-logit-scale"]),
    ],
)
def test_meta_learner_flags_reach_the_saved_meta_learner_and_cannot_change_on_resume(
    tmp_path, data_dir, flag, key, value, other_flag
):
    import keras

    run_dir = tmp_path / "run"
    result = run_cli(train_args(data_dir, run_dir, "--episodes", "2", *flag))
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((run_dir / "config.yaml").read_text())[key] == value
    assert getattr(keras.models.load_model(run_dir / "best.keras"), key) == value
    before = snapshot(run_dir)
    result = run_cli(train_args(data_dir, run_dir, "--episodes", "4", *other_flag, "--resume"))
    assert result.exit_code != 0 and key in result.output
    assert snapshot(run_dir) == before


def test_episode_batching_reaches_the_saved_meta_learner_and_may_change_on_resume(tmp_path, data_dir):
    import keras

    run_dir = tmp_path / "run"
    result = run_cli(train_args(data_dir, run_dir, "--episodes", "2", "--episode-batching", "per_episode"))
    assert result.exit_code == 0, result.output
    assert keras.models.load_model(run_dir / "best.keras").episode_batching == "per_episode"
    result = run_cli(train_args(data_dir, run_dir, "--episodes", "4", "--episode-batching", "auto", "--resume"))
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["episode_batching"] == "auto"


def test_resume_continues_from_the_last_checkpoint(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    assert run_cli(train_args(data_dir, run_dir, "--episodes", "4", "--checkpoint-every", "2")).exit_code == 0
    result = run_cli(["train", "--run-dir", run_dir, "--resume", "--episodes", "6", "--no-progress",
                      "--no-deterministic"])
    assert result.exit_code == 0, result.output
    assert "finished: 6 episodes" in result.output
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["episode"] for r in rows if r["kind"] == "train"] == [2, 4, 6]  # no duplicates
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["episodes"] == 6


def test_resume_with_a_new_learning_rate_uses_it(tmp_path, data_dir):
    import tensorflow as tf

    run_dir = tmp_path / "run"
    assert run_cli(train_args(data_dir, run_dir, "--episodes", "2", "--checkpoint-every", "2")).exit_code == 0
    result = run_cli(["train", "--run-dir", run_dir, "--resume", "--episodes", "4", "--learning-rate", "2e-5",
                      "--no-progress", "--no-deterministic"])
    assert result.exit_code == 0, result.output
    # The optimizer's learning rate is part of the checkpoint: the restored value must not win over the flag.
    reader = tf.train.load_checkpoint(str(run_dir / "checkpoints"))
    stored = [name for name in reader.get_variable_to_shape_map() if "learning_rate" in name]
    assert stored and reader.get_tensor(stored[0]) == pytest.approx(2e-5)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["learning_rate"] == pytest.approx(2e-5)


def test_missing_or_unknown_data_set_path(tmp_path):
    result = run_cli(["train", "--dataset", "folder", "--run-dir", tmp_path / "a", *TINY_FLAGS])
    assert result.exit_code != 0 and "needs a data directory" in result.output
    result = run_cli(["train", "--dataset", "folder", "--data-dir", tmp_path / "nope", "--run-dir",
                      tmp_path / "b", *TINY_FLAGS])
    assert result.exit_code != 0 and "not found" in result.output
    result = run_cli(["train", "--dataset", "imagenet21k", "--run-dir", tmp_path / "c"])
    assert result.exit_code != 0 and "imagenet21k" in result.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_config_file_environment_and_flags_are_layered(tmp_path, data_dir):
    config_file = tmp_path / "run.toml"
    config_file.write_text(f'dataset = "folder"\ndata-dir = "{data_dir}"\nn-way = 3\nquery = 1\nepisodes = 2\n'
                           'log-every = 2\nval-episodes = 0\ninner-steps = 2\nhidden-units = 4\nfilters = 4\n')
    env = {"METALSTM_N_WAY": "2", "METALSTM_EPISODES": "6", "METALSTM_QUERY": "2"}
    run_dir = tmp_path / "run"
    result = run_cli(["train", "--config", config_file, "--run-dir", run_dir, "--episodes", "2",
                      "--no-progress", "--no-deterministic"], env=env)
    assert result.exit_code == 0, result.output
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["n_way"] == 2  # environment over file
    assert config["episodes"] == 2  # flag over environment
    assert config["query"] == 2 and config["inner_steps"] == 2  # environment, file
    assert config["dataset"] == "folder"


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path, data_dir,
                                                                                monkeypatch):
    import tensorflow as tf

    import keras_metalstm as km

    original = km.MetaTrainer.train_step
    calls = []

    def poisoned(self, episodes):
        out = original(self, episodes)
        calls.append(1)
        if len(calls) >= 5:
            return {"loss": tf.constant(float("nan")), "accuracy": out["accuracy"]}
        return out

    monkeypatch.setattr(km.MetaTrainer, "train_step", poisoned)
    run_dir = tmp_path / "run"
    result = run_cli(train_args(data_dir, run_dir, "--episodes", "10", "--checkpoint-every", "2",
                                "--val-episodes", "0"))
    assert result.exit_code != 0
    assert "loss became nan at episode 5" in result.output and "ckpt-4" in result.output
    assert tf.train.latest_checkpoint(str(run_dir / "checkpoints")).endswith("ckpt-4")
    assert json.loads((run_dir / "state.json").read_text())["status"] == "diverged"


def test_quickstart_refuses_a_non_empty_output(tmp_path):
    (tmp_path / "file").write_text("x")
    result = run_cli(["quickstart", "--out", tmp_path])
    assert result.exit_code != 0 and "not empty" in result.output


@pytest.mark.parametrize("recipe", ["ours", "paper"])
def test_quickstart_runs_the_named_recipe_at_its_size(recipe):
    """The configuration `metalstm quickstart` trains (the end-to-end run is a slow test): the recipe's settings,
    the quickstart's task and size, and --episodes / --pretrain-epochs on top."""
    from keras_metalstm.cli.quickstart import QUICKSTART, quickstart_config

    from keras_metalstm.config import RECIPES, RunConfig

    config = quickstart_config(recipe, episodes=100, pretrain_epochs=2)
    expected = {**QUICKSTART, **RECIPES[recipe], "episodes": 100, "pretrain_epochs": 2}
    # validated at 34, 68 and 100, where training validates anyway (not a fourth time at 99)
    expected["checkpoint_every"] = expected["validate_every"] = 34
    assert config == RunConfig.from_dict(expected)
    assert config.theta0_init == ("pretrained" if recipe == "ours" else "scratch")


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    result = run_cli(["quickstart", "--out", tmp_path / "qs", "--episodes", "20", "--eval-episodes", "10",
                      "--pretrain-epochs", "1", "--no-progress", "--no-export"])
    assert result.exit_code == 0, result.output
    assert "Meta-Learner LSTM" in result.output and "quickstart done" in result.output
    assert (tmp_path / "qs" / "run" / "best.keras").is_file()
