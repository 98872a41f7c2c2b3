"""`metalstm train --theta0-init pretrained`: theta_0 starts from a classifier pre-trained on the meta-train classes
(cached in the run directory and reused by the baselines) or from a given .keras classifier."""

import os
import re
import signal

import keras
import numpy as np
import pytest
from cli_helpers import TINY_FLAGS, assert_clean_failure, invoke, make_image_folder, run_cli

import keras_metalstm as km
from keras_metalstm.runs import load_meta_learner, load_run_config

# Adam moves every weight by about the learning rate per step: with 1e-9, theta_0 after two meta-updates is its
# starting point to float precision.
FROZEN = ["--learning-rate", "1e-9", "--episodes", "2", "--checkpoint-every", "2", "--validate-every", "2"]


def train_args(data_dir, run_dir, *extra):
    return ["train", "--dataset", "folder", "--data-dir", data_dir, "--run-dir", run_dir, *TINY_FLAGS,
            "--no-deterministic", *FROZEN, *extra]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data") / "folder")


def body_of_theta0(run_dir):
    """theta_0 of the run's latest checkpoint, split per learner weight, without the output layer."""
    _, meta = load_meta_learner(run_dir, "latest")
    sizes = [int(np.prod(v.shape)) for v in meta.learner.trainable_variables]
    return np.split(meta.theta0.numpy(), np.cumsum(sizes)[:-1])[:-2]


def test_pretrained_theta0_is_pretrained_in_the_run_and_reused_by_the_baselines(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    result = run_cli(train_args(data_dir, run_dir, "--theta0-init", "pretrained", "--pretrain-epochs", "1"))
    assert result.exit_code == 0, result.output
    assert "pre-training the conv4 classifier" in result.output
    assert re.search(r"epoch 1/1: training accuracy \d+\.\d%", result.output)  # a line per pre-training epoch
    assert load_run_config(run_dir).theta0_init == "pretrained"
    pretrained = keras.models.load_model(run_dir / "baselines" / "pretrained.keras")
    for piece, weight in zip(body_of_theta0(run_dir), pretrained.trainable_variables, strict=False):
        np.testing.assert_allclose(piece, weight.numpy().ravel(), atol=1e-6)

    classifier_bytes = (run_dir / "baselines" / "pretrained.keras").read_bytes()
    evaluation = run_cli(["evaluate", run_dir, "--episodes", "2", "--baselines", "--finetune-val-episodes", "2",
                          "--no-progress"])
    assert evaluation.exit_code == 0, evaluation.output
    assert "pre-training" not in evaluation.output  # the run's classifier (1 epoch) is the baselines' classifier
    # each baseline's validation choice is reported as it is made
    assert re.search(r"finetune_authors: learning_rate=[\d.e-]+,decay=[\d.e-]+ of 42 settings, validation accuracy",
                     evaluation.output)
    # another pre-training would replace the classifier theta_0 started from
    other = invoke(["evaluate", run_dir, "--episodes", "2", "--baselines", "--pretrain-epochs", "2", "--no-progress"])
    assert_clean_failure(other, "pretrained.keras is the classifier the run's theta_0 started from (pre-trained for 1 "
                         "epochs), which its baselines share; pre-training another (2 epochs) would replace it")
    assert (run_dir / "baselines" / "pretrained.keras").read_bytes() == classifier_bytes


def test_theta0_from_a_given_classifier_file(tmp_path, data_dir):
    keras.utils.set_random_seed(3)
    classifier = km.learners.conv4(input_shape=(28, 28, 1), num_classes=9, filters=4)
    path = tmp_path / "classifier.keras"
    classifier.save(path)
    run_dir = tmp_path / "run"
    result = run_cli(train_args(data_dir, run_dir, "--theta0-init", "pretrained", "--pretrained-model", path))
    assert result.exit_code == 0, result.output
    assert not (run_dir / "baselines").exists()  # nothing pre-trained
    assert f"theta_0 starts from the weights of {path}" in result.output
    for piece, weight in zip(body_of_theta0(run_dir), classifier.trainable_variables, strict=False):
        np.testing.assert_allclose(piece, weight.numpy().ravel(), atol=1e-6)


def test_a_scratch_run_does_not_start_from_the_classifier(tmp_path, data_dir):
    keras.utils.set_random_seed(3)
    classifier = km.learners.conv4(input_shape=(28, 28, 1), num_classes=9, filters=4)
    run_dir = tmp_path / "run"
    assert run_cli(train_args(data_dir, run_dir)).exit_code == 0
    first = body_of_theta0(run_dir)[0]
    assert not np.allclose(first, classifier.trainable_variables[0].numpy().ravel(), atol=1e-3)


def test_a_stop_signal_while_pre_training_stops_the_run_and_a_resume_pre_trains_again(tmp_path, data_dir):
    """Ctrl-C or SIGTERM while theta_0's classifier pre-trains: the stop handler was installed only after it, so
    SIGTERM killed the process (state.json left "starting") and an ignored SIGINT (a job started with &) let the
    whole run finish."""
    from keras_metalstm.config import RunConfig
    from keras_metalstm.runs import read_state
    from keras_metalstm.training import train
    from keras_metalstm.training_session import Callback

    class SignalWhenPreTraining(Callback):
        def on_message(self, text):
            if text.startswith("pre-training the"):
                os.kill(os.getpid(), signal.SIGTERM)

    config = RunConfig(dataset="folder", data_dir=str(data_dir), n_way=2, query=2, inner_steps=2, hidden_units=4,
                       filters=4, episodes=2, checkpoint_every=2, validate_every=2, val_episodes=2,
                       theta0_init="pretrained", pretrain_epochs=3)
    run_dir = tmp_path / "run"
    stopped = train(config, run_dir, callbacks=SignalWhenPreTraining())
    assert (stopped.status, stopped.signal, stopped.episode) == ("interrupted", signal.SIGTERM, 0)
    assert read_state(run_dir)["status"] == "interrupted"
    assert not (run_dir / "baselines" / "pretrained.keras").exists()  # a classifier cut short is not kept
    resumed = train(config, run_dir, resume=True)
    assert (resumed.status, resumed.episode) == ("finished", 2)
    assert (run_dir / "baselines" / "pretrained.keras").is_file()


def test_unusable_pretrained_models_are_refused_with_a_message(tmp_path, data_dir):
    missing = run_cli(train_args(data_dir, tmp_path / "a", "--theta0-init", "pretrained", "--pretrained-model",
                                 tmp_path / "nope.keras"))
    assert missing.exit_code != 0
    assert "nope.keras does not exist" in missing.output and "Traceback" not in missing.output
    assert not (tmp_path / "a").exists()

    wider = km.learners.conv4(input_shape=(28, 28, 1), num_classes=2, filters=8)
    wider.save(tmp_path / "wider.keras")
    other = run_cli(train_args(data_dir, tmp_path / "b", "--theta0-init", "pretrained", "--pretrained-model",
                               tmp_path / "wider.keras"))
    assert other.exit_code != 0
    assert "Only the output layer may differ" in other.output and "Traceback" not in other.output

    without_init = run_cli(train_args(data_dir, tmp_path / "c", "--pretrained-model", tmp_path / "wider.keras"))
    assert without_init.exit_code != 0 and "only used with theta0_init 'pretrained'" in without_init.output


def test_theta0_lr_scale_zero_keeps_the_pretrained_theta0_while_the_update_rule_learns(tmp_path, data_dir):
    keras.utils.set_random_seed(3)
    classifier = km.learners.conv4(input_shape=(28, 28, 1), num_classes=9, filters=4)
    path = tmp_path / "classifier.keras"
    classifier.save(path)
    pretrained = ["--theta0-init", "pretrained", "--pretrained-model", path, "--learning-rate", "1e-2"]

    frozen_dir = tmp_path / "frozen"
    result = run_cli(train_args(data_dir, frozen_dir, *pretrained, "--theta0-lr-scale", "0"))
    assert result.exit_code == 0, result.output
    assert load_run_config(frozen_dir).theta0_lr_scale == 0.0
    _, frozen = load_meta_learner(frozen_dir, "latest")
    for piece, weight in zip(body_of_theta0(frozen_dir), classifier.trainable_variables, strict=False):
        np.testing.assert_array_equal(piece, weight.numpy().ravel())

    moving_dir = tmp_path / "moving"
    assert run_cli(train_args(data_dir, moving_dir, *pretrained)).exit_code == 0
    assert not np.allclose(body_of_theta0(moving_dir)[0], classifier.trainable_variables[0].numpy().ravel(), atol=1e-3)
    # ... while the update rule learned: its weights moved away from where a run with a 1e-9 step leaves them.
    still_dir = tmp_path / "still"
    assert run_cli(train_args(data_dir, still_dir, *pretrained[:4])).exit_code == 0
    _, still = load_meta_learner(still_dir, "latest")
    for learned, initial in zip(frozen.cell.trainable_variables, still.cell.trainable_variables, strict=True):
        assert np.abs(learned.numpy() - initial.numpy()).max() > 1e-4

    negative = run_cli(train_args(data_dir, tmp_path / "negative", "--theta0-lr-scale", "-1"))
    assert negative.exit_code != 0 and "theta0_lr_scale must be >= 0" in negative.output
