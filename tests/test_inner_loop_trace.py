"""MetaLearner.trace: its gates, losses and norms recomputed in NumPy for a small learner, the cell that is
plain SGD, and the summaries per learner variable and layer."""

import math

import keras
import numpy as np
import pytest
from conftest import random_episodes

import keras_metalstm as km
from keras_metalstm.inner_loop_trace import layer_of
from keras_metalstm.inspection import plain_sgd

N_WAY, K_SHOT, IMAGE_SHAPE, STEPS = 3, 2, (3, 3, 1), 3


def softmax_regression():
    keras.utils.set_random_seed(0)
    images = keras.Input(IMAGE_SHAPE)
    return keras.Model(
        images, keras.layers.Dense(N_WAY, name="head")(keras.layers.Flatten(name="flat")(images))
    )


def two_layer_learner():
    keras.utils.set_random_seed(1)
    images = keras.Input(IMAGE_SHAPE)
    features = keras.layers.Conv2D(2, 2, name="conv")(images)
    features = keras.layers.BatchNormalization(name="norm")(features)
    features = keras.layers.Flatten()(keras.layers.ReLU()(features))
    return keras.Model(images, keras.layers.Dense(N_WAY, name="out")(features))


def support_set(seed=0):
    episode = random_episodes(n_way=N_WAY, k_shot=K_SHOT, image_shape=IMAGE_SHAPE, seed=seed)
    return episode["support_images"][0], episode["support_labels"][0]


def meta_with_large_weights(learner):
    """Meta-parameters far from their near-zero initialisation, so that every input of the gates moves them."""
    meta = km.MetaLearner(learner, inner_steps=STEPS, hidden_units=3)
    rng = np.random.default_rng(7)
    for variable in (
        meta.coordinate_lstm.kernel,
        meta.coordinate_lstm.recurrent_kernel,
        meta.coordinate_lstm.bias,
    ):
        variable.assign(rng.uniform(-1.0, 1.0, variable.shape))
    meta.cell.W_f.assign(rng.uniform(-0.5, 0.5, meta.cell.W_f.shape))
    meta.cell.W_i.assign(rng.uniform(-0.5, 0.5, meta.cell.W_i.shape))
    meta.cell.b_f.assign(2.0)
    meta.cell.b_i.assign(-3.0)
    return meta


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def preprocess(x, p=10.0):
    """(log|x| / p, sign x) where |x| > exp(-p), else (-1, exp(p) x): two rows."""
    large = np.abs(x) > math.exp(-p)
    log_feature = np.where(large, np.log(np.maximum(np.abs(x), math.exp(-p))) / p, -1.0)
    return np.stack([log_feature, np.where(large, np.sign(x), x * math.exp(p))])


def numpy_inner_loop(meta, images, labels):
    """The inner loop of a Flatten -> Dense learner in NumPy (float64, analytic gradient): per step the gates and
    theta, with the loss and theta at theta_0..theta_T."""
    x = images.reshape(len(images), -1).astype(np.float64)
    onehot = np.eye(N_WAY)[labels]
    inputs = x.shape[1]
    weights = lambda variable: variable.numpy().astype(np.float64)  # noqa: E731
    kernel, recurrent, bias = (weights(v) for v in meta.coordinate_lstm.weights)
    W_f, W_i, b_f, b_i = (weights(v) for v in (meta.cell.W_f, meta.cell.W_i, meta.cell.b_f, meta.cell.b_i))
    units = meta.hidden_units

    def loss_and_gradient(theta):
        W, b = theta[: inputs * N_WAY].reshape(inputs, N_WAY), theta[inputs * N_WAY :]
        logits = x @ W + b
        probabilities = np.exp(logits - logits.max(1, keepdims=True))
        probabilities /= probabilities.sum(1, keepdims=True)
        loss = -np.mean(np.log(probabilities[np.arange(len(x)), labels]))
        d_logits = (probabilities - onehot) / len(x)
        return loss, np.concatenate([(x.T @ d_logits).ravel(), d_logits.sum(0)])

    theta = meta.theta0.numpy().astype(np.float64)
    h = c = np.zeros((units, theta.size))
    f_previous = i_previous = np.zeros(theta.size)
    record = {"input_gates": [], "forget_gates": [], "thetas": [theta], "losses": []}
    for _ in range(STEPS):
        loss, gradient = loss_and_gradient(theta)
        record["losses"].append(loss)
        features = np.concatenate(
            [np.repeat(preprocess(np.array([loss])), theta.size, axis=1), preprocess(gradient)]
        )
        gates = kernel.T @ features + recurrent.T @ h + bias[:, None]
        gate_i, gate_f, candidate, gate_o = np.split(gates, 4)
        c = sigmoid(gate_f) * c + sigmoid(gate_i) * np.tanh(candidate)
        h = sigmoid(gate_o) * np.tanh(c)
        f_logit = W_f[:units, 0] @ h + W_f[units, 0] * theta + W_f[units + 1, 0] * f_previous + b_f
        i_logit = W_i[:units, 0] @ h + W_i[units, 0] * theta + W_i[units + 1, 0] * i_previous + b_i
        theta = sigmoid(f_logit) * theta - sigmoid(i_logit) * gradient
        f_previous, i_previous = f_logit, i_logit
        record["input_gates"].append(sigmoid(i_logit))
        record["forget_gates"].append(sigmoid(f_logit))
        record["thetas"].append(theta)
    record["losses"].append(loss_and_gradient(theta)[0])
    return record


def variable_norms(vector, sizes):
    return np.array([np.linalg.norm(piece) for piece in np.split(vector, np.cumsum(sizes)[:-1])])


def test_trace_equals_the_cell_recomputed_in_numpy():
    meta = meta_with_large_weights(softmax_regression())
    images, labels = support_set()
    trace = meta.trace(images, labels)
    expected = numpy_inner_loop(meta, images, labels)

    assert trace.input_gates.shape == (STEPS, meta.num_parameters)
    np.testing.assert_allclose(trace.input_gates, expected["input_gates"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(trace.forget_gates, expected["forget_gates"], rtol=1e-5, atol=1e-6)
    # The large meta-weights make the gates differ from coordinate to coordinate and from step to step: equality
    # above is not two constants agreeing.
    assert np.ptp(trace.input_gates) > 0.02 and np.ptp(trace.forget_gates) > 0.02
    np.testing.assert_allclose(trace.support_loss, expected["losses"], rtol=1e-5)
    thetas = expected["thetas"]
    for step in range(1, STEPS + 1):
        np.testing.assert_allclose(
            trace.distances[step - 1], variable_norms(thetas[step] - thetas[0], trace.sizes), rtol=1e-4
        )
        np.testing.assert_allclose(
            trace.update_norms[step - 1],
            variable_norms(thetas[step] - thetas[step - 1], trace.sizes),
            rtol=1e-4,
        )


def test_the_sgd_cell_traces_a_constant_learning_rate_and_forget_gate_one_and_plain_sgd_losses():
    alpha = 0.05
    meta = km.MetaLearner(two_layer_learner(), inner_steps=STEPS, hidden_units=3)
    meta.cell.W_f.assign(np.zeros(meta.cell.W_f.shape))
    meta.cell.W_i.assign(np.zeros(meta.cell.W_i.shape))
    meta.cell.b_f.assign(30.0)  # sigmoid(30) is 1 in float32
    meta.cell.b_i.assign(math.log(alpha / (1 - alpha)))
    images, labels = support_set(seed=1)
    trace = meta.trace(images, labels)

    np.testing.assert_allclose(trace.input_gates, alpha, rtol=1e-6)
    assert np.all(trace.forget_gates == 1.0)
    sgd_loss, sgd_accuracy = plain_sgd(meta.learner_function, meta.theta0, images, labels, alpha, STEPS)
    np.testing.assert_allclose(trace.support_loss, sgd_loss.numpy(), rtol=1e-5)
    np.testing.assert_allclose(trace.support_accuracy, sgd_accuracy.numpy())
    assert trace.support_loss[-1] < trace.support_loss[0]


def test_statistics_are_per_learner_variable_and_layer():
    meta = meta_with_large_weights(two_layer_learner())
    trace = meta.trace(*support_set())
    paths = [variable.path for variable in meta.learner.trainable_variables]
    assert trace.variables == paths and sum(trace.sizes) == meta.num_parameters

    by_variable = trace.statistics("variable")
    by_layer = trace.statistics("layer")
    assert list(by_variable) == paths
    assert list(by_layer) == ["conv", "norm", "out"] == list(dict.fromkeys(layer_of(path) for path in paths))

    start = sum(trace.sizes[: paths.index("out/kernel")])
    kernel_gates = trace.input_gates[:, start : start + trace.sizes[paths.index("out/kernel")]]
    np.testing.assert_allclose(
        by_variable["out/kernel"]["input_gate"]["median"], np.median(kernel_gates, axis=1)
    )
    np.testing.assert_allclose(
        by_variable["out/kernel"]["input_gate"]["p90"], np.percentile(kernel_gates, 90, axis=1)
    )
    np.testing.assert_array_equal(trace.gates_of("out/kernel")["input_gate"], kernel_gates)

    layer_coordinates = np.concatenate(
        [trace.gates_of(path)["forget_gate"] for path in ("out/kernel", "out/bias")], 1
    )
    np.testing.assert_allclose(by_layer["out"]["forget_gate"]["mean"], layer_coordinates.mean(axis=1))
    np.testing.assert_allclose(
        by_layer["out"]["distance"],
        np.hypot(by_variable["out/kernel"]["distance"], by_variable["out/bias"]["distance"]),
    )
    with pytest.raises(ValueError, match="by must be one of"):
        trace.groups("unit")
