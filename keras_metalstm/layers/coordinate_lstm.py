"""Layer 1 of the meta-learner: an ordinary LSTM cell applied to every learner coordinate independently.

The coordinates of the learner's parameter vector are a batch axis: one set of weights is shared by all of
them, and each coordinate carries its own (h, c) state across the inner steps of an episode.

Layout: features come FIRST and the coordinates last, e.g. inputs (input_dim, episodes, coordinates) and
states (units, episodes, coordinates). With ~30k coordinates and 20 units this step is the meta-learner's
hot loop; features-first makes the per-gate slices contiguous blocks and turns the gate products into one
(4 * units, features) x (features, coordinates) matrix product. In the library's own training and evaluation
steps on CPU-only machines, float32 and without XLA, the step runs as one fused kernel (keras_metalstm/ops);
everywhere else, including any function a user traces or saves, it runs these stock ops, the reference the
kernel is tested against. Under XLA and on a GPU/TPU their backward pass recomputes the step from its inputs
instead of keeping its activations for every inner step (`recomputes_backward`), as the kernel does.
"""

import keras
import tensorflow as tf

from keras_metalstm import xla_ops
from keras_metalstm.ops import fused_kernels


def hidden_readout(readout_kernel, hidden):
    """readout_kernel^T . hidden per coordinate: (R, *S) for a (units, R) kernel and hidden (units, *S).

    The meta-learner cell's products of h_t with its gate weights, in stock TensorFlow ops (the fused kernel
    computes them itself).
    """
    readout = tf.matmul(readout_kernel, tf.reshape(hidden, [tf.shape(hidden)[0], -1]), transpose_a=True)
    return tf.reshape(readout, tf.concat([tf.shape(readout_kernel)[1:], tf.shape(hidden)[1:]], axis=0))


def stock_step(inputs, input_kernel, gate_bias, with_bias_rows=False, recurrent_kernel=None, hidden=None, cell=None,
               readout_kernel=None):
    """One LSTM step over coordinates in stock TensorFlow ops (any input rank, any device, XLA): the fused
    kernel's reference. Features first: inputs (features, episodes, ...), hidden and cell (units, episodes, ...),
    gate_bias (4 * units, episodes). Without a state (hidden, cell, recurrent_kernel all None) it is the zero
    state's step, its recurrent product skipped. with_bias_rows: XLA on a CPU (`_episode_indicator_rows`).

    Returns (hidden, cell), and the readout_kernel^T . hidden readout after them if a readout_kernel is given.
    """
    units = gate_bias.shape[0] // 4
    coordinate_shape = tf.shape(inputs)[1:]
    rank = inputs.shape.rank
    rows, weights = [tf.reshape(inputs, [tf.shape(inputs)[0], -1])], [input_kernel]
    if hidden is not None:
        rows.append(tf.reshape(hidden, [units, -1]))
        weights.append(recurrent_kernel)
    bias_rows = _episode_indicator_rows(inputs) if with_bias_rows else None
    if bias_rows is not None:
        rows.append(bias_rows)
        weights.append(tf.transpose(gate_bias))
    gates = tf.matmul(tf.concat(weights, axis=0), tf.concat(rows, axis=0), transpose_a=True)
    gates = tf.reshape(gates, tf.concat([[4 * units], coordinate_shape], axis=0))
    if bias_rows is None:
        gates = gates + tf.reshape(gate_bias, [4 * units, -1] + [1] * (rank - 2))
    input_gate, forget_gate, candidate, output_gate = tf.split(gates, 4, axis=0)
    new_cell = tf.sigmoid(input_gate) * tf.tanh(candidate)
    if cell is not None:
        new_cell = new_cell + tf.sigmoid(forget_gate) * cell
    new_hidden = tf.sigmoid(output_gate) * tf.tanh(new_cell)
    readout = () if readout_kernel is None else (hidden_readout(readout_kernel, new_hidden),)
    return (new_hidden, new_cell, *readout)


def recomputes_backward():
    """Whether the stock step's backward pass recomputes the step from its inputs (`tf.recompute_grad`) instead of
    keeping its gates and activations: under XLA (which fuses the recomputation into the backward pass) and on a
    GPU/TPU. An inner loop then keeps, per coordinate and step, about what the next step reads anyway (the inputs,
    h and c: 48 values, not 168), which bounds the learner's size x T x meta-batch in an accelerator's memory, and
    XLA's CPU step gets faster. Not in plain TensorFlow on a CPU, where the recomputation runs as separate ops and
    makes the step slower (there the fused kernel recomputes in its own way). Measured: docs/design.md.
    """
    return xla_ops.in_xla_context() or xla_ops.accelerator_present()


# Up to this many episodes the XLA CPU form carries the gate bias into the matrix product (`_episode_indicator_rows`):
# the rows it adds, episodes x (episodes x coordinates), grow with the square of the episodes.
MAX_EPISODES_WITH_BIAS_ROWS = 8


def _episode_indicator_rows(inputs):
    """For XLA on a CPU: (E, E * coordinates) rows, row e one on episode e's coordinates and zero elsewhere, for
    inputs (features, E, coordinates) of up to MAX_EPISODES_WITH_BIAS_ROWS episodes with static shapes; else None.

    With them the episodes' gate biases are weights of the gate product. Added after it, the bias's gradient is a
    sum over coordinates of the gates' gradient, and XLA's CPU compiler fuses the gates' whole elementwise backward
    into that sum and again into the product's operand, computing it twice (the 12 steps' forward and backward at
    28x28: 176 ms added, 153 in the product; four episodes: 847 and 632 ms; benchmarks/README.md).
    """
    if inputs.shape.rank != 3 or None in inputs.shape[1:] or inputs.shape[1] > MAX_EPISODES_WITH_BIAS_ROWS:
        return None
    episodes, coordinates = inputs.shape[1], inputs.shape[2]
    return tf.repeat(tf.eye(episodes, dtype=inputs.dtype), coordinates, axis=1)


# The authors' code starts every meta-parameter in U(-0.01, 0.01); Keras' LSTM
# defaults (glorot / orthogonal kernels, unit forget bias) are a known way to break the meta-learner.
def _small_uniform():
    return keras.initializers.RandomUniform(-0.01, 0.01)


@keras.saving.register_keras_serializable(package="keras_metalstm")
class CoordinateLSTM(keras.layers.Layer):
    """LSTM cell over per-coordinate inputs, weights shared by all coordinates.

    Gate order and equations are those of `keras.layers.LSTMCell` (input, forget, candidate, output; sigmoid
    gates, tanh candidate and output) and the weights have its shapes, so the two agree on the same weights.
    What differs is the initialisation, the features-first layout, and that some input features may be
    shared by all coordinates of an episode: the meta-learner's loss features are one value per episode, so
    their contribution is computed once per episode and added like a bias instead of being copied to every
    coordinate.

    Args:
        units: hidden units per coordinate (20 in the paper).
        input_dim: input features per coordinate (4: preprocessed loss and gradient).
        shared_input_dim: how many of those features (the first ones) are shared by all coordinates of an
            episode (2: the preprocessed loss).
    """

    def __init__(self, units=20, input_dim=4, shared_input_dim=0, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        self.input_dim = int(input_dim)
        self.shared_input_dim = int(shared_input_dim)
        if not 0 <= self.shared_input_dim <= self.input_dim:
            raise ValueError(f"shared_input_dim must be in [0, input_dim], got {shared_input_dim}.")
        self.kernel = self.add_weight(
            shape=(self.input_dim, 4 * self.units), initializer=_small_uniform(), name="kernel"
        )
        self.recurrent_kernel = self.add_weight(
            shape=(self.units, 4 * self.units), initializer=_small_uniform(), name="recurrent_kernel"
        )
        self.bias = self.add_weight(shape=(4 * self.units,), initializer=_small_uniform(), name="bias")
        self.built = True

    def call(self, inputs, state=None, shared_inputs=None):
        """One step.

        Args:
            inputs: (input_dim - shared_input_dim, episodes, coordinates) per-coordinate features.
            state: (h, c), each (units, episodes, coordinates); None is the zero state every episode starts
                from (its recurrent product is skipped).
            shared_inputs: (shared_input_dim, episodes) features shared by an episode's coordinates.

        Returns:
            (h, (h, c)).
        """
        hidden, state, _ = self.step_with_readout(inputs, state, shared_inputs)
        return hidden, state

    def step_with_readout(self, inputs, state=None, shared_inputs=None, readout_kernel=None):
        """One step, plus readout = readout_kernel^T . h: (R, *coordinate shape) for a (units, R) kernel.

        The meta-learner cell multiplies h by its gate weights; done here, the fused kernel computes that
        product (and its gradient) while h is still in the cache. Without a readout_kernel, readout is None.
        """
        own_kernel = self.kernel[self.shared_input_dim :]
        gate_bias = self._episode_gate_bias(tf.shape(inputs)[1] if inputs.shape.rank >= 3 else 1, shared_inputs)
        fused_step = fused_kernels.coordinate_step(inputs.dtype) if inputs.shape.rank == 3 else None
        if fused_step is not None:
            if state is None:
                zeros = tf.zeros(tf.concat([[self.units], tf.shape(inputs)[1:]], axis=0), inputs.dtype)
                state = (zeros, zeros)
            kernel = tf.zeros((self.units, 0), inputs.dtype) if readout_kernel is None else readout_kernel
            hidden, cell, readout = fused_step(
                inputs, *state, own_kernel, self.recurrent_kernel, gate_bias, kernel
            )
            return hidden, (hidden, cell), None if readout_kernel is None else readout
        tensors = {"inputs": inputs, "input_kernel": own_kernel, "gate_bias": gate_bias}
        if state is not None:
            tensors.update(recurrent_kernel=tf.convert_to_tensor(self.recurrent_kernel), hidden=state[0], cell=state[1])
        if readout_kernel is not None:
            tensors["readout_kernel"] = readout_kernel
        # Read now, not in `step`: the backward pass's recomputation must build the form the forward pass built.
        with_bias_rows = xla_ops.cpu_forms_active()

        def step(*values):
            return stock_step(with_bias_rows=with_bias_rows, **dict(zip(tensors, values, strict=True)))

        hidden, cell, *readout = (tf.recompute_grad(step) if recomputes_backward() else step)(*tensors.values())
        return hidden, (hidden, cell), readout[0] if readout else None

    def _episode_gate_bias(self, episodes, shared_inputs):
        """(4 * units, episodes): the bias plus each episode's shared-feature contribution, computed once per
        episode and added to all of its coordinates like a bias."""
        bias = self.bias[:, tf.newaxis]
        if self.shared_input_dim:
            # Broadcast, not tiled: in the gradient of a compiled loop a tile's multiples are a runtime value,
            # which XLA refuses as a shape.
            return bias + tf.matmul(self.kernel[: self.shared_input_dim], shared_inputs, transpose_a=True)
        return tf.tile(bias, [1, episodes])

    def get_config(self):
        config = super().get_config()
        config.update(
            {"units": self.units, "input_dim": self.input_dim, "shared_input_dim": self.shared_input_dim}
        )
        return config
