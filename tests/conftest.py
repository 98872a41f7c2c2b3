"""Shared test fixtures: small random episodes in the episode-batch format the core consumes, a tiny training run
and the small adapted task the export and prediction tests use."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# No test writes decoded images to the user's cache folder; test_image_cache.py turns the cache on in its own.
os.environ["KERAS_METALSTM_CACHE_DIR"] = ""

import contextlib
import shutil

import numpy as np
import pytest

# For tests of the fused kernel: skipped only without a C++ compiler (where one exists the kernel must build, or
# they fail), the compiler the kernel's build uses (CXX, else g++).
NO_KERNEL_COMPILER = shutil.which(os.environ.get("CXX", "g++")) is None
needs_kernel_compiler = pytest.mark.skipif(NO_KERNEL_COMPILER, reason="no C++ compiler: kernels fall back to stock ops")


@contextlib.contextmanager
def float64_policy():
    """Learners and meta-learner built within are float64 (stock ops: the fused kernel and the fused batch
    normalisation are float32): references for finite differences, exact to many digits, and for float32 results."""
    import keras

    from keras_metalstm.ops import fused_kernels

    floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        with fused_kernels.disabled():
            yield
    finally:
        keras.config.set_floatx(floatx)
        keras.config.set_dtype_policy(policy)


def small_conv4_meta(learner=None, inner_steps=3, seed=0, **options):
    """A MetaLearner of `learner` (default: conv4 with 8 filters for 28x28x1 5-way episodes), made after seeding."""
    import keras

    import keras_metalstm as km

    keras.utils.set_random_seed(seed)
    learner = learner or km.learners.conv4(input_shape=(28, 28, 1), num_classes=5, filters=8)
    return km.MetaLearner(learner, inner_steps=inner_steps, **options)


def twin(meta, **overrides):
    """A second MetaLearner with the same configuration (plus overrides) and the same weights."""
    import keras_metalstm as km

    copy = km.MetaLearner.from_config({**meta.get_config(), **overrides})
    copy.set_weights(meta.get_weights())
    return copy


def random_episodes(batch=1, n_way=5, k_shot=1, query=3, image_shape=(28, 28, 1), seed=0):
    """A batch of episodes with random images and class-major labels, as float32/int32 NumPy arrays."""
    rng = np.random.default_rng(seed)
    return {
        "support_images": rng.random((batch, n_way * k_shot, *image_shape), dtype=np.float32),
        "support_labels": np.tile(np.repeat(np.arange(n_way), k_shot), (batch, 1)).astype(np.int32),
        "query_images": rng.random((batch, n_way * query, *image_shape), dtype=np.float32),
        "query_labels": np.tile(np.repeat(np.arange(n_way), query), (batch, 1)).astype(np.int32),
    }


def as_tensors(episodes, float_dtype=None):
    """The same episode batch (NumPy arrays or tensors) as TensorFlow tensors, the images in `float_dtype` if given."""
    import tensorflow as tf

    tensors = {key: tf.convert_to_tensor(value) for key, value in episodes.items()}
    return {
        key: tf.cast(tensor, float_dtype) if float_dtype and tensor.dtype.is_floating else tensor
        for key, tensor in tensors.items()
    }


def graph_def_nodes(graph_def):
    """Every node of a GraphDef and of the functions in its library (loop bodies, gradients)."""
    return list(graph_def.node) + [node for function in graph_def.library.function for node in function.node_def]


def graph_nodes(concrete_function):
    """Every node of a traced function and of the functions it calls (loop bodies, gradients)."""
    return graph_def_nodes(concrete_function.graph.as_graph_def())


def parallel_iterations_of_loops(concrete_function):
    """parallel_iterations of every While op in a traced function and the functions it calls."""
    return [
        node.attr["parallel_iterations"].i
        for node in graph_nodes(concrete_function)
        if node.op in ("While", "StatelessWhile")
    ]


def graph_op_types(concrete_function):
    """The op types of a traced function's graph and of the functions it calls (loop bodies, gradients)."""
    types = {op.type for op in concrete_function.graph.get_operations()}
    for function in concrete_function.graph._functions.values():
        types |= {node.op for node in function.definition.node_def}
    return types


@pytest.fixture
def episodes_factory():
    return random_episodes


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A tiny generated image folder (12 classes of 5 images), one per test module."""
    from cli_helpers import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("data") / "folder")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """(run directory, output) of a tiny `metalstm train` run of 8 episodes on `data_dir`, one per test module."""
    from cli_helpers import run_cli, train_args

    run_dir = tmp_path_factory.mktemp("runs") / "run"
    result = run_cli(train_args(data_dir, run_dir, "--episodes", "8", "--checkpoint-every", "4",
                                "--validate-every", "4"))
    assert result.exit_code == 0, result.output
    return run_dir, result.output


# The adapt/export/predict tests' task (tests/export_helpers.py), built once per test module that uses it.
@pytest.fixture(scope="module")
def meta():
    from export_helpers import make_meta

    return make_meta()


@pytest.fixture(scope="module")
def support_dir(tmp_path_factory):
    from export_helpers import write_support

    return write_support(tmp_path_factory.mktemp("support"))


@pytest.fixture(scope="module")
def adapted(meta, support_dir):
    """`meta` adapted to `support_dir`: an AdaptedLearner of the five classes."""
    from keras_metalstm import export

    return export.adapt_folder(meta, support_dir)


@pytest.fixture(scope="module")
def queries():
    from export_helpers import SHAPE

    return np.random.default_rng(7).random((64, *SHAPE), dtype=np.float32)


@pytest.fixture(scope="module")
def exported(adapted, tmp_path_factory):
    """`adapted` exported as SavedModel and ONNX (an ExportResult)."""
    from keras_metalstm import export

    return export.export_adapted(adapted, tmp_path_factory.mktemp("models") / "task", format="both")


@pytest.fixture(scope="module")
def encoded_files(tmp_path_factory):
    from export_helpers import write_encoded_files

    return write_encoded_files(tmp_path_factory.mktemp("encoded"))
