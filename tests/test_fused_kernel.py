"""The fused CPU kernel of the coordinate-wise LSTM step against NumPy and against the stock TensorFlow ops
(themselves checked against Keras' LSTMCell in test_layers.py), the accuracy of its activations, results that do
not depend on the number of threads, its fallbacks, and that it never leaks into XLA or exported SavedModels.
Where the library uses it and where it never does: test_fused_kernel_scope.py."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import graph_op_types, needs_kernel_compiler

import keras_metalstm as km
from keras_metalstm.ops import fused_kernels

pytestmark = needs_kernel_compiler

UNITS = 20
REPOSITORY = Path(__file__).resolve().parents[1]


def numpy_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def numpy_step(inputs, hidden, cell, input_kernel, recurrent_kernel, gate_bias, readout_kernel):
    """One coordinate-wise LSTM step per (episode, coordinate), written out with NumPy in float64."""
    _, episodes, coordinates = inputs.shape
    new_hidden, new_cell = np.zeros(hidden.shape), np.zeros(cell.shape)
    for episode in range(episodes):
        for coordinate in range(coordinates):
            stacked = np.concatenate([inputs[:, episode, coordinate], hidden[:, episode, coordinate]])
            gates = stacked @ np.concatenate([input_kernel, recurrent_kernel]) + gate_bias[:, episode]
            i, f, g, o = np.split(gates, 4)
            c = numpy_sigmoid(f) * cell[:, episode, coordinate] + numpy_sigmoid(i) * np.tanh(g)
            new_cell[:, episode, coordinate] = c
            new_hidden[:, episode, coordinate] = numpy_sigmoid(o) * np.tanh(c)
    readout = np.einsum("ur,uec->rec", readout_kernel, new_hidden)
    return new_hidden, new_cell, readout


def random_step_inputs(rng, episodes, coordinates, readouts=2, features=2):
    def normal(*shape, scale=1.0):
        return tf.constant(rng.normal(size=shape, scale=scale), tf.float32)

    return [
        normal(features, episodes, coordinates, scale=2.0),  # inputs (preprocessed gradients: [-1, 1] and beyond)
        normal(UNITS, episodes, coordinates, scale=0.5),  # hidden
        normal(UNITS, episodes, coordinates),  # cell
        normal(features, 4 * UNITS, scale=0.5),  # input_kernel
        normal(UNITS, 4 * UNITS, scale=0.3),  # recurrent_kernel
        normal(4 * UNITS, episodes),  # gate_bias
        normal(UNITS, readouts),  # readout_kernel
    ]


def stock_step(inputs, hidden, cell, input_kernel, recurrent_kernel, gate_bias, readout_kernel):
    """The same step written with stock TensorFlow ops, differentiated by TensorFlow."""
    stacked = tf.reshape(tf.concat([inputs, hidden], axis=0), [inputs.shape[0] + UNITS, -1])
    gates = tf.matmul(tf.concat([input_kernel, recurrent_kernel], axis=0), stacked, transpose_a=True)
    gates = tf.reshape(gates, [4 * UNITS, *inputs.shape[1:]]) + gate_bias[:, :, tf.newaxis]
    i, f, g, o = tf.split(gates, 4)
    new_cell = tf.sigmoid(f) * cell + tf.sigmoid(i) * tf.tanh(g)
    new_hidden = tf.sigmoid(o) * tf.tanh(new_cell)
    return new_hidden, new_cell, tf.einsum("ur,uec->rec", readout_kernel, new_hidden)


@pytest.mark.parametrize("episodes, coordinates", [(1, 128), (2, 1001), (3, 5)])
def test_fused_step_matches_numpy(episodes, coordinates):
    """Coordinates that are not a multiple of the kernel's block (128 with AVX-512, else 64) included."""
    arguments = random_step_inputs(np.random.default_rng(coordinates), episodes, coordinates)
    step = fused_kernels.load().meta_lstm_coordinate_step
    outputs = step(*arguments)
    expected = numpy_step(*[argument.numpy().astype(np.float64) for argument in arguments])
    for output, reference in zip(outputs, expected, strict=True):
        np.testing.assert_allclose(output.numpy(), reference, rtol=1e-5, atol=2e-6)


# 3 features: the kernel is not tied to the meta-learner's input features (2 per coordinate).
@pytest.mark.parametrize("readouts, features", [(2, 2), (0, 2), (2, 3)])
def test_fused_step_gradients_match_stock_ops(readouts, features):
    rng = np.random.default_rng(7)
    arguments = random_step_inputs(rng, episodes=2, coordinates=333, readouts=readouts, features=features)
    output_weights = [
        tf.constant(rng.normal(size=shape), tf.float32) for shape in [(UNITS, 2, 333), (UNITS, 2, 333), (readouts, 2, 333)]
    ]
    step = fused_kernels.load().meta_lstm_coordinate_step

    def gradients(function):
        with tf.GradientTape() as tape:
            tape.watch(arguments)
            outputs = function(*arguments)
            objective = tf.add_n([tf.reduce_sum(o * w) for o, w in zip(outputs, output_weights, strict=True)])
        return tape.gradient(objective, arguments)

    for fused, stock in zip(gradients(step), gradients(stock_step), strict=True):
        scale = np.abs(stock.numpy()).max(initial=0.0) + 1e-12
        np.testing.assert_allclose(fused.numpy() / scale, stock.numpy() / scale, atol=2e-6)


def test_fused_step_gradients_match_finite_differences():
    """An independent check of the backward kernel on the recurrent kernel, in float64 arithmetic."""
    rng = np.random.default_rng(3)
    arguments = random_step_inputs(rng, episodes=1, coordinates=70)
    step = fused_kernels.load().meta_lstm_coordinate_step
    weights = rng.normal(size=(UNITS, 1, 70))

    with tf.GradientTape() as tape:
        tape.watch(arguments[4])
        objective = tf.reduce_sum(step(*arguments)[0] * weights)
    gradient = tape.gradient(objective, arguments[4]).numpy()

    as_float64 = [argument.numpy().astype(np.float64) for argument in arguments]
    for row, column in [(0, 0), (3, 25), (19, 79), (7, 50)]:
        delta = 1e-5
        plus, minus = [array.copy() for array in as_float64], [array.copy() for array in as_float64]
        plus[4][row, column] += delta
        minus[4][row, column] -= delta
        numeric = (np.sum(numpy_step(*plus)[0] * weights) - np.sum(numpy_step(*minus)[0] * weights)) / (2 * delta)
        assert gradient[row, column] == pytest.approx(numeric, rel=1e-3, abs=1e-4)


def test_activations_keep_a_small_relative_error_at_every_magnitude():
    """Every gate's pre-activation is x (one input feature, unit weights, zero state), so the new cell is
    sigmoid(x) * tanh(x) and the new hidden sigmoid(x) * tanh(cell): compared with float64 NumPy at magnitudes
    from 1e-8 to 10. The former tanh, 2 / (1 + e^-2x) - 1, was off by 9% at 1e-6 and by 100% below 1e-7."""
    magnitudes = np.concatenate([np.geomspace(1e-8, 1e-3, 400), np.geomspace(1e-3, 10, 400)])
    x = np.concatenate([magnitudes, -magnitudes]).astype(np.float32)
    coordinates = x.size
    new_hidden, new_cell, _ = fused_kernels.load().meta_lstm_coordinate_step(
        tf.constant(x[np.newaxis, np.newaxis]),
        tf.zeros((UNITS, 1, coordinates)),
        tf.zeros((UNITS, 1, coordinates)),
        tf.ones((1, 4 * UNITS)),
        tf.zeros((UNITS, 4 * UNITS)),
        tf.zeros((4 * UNITS, 1)),
        tf.zeros((UNITS, 0)),
    )
    new_hidden, new_cell = new_hidden.numpy()[:, 0], new_cell.numpy()[:, 0]
    sigmoid = numpy_sigmoid(x.astype(np.float64))
    expected_cell = np.broadcast_to(sigmoid * np.tanh(x.astype(np.float64)), new_cell.shape)
    np.testing.assert_allclose(new_cell, expected_cell, rtol=1e-6, atol=0)
    np.testing.assert_allclose(new_hidden, sigmoid * np.tanh(new_cell.astype(np.float64)), rtol=1e-6, atol=0)


# One step and its gradient with the kernel on a problem cut into many shards (2 x 40,000 coordinates), saved
# for comparison with another thread count. The thread count is process-wide, fixed before the first op.
THREAD_COUNT_SCRIPT = """
import sys
import tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(int(sys.argv[1]))
import numpy as np
from keras_metalstm.ops import fused_kernels

rng = np.random.default_rng(0)
units, features, episodes, coordinates, readouts = 20, 2, 2, 40000, 2
shapes = [(features, episodes, coordinates), (units, episodes, coordinates), (units, episodes, coordinates),
          (features, 4 * units), (units, 4 * units), (4 * units, episodes), (units, readouts)]
arguments = [tf.constant(rng.normal(size=shape, scale=0.5), tf.float32) for shape in shapes]
step = fused_kernels.load().meta_lstm_coordinate_step
with tf.GradientTape() as tape:
    tape.watch(arguments)
    outputs = step(*arguments)
    objective = tf.add_n([tf.reduce_sum(output * rng.normal(size=output.shape)) for output in outputs])
gradients = tape.gradient(objective, arguments)
np.savez(sys.argv[2], *[tensor.numpy() for tensor in [*outputs, *gradients]])
"""


def arrays_with_one_and_two_threads(script, tmp_path):
    """The arrays `script` saves (to the file named by its second argument) with 1 and with 2 intra-op threads
    (its first argument), each run in its own process."""
    results = []
    for threads in (1, 2):
        output = tmp_path / f"threads{threads}.npz"
        run = run_python(script, tmp_path, own_cache=False, arguments=(threads, output))
        assert run.returncode == 0, run.stderr[-3000:]
        with np.load(output) as arrays:
            results.append([arrays[f"arr_{index}"] for index in range(len(arrays.files))])
    return results


def assert_bitwise_equal(one_thread, two_threads):
    for index, (first, second) in enumerate(zip(one_thread, two_threads, strict=True)):
        assert np.array_equal(first, second), f"array {index} differs between 1 and 2 threads"


def test_results_are_bitwise_the_same_with_one_and_two_threads(tmp_path):
    """The kernel and bias gradients are sums over coordinates; they were summed in 4 x threads shards, so
    one and two threads differed in the last bits and a resumed run was exact only at the same thread count."""
    one_thread, two_threads = arrays_with_one_and_two_threads(THREAD_COUNT_SCRIPT, tmp_path)
    assert len(one_thread) == 3 + 7  # outputs, then the gradient of every input
    assert_bitwise_equal(one_thread, two_threads)


def test_fused_kernel_rejects_mismatched_shapes_with_a_message():
    arguments = random_step_inputs(np.random.default_rng(0), episodes=1, coordinates=10)
    arguments[4] = tf.zeros((UNITS, 4 * UNITS + 1))
    with pytest.raises(tf.errors.InvalidArgumentError, match="kernel shapes do not match"):
        fused_kernels.load().meta_lstm_coordinate_step(*arguments)


def small_meta_learner():
    keras.utils.set_random_seed(0)
    learner = km.learners.conv4(input_shape=(28, 28, 1), num_classes=5, filters=8)
    meta = km.MetaLearner(learner, inner_steps=3)
    rng = np.random.default_rng(0)
    episodes = {
        "support_images": tf.constant(rng.random((2, 5, 28, 28, 1)), tf.float32),
        "support_labels": tf.constant(np.tile(np.arange(5), (2, 1)), tf.int32),
        "query_images": tf.constant(rng.random((2, 15, 28, 28, 1)), tf.float32),
        "query_labels": tf.constant(np.tile(np.repeat(np.arange(5), 3), (2, 1)), tf.int32),
    }
    return meta, episodes


@pytest.mark.parametrize("first_order", [True, False])
def test_meta_gradients_are_the_same_with_and_without_the_fused_kernel(first_order):
    meta, episodes = small_meta_learner()
    meta.first_order = first_order
    with fused_kernels.enabled():
        fused_function = tf.function(meta.meta_gradients)
        assert "MetaLstmCoordinateStep" in graph_op_types(fused_function.get_concrete_function(episodes))
        fused_loss, _, fused_gradients = fused_function(episodes)
    stock_loss, _, stock_gradients = tf.function(meta.meta_gradients)(episodes)
    assert float(fused_loss) == pytest.approx(float(stock_loss), rel=1e-5)
    for variable, fused, stock in zip(meta.trainable_variables, fused_gradients, stock_gradients, strict=True):
        difference = np.linalg.norm(fused.numpy() - stock.numpy())
        assert difference <= 1e-4 * np.linalg.norm(stock.numpy()) + 1e-9, variable.path


def test_the_fused_kernel_is_used_on_cpu_but_not_under_xla_even_when_enabled():
    meta, episodes = small_meta_learner()
    with fused_kernels.enabled():
        plain = tf.function(meta.meta_gradients).get_concrete_function(episodes)
        compiled = meta._compiled(meta.meta_gradients, jit_compile=True).get_concrete_function(episodes)
    assert {"MetaLstmCoordinateStep", "MetaLstmNormReluPool"} <= graph_op_types(plain)
    assert not [op_type for op_type in graph_op_types(compiled) if op_type.startswith("MetaLstm")]


def test_exported_adapt_in_serving_savedmodel_has_no_custom_op(tmp_path):
    from keras_metalstm.export.savedmodel import AdaptInServingModule, write_savedmodel

    meta, episodes = small_meta_learner()
    with fused_kernels.enabled():  # even where a caller enables them, adapt computes what the SavedModel does
        meta.adapt(episodes["support_images"][0], episodes["support_labels"][0])
    adapt = meta._for_any_support_size(
        meta._adapt_one, episodes["support_images"].shape[2:], meta.inner_steps
    ).get_concrete_function()
    assert not [op_type for op_type in graph_op_types(adapt) if op_type.startswith("MetaLstm")]
    module = AdaptInServingModule(meta)
    serving_op_types = graph_op_types(module.adapt_and_predict.get_concrete_function())
    assert not [op_type for op_type in serving_op_types if op_type.startswith("MetaLstm")]
    write_savedmodel(module, tmp_path / "meta", {"kind": "meta_learner"})
    saved = b"".join(path.read_bytes() for path in (tmp_path / "meta").rglob("*.pb"))
    assert b"MetaLstm" not in saved


def run_python(code, tmp_path, own_cache=True, arguments=(), **environment):
    """Runs `code` as a script file (AutoGraph needs the source of the functions it converts), importing
    keras_metalstm from this checkout."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **environment)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))
    if own_cache:
        env["KERAS_METALSTM_CACHE"] = str(tmp_path / "cache")
    script = tmp_path / "script.py"
    script.write_text(code)
    return subprocess.run(
        [sys.executable, str(script), *map(str, arguments)],
        capture_output=True, text=True, env=env, check=False, timeout=300,
    )


FIRST_USE_IN_A_TF_FUNCTION = """
import tensorflow as tf, keras_metalstm as km
from keras_metalstm.ops import fused_kernels
layer = km.CoordinateLSTM(4, input_dim=4, shared_input_dim=2)

@tf.function  # AutoGraph converts what the loop body calls, as in MetaLearner.inner_loop
def gradient_norm():
    with fused_kernels.enabled(), tf.GradientTape() as tape:
        state = None
        for _ in range(2):
            hidden, state, _ = layer.step_with_readout(tf.ones((2, 1, 10)), state, shared_inputs=tf.ones((2, 1)))
        loss = tf.reduce_sum(hidden)
    return tf.linalg.global_norm(tape.gradient(loss, layer.trainable_variables))

types = {op.type for op in gradient_norm.get_concrete_function().graph.get_operations()}
print("norm", float(gradient_norm()) > 0, "fused", "MetaLstmCoordinateStep" in types)
"""


def test_the_kernel_first_used_inside_a_tf_function_is_differentiable(tmp_path):
    """A fresh process whose first use of the kernel is inside a tf.function (AutoGraph once broke this)."""
    result = run_python(FIRST_USE_IN_A_TF_FUNCTION, tmp_path, own_cache=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "norm True fused True" in result.stdout


FALLBACK_SCRIPT = """
import numpy as np, tensorflow as tf, keras_metalstm as km
from keras_metalstm.ops import fused_kernels
layer = km.CoordinateLSTM(4, input_dim=2)
hidden, _ = layer(tf.ones((2, 1, 10)))
print("fused", fused_kernels.load() is not None, "hidden", hidden.shape)
"""


def test_without_a_compiler_the_layer_warns_once_and_uses_stock_ops(tmp_path):
    result = run_python(FALLBACK_SCRIPT, tmp_path, CXX="no-such-compiler-here")
    assert result.returncode == 0, result.stderr
    assert "fused False hidden (4, 1, 10)" in result.stdout
    assert result.stderr.count("fused CPU kernels are unavailable") == 1
    assert "no C++ compiler 'no-such-compiler-here' found" in result.stderr


def test_the_environment_switch_turns_the_kernel_off_silently(tmp_path):
    result = run_python(FALLBACK_SCRIPT, tmp_path, KERAS_METALSTM_FUSED_KERNELS="0")
    assert result.returncode == 0, result.stderr
    assert "fused False" in result.stdout
    assert "unavailable" not in result.stderr


def test_a_failed_build_raises_a_clear_error_and_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_METALSTM_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="compiling coordinate_lstm_kernel.cc and norm_relu_pool_kernel.cc failed"):
        fused_kernels.build(compiler="false")  # exists, always fails
    assert list(tmp_path.iterdir()) == []


def test_the_kernel_builds_and_loads_with_this_machines_compiler():
    assert fused_kernels.load() is not None


# Rejects one flag, as a compiler too old for -mno-avx512fp16 does; otherwise writes its command line as the
# "library".
COMPILER_REJECTING_A_FLAG = """#!/bin/sh
arguments="$*"
for argument in "$@"; do
  if [ "$argument" = "{flag}" ]; then echo "unrecognized command-line option '{flag}'" >&2; exit 1; fi
done
while [ "$1" != "-o" ]; do shift; done
echo "$arguments" > "$2"
"""


@pytest.mark.parametrize("rejected_flag", ["-mno-avx512fp16", "-march=native"])
def test_the_build_falls_back_to_architecture_flags_the_compiler_accepts(tmp_path, monkeypatch, rejected_flag):
    monkeypatch.setenv("KERAS_METALSTM_CACHE", str(tmp_path / "cache"))
    compiler = tmp_path / "old-c++"
    compiler.write_text(COMPILER_REJECTING_A_FLAG.format(flag=rejected_flag))
    compiler.chmod(0o755)
    built = fused_kernels.build(compiler=str(compiler))
    assert built.exists()
    command = built.read_text().split()
    assert rejected_flag not in command
    assert all(str(source) in command for source in fused_kernels.SOURCES)
    assert [path.name for path in built.parent.iterdir()] == [built.name]  # no partial file left


def test_a_first_build_says_what_it_compiles_and_where_and_a_cached_one_says_nothing(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("KERAS_METALSTM_CACHE", str(tmp_path / "cache"))
    compiler = tmp_path / "c++"
    compiler.write_text(COMPILER_REJECTING_A_FLAG.format(flag="--no-such-flag"))
    compiler.chmod(0o755)
    with caplog.at_level(logging.INFO, logger="keras_metalstm"):
        built = fused_kernels.build(compiler=str(compiler))
        first = [record.getMessage() for record in caplog.records]
        caplog.clear()
        assert fused_kernels.build(compiler=str(compiler)) == built
    assert len(first) == 2
    assert first[0].startswith("compiling the fused CPU kernels") and str(built.parent) in first[0]
    assert first[1].startswith("compiled the fused CPU kernels in") and first[1].endswith(str(built))
    assert caplog.records == []  # the second call found the build in the cache


def test_the_build_is_cached_by_source_tensorflow_and_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_METALSTM_CACHE", str(tmp_path))
    path = fused_kernels.library_path("g++")
    assert path.parent == tmp_path
    assert path != fused_kernels.library_path("clang++")
