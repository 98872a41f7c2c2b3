"""A session stopped between two checkpoints, resumed: the metrics row in progress at the checkpoint (its loss and
accuracy sums over the episodes since the last row) and the training time continue, so the log reads as the
uninterrupted run's. Checkpoints that do not fall on log rows (--checkpoint-every 3, --log-every 4) are the case."""

import json
import shutil

import numpy as np
import pytest
from cli_helpers import make_image_folder

from keras_metalstm.config import RunConfig
from keras_metalstm.runs import CHECKPOINT_DIR
from keras_metalstm.training import Callback, train
from keras_metalstm.training_session import TrainingSession

SETTINGS = dict(dataset="folder", n_way=2, k_shot=1, query=2, inner_steps=2, hidden_units=4, filters=4,
                log_every=4, checkpoint_every=3, validate_every=8, val_episodes=2, episodes=8, seed=7)


class InterruptAt(Callback):
    """Ctrl-C pressed twice after meta-update `episode`: KeyboardInterrupt, no checkpoint saved on the way out."""

    def __init__(self, episode):
        self.episode = episode

    def on_step(self, episode, loss, accuracy):
        if episode == self.episode:
            raise KeyboardInterrupt


def train_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(row["episode"], row["loss"], row["accuracy"]) for row in rows if row["kind"] == "train"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data") / "folder")


def test_a_resume_from_a_checkpoint_older_than_the_stop_logs_the_rows_of_the_uninterrupted_run(
    tmp_path, data_dir, monkeypatch
):
    config = RunConfig(data_dir=str(data_dir), **SETTINGS)
    train(config, tmp_path / "full", deterministic=True)
    expected = train_rows(tmp_path / "full")
    assert [episode for episode, _, _ in expected] == [4, 8]

    # The run directory as a process killed right after writing the checkpoint of episode 3 leaves it.
    stopped, killed = tmp_path / "stopped", tmp_path / "killed"
    save = TrainingSession._saved

    def save_then_snapshot(session, manager, episode, folder, what):
        path = save(session, manager, episode, folder, what)
        if folder == CHECKPOINT_DIR and episode == 3:
            shutil.copytree(stopped, killed)
        return path

    monkeypatch.setattr(TrainingSession, "_saved", save_then_snapshot)
    with pytest.raises(KeyboardInterrupt):  # at episode 5, two after the checkpoint of episode 3
        train(config, stopped, callbacks=InterruptAt(5), deterministic=True)
    monkeypatch.undo()
    state = json.loads((stopped / "state.json").read_text())
    assert (state["episode"], state["checkpoint"]["episode"]) == (5, 3)
    for run_dir in (stopped, killed):
        resumed = train(config, run_dir, resume=True, deterministic=True)
        assert resumed.status == "finished"
        # the row of episode 4 averages episodes 1-4, not only the replayed episode 4
        np.testing.assert_allclose(np.array(train_rows(run_dir)), np.array(expected), rtol=1e-6, err_msg=run_dir.name)
        assert json.loads((run_dir / "state.json").read_text())["seconds"] > state["checkpoint"]["seconds"]


def test_the_folder_of_a_checkpoint_whose_save_was_killed_is_removed_when_the_run_resumes(tmp_path, data_dir):
    """TensorFlow writes a checkpoint into ckpt-N_temp/ and renames it: a process killed meanwhile left the folder
    for good."""
    config = RunConfig(data_dir=str(data_dir), **{**SETTINGS, "episodes": 3})
    run_dir = tmp_path / "run"
    train(config, run_dir)
    for folder in ("checkpoints", "best"):
        (run_dir / folder / "ckpt-4_temp" / "part-00000-of-00001").mkdir(parents=True)
    train(config.replace(episodes=6), run_dir, resume=True)
    assert not list(run_dir.glob("*/ckpt-*_temp*"))
    assert (run_dir / "checkpoints" / "ckpt-6.index").is_file()
