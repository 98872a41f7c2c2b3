"""A learner under a mixed-precision policy (Keras' `mixed_bfloat16`, what TPU users set; `mixed_float16`): it
computes in the low precision, while theta, the coordinate LSTM and the cell update stay in float32, `adapt` works,
and the exported model computes in float32 with parity."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import as_tensors, random_episodes

import keras_metalstm as km
from keras_metalstm import export
from keras_metalstm.ops import fused_coordinate_lstm

IMAGE_SHAPE = (16, 16, 1)
CLASSES = ["a", "b", "c", "d", "e"]


@pytest.fixture(params=["mixed_bfloat16", "mixed_float16"])
def policy(request):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(request.param)
    yield request.param
    keras.config.set_dtype_policy(previous)


def meta_learner(inner_steps=3):
    keras.utils.set_random_seed(0)
    learner = km.learners.conv4(input_shape=IMAGE_SHAPE, num_classes=5, filters=4)
    return km.MetaLearner(learner, inner_steps=inner_steps)


def test_theta_and_the_meta_learners_layers_stay_float32_while_the_learner_computes_low(policy):
    meta = meta_learner()
    low = keras.dtype_policies.get(policy).compute_dtype
    assert {layer.compute_dtype for layer in meta.learner.layers if layer.weights} == {low}
    assert meta.compute_dtype == meta.coordinate_lstm.compute_dtype == meta.cell.compute_dtype == "float32"
    episodes = as_tensors(random_episodes(batch=2, image_shape=IMAGE_SHAPE))
    theta, _ = tf.function(meta.inner_loop)(episodes["support_images"], episodes["support_labels"])
    assert theta.dtype == tf.float32  # was bfloat16 after one step: updates of 1e-3 of a weight rounded away
    loss, _, gradients = tf.function(meta.meta_gradients)(episodes)
    assert loss.dtype == tf.float32 and all(np.all(np.isfinite(g.numpy())) for g in gradients)


def test_adapt_under_a_mixed_policy_gives_the_test_mode_query_logits(policy):
    meta = meta_learner()
    km.MetaTrainer(meta).train_step(as_tensors(random_episodes(image_shape=IMAGE_SHAPE)))
    episode = as_tensors(random_episodes(image_shape=IMAGE_SHAPE, seed=4))
    adapted = meta.adapt(episode["support_images"][0], episode["support_labels"][0])  # failed: loop var dtype
    logits = tf.cast(adapted(episode["query_images"][0]), tf.float32).numpy()
    # With the fused kernel, as adapt runs: the stock ops' float32 rounding differences would flip theta's
    # bfloat16 roundings in the learner and grow over the steps (0.14 of logits of ~1 here).
    with fused_coordinate_lstm.enabled():
        expected = tf.function(lambda episode: meta(episode, mode="test"))(episode).numpy()[0]
    tolerance = 0.03 * np.abs(expected).max()  # a few bfloat16 roundings: the two graphs' kernels differ
    np.testing.assert_allclose(logits, expected, atol=tolerance)
    unadapted = meta._learner_function.materialise(meta.theta0, meta._learner_function.initial_state())
    assert np.abs(tf.cast(unadapted(episode["query_images"][0]), tf.float32).numpy() - expected).max() > 5 * tolerance


def test_the_exported_model_computes_in_float32_with_parity(policy, tmp_path):
    meta = meta_learner()
    episode = as_tensors(random_episodes(image_shape=IMAGE_SHAPE, seed=5))
    adapted = export.adapt(meta, episode["support_images"][0], episode["support_labels"][0], CLASSES)
    assert {layer.compute_dtype for layer in adapted.learner.layers} == {"float32"}
    in_low_precision = meta.adapt(episode["support_images"][0], episode["support_labels"][0])
    for ours, theirs in zip(adapted.learner.weights, in_low_precision.weights, strict=True):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())  # the same weights, only the arithmetic differs
    result = export.export_adapted(adapted, tmp_path / "task", format="both")  # ONNX Runtime has no bf16 Conv
    assert result.parity.ok, result.parity.summary()


def test_the_float32_copy_of_a_learner_keeps_an_adapted_normalization_layers_statistics(policy):
    """The copy gets its weights by set_weights, after which Keras' Normalization layer kept the mean and variance
    of its fresh weights (0 and 1) until told to recompute them."""
    from keras_metalstm.export.adapted import in_variable_precision

    rng = np.random.default_rng(0)
    normalization = keras.layers.Normalization()
    normalization.adapt(0.5 + 0.1 * rng.random((32, *IMAGE_SHAPE), dtype=np.float32))
    images = keras.Input(IMAGE_SHAPE)
    learner = keras.Model(images, keras.layers.Dense(5)(keras.layers.Flatten()(normalization(images))))
    copy = in_variable_precision(learner, IMAGE_SHAPE)
    assert copy is not learner and copy.compute_dtype == "float32"
    batch = rng.random((3, *IMAGE_SHAPE), dtype=np.float32)
    expected = np.asarray(learner(batch), np.float32)
    np.testing.assert_allclose(np.asarray(copy(batch)), expected, atol=0.05 * np.abs(expected).max())
