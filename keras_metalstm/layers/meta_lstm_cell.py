"""Layer 2 of the meta-learner: the cell whose state is the learner's parameter vector
(the paper's equation 2, its gates as in Section 3.2).

    f_logit_t = [h_t, theta_{t-1}, f_logit_{t-1}] . W_f + b_f
    i_logit_t = [h_t, theta_{t-1}, i_logit_{t-1}] . W_i + b_i
    theta_t   = sigmoid(f_logit_t) * theta_{t-1} - sigmoid(i_logit_t) * grad_t

sigmoid(f) is a learned per-coordinate shrinkage, sigmoid(i) a learned per-coordinate learning rate; with
f = 1 and i = alpha the update is plain gradient descent with step alpha.
"""

import keras
import tensorflow as tf

from keras_metalstm.layers.coordinate_lstm import hidden_readout


@keras.saving.register_keras_serializable(package="keras_metalstm")
class MetaLSTMCell(keras.layers.Layer):
    """The meta-learner cell, weights shared over all learner coordinates.

    Weights: `W_f`, `W_i` of shape (hidden_units + 2, 1) (rows: the hidden units of layer 1, then theta,
    then the previous gate logit) and scalar biases `b_f`, `b_i`. The gate feedback is the PRE-sigmoid
    logit, as in the authors' code, and starts at 0 every episode.

    Initialisation as the authors' code: W ~ U(-0.01, 0.01), b_f ~ U(4, 5), b_i ~ U(-5, -4), so the cell
    starts as gradient descent with a small step (sigmoid(b_f) ~ 0.99, sigmoid(b_i) ~ 0.01). Zero gate
    biases are the classic bug that stops the meta-learner from learning.
    """

    def __init__(self, hidden_units=20, **kwargs):
        super().__init__(**kwargs)
        self.hidden_units = int(hidden_units)
        small = keras.initializers.RandomUniform(-0.01, 0.01)
        self.W_f = self.add_weight(shape=(self.hidden_units + 2, 1), initializer=small, name="W_f")
        self.W_i = self.add_weight(shape=(self.hidden_units + 2, 1), initializer=small, name="W_i")
        self.b_f = self.add_weight(shape=(), initializer=keras.initializers.RandomUniform(4.0, 5.0), name="b_f")
        self.b_i = self.add_weight(
            shape=(), initializer=keras.initializers.RandomUniform(-5.0, -4.0), name="b_i"
        )
        self.built = True

    def hidden_kernel(self):
        """(hidden_units, 2): the weights of h_t in the f and i gates, side by side."""
        units = self.hidden_units
        return tf.concat([self.W_f[:units], self.W_i[:units]], axis=1)

    def call(self, hidden, theta, grad, previous_logits=None, hidden_terms=None):
        """One update of the learner's parameters, for coordinates of any shape S.

        Args:
            hidden: (hidden_units, *S), layer 1's output h_t (features first, see CoordinateLSTM).
            theta: S, theta_{t-1}.
            grad: S, the raw learner gradient at theta_{t-1}.
            previous_logits: (f_logit_{t-1}, i_logit_{t-1}), each of shape S; None is the zero feedback
                every episode starts from.
            hidden_terms: (2, *S), hidden_kernel()^T . hidden if already computed (CoordinateLSTM's
                step_with_readout does it in its fused kernel); None computes it here.

        Returns:
            (theta_t, (f_logit_t, i_logit_t)).
        """
        units = self.hidden_units
        if hidden_terms is None:
            # Both gates read the same hidden state: one (2, H) x (H, coordinates) product serves both.
            hidden_terms = hidden_readout(self.hidden_kernel(), hidden)
        # unstack, not two slices: its gradient is one stack instead of two full-size padded slices.
        f_terms, i_terms = tf.unstack(hidden_terms, num=2)
        f_logit = f_terms + theta * self.W_f[units, 0] + self.b_f
        i_logit = i_terms + theta * self.W_i[units, 0] + self.b_i
        if previous_logits is not None:
            f_previous, i_previous = previous_logits
            f_logit = f_logit + f_previous * self.W_f[units + 1, 0]
            i_logit = i_logit + i_previous * self.W_i[units + 1, 0]
        theta = tf.sigmoid(f_logit) * theta - tf.sigmoid(i_logit) * grad
        return theta, (f_logit, i_logit)

    def get_config(self):
        config = super().get_config()
        config.update({"hidden_units": self.hidden_units})
        return config
