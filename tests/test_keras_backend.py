"""keras-metalstm runs on Keras' TensorFlow backend: a process whose environment names another backend (a JAX
user's shell) gets TensorFlow with a warning, not an import error from deep inside Keras; a process that already
runs Keras on another backend is told how to fix it."""

import subprocess
import sys


def run_python(code, backend):
    env = {"PATH": "/usr/bin:/bin", "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_another_backend_in_the_environment_is_replaced_by_tensorflow_with_a_warning():
    # jax is not installed here: without the replacement, importing Keras would fail on `import jax`.
    result = run_python("import keras_metalstm, keras; print(keras.backend.backend())", "jax")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "tensorflow"
    assert "KERAS_BACKEND=jax is replaced by tensorflow in this process" in result.stderr


def test_keras_already_running_another_backend_is_a_clear_import_error():
    code = (
        "import keras\n"
        "keras.backend.backend = lambda: 'jax'  # as if Keras had been imported with KERAS_BACKEND=jax\n"
        "import keras_metalstm\n"
    )
    result = run_python(code, "tensorflow")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "ImportError: keras-metalstm runs on Keras' TensorFlow backend, but Keras was already imported with the "
        "'jax' backend in this process: import keras_metalstm first, or set KERAS_BACKEND=tensorflow"
    )
