"""The float32 meta-gradient against a float64 one with the same weights and episode, in the paper's 5-shot setting.

The float32 step runs what a user's CPU training runs (the fused coordinate-LSTM kernel, batch normalisation on
TensorFlow's fused ops); the float64 step runs stock ops. They agree to float32 precision for a learner whose
layers are smooth. For conv4 (ReLU and max pooling) they may not, and that is not rounding error growing: a
float32 value that lands on the other side of a kink (a near-tie in a pooling window, a pre-activation near zero)
sends the gradient to another input, a different but equally valid gradient, and the inner loop carries the
difference on (docs/design.md#float32-float64-and-the-kinks-of-relu-and-max-pooling).
"""

import keras
import numpy as np
import tensorflow as tf
from conftest import as_tensors, float64_policy, graph_op_types, needs_kernel_compiler

import keras_metalstm as km
from keras_metalstm.data import episode_dataset, load_dataset
from keras_metalstm.ops import fused_kernels


def smooth_conv4(seed=0):
    """conv4's shape (four 32-filter 3x3 blocks with batch normalisation, 28x28x1, 5 classes) with GELU and
    average pooling in place of ReLU and max pooling: no kinks."""
    keras.utils.set_random_seed(seed)
    images = keras.Input((28, 28, 1))
    features = images
    for block in range(4):
        features = keras.layers.Conv2D(32, 3, padding="same", name=f"conv{block + 1}")(features)
        features = keras.layers.BatchNormalization(name=f"bn{block + 1}")(features)
        features = keras.layers.Activation("gelu")(features)
        features = keras.layers.AveragePooling2D(2)(features)
    logits = keras.layers.Dense(5, name="logits")(keras.layers.Flatten()(features))
    return keras.Model(images, logits)


@needs_kernel_compiler
def test_the_float32_meta_gradient_equals_the_float64_one_for_a_smooth_learner_at_the_paper_5_shot_setting():
    episode = next(iter(episode_dataset(load_dataset("fontglot").test, 5, 5, 15, seed=3, num_episodes=1)))
    meta = km.MetaLearner(smooth_conv4(), inner_steps=8)
    with fused_kernels.enabled():
        meta_gradients = tf.function(meta.meta_gradients)
        op_types = graph_op_types(meta_gradients.get_concrete_function(episode))
        _, _, gradients = meta_gradients(episode)
    assert {"MetaLstmCoordinateStep", "FusedBatchNormV3"} <= op_types
    with float64_policy():
        reference = km.MetaLearner(smooth_conv4(), inner_steps=8)
        reference.set_weights([weight.astype(np.float64) for weight in meta.get_weights()])
        double = as_tensors(episode, float_dtype=tf.float64)
        _, _, expected = tf.function(reference.meta_gradients)(double)
    for variable, ours, exact in zip(meta.trainable_variables, gradients, expected, strict=True):
        error = float(tf.norm(tf.cast(ours, tf.float64) - exact))
        # Measured: at most 2e-4 of the norm (the fused kernel's sigmoid made 1.001x too large: 2.7e-3); conv4, with
        # its kinks, in place of the smooth learner: 0.28.
        assert error <= 1e-3 * float(tf.norm(exact)), variable.path
