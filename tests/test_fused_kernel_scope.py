"""Where the library runs its fused CPU kernel and where it never does.

Its own float32 training and evaluation steps use it (MetaTrainer, fit/evaluate without jit_compile); float64
meta-learners, fit with jit_compile (XLA) and every function a user traces around the meta-learner use stock
TensorFlow ops, so a SavedModel a user writes loads and runs in a process without this library.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import as_tensors, graph_op_types, needs_kernel_compiler, random_episodes

import keras_metalstm as km

# The kernel must be there to be kept out.
pytestmark = needs_kernel_compiler

STEP_OPS = {"MetaLstmCoordinateStep", "MetaLstmNormReluPool", "MetaLstmNormReluPoolGrad"}  # an evaluation's
KERNEL_OPS = STEP_OPS | {"MetaLstmCoordinateStepGrad"}  # a training step's: the meta-gradient too


def make_meta(inner_steps=2):
    keras.utils.set_random_seed(0)
    learner = km.learners.conv4(input_shape=(28, 28, 1), num_classes=5, filters=8)
    return km.MetaLearner(learner, inner_steps=inner_steps)


def kernel_ops_in(concrete_function):
    return graph_op_types(concrete_function) & KERNEL_OPS


def episode_dataset(episodes=4):
    return tf.data.Dataset.from_tensor_slices(random_episodes(batch=episodes)).batch(1, drop_remainder=True).repeat()


@pytest.fixture
def float64_floatx():
    """floatx float64, and the dtype policy with it (the global policy is fixed once a layer was built)."""
    floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        yield
    finally:
        keras.config.set_floatx(floatx)
        keras.config.set_dtype_policy(policy)


def test_the_librarys_own_float32_steps_use_the_kernel():
    """The kernel is opt-in: this is where the library opts in, and what keeps training fast."""
    meta = make_meta()
    episodes = as_tensors(random_episodes())
    trainer = km.MetaTrainer(meta)
    assert kernel_ops_in(trainer._train_function.get_concrete_function(episodes)) == KERNEL_OPS
    assert kernel_ops_in(trainer._evaluate_function.get_concrete_function(episodes)) == STEP_OPS
    meta.compile()  # fit's steps: Keras traces train_step and test_step
    assert kernel_ops_in(tf.function(meta.train_step).get_concrete_function(episodes)) == KERNEL_OPS
    assert kernel_ops_in(tf.function(meta.test_step).get_concrete_function(episodes)) == STEP_OPS


def test_float64_meta_training_runs_on_stock_ops(float64_floatx):
    meta = make_meta()
    assert meta.theta0.dtype == "float64"
    episodes = {
        key: tf.constant(value.astype(np.float64) if value.dtype == np.float32 else value)
        for key, value in random_episodes().items()
    }
    trainer = km.MetaTrainer(meta)
    before = meta.theta0.numpy().copy()
    result = trainer.train_step(episodes)
    assert np.isfinite(float(result["loss"]))
    assert not np.array_equal(meta.theta0.numpy(), before)
    assert np.all(np.isfinite(trainer.evaluate_step(episodes)["loss"].numpy()))
    assert not kernel_ops_in(trainer._train_function.get_concrete_function(episodes))


def test_fit_and_evaluate_with_jit_compile_run_under_xla():
    """Keras compiles train_step/test_step with XLA, which cannot compile the kernel ("tf2xla conversion
    failed" before): those steps must trace stock ops."""
    meta = make_meta()
    meta.compile(jit_compile=True)
    before = [variable.numpy().copy() for variable in meta.trainable_variables]
    history = meta.fit(episode_dataset(), epochs=1, steps_per_epoch=2, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    changed = [not np.array_equal(variable.numpy(), old) for variable, old in zip(meta.trainable_variables, before, strict=True)]
    assert all(changed), [variable.path for variable, moved in zip(meta.trainable_variables, changed, strict=True) if not moved]
    assert np.isfinite(meta.evaluate(episode_dataset(), steps=1, verbose=0, return_dict=True)["loss"])


def test_functions_a_user_traces_hold_stock_ops_only():
    """Even after the library's own steps traced the kernel in this process."""
    meta = make_meta()
    episodes = as_tensors(random_episodes())
    km.MetaTrainer(meta).train_step(episodes)
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(meta.trainable_variables)
    user_functions = {
        "inner_loop": tf.function(lambda support, labels: meta.inner_loop(support, labels)[0]).get_concrete_function(
            episodes["support_images"], episodes["support_labels"]
        ),
        "call": tf.function(lambda batch: meta(batch)).get_concrete_function(episodes),
        "meta_gradients": tf.function(meta.meta_gradients).get_concrete_function(episodes),
        "meta_train_step": tf.function(lambda batch: meta.meta_train_step(batch, optimizer)).get_concrete_function(
            episodes
        ),
    }
    for name, function in user_functions.items():
        assert not kernel_ops_in(function), name


# Runs in a fresh process that never imports keras_metalstm, with the kernel switched off as well: the op is not
# registered there, so a graph holding it would fail to load ("Op type not registered").
LOAD_WITHOUT_THE_LIBRARY = """
import sys
import numpy as np
import tensorflow as tf
from tensorflow.python.framework import op_def_registry

loaded = tf.saved_model.load(sys.argv[1])
data = dict(np.load(sys.argv[2]))
theta = loaded.adapt(data["support_images"], data["support_labels"]).numpy()
print("adapt difference", float(np.abs(theta - data["theta"]).max()))
episodes = {key: data[key] for key in ("support_images", "support_labels", "query_images", "query_labels")}
loss, accuracy = loaded.train_step(episodes)
print("train loss finite", bool(np.isfinite(loss.numpy())))
print("library imported", "keras_metalstm" in sys.modules)
print("op registered", any(op_def_registry.get(name) for name in ("MetaLstmCoordinateStep", "MetaLstmNormReluPool")))
"""


def test_a_users_savedmodel_of_the_inner_loop_and_a_train_step_loads_without_the_library(tmp_path):
    meta = make_meta()
    episodes = random_episodes()
    tensors = as_tensors(episodes)
    km.MetaTrainer(meta).train_step(tensors)  # the library's own step traced with the kernel first
    meta.adapt(episodes["support_images"][0], episodes["support_labels"][0])

    module = tf.Module()
    module.meta = meta
    module.optimizer = keras.optimizers.Adam(1e-3)
    module.optimizer.build(meta.trainable_variables)
    signature = {key: tf.TensorSpec(value.shape, value.dtype) for key, value in episodes.items()}
    module.adapt = tf.function(
        lambda support, labels: meta.inner_loop(support, labels)[0],
        input_signature=[signature["support_images"], signature["support_labels"]],
    )
    module.train_step = tf.function(
        lambda batch: meta.meta_train_step(batch, module.optimizer, clip_norm=0.25), input_signature=[signature]
    )
    theta = module.adapt(tensors["support_images"], tensors["support_labels"]).numpy()
    tf.saved_model.save(module, str(tmp_path / "saved"))
    assert b"MetaLstm" not in (tmp_path / "saved" / "saved_model.pb").read_bytes()
    np.savez(tmp_path / "inputs.npz", theta=theta, **episodes)

    script = tmp_path / "load.py"
    script.write_text(LOAD_WITHOUT_THE_LIBRARY)
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_METALSTM_FUSED_KERNELS="0")
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "saved"), str(tmp_path / "inputs.npz")],
        capture_output=True, text=True, env=environment, cwd=tmp_path, check=False, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train loss finite True" in result.stdout
    assert "library imported False" in result.stdout
    assert "op registered False" in result.stdout
    difference = float(result.stdout.split("adapt difference")[1].split()[0])
    assert difference <= 1e-5
