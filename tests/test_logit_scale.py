"""learn_logit_scale: a learned factor of the query logits in the meta-loss, checked against a NumPy cross-entropy,
finite differences and the Adam step it is meant to take; predictions and old checkpoints do not change."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import as_tensors, random_episodes

import keras_metalstm as km
from keras_metalstm.meta_learner import LOGIT_SCALE_GAIN


def dense_learner(seed=0):
    keras.utils.set_random_seed(seed)
    images = keras.Input((28, 28, 1))
    hidden = keras.layers.Dense(6, activation="relu")(keras.layers.Flatten()(images))
    return keras.Model(images, keras.layers.Dense(5)(hidden))


def scaled_meta(exponent=0.0, **options):
    meta = km.MetaLearner(dense_learner(), inner_steps=2, learn_logit_scale=True, **options)
    meta.logit_scale_exponent.assign(exponent)
    return meta


def numpy_cross_entropy(logits, labels):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return -np.take_along_axis(log_probabilities, labels[..., None], axis=-1)[..., 0].mean(axis=-1)


@pytest.mark.parametrize("mode", ["train", "test"])
def test_the_loss_is_the_cross_entropy_of_the_scaled_logits_and_the_accuracy_that_of_the_raw_ones(mode):
    meta = scaled_meta(exponent=0.01)  # scale e = 2.718
    episodes = as_tensors(random_episodes(batch=2, query=3, seed=4))
    losses, accuracies = meta.episode_metrics(episodes, mode)
    logits = meta(episodes, mode=mode).numpy().astype(np.float64)
    labels = episodes["query_labels"].numpy().astype(np.int64)
    np.testing.assert_allclose(losses.numpy(), numpy_cross_entropy(np.e * logits, labels), rtol=1e-5)
    assert not np.allclose(losses.numpy(), numpy_cross_entropy(logits, labels), rtol=1e-3)
    np.testing.assert_allclose(accuracies.numpy(), (logits.argmax(-1) == labels).mean(-1))


def test_the_meta_gradient_of_the_scale_matches_finite_differences():
    meta = scaled_meta(exponent=0.003)
    episodes = as_tensors(random_episodes(batch=1, query=3, seed=5))

    def loss_at(exponent):
        meta.logit_scale_exponent.assign(exponent)
        return float(meta.episode_metrics(episodes, "train")[0][0])

    with tf.GradientTape() as tape:
        loss = meta.episode_metrics(episodes, "train")[0][0]
    gradient = float(tape.gradient(loss, meta.logit_scale_exponent))
    step = 1e-4
    finite_difference = (loss_at(0.003 + step) - loss_at(0.003 - step)) / (2 * step)
    assert abs(gradient) > 1e-3
    np.testing.assert_allclose(gradient, finite_difference, rtol=2e-2)


def test_one_adam_update_moves_the_log_scale_by_the_gain_times_the_learning_rate():
    meta = scaled_meta()
    optimizer = keras.optimizers.Adam(1e-3)
    meta.meta_train_step(as_tensors(random_episodes(batch=1, query=3, seed=6)), optimizer)
    # Adam's first step is the learning rate in magnitude: log(scale) moves by GAIN * 1e-3 = 0.1.
    np.testing.assert_allclose(abs(np.log(float(meta.logit_scale))), LOGIT_SCALE_GAIN * 1e-3, rtol=1e-3)


def test_predictions_do_not_depend_on_the_scale():
    episodes = as_tensors(random_episodes(batch=1, query=3, seed=7))
    plain = km.MetaLearner(dense_learner(), inner_steps=2)
    scaled = km.MetaLearner.from_config({**plain.get_config(), "learn_logit_scale": True})
    scaled.theta0.assign(plain.theta0)
    scaled.coordinate_lstm.set_weights(plain.coordinate_lstm.get_weights())
    scaled.cell.set_weights(plain.cell.get_weights())
    scaled.logit_scale_exponent.assign(0.02)
    np.testing.assert_array_equal(plain(episodes).numpy(), scaled(episodes).numpy())
    adapted = scaled.adapt(episodes["support_images"][0], episodes["support_labels"][0])
    np.testing.assert_allclose(adapted(episodes["query_images"][0]).numpy(), plain(episodes).numpy()[0], atol=1e-5)


def test_the_scale_is_saved_and_only_exists_when_learned(tmp_path):
    plain = km.MetaLearner(dense_learner(), inner_steps=2)
    assert plain.logit_scale_exponent is None and float(plain.logit_scale) == 1.0
    assert "logit_scale_exponent" not in [variable.name for variable in plain.weights]  # old checkpoints load
    meta = scaled_meta(exponent=0.0123)
    meta.save(tmp_path / "meta.keras")
    loaded = keras.models.load_model(tmp_path / "meta.keras")
    assert loaded.learn_logit_scale
    np.testing.assert_allclose(float(loaded.logit_scale_exponent.numpy()), 0.0123)
