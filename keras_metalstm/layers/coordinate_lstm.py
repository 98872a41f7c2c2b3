"""Layer 1 of the meta-learner: an ordinary LSTM cell applied to every learner coordinate independently.

The coordinates of the learner's parameter vector are the batch axis: one set of weights is shared by all of
them, and each coordinate carries its own (h, c) state across the inner steps of an episode.
"""

import keras
from keras import ops

# SPEC, "Initialisation (official code)": every meta-parameter starts in U(-0.01, 0.01); Keras' LSTM
# defaults (glorot / orthogonal kernels, unit forget bias) are a known way to break the meta-learner.
def _small_uniform():
    return keras.initializers.RandomUniform(-0.01, 0.01)


@keras.saving.register_keras_serializable(package="keras_metalstm")
class CoordinateLSTM(keras.layers.Layer):
    """LSTM cell over per-coordinate inputs of shape (coordinates, input_dim).

    Gate order and equations are those of `keras.layers.LSTMCell` (input, forget, candidate, output;
    sigmoid gates, tanh candidate and output), so the two agree on the same weights; what differs is the
    initialisation and that the state is passed in and returned explicitly.

    Args:
        units: hidden units per coordinate (20 in the paper).
        input_dim: features per coordinate (4: preprocessed loss and gradient).
    """

    def __init__(self, units=20, input_dim=4, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        self.input_dim = int(input_dim)
        self.kernel = self.add_weight(
            shape=(self.input_dim, 4 * self.units), initializer=_small_uniform(), name="kernel"
        )
        self.recurrent_kernel = self.add_weight(
            shape=(self.units, 4 * self.units), initializer=_small_uniform(), name="recurrent_kernel"
        )
        self.bias = self.add_weight(shape=(4 * self.units,), initializer=_small_uniform(), name="bias")
        self.built = True

    def initial_state(self, num_coordinates, dtype="float32"):
        """The zero (h, c) state every episode starts from."""
        zeros = ops.zeros((num_coordinates, self.units), dtype=dtype)
        return zeros, zeros

    def call(self, inputs, state):
        """One step. `inputs`: (coordinates, input_dim); `state`: (h, c). Returns (h, (h, c))."""
        hidden, cell = state
        gates = ops.matmul(inputs, self.kernel) + ops.matmul(hidden, self.recurrent_kernel) + self.bias
        input_gate, forget_gate, candidate, output_gate = ops.split(gates, 4, axis=-1)
        cell = ops.sigmoid(forget_gate) * cell + ops.sigmoid(input_gate) * ops.tanh(candidate)
        hidden = ops.sigmoid(output_gate) * ops.tanh(cell)
        return hidden, (hidden, cell)

    def get_config(self):
        config = super().get_config()
        config.update({"units": self.units, "input_dim": self.input_dim})
        return config
