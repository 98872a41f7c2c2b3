"""The two meta-learner layers against independent computations: NumPy for the cell, Keras' LSTMCell for layer 1."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_metalstm as km


def numpy_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def numpy_cell(hidden, theta, grad, f_prev, i_prev, W_f, W_i, b_f, b_i):
    """The cell update of the paper's equation 2, written out per coordinate."""
    theta_new, f_new, i_new = [], [], []
    for k in range(theta.shape[0]):
        f_logit = np.concatenate([hidden[k], [theta[k], f_prev[k]]]) @ W_f[:, 0] + b_f
        i_logit = np.concatenate([hidden[k], [theta[k], i_prev[k]]]) @ W_i[:, 0] + b_i
        theta_new.append(numpy_sigmoid(f_logit) * theta[k] - numpy_sigmoid(i_logit) * grad[k])
        f_new.append(f_logit)
        i_new.append(i_logit)
    return np.array(theta_new), np.array(f_new), np.array(i_new)


def test_meta_lstm_cell_matches_numpy():
    rng = np.random.default_rng(1)
    units, coordinates = 20, 57
    cell = km.MetaLSTMCell(units)
    weights = {
        "W_f": rng.normal(size=(units + 2, 1)) * 0.3,
        "W_i": rng.normal(size=(units + 2, 1)) * 0.3,
        "b_f": np.float32(rng.normal()),
        "b_i": np.float32(rng.normal()),
    }
    for name, value in weights.items():
        getattr(cell, name).assign(value)
    hidden = rng.normal(size=(coordinates, units)).astype(np.float32)
    theta = rng.normal(size=coordinates).astype(np.float32)
    grad = (rng.normal(size=coordinates) * 10.0 ** rng.integers(-8, 1, size=coordinates)).astype(np.float32)
    f_prev = rng.normal(size=coordinates).astype(np.float32)
    i_prev = rng.normal(size=coordinates).astype(np.float32)

    theta_new, (f_logit, i_logit) = cell(hidden.T, theta, grad, (f_prev, i_prev))
    expected = numpy_cell(hidden, theta, grad, f_prev, i_prev, **weights)
    np.testing.assert_allclose(theta_new.numpy(), expected[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f_logit.numpy(), expected[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(i_logit.numpy(), expected[2], rtol=1e-5, atol=1e-5)


def test_meta_lstm_cell_initialisation_is_the_official_one():
    keras.utils.set_random_seed(3)
    cell = km.MetaLSTMCell(20)
    assert cell.W_f.shape == (22, 1) and cell.W_i.shape == (22, 1)
    for weight in (cell.W_f, cell.W_i):
        values = weight.numpy()
        assert np.all(np.abs(values) <= 0.01) and np.std(values) > 0
    assert 4.0 <= float(cell.b_f.numpy()) <= 5.0
    assert -5.0 <= float(cell.b_i.numpy()) <= -4.0
    # The cell therefore starts as gradient descent with a small step.
    assert numpy_sigmoid(float(cell.b_f.numpy())) > 0.98
    assert numpy_sigmoid(float(cell.b_i.numpy())) < 0.02


def lstm_pair(units, rng):
    """Our CoordinateLSTM and Keras' LSTMCell holding the same random weights."""
    ours = km.CoordinateLSTM(units=units, input_dim=4)
    reference = keras.layers.LSTMCell(units)
    reference.build((None, 4))
    for variable in ours.trainable_variables:
        variable.assign(rng.normal(size=variable.shape) * 0.5)
    reference.set_weights([ours.kernel.numpy(), ours.recurrent_kernel.numpy(), ours.bias.numpy()])
    return ours, reference


def test_coordinate_lstm_matches_keras_lstm_cell_on_the_same_weights():
    rng = np.random.default_rng(2)
    ours, reference = lstm_pair(20, rng)

    inputs = [rng.normal(size=(33, 4)).astype(np.float32) for _ in range(3)]
    state = None  # the zero state
    reference_state = [tf.zeros((33, 20)), tf.zeros((33, 20))]
    for step_inputs in inputs:
        hidden, state = ours(step_inputs.T, state)  # features first
        reference_hidden, reference_state = reference(step_inputs, reference_state)
        np.testing.assert_allclose(hidden.numpy().T, reference_hidden.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state[1].numpy().T, reference_state[1].numpy(), rtol=1e-5, atol=1e-6)


def test_shared_inputs_equal_the_same_features_copied_to_every_coordinate():
    rng = np.random.default_rng(6)
    shared = km.CoordinateLSTM(units=5, input_dim=4, shared_input_dim=2)
    copied = km.CoordinateLSTM(units=5, input_dim=4)
    for variable in shared.trainable_variables:
        variable.assign(rng.normal(size=variable.shape))
    copied.set_weights(shared.get_weights())
    episodes, coordinates = 3, 11
    own = rng.normal(size=(2, episodes, coordinates)).astype(np.float32)
    per_episode = rng.normal(size=(2, episodes)).astype(np.float32)
    full = np.concatenate([np.broadcast_to(per_episode[:, :, None], (2, episodes, coordinates)), own], axis=0)
    state, copied_state = None, None
    for _ in range(2):
        hidden, state = shared(own, state, shared_inputs=per_episode)
        copied_hidden, copied_state = copied(full, copied_state)
        np.testing.assert_allclose(hidden.numpy(), copied_hidden.numpy(), rtol=1e-5, atol=1e-6)
    assert hidden.shape == (5, episodes, coordinates)


def test_coordinate_lstm_gradients_match_keras_lstm_cell():
    rng = np.random.default_rng(4)
    ours, reference = lstm_pair(8, rng)
    inputs = [tf.constant(rng.normal(size=(17, 4)), tf.float32) for _ in range(3)]
    target = tf.constant(rng.normal(size=(17, 8)), tf.float32)

    def unrolled_loss(step, state):
        for step_inputs in inputs:
            hidden, state = step(step_inputs, state)
        return tf.reduce_sum((hidden - target) ** 2) + tf.reduce_sum(state[1])

    def ours_step(step_inputs, state):
        hidden, (hidden, cell) = ours(tf.transpose(step_inputs), state)
        return tf.transpose(hidden), (hidden, cell)

    with tf.GradientTape() as tape:
        loss = unrolled_loss(ours_step, None)
    ours_grads = tape.gradient(loss, ours.trainable_variables)
    with tf.GradientTape() as tape:
        reference_loss = unrolled_loss(reference, [tf.zeros((17, 8)), tf.zeros((17, 8))])
    reference_grads = tape.gradient(reference_loss, reference.trainable_variables)
    np.testing.assert_allclose(loss.numpy(), reference_loss.numpy(), rtol=1e-5)
    for mine, theirs in zip(ours_grads, reference_grads, strict=True):
        np.testing.assert_allclose(mine.numpy(), theirs.numpy(), rtol=1e-4, atol=1e-5)


def test_coordinate_lstm_initialisers_are_small_uniform_not_keras_defaults():
    keras.utils.set_random_seed(5)
    layer = km.CoordinateLSTM(units=20, input_dim=4)
    for variable in layer.trainable_variables:
        values = variable.numpy()
        assert np.all(np.abs(values) <= 0.01), variable.path
        assert np.std(values) > 0.003, variable.path  # random, not zeros or a constant forget bias
    # Keras' unit_forget_bias would put ones in the forget-gate slice of the bias.
    assert np.all(np.abs(layer.bias.numpy()[20:40]) <= 0.01)


@pytest.mark.parametrize(
    "layer", [km.MetaLSTMCell(hidden_units=7, name="cell"), km.CoordinateLSTM(units=6, input_dim=4, shared_input_dim=2, name="lstm")]
)
def test_get_config_round_trip(layer):
    config = layer.get_config()
    rebuilt = layer.__class__.from_config(config)
    assert rebuilt.get_config() == config
    assert [w.shape for w in rebuilt.weights] == [w.shape for w in layer.weights]
    serialized = keras.saving.serialize_keras_object(layer)
    assert keras.saving.deserialize_keras_object(serialized).get_config() == config
