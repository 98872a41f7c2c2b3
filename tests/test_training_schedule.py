"""`lr_schedule="cosine"` (`metalstm train --lr-schedule cosine`): the meta-optimiser's step follows a cosine from --learning-rate to
--final-learning-rate over the run's meta-updates, and a run stopped and resumed follows the same curve to the
same weights as an uninterrupted one."""

import json
import math
import os
import signal

import numpy as np
import pytest
from cli_helpers import TINY_FLAGS, make_image_folder
from click.testing import CliRunner
from keras_metalstm.cli.main import main

from keras_metalstm.config import ConfigError, RunConfig
from keras_metalstm.runs import load_meta_learner, load_run_config
from keras_metalstm.training import Callback, train
from keras_metalstm.training_session import learning_rate_schedule

EPISODES = 20
SETTINGS = dict(dataset="folder", n_way=2, k_shot=1, query=2, inner_steps=2, hidden_units=4, filters=4,
                log_every=2, val_episodes=2, episodes=EPISODES, checkpoint_every=10, validate_every=10, seed=5,
                lr_schedule="cosine", learning_rate=0.01, final_learning_rate=0.001)


def cosine(update, updates, first, last):
    """Independent statement of the schedule: the step used for meta-update number `update` (0-based)."""
    progress = min(update, updates) / updates
    return last + (first - last) * 0.5 * (1 + math.cos(math.pi * progress))


class TerminateAt(Callback):
    """Sends this process SIGTERM after meta-update `episode`, as a scheduler stopping the job would."""

    def __init__(self, episode):
        self.episode = episode

    def on_step(self, episode, loss, accuracy):
        if episode == self.episode:
            os.kill(os.getpid(), signal.SIGTERM)


def train_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row["kind"] == "train"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data") / "folder")


def test_the_schedule_is_a_cosine_over_the_runs_meta_updates():
    config = RunConfig(lr_schedule="cosine", learning_rate=2e-3, episodes=600, meta_batch=2)
    schedule = learning_rate_schedule(config)
    for update in (0, 1, 75, 150, 299, 300, 400):
        # default final step: learning_rate / 100; 600 episodes in meta-batches of 2 are 300 updates
        np.testing.assert_allclose(float(schedule(update)), cosine(update, 300, 2e-3, 2e-5), rtol=1e-5)
    assert learning_rate_schedule(RunConfig(learning_rate=3e-4)) == 3e-4  # constant: the paper


def test_schedule_settings_are_checked():
    with pytest.raises(ConfigError, match="lr_schedule"):
        RunConfig(lr_schedule="linear")
    with pytest.raises(ConfigError, match="only used with lr_schedule 'cosine'"):
        RunConfig(final_learning_rate=1e-5)
    with pytest.raises(ConfigError, match="final_learning_rate must lie"):
        RunConfig(lr_schedule="cosine", learning_rate=1e-3, final_learning_rate=1e-2)


def test_cosine_run_logs_the_decaying_step_and_resumes_exactly(tmp_path, data_dir):
    config = RunConfig(data_dir=str(data_dir), **SETTINGS)
    full = train(config, tmp_path / "full", deterministic=True)
    rows = train_rows(tmp_path / "full")
    assert [row["episode"] for row in rows] == list(range(2, EPISODES + 1, 2))
    # a row gives the step its episode's update took: update number episode - 1 (0-based)
    for row in rows:
        np.testing.assert_allclose(row["learning_rate"], cosine(row["episode"] - 1, EPISODES, 0.01, 0.001), rtol=1e-5)

    stopped = train(config, tmp_path / "stopped", callbacks=TerminateAt(8), deterministic=True)
    assert (full.status, stopped.status, stopped.episode) == ("finished", "interrupted", 8)
    resumed = train(config, tmp_path / "stopped", resume=True, deterministic=True)
    assert resumed.episode == EPISODES
    assert [row["learning_rate"] for row in train_rows(tmp_path / "stopped")] == [
        row["learning_rate"] for row in rows
    ]
    _, meta_full = load_meta_learner(tmp_path / "full", "latest")
    _, meta_resumed = load_meta_learner(tmp_path / "stopped", "latest")
    for a, b in zip(meta_full.weights, meta_resumed.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_the_command_line_flags_reach_the_run(tmp_path, data_dir):
    args = ["train", "--dataset", "folder", "--data-dir", data_dir, "--run-dir", tmp_path / "run", *TINY_FLAGS,
            "--episodes", "4", "--lr-schedule", "cosine", "--learning-rate", "0.02", "--final-learning-rate", "0.002"]
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    config = load_run_config(tmp_path / "run")
    assert (config.lr_schedule, config.learning_rate, config.final_learning_rate) == ("cosine", 0.02, 0.002)
    # the last of 4 updates, not the final step 0.002 that no update takes
    np.testing.assert_allclose(train_rows(tmp_path / "run")[-1]["learning_rate"], cosine(3, 4, 0.02, 0.002), rtol=1e-5)


def test_resuming_with_another_schedule_is_refused(tmp_path, data_dir):
    # The optimizer's checkpoint holds a constant step as a variable and a schedule not: switching on resume would
    # restore variables into the wrong slots.
    args = ["train", "--dataset", "folder", "--data-dir", data_dir, "--run-dir", tmp_path / "run", *TINY_FLAGS,
            "--episodes", "2", "--lr-schedule", "cosine"]
    assert CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False).exit_code == 0
    resumed = CliRunner().invoke(
        main, [str(a) for a in [*args[:-1], "constant", "--episodes", "4", "--resume"]], catch_exceptions=False
    )
    assert resumed.exit_code != 0
    assert "lr_schedule: run has 'cosine', requested 'constant'" in resumed.output
    assert "Traceback" not in resumed.output
