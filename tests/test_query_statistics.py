"""query_statistics="support": the query pass normalised with the support batch's statistics under theta_T.

Checked against a NumPy forward pass, finite differences (the statistics carry the meta-gradient) and the
"query" protocol it replaces.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import as_tensors, float64_policy, graph_op_types, random_episodes

import keras_metalstm as km
from keras_metalstm.learner_function import LearnerFunction, cross_entropy

BN_EPSILON = 1e-3


def dense_batchnorm_learner(seed=0):
    """Flatten -> Dense(4) -> BatchNorm -> ReLU -> Dense(5): small enough for a NumPy forward pass."""
    keras.utils.set_random_seed(seed)
    images = keras.Input((28, 28, 1))
    hidden = keras.layers.Dense(4, name="hidden")(keras.layers.Flatten()(images))
    hidden = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name="bn")(hidden)
    logits = keras.layers.Dense(5, name="logits")(keras.layers.ReLU()(hidden))
    return keras.Model(images, logits)


def numpy_forward_with_support_moments(theta, support_images, query_images):
    """The dense learner's query logits, its BN normalising with the support batch's biased moments."""
    sizes = [784 * 4, 4, 4, 4, 4 * 5, 5]
    kernel, bias, gamma, beta, out_kernel, out_bias = np.split(theta, np.cumsum(sizes)[:-1])
    kernel, out_kernel = kernel.reshape(784, 4), out_kernel.reshape(4, 5)
    support_hidden = support_images.reshape(len(support_images), -1) @ kernel + bias
    mean, variance = support_hidden.mean(axis=0), support_hidden.var(axis=0)
    query_hidden = query_images.reshape(len(query_images), -1) @ kernel + bias
    normalised = gamma * (query_hidden - mean) / np.sqrt(variance + BN_EPSILON) + beta
    return np.maximum(normalised, 0.0) @ out_kernel + out_bias


def support_meta(learner=None, inner_steps=2, **options):
    learner = learner or dense_batchnorm_learner()
    return km.MetaLearner(learner, inner_steps=inner_steps, query_statistics="support", **options)


@pytest.mark.parametrize("mode", ["train", "test"])
def test_query_logits_equal_a_numpy_forward_with_the_support_moments_under_theta_T(mode):
    meta = support_meta()
    episodes = random_episodes(query=4, seed=1)
    theta, _ = meta.inner_loop(tf.constant(episodes["support_images"]), tf.constant(episodes["support_labels"]))
    expected = numpy_forward_with_support_moments(
        theta[0].numpy().astype(np.float64),
        episodes["support_images"][0].astype(np.float64),
        episodes["query_images"][0].astype(np.float64),
    )
    np.testing.assert_allclose(meta(as_tensors(episodes), mode=mode).numpy()[0], expected, rtol=1e-4, atol=1e-4)


def test_query_protocol_differs_from_the_support_moments_under_theta_T():
    # The reference above is not satisfied by the authors' protocol, so the test above tells the two apart.
    meta = km.MetaLearner(dense_batchnorm_learner(), inner_steps=2)
    episodes = random_episodes(query=4, seed=1)
    theta, _ = meta.inner_loop(tf.constant(episodes["support_images"]), tf.constant(episodes["support_labels"]))
    reference = numpy_forward_with_support_moments(
        theta[0].numpy(), episodes["support_images"][0], episodes["query_images"][0]
    )
    for mode in ("train", "test"):
        assert not np.allclose(meta(as_tensors(episodes), mode=mode).numpy()[0], reference, atol=1e-3)


def test_conv4_statistics_are_the_support_batch_moments_under_theta_T_and_the_adapted_model_holds_them():
    keras.utils.set_random_seed(0)
    learner = km.learners.conv4(input_shape=(28, 28, 1), num_classes=5, filters=8)
    meta = support_meta(learner, inner_steps=2)
    episodes = random_episodes(seed=2)
    support, labels = episodes["support_images"][0], episodes["support_labels"][0]
    adapted = meta.adapt(support, labels)

    theta, _ = meta.inner_loop(tf.constant(support[None]), tf.constant(labels[None]))
    reference = keras.models.clone_model(learner)
    for variable, value in zip(
        reference.trainable_variables, meta._learner_function.unflatten(theta[0]), strict=True
    ):
        variable.assign(value)
    conv1 = keras.Model(reference.input, reference.get_layer("conv1").output)(support).numpy()
    bn1 = adapted.get_layer("bn1")
    np.testing.assert_allclose(bn1.moving_mean.numpy(), conv1.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bn1.moving_variance.numpy(), conv1.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)

    # The standalone model reproduces the meta-learner's query logits, in both modes, one image at a time.
    query = episodes["query_images"][0]
    single = np.concatenate([adapted(query[i : i + 1], training=False).numpy() for i in range(len(query))])
    for mode in ("train", "test"):
        np.testing.assert_allclose(single, meta(as_tensors(episodes), mode=mode).numpy()[0], rtol=1e-5, atol=1e-5)


def test_a_query_image_does_not_depend_on_the_other_query_images_even_in_train_mode():
    meta = support_meta()
    episodes = as_tensors(random_episodes(query=6, seed=3))
    full = meta(episodes, mode="train").numpy()
    halved = dict(episodes, query_images=episodes["query_images"][:, :5])
    np.testing.assert_allclose(meta(halved, mode="train").numpy()[0], full[0, :5], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("normalization", ["group", "none"])
def test_a_learner_without_batch_statistics_takes_support_statistics_as_the_query_protocol(normalization):
    """GroupNormalization or no normalisation: nothing to recompute, so "support" trains and predicts exactly as
    "query" (the recipe that names it runs with any learner), in a compiled meta-training step too."""

    def learner():
        keras.utils.set_random_seed(5)
        images = keras.Input((28, 28, 1))
        hidden = keras.layers.Conv2D(4, 3, strides=4)(images)
        if normalization == "group":
            hidden = keras.layers.GroupNormalization(groups=2)(hidden)
        logits = keras.layers.Dense(5)(keras.layers.Flatten()(keras.layers.ReLU()(hidden)))
        return keras.Model(images, logits)

    episodes = as_tensors(random_episodes(query=3, seed=6))
    results = {}
    for protocol in ("query", "support"):
        meta = km.MetaLearner(learner(), inner_steps=2, query_statistics=protocol, first_order=False)
        optimizer = keras.optimizers.Adam(1e-3)
        loss, _ = meta.meta_train_step(episodes, optimizer)
        results[protocol] = (meta(episodes, mode="test").numpy(), float(loss))
    np.testing.assert_allclose(results["support"][0], results["query"][0], rtol=1e-6, atol=1e-6)
    assert results["support"][1] == pytest.approx(results["query"][1], rel=1e-6)


def test_the_gradient_flows_through_the_support_statistics():
    """d(query loss)/d(theta) with the statistics a function of theta, against central finite differences;
    the same gradient with the statistics held constant is measurably different."""
    function = LearnerFunction(dense_batchnorm_learner(seed=4), bn_momentum=0.1)
    episodes = random_episodes(query=4, seed=4)
    support = tf.constant(episodes["support_images"][0])
    query, labels = tf.constant(episodes["query_images"][0]), tf.constant(episodes["query_labels"][0])

    def query_loss(theta, constant_statistics=False):
        state = function.batch_statistics(theta, support)
        if constant_statistics:
            state = [tf.stop_gradient(value) for value in state]
        return cross_entropy(labels, function(theta, state, query, training=False)[0])

    theta = tf.Variable(function.initial_theta())
    with tf.GradientTape(persistent=True) as tape:
        loss = query_loss(theta)
        loss_constant_statistics = query_loss(theta, constant_statistics=True)
    gradient = tape.gradient(loss, theta).numpy()
    gradient_constant_statistics = tape.gradient(loss_constant_statistics, theta).numpy()

    rng = np.random.default_rng(0)
    step = 1e-3
    for _ in range(3):
        direction = rng.standard_normal(theta.shape).astype(np.float32)
        direction /= np.linalg.norm(direction)
        finite_difference = (
            float(query_loss(theta + step * direction)) - float(query_loss(theta - step * direction))
        ) / (2 * step)
        np.testing.assert_allclose(gradient @ direction, finite_difference, rtol=2e-2, atol=2e-4)
    assert np.linalg.norm(gradient - gradient_constant_statistics) > 0.1 * np.linalg.norm(gradient)


@pytest.fixture
def float64_learners():
    with float64_policy():
        yield


@pytest.mark.parametrize("query_statistics", ["query", "support"])
def test_second_order_meta_gradient_matches_finite_differences_of_the_meta_loss(float64_learners, query_statistics):
    """Second order, the meta-gradient of theta_0 is the exact derivative of the meta-loss. Through a
    batch-norm learner this needs the twice-differentiable moments of LearnerFunction: with Keras' own
    (tf.nn.moments) the first-layer coordinates were off by 0.3 % ("query") and 30 % ("support")."""
    meta = km.MetaLearner(
        dense_batchnorm_learner(), inner_steps=1, first_order=False, query_statistics=query_statistics
    )
    episodes = {
        key: tf.constant(value.astype(np.float64) if value.dtype == np.float32 else value)
        for key, value in random_episodes(query=4, seed=5).items()
    }
    _, _, gradients = meta.meta_gradients(episodes)
    theta0_gradient = dict(zip([v.path for v in meta.trainable_variables], gradients, strict=True))[meta.theta0.path]
    theta0_gradient = theta0_gradient.numpy()
    assert theta0_gradient.dtype == np.float64

    def meta_loss(theta0):
        meta.theta0.assign(theta0)
        losses, _ = meta.episode_metrics(episodes, mode="train")
        return float(tf.reduce_mean(losses))

    start = meta.theta0.numpy().copy()
    step = 1e-5
    # The largest coordinates of the gradient and two first-layer ones, where the missing term showed.
    coordinates = [*np.argsort(-np.abs(theta0_gradient))[:4], 119, 1123]
    for coordinate in coordinates:
        offset = np.zeros_like(start)
        offset[coordinate] = step
        finite_difference = (meta_loss(start + offset) - meta_loss(start - offset)) / (2 * step)
        np.testing.assert_allclose(theta0_gradient[coordinate], finite_difference, rtol=1e-5, atol=1e-8)
    meta.theta0.assign(start)


def test_the_float32_second_order_meta_gradient_through_fused_batch_norm_equals_the_float64_one():
    """float32 batch normalisation runs on TensorFlow's fused ops with derivatives of our own; float64 runs
    Keras' ops (exact: the finite-difference test above). Second order through the support statistics, the
    two meta-gradients agree to float32 precision."""
    options = dict(inner_steps=2, first_order=False, query_statistics="support")
    meta = km.MetaLearner(dense_batchnorm_learner(), **options)
    episodes = random_episodes(query=4, seed=6)
    single = as_tensors(episodes)
    with float64_policy():
        reference = km.MetaLearner(dense_batchnorm_learner(), **options)
        reference.set_weights([weight.astype(np.float64) for weight in meta.get_weights()])
        double = as_tensors(episodes, float_dtype=np.float64)
        _, _, expected = tf.function(reference.meta_gradients)(double)
    meta_gradients = tf.function(meta.meta_gradients)
    assert "FusedBatchNormV3" in graph_op_types(meta_gradients.get_concrete_function(single))
    _, _, gradients = meta_gradients(single)
    for variable, ours, exact in zip(meta.trainable_variables, gradients, expected, strict=True):
        assert float(tf.norm(exact)) > 0, variable.path
        error = float(tf.norm(tf.cast(ours, tf.float64) - exact))
        assert error <= 1e-4 * float(tf.norm(exact)), variable.path


def test_the_option_survives_get_config_and_bad_values_are_refused():
    meta = support_meta()
    assert km.MetaLearner.from_config(meta.get_config()).query_statistics == "support"
    assert km.MetaLearner(dense_batchnorm_learner(), inner_steps=1).query_statistics == "query"
    with pytest.raises(ValueError, match="query_statistics must be one of"):
        km.MetaLearner(dense_batchnorm_learner(), inner_steps=1, query_statistics="transductive")
