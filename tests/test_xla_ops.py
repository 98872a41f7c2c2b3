"""The CPU forms of the learner's convolutions and max pooling for XLA (keras_metalstm.xla_ops): the same values
and derivatives (first and second order, against TensorFlow's own ops in float64), used by the learner function
only inside `cpu_forms()`, and what they are for: every convolution of the compiled meta-gradient in the forward
form XLA's CPU compiler runs on its fast kernels; and the coordinate LSTM's CPU form (its gate bias inside the
matrix product): the same step and gradients, its gate gradients computed once. A learner op XLA cannot compile
is a LearnerError naming it."""

import contextlib
import functools
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from cli_helpers import make_image_folder
from conftest import as_tensors, graph_op_types, random_episodes

import keras_metalstm as km
from keras_metalstm import xla_ops
from keras_metalstm.config import RunConfig
from keras_metalstm.learner_function import LearnerFunction
from keras_metalstm.learner_spec import LearnerError
from keras_metalstm.training import Callback, train
from keras_metalstm.training_session import XLA_ON_CPU_NOTE

IMAGE_SHAPE = (16, 16, 1)


def values_and_two_derivatives(function, *inputs):
    """The outputs of function(*inputs), the gradient of a scalar of them w.r.t. every input, and the gradient of
    a scalar of that gradient (second derivatives through the backward pass)."""
    with tf.GradientTape(persistent=True) as outer:
        outer.watch(inputs)
        with tf.GradientTape() as inner:
            inner.watch(inputs)
            outputs = tf.nest.flatten(function(*inputs))
            loss = tf.add_n([tf.reduce_sum(tf.sin(output)) for output in outputs])
        first = inner.gradient(loss, inputs)
        second = tf.add_n([tf.reduce_sum(tf.square(gradient) + tf.cos(gradient)) for gradient in first])
    return [*outputs, *first, *outer.gradient(second, inputs)]


def assert_same_values_and_derivatives(ours, reference):
    assert len(ours) == len(reference)
    for index, (expected, actual) in enumerate(zip(reference, ours, strict=True)):
        assert float(tf.norm(expected)) > 0, index
        np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=1e-10, atol=1e-10, err_msg=str(index))


@pytest.mark.parametrize(
    "height, width, kernel_size, padding",
    [
        (6, 5, (3, 3), "SAME"),
        (7, 6, (3, 2), "VALID"),
        (5, 5, (4, 4), "SAME"),  # an even kernel: "same" pads less before than after
        (1, 1, (3, 3), "SAME"),  # the backward convolutions then crop (negative padding)
    ],
)
def test_conv2d_values_and_derivatives_equal_tensorflows(height, width, kernel_size, padding):
    rng = np.random.default_rng(0)
    images = tf.constant(rng.normal(size=(2, height, width, 3)))
    kernel = tf.constant(rng.normal(size=(*kernel_size, 3, 4)))
    pairs = xla_ops.same_padding(kernel_size) if padding == "SAME" else ((0, 0), (0, 0))
    expected = values_and_two_derivatives(lambda x, k: tf.nn.conv2d(x, k, 1, padding), images, kernel)
    actual = values_and_two_derivatives(lambda x, k: xla_ops.conv2d(x, k, pairs), images, kernel)
    assert_same_values_and_derivatives(actual, expected)


def test_conv2d_gradients_are_forward_convolutions():
    images = tf.random.normal((2, 6, 6, 3))
    kernel = tf.random.normal((3, 3, 3, 4))

    @tf.function
    def gradients(images, kernel):
        with tf.GradientTape() as tape:
            tape.watch([images, kernel])
            loss = tf.reduce_sum(xla_ops.conv2d(images, kernel, ((1, 1), (1, 1))))
        return tape.gradient(loss, [images, kernel])

    op_types = {op.type for op in gradients.get_concrete_function(images, kernel).graph.get_operations()}
    assert "Conv2D" in op_types
    assert not op_types & {"Conv2DBackpropInput", "Conv2DBackpropFilter"}


def test_max_pool_values_and_derivatives_equal_tensorflows():
    rng = np.random.default_rng(1)
    images = tf.constant(rng.normal(size=(2, 7, 6, 3)))  # an odd height: the last row is dropped, as "valid"
    assert_same_values_and_derivatives(
        values_and_two_derivatives(lambda images: xla_ops.max_pool(images, (2, 2)), images),
        values_and_two_derivatives(lambda images: tf.nn.max_pool2d(images, 2, 2, "VALID"), images),
    )


def test_max_pool_sends_each_windows_gradient_to_exactly_one_of_its_maxima():
    images = tf.constant(np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [2.0, 2.0, 2.0]])[None, :, :, None])
    upstream = tf.constant(3.0, tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(images)
        pooled = xla_ops.max_pool(images, (2, 2))  # one window, four tied maxima
        loss = upstream * tf.reduce_sum(pooled)
    gradient = tape.gradient(loss, images).numpy()[0, :, :, 0]
    assert float(pooled[0, 0, 0, 0]) == 1.0
    assert sorted(gradient[:2, :2].ravel().tolist()) == [0.0, 0.0, 0.0, 3.0]  # not 0.75 each, as reduce_max's
    assert not gradient[2].any() and not gradient[:, 2].any()  # the dropped row and column


RESIDUAL_IMAGE_SHAPE = (14, 14, 3)


def residual_learner():
    """A residual block (two batch norms summed, LeakyReLU) before max pooling, as in resnet12."""
    keras.utils.set_random_seed(0)
    images = keras.Input(RESIDUAL_IMAGE_SHAPE)
    shortcut = keras.layers.BatchNormalization()(keras.layers.Conv2D(10, 1, use_bias=False)(images))
    features = keras.layers.BatchNormalization()(keras.layers.Conv2D(10, 3, padding="same", use_bias=False)(images))
    features = keras.layers.LeakyReLU(0.1)(keras.layers.Add()([features, shortcut]))
    features = keras.layers.Flatten()(keras.layers.MaxPooling2D(2)(features))
    return keras.Model(images, keras.layers.Dense(5)(features))


def test_a_residual_learners_meta_gradient_compiled_for_xla_equals_the_plain_one_for_two_episodes():
    """With reduce_max's own gradient the max pooling's CPU form lost the gradient here: XLA recomputed the
    pooled values in the backward pass with another rounding, no element equalled its window's maximum, and the
    support gradients before the pooling were wrong (NaN in training)."""
    meta = km.MetaLearner(residual_learner(), inner_steps=1)
    episodes = as_tensors(random_episodes(batch=2, query=3, image_shape=RESIDUAL_IMAGE_SHAPE))
    plain = tf.function(meta.meta_gradients)(episodes)

    def compiled(episodes):
        with xla_ops.traced_for_xla():
            return meta.meta_gradients(episodes)

    compiled = tf.function(compiled, jit_compile=True)(episodes)
    for expected, actual in zip(plain[2], compiled[2], strict=True):
        assert np.all(np.isfinite(actual.numpy()))
        scale = float(tf.reduce_max(tf.abs(expected)))
        np.testing.assert_allclose(actual.numpy(), expected.numpy(), atol=1e-3 * scale)


def test_channel_sum_and_broadcast_channels_equal_tensorflows_and_are_each_others_gradient():
    rng = np.random.default_rng(2)
    tensor, channels = tf.constant(rng.normal(size=(3, 5, 4, 6))), tf.constant(rng.normal(size=(6,)))
    assert_same_values_and_derivatives(
        values_and_two_derivatives(xla_ops.channel_sum, tensor),
        values_and_two_derivatives(lambda values: tf.reduce_sum(values, [0, 1, 2]), tensor),
    )
    assert_same_values_and_derivatives(
        values_and_two_derivatives(lambda values: xla_ops.broadcast_channels(values, tensor.shape), channels),
        values_and_two_derivatives(lambda values: tf.broadcast_to(values, tensor.shape), channels),
    )
    graph = tf.function(lambda values: tf.gradients(xla_ops.channel_sum(values), values)).get_concrete_function(
        tensor
    )
    assert "Sum" not in graph_op_types(graph)  # neither the sum nor its gradient is a reduction


def conv4(input_shape=IMAGE_SHAPE):
    keras.utils.set_random_seed(0)
    return km.learners.conv4(input_shape=input_shape, num_classes=5, filters=4)


def traced_op_types(function, *args):
    return graph_op_types(tf.function(function).get_concrete_function(*args))


def test_the_learner_function_uses_the_cpu_forms_only_inside_their_scope():
    learner = conv4()
    function = LearnerFunction(learner)
    theta = function.initial_theta()
    images = tf.random.normal((10, *IMAGE_SHAPE), seed=2)
    labels = tf.constant([0, 1, 2, 3, 4] * 2)

    def loss_and_gradient(theta):
        loss, gradient, _ = function.loss_and_gradient(theta, function.initial_state(), images, labels)
        return loss, gradient

    stock = traced_op_types(loss_and_gradient, theta)
    with xla_ops.cpu_forms():
        forms = traced_op_types(loss_and_gradient, theta)
        loss, gradient = tf.function(loss_and_gradient)(theta)
    replaced = {"Conv2DBackpropFilter", "MaxPool", "MaxPoolGrad", "FusedBatchNormV3", "FusedBatchNormGradV3"}
    assert replaced <= stock
    assert not forms & (replaced | {"Conv2DBackpropInput"})
    stock_loss, stock_gradient = tf.function(loss_and_gradient)(theta)
    np.testing.assert_allclose(loss.numpy(), stock_loss.numpy(), rtol=1e-6)
    assert float(tf.norm(gradient - stock_gradient)) <= 1e-5 * float(tf.norm(stock_gradient))
    # The layers are the user's again once the call is over.
    assert not any("convolution_op" in vars(layer) or "call" in vars(layer) for layer in learner._flatten_layers())


def test_the_convolution_layers_form_keeps_their_bias_and_activation():
    keras.utils.set_random_seed(5)
    images = keras.Input(IMAGE_SHAPE)
    features = keras.layers.Conv2D(3, 3, activation="relu")(images)
    features = keras.layers.Conv2D(2, 2, padding="same", use_bias=False, activation="tanh")(features)
    function = LearnerFunction(keras.Model(images, keras.layers.Dense(5)(keras.layers.Flatten()(features))))
    theta = function.initial_theta() + tf.random.normal([function.num_parameters], stddev=0.1, seed=6)
    inputs = tf.random.normal((3, *IMAGE_SHAPE), seed=7)

    def logits(theta):
        return function(theta, function.initial_state(), inputs, True)[0]

    stock = logits(theta)
    with xla_ops.cpu_forms():
        assert "Relu" in traced_op_types(logits, theta)
        np.testing.assert_allclose(tf.function(logits)(theta).numpy(), stock.numpy(), rtol=1e-5, atol=1e-6)


def test_layers_the_forms_do_not_cover_keep_keras_call():
    images = keras.Input(IMAGE_SHAPE)
    strided = keras.layers.Conv2D(2, 3, strides=2)(images)
    dilated = keras.layers.Conv2D(2, 3, dilation_rate=2, padding="same")(strided)
    pooled = keras.layers.MaxPooling2D(pool_size=3, strides=2)(dilated)  # overlapping windows
    logits = keras.layers.Dense(5)(keras.layers.Flatten()(pooled))
    function = LearnerFunction(keras.Model(images, logits))
    theta = function.initial_theta()
    with xla_ops.cpu_forms():
        op_types = traced_op_types(
            lambda theta: function(theta, function.initial_state(), tf.zeros((2, *IMAGE_SHAPE)), False)[0], theta
        )
    assert {"Conv2D", "MaxPool"} <= op_types


def test_the_xla_compiled_meta_gradient_has_only_forward_convolutions():
    """XLA's CPU compiler runs a convolution on its fast kernels only in the forward form (dim_labels
    b01f_01io->b01f); TensorFlow's own backward convolutions inside the inner loop stay in other forms and are
    emitted as plain loops, ~100x slower. Checked on the optimised HLO XLA runs, at 28x28 (at 16x16 the last
    layer's 2x2 activations are no larger than its kernel, and XLA swaps such a convolution's operands)."""
    keras.utils.set_random_seed(0)
    meta = km.MetaLearner(km.learners.conv4(input_shape=(28, 28, 1), num_classes=5, filters=4), inner_steps=2)
    episodes = as_tensors(random_episodes(batch=1, query=2, seed=3))
    compiled = meta._compiled(meta.meta_gradients, jit_compile=True)
    hlo = compiled.experimental_get_compiler_ir(episodes)(stage="optimized_hlo")
    labels = re.findall(r"convolution\(.*?dim_labels=([^,\s]+)", hlo)
    assert len(labels) >= 8  # conv4's four convolutions, forward and backward, in the loop and the query pass
    assert set(labels) == {"b01f_01io->b01f"}


def test_traced_for_xla_uses_the_cpu_forms_without_an_accelerator_and_never_the_fused_kernel(monkeypatch):
    from keras_metalstm.ops import fused_kernels

    with fused_kernels.enabled():
        assert fused_kernels.coordinate_step(tf.float32) is not None
        with xla_ops.traced_for_xla():
            assert xla_ops.cpu_forms_active()
            assert fused_kernels.coordinate_step(tf.float32) is None
        monkeypatch.setattr(xla_ops, "accelerator_present", lambda: True)
        with xla_ops.traced_for_xla():
            assert not xla_ops.cpu_forms_active()
            assert fused_kernels.coordinate_step(tf.float32) is None
    assert not xla_ops.cpu_forms_active()


def coordinate_lstm_gradients(layer, inputs, hidden, cell, shared):
    """h, c and the gradient of a scalar of them w.r.t. the inputs, the state and the layer's weights."""
    with tf.GradientTape() as tape:
        tape.watch([inputs, hidden, cell])
        hidden_out, (_, cell_out) = layer(inputs, (hidden, cell), shared_inputs=shared)
        loss = tf.reduce_sum(tf.sin(hidden_out)) + tf.reduce_sum(tf.square(cell_out))
    return [hidden_out, cell_out, *tape.gradient(loss, [inputs, hidden, cell, *layer.trainable_variables])]


def coordinate_lstm_arguments(coordinates, episodes=1, dtype="float32"):
    """A CoordinateLSTM with the meta-learner's shapes (20 units, 2 own and 2 shared features)."""
    keras.utils.set_random_seed(1)
    layer = km.layers.CoordinateLSTM(units=20, input_dim=4, shared_input_dim=2, dtype=dtype)
    shapes = [(2, episodes, coordinates), (20, episodes, coordinates), (20, episodes, coordinates), (2, episodes)]
    return layer, [tf.random.normal(shape, dtype=dtype) for shape in shapes]


@pytest.mark.parametrize("episodes", [1, 3])
def test_the_coordinate_lstms_cpu_form_gives_the_same_step_and_gradients(episodes):
    layer, arguments = coordinate_lstm_arguments(coordinates=300, episodes=episodes, dtype="float64")
    stock = coordinate_lstm_gradients(layer, *arguments)
    with xla_ops.cpu_forms():
        assert_same_values_and_derivatives(coordinate_lstm_gradients(layer, *arguments), stock)


@pytest.mark.parametrize("forms, fusions, episodes", [(False, 2, 1), (True, 1, 1), (True, 1, 4)])
def test_xla_computes_the_coordinate_lstms_gate_gradients_once_in_its_cpu_form(forms, fusions, episodes):
    """With the gate bias added after the product, XLA's CPU compiler fuses the gates' elementwise backward (the
    sigmoid gradients) both into the bias gradient's reduction and into the product's operand: two computations.
    The CPU form's bias rows inside the product leave the product as the only consumer."""
    layer, arguments = coordinate_lstm_arguments(coordinates=500, episodes=episodes)
    compiled = tf.function(functools.partial(coordinate_lstm_gradients, layer), jit_compile=True)
    with xla_ops.cpu_forms() if forms else contextlib.nullcontext():
        hlo = compiled.experimental_get_compiler_ir(*arguments)(stage="optimized_hlo")
    computations = re.split(r"\n(?=\S)", hlo)
    assert sum('op_type="SigmoidGrad"' in computation for computation in computations) == fusions


@pytest.mark.parametrize("forms", [False, True])
def test_the_learners_sums_over_long_axes_compile_without_windowed_reductions(forms):
    """XLA's CPU compiler splits a reduction over an axis longer than 32 (batch-norm moments and bias gradients
    over 40x40 activations here) into a windowed reduction that it emits as plain loops; in the CPU forms every
    such sum is a matrix product."""
    function = LearnerFunction(conv4(input_shape=(40, 40, 1)))
    images, labels = tf.random.normal((10, 40, 40, 1), seed=4), tf.constant([0, 1, 2, 3, 4] * 2)

    def gradient(theta):
        return function.loss_and_gradient(theta, function.initial_state(), images, labels)[1]

    with xla_ops.cpu_forms() if forms else contextlib.nullcontext():
        compiled = tf.function(gradient, jit_compile=True)
        hlo = compiled.experimental_get_compiler_ir(function.initial_theta())(stage="optimized_hlo")
    assert ("reduce-window(" in hlo) is not forms


class Messages(Callback):
    def __init__(self):
        self.texts = []

    def on_message(self, text):
        self.texts.append(text)


def test_a_run_compiled_with_xla_on_a_cpu_says_that_xla_is_slower_there(tmp_path):
    config = RunConfig(
        data_dir=str(make_image_folder(tmp_path / "data")), dataset="folder", n_way=2, k_shot=1, query=2,
        inner_steps=2, hidden_units=4, filters=4, episodes=2, log_every=1, val_episodes=2, validate_every=2,
        checkpoint_every=2, seed=1,
    )
    messages = {}
    for xla in (False, True):
        messages[xla] = Messages()
        assert train(config.replace(xla=xla), tmp_path / f"run_{xla}", callbacks=messages[xla]).status == "finished"
    assert XLA_ON_CPU_NOTE in messages[True].texts
    assert XLA_ON_CPU_NOTE not in messages[False].texts


def test_a_learner_op_xla_cannot_compile_is_named_with_its_layer_and_the_way_out():
    keras.utils.set_random_seed(0)
    images = keras.Input(IMAGE_SHAPE)
    features = keras.layers.RandomTranslation(0.1, 0.1, name="shift")(keras.layers.RandomFlip(name="flip")(images))
    features = keras.layers.Flatten()(keras.layers.Conv2D(4, 3)(features))
    learner = keras.Model(images, keras.layers.Dense(5)(features))
    episodes = as_tensors(random_episodes(query=2, image_shape=IMAGE_SHAPE))
    trainer = km.MetaTrainer(km.MetaLearner(learner, inner_steps=1), jit_compile=True)
    with pytest.raises(LearnerError, match=r"no XLA kernel for ImageProjectiveTransformV3 \(layers: shift\)\..*--xla"):
        trainer.train_step(episodes)
    trainer.meta.compile(jit_compile=True)
    with pytest.raises(LearnerError, match=r"no XLA kernel for ImageProjectiveTransformV3 \(layers: shift\)"):
        trainer.meta.fit(tf.data.Dataset.from_tensors(episodes), verbose=0)
    # Without XLA the same learner trains, and other errors pass through as TensorFlow raised them.
    assert np.isfinite(km.MetaTrainer(trainer.meta).train_step(episodes)["loss"].numpy())
    with pytest.raises(tf.errors.InvalidArgumentError, match="not an XLA refusal"):
        with xla_ops.explaining_uncompilable_ops(learner):
            raise tf.errors.InvalidArgumentError(None, None, "not an XLA refusal")


@pytest.mark.parametrize(
    "version, trusted", [("2.16.2", False), ("2.17.1", False), ("2.18.0rc1", True), ("2.21.0", True), ("3.0.0", True)]
)
def test_xla_before_tensorflow_2_18_is_named_untrusted(version, trusted):
    reason = xla_ops.untrusted_xla_reason(version)
    assert (reason is None) is trusted
    if not trusted:
        assert f"TensorFlow {version}'s XLA" in reason and "2.18" in reason


def test_compiling_the_step_with_an_untrusted_xla_warns_and_the_plain_step_does_not(monkeypatch):
    import warnings

    monkeypatch.setattr(tf, "__version__", "2.17.1")
    meta = km.MetaLearner(conv4(), inner_steps=1)

    def random_episode_dataset():
        return tf.data.Dataset.from_tensors(as_tensors(random_episodes(query=1, image_shape=IMAGE_SHAPE)))

    with pytest.warns(RuntimeWarning, match="TensorFlow 2.17.1's XLA computed a wrong meta-gradient"):
        km.MetaTrainer(meta, jit_compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        km.MetaTrainer(meta, jit_compile=False)
        meta.compile(jit_compile=False)
        meta.fit(random_episode_dataset(), epochs=1, verbose=0)
    meta.compile(jit_compile=True)
    with pytest.warns(RuntimeWarning, match="2.17.1's XLA"):
        meta.fit(random_episode_dataset(), epochs=1, verbose=0)
