"""Training-mode batch normalisation on TensorFlow's fused ops: values against NumPy, first and second derivatives
(through the batch statistics too) against autodiff of the plain formula in float64, and the learner function
using it where Keras' own call would give the same result, and only there; and its XLA CPU form
(`xla_ops.batch_normalization_training`) against the same formula."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_metalstm import xla_ops
from keras_metalstm.fused_batch_norm import batch_normalization_training
from keras_metalstm.learner_function import LearnerFunction

EPSILON = 1e-3


def plain_batch_norm(inputs, gamma, beta):
    """The textbook formula with plain ops (no stop_gradient anywhere): the independent reference."""
    axes = list(range(inputs.shape.rank - 1))
    mean = tf.reduce_mean(inputs, axes)
    variance = tf.reduce_mean(tf.square(inputs - mean), axes)
    return (inputs - mean) * tf.math.rsqrt(variance + EPSILON) * gamma + beta, mean, variance


def fused_batch_norm(inputs, gamma, beta):
    return batch_normalization_training(inputs, gamma, beta, EPSILON)


def random_case(shape, seed=0):
    rng = np.random.default_rng(seed)
    channels = shape[-1]
    return {
        "inputs": rng.normal(size=shape) * 2.0 + 0.5,
        "gamma": rng.normal(size=channels),
        "beta": rng.normal(size=channels),
        "output_weights": rng.normal(size=shape),
        "mean_weights": rng.normal(size=channels),
        "variance_weights": rng.normal(size=channels),
    }


def tensors(case, dtype):
    return {key: tf.constant(value, dtype) for key, value in case.items()}


def objective(normalise, case, use_statistics):
    """A scalar of all three outputs (nonlinear, so second derivatives mix them); with use_statistics=False of
    the normalised outputs only, whose statistics' gradients are then the zeros the fused backward skips."""
    outputs, mean, variance = normalise(case["inputs"], case["gamma"], case["beta"])
    value = tf.reduce_sum(tf.sin(outputs) * case["output_weights"])
    if use_statistics:
        value += tf.reduce_sum(tf.sin(mean) * case["mean_weights"])
        value += tf.reduce_sum(tf.sin(variance) * case["variance_weights"])
    return value


def derivatives(normalise, case, use_statistics):
    """The objective, its gradient w.r.t. (inputs, gamma, beta) and a Hessian-vector product."""
    primals = [case["inputs"], case["gamma"], case["beta"]]

    @tf.function
    def compute():
        with tf.GradientTape() as outer:
            outer.watch(primals)
            with tf.GradientTape() as inner:
                inner.watch(primals)
                value = objective(normalise, case, use_statistics)
            gradients = inner.gradient(value, primals)
            directional = sum(
                tf.reduce_sum(gradient * direction)
                for gradient, direction in zip(
                    gradients, [case["output_weights"], case["mean_weights"], case["variance_weights"]], strict=True
                )
            )
        return value, gradients, outer.gradient(directional, primals)

    return compute()


@pytest.mark.parametrize("shape", [(6, 5, 5, 3), (10, 4), (4, 3, 7, 2)])
def test_values_equal_numpy_with_the_biased_variance(shape):
    case = random_case(shape)
    single = tensors(case, tf.float32)
    outputs, mean, variance = fused_batch_norm(single["inputs"], single["gamma"], single["beta"])
    inputs = case["inputs"]
    axes = tuple(range(len(shape) - 1))
    expected_mean, expected_variance = inputs.mean(axis=axes), inputs.var(axis=axes)  # biased, as Keras averages
    expected = (inputs - expected_mean) / np.sqrt(expected_variance + EPSILON) * case["gamma"] + case["beta"]
    assert outputs.shape == shape
    np.testing.assert_allclose(outputs.numpy(), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(mean.numpy(), expected_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(variance.numpy(), expected_variance, rtol=1e-5)


@pytest.mark.parametrize("use_statistics", [True, False])
@pytest.mark.parametrize("shape", [(6, 5, 5, 3), (10, 4)])
def test_first_and_second_derivatives_equal_autodiff_of_the_plain_formula_in_float64(shape, use_statistics):
    case = random_case(shape, seed=1)
    value, gradients, hessian_products = derivatives(fused_batch_norm, tensors(case, tf.float32), use_statistics)
    reference = derivatives(plain_batch_norm, tensors(case, tf.float64), use_statistics)
    np.testing.assert_allclose(value.numpy(), reference[0].numpy(), rtol=1e-5)
    for name, fused, plain in zip(["inputs", "gamma", "beta"], gradients, reference[1], strict=True):
        scale = np.abs(plain.numpy()).max()
        np.testing.assert_allclose(fused.numpy(), plain.numpy(), rtol=0, atol=2e-5 * scale, err_msg=name)
    for name, fused, plain in zip(["inputs", "gamma", "beta"], hessian_products, reference[2], strict=True):
        scale = np.abs(plain.numpy()).max()
        assert scale > 0, name
        np.testing.assert_allclose(fused.numpy(), plain.numpy(), rtol=0, atol=5e-5 * scale, err_msg=name)


@pytest.mark.parametrize("use_statistics", [True, False])
@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (10, 4)])
def test_the_xla_cpu_form_equals_the_plain_formula_with_two_derivatives_in_float64(shape, use_statistics):
    """`xla_ops.batch_normalization_training` (sums as products, the backward pass in closed form) in float64:
    value, gradients and Hessian-vector products equal autodiff of the plain formula to rounding."""
    case = tensors(random_case(shape, seed=3), tf.float64)

    def xla_form(inputs, gamma, beta):
        return xla_ops.batch_normalization_training(inputs, gamma, beta, EPSILON)

    ours, reference = derivatives(xla_form, case, use_statistics), derivatives(plain_batch_norm, case, use_statistics)
    np.testing.assert_allclose(ours[0].numpy(), reference[0].numpy(), rtol=1e-10)
    for order, (our_values, plain_values) in enumerate(zip(ours[1:], reference[1:], strict=True), start=1):
        for name, our_value, plain in zip(["inputs", "gamma", "beta"], our_values, plain_values, strict=True):
            assert float(tf.norm(plain)) > 0, (order, name)
            np.testing.assert_allclose(our_value.numpy(), plain.numpy(), rtol=1e-10, atol=1e-10, err_msg=f"{order} {name}")


def test_tensorflows_registered_gradient_would_ignore_the_statistics():
    """Why the fused op carries a gradient of its own: differentiated with TensorFlow's registered gradient, the
    batch mean and variance it returns pass no gradient back, so the test above can tell the two apart."""
    case = tensors(random_case((6, 5, 5, 3), seed=1), tf.float32)

    def registered_gradient(inputs, gamma, beta):
        return tf.compat.v1.nn.fused_batch_norm(inputs, gamma, beta, epsilon=EPSILON, is_training=True)

    _, stock, _ = derivatives(registered_gradient, case, use_statistics=True)
    _, ours, _ = derivatives(fused_batch_norm, case, use_statistics=True)
    assert float(tf.norm(stock[0] - ours[0])) > 1e-2 * float(tf.norm(ours[0]))


def conv_batchnorm_learner(dtype="float32", **batchnorm_options):
    keras.utils.set_random_seed(0)
    images = keras.Input((8, 8, 2), dtype=dtype)
    features = keras.layers.Conv2D(3, 3, dtype=dtype)(images)
    features = keras.layers.BatchNormalization(momentum=0.7, dtype=dtype, **batchnorm_options)(features)
    return keras.Model(images, keras.layers.Dense(4, dtype=dtype)(keras.layers.Flatten()(features)))


def traced_op_types(function, *args):
    return {operation.type for operation in tf.function(function).get_concrete_function(*args).graph.get_operations()}


def test_the_learner_function_normalises_with_the_fused_op_as_keras_would():
    learner = conv_batchnorm_learner()
    learner_function = LearnerFunction(learner)
    images = tf.constant(np.random.default_rng(2).normal(size=(5, 8, 8, 2)), tf.float32)
    theta, state = learner_function.initial_theta(), learner_function.initial_state()

    logits, new_state = learner_function(theta, state, images, training=True)
    assert "FusedBatchNormV3" in traced_op_types(lambda: learner_function(theta, state, images, training=True))
    # Keras' own training-mode call on the same weights: the same logits and moving statistics.
    expected_logits = learner(images, training=True)
    np.testing.assert_allclose(logits.numpy(), expected_logits.numpy(), rtol=1e-5, atol=1e-5)
    for ours, keras_value in zip(new_state, learner.non_trainable_variables, strict=True):
        np.testing.assert_allclose(ours.numpy(), keras_value.numpy(), rtol=1e-5, atol=1e-6)
    # Inference mode and the layer's own variables are untouched by the override.
    assert "FusedBatchNormV3" not in traced_op_types(lambda: learner_function(theta, state, images, training=False))
    assert "call" not in vars(learner.layers[2])


@pytest.mark.parametrize(
    "dtype, options", [("float64", {}), ("float32", {"renorm": True})], ids=["float64", "renorm"]
)
def test_what_the_fused_op_cannot_do_runs_keras_own_call(dtype, options):
    learner = conv_batchnorm_learner(dtype, **options)
    learner_function = LearnerFunction(learner)
    images = tf.constant(np.random.default_rng(3).normal(size=(5, 8, 8, 2)), dtype)
    theta, state = learner_function.initial_theta(), learner_function.initial_state()
    assert "FusedBatchNormV3" not in traced_op_types(lambda: learner_function(theta, state, images, training=True))
    logits, _ = learner_function(theta, state, images, training=True)
    np.testing.assert_allclose(logits.numpy(), learner(images, training=True).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_statistics", [False, True])
def test_the_statistics_term_is_traced_only_when_the_statistics_are_used(use_statistics):
    """Unused statistics (a discarded moving average) reach the backward pass as constant zeros: their closed-form
    term, two more passes over the activations, is left out of the graph; used, it is there."""
    case = tensors(random_case((4, 5, 5, 3)), tf.float32)

    @tf.function
    def gradient():
        with tf.GradientTape() as tape:
            tape.watch(case["inputs"])
            value = objective(fused_batch_norm, case, use_statistics)
        return tape.gradient(value, case["inputs"])

    op_types = [operation.type for operation in gradient.get_concrete_function().graph.get_operations()]
    assert ("Mean" in op_types) == use_statistics
