"""The fused CPU kernels: building them, loading them, and where they are used.

Two kernels, each computing what a chain of stock TensorFlow ops computes, in fewer passes over memory:
- coordinate_lstm_kernel.cc: one step of the coordinate-wise LSTM, forward and backward, carrying a block of
  coordinates through the whole step while it sits in the cache (the same step as CoordinateLSTM's stock ops);
- norm_relu_pool_kernel.cc: a learner's training-mode batch normalisation, ReLU and 2x2 max pooling, forward and
  backward (`keras_metalstm.fused_batch_norm.batch_normalization_relu_max_pool_training`), where TensorFlow's
  oneDNN ops take about a dozen passes over the full-size activations.
They are compiled on first use against the installed TensorFlow with the machine's C++ compiler, into one
library, and cached (the sources, TensorFlow version and flags name the file), so nothing is compiled at install
time. Their results do not depend on the number of threads (the work is split by the problem's size alone), but
on the build's vector width (`arithmetic()`, which a training run records), and the LSTM kernel's activations keep
a small relative error down to tiny pre-activations.

The kernels are opt-in: a function traced within `enabled()` uses them, every other traces stock ops. The library
enters `enabled()` only in its own training and evaluation steps (`MetaTrainer`, `MetaLearner.train_step` and
`test_step` under `fit`/`evaluate` without `jit_compile`) and its own cache of `MetaLearner.adapt`, functions
that are never saved. So a tf.function a user writes around the meta-learner (`meta(...)`, `inner_loop`,
`meta_gradients`, `meta_train_step`), and every SavedModel or ONNX export, holds stock ops only and loads
where this library is absent (TensorFlow Serving). Even within `enabled()`, stock ops run for float64 and
other non-float32 inputs, within `disabled()` (MetaTrainer's XLA-compiled part, and the support passes of a
second-order meta-gradient, which differentiates their backward pass), on GPU/TPU machines, with
KERAS_METALSTM_FUSED_KERNELS=0, and when no compiler is available; they are the reference the kernels are
tested against.
"""

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path

import tensorflow as tf

SOURCES = tuple(Path(__file__).with_name(name) for name in ("coordinate_lstm_kernel.cc", "norm_relu_pool_kernel.cc"))
ENVIRONMENT_SWITCH = "KERAS_METALSTM_FUSED_KERNELS"
CACHE_ENVIRONMENT = "KERAS_METALSTM_CACHE"
COMPILER_ENVIRONMENT = "CXX"
OPTIMISATION_FLAGS = ["-O3", "-fPIC", "-shared", "-w"]
# Tried in order, the first that compiles wins. -march=native: the library is built on, and cached for, the
# machine that runs it. -mno-avx512fp16: with AVX512-FP16 enabled (Sapphire Rapids and later), the Eigen headers
# TensorFlow ships do not compile with GCC 12; a compiler too old to know the flag moves on to the next choice.
ARCHITECTURE_FLAG_CHOICES = (["-march=native", "-mno-avx512fp16"], ["-march=native"], [])

# What a first build tells (INFO; `metalstm` shows it): it runs inside the first step's tracing and takes
# 20-30 s on 2 cores, which would otherwise look like a hung first step.
logger = logging.getLogger(__name__)

_lock = threading.Lock()
_library = None
_load_attempted = False
_state = threading.local()


def cache_directory():
    """Where compiled kernels are kept: $KERAS_METALSTM_CACHE, else $XDG_CACHE_HOME (or ~/.cache)/keras_metalstm."""
    if os.environ.get(CACHE_ENVIRONMENT):
        return Path(os.environ[CACHE_ENVIRONMENT])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "keras_metalstm"


def _build_command(compiler, output, architecture_flags):
    return [
        compiler,
        *OPTIMISATION_FLAGS,
        *architecture_flags,
        *tf.sysconfig.get_compile_flags(),
        *(str(source) for source in SOURCES),
        "-o",
        str(output),
        *tf.sysconfig.get_link_flags(),
    ]


def _cpu_identity():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith(("flags", "model name"))), "")
    except OSError:
        return platform.processor()


def _compiler(compiler=None):
    return compiler or os.environ.get(COMPILER_ENVIRONMENT, "g++")


def library_path(compiler=None):
    """The cached library's path for these sources, TensorFlow version, compiler and flags."""
    compiler = _compiler(compiler)
    key = hashlib.sha256()
    for source in SOURCES:
        key.update(source.read_bytes())
    for architecture_flags in ARCHITECTURE_FLAG_CHOICES:
        key.update(" ".join(_build_command(compiler, "out", architecture_flags)).encode())
    key.update(tf.__version__.encode())
    # -march=native code may not run on another CPU sharing this cache (a network home directory).
    key.update(_cpu_identity().encode())
    return cache_directory() / f"fused_kernels-{key.hexdigest()[:16]}.so"


def build(compiler=None):
    """Compiles the kernels into the cache (if they are not there yet) and returns the library's path.

    Raises:
        RuntimeError: no compiler, or the compilation failed; the message says which and how to proceed.
    """
    compiler = _compiler(compiler)
    target = library_path(compiler)
    if target.exists():
        return target
    if shutil.which(compiler) is None:
        raise RuntimeError(
            f"no C++ compiler {compiler!r} found (set {COMPILER_ENVIRONMENT} to one, e.g. g++)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info(
        "compiling the fused CPU kernels for this machine and TensorFlow %s with %s (once, about half a minute; "
        "kept in %s) ...",
        tf.__version__,
        compiler,
        target.parent,
    )
    start = time.perf_counter()
    # Compile to a temporary name and rename: a concurrent or interrupted build never leaves a broken file.
    handle, partial = tempfile.mkstemp(suffix=".so.partial", dir=target.parent)
    os.close(handle)
    try:
        first_errors = None  # reported if all fail: the build as intended, before any fallback
        for architecture_flags in ARCHITECTURE_FLAG_CHOICES:
            command = _build_command(compiler, partial, architecture_flags)
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode == 0:
                os.replace(partial, target)
                logger.info("compiled the fused CPU kernels in %.0f s: %s", time.perf_counter() - start, target)
                return target
            first_errors = result.stderr if first_errors is None else first_errors
        names = " and ".join(source.name for source in SOURCES)
        raise RuntimeError(f"compiling {names} failed:\n{first_errors[-2000:]}")
    finally:
        if os.path.exists(partial):
            os.remove(partial)


# Not converted by AutoGraph when called from a tf.function: converted, its module-level state would not be
# updated (the library loaded once, then seen as missing).
@tf.autograph.experimental.do_not_convert
def load():
    """The loaded kernels' library, or None where it cannot be used (see the module docstring).

    The first call may compile the kernels (20-30 s on 2 cores, logged at INFO level); a failure is reported once
    as a warning.
    """
    global _library, _load_attempted
    with _lock:
        if _load_attempted:
            return _library
        _load_attempted = True
        if os.environ.get(ENVIRONMENT_SWITCH, "1") == "0":
            return None
        if tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"):
            return None
        try:
            _library = tf.load_op_library(str(build()))
        except (RuntimeError, OSError, tf.errors.NotFoundError) as error:
            warnings.warn(
                f"keras_metalstm: the fused CPU kernels are unavailable ({error}); using stock TensorFlow ops, "
                f"which give the same results more slowly. Set {ENVIRONMENT_SWITCH}=0 to silence this.",
                RuntimeWarning,
                stacklevel=2,
            )
            _library = None
        return _library


def arithmetic():
    """How the kernels round where this process uses them ("8 lanes, FMA": the coordinate step's vector width, which
    orders its sums, and whether multiply-adds are fused), or None where it does not (see `load`). Call eagerly."""
    library = load()
    return None if library is None else library.meta_lstm_kernel_arithmetic().numpy().decode()


def enabled():
    """Within this context, in this thread, functions traced use the kernels where they can run (float32, CPU).

    For the library's own step functions only, which are never saved: a graph traced here holds a custom op
    that loads only where this library is installed. Thread-local because MirroredStrategy traces each
    replica in its own thread: a step function enters it inside the replica function it runs.
    """
    return _thread_flag("enabled")


def disabled():
    """Within this context, in this thread, functions traced use stock TensorFlow ops, even within `enabled()`:
    for XLA, which cannot compile a custom op, for a pass whose backward pass is differentiated again (the kernels'
    backward ops have no gradient of their own), and for comparing the two. (Thread-local, as `enabled()`.)"""
    return _thread_flag("disabled")


@contextlib.contextmanager
def _thread_flag(name):
    previous = getattr(_state, name, False)
    setattr(_state, name, True)
    try:
        yield
    finally:
        setattr(_state, name, previous)


def _library_for(dtype):
    """The loaded library where a function being traced may use it for inputs of `dtype`, else None."""
    if tf.as_dtype(dtype) != tf.float32:  # the kernels are float32 only
        return None
    if not getattr(_state, "enabled", False) or getattr(_state, "disabled", False):
        return None
    return load()


@tf.autograph.experimental.do_not_convert
def coordinate_step(dtype):
    """The fused step op for inputs of `dtype`, or None if the stock ops must be used here."""
    library = _library_for(dtype)
    return None if library is None else library.meta_lstm_coordinate_step


@tf.autograph.experimental.do_not_convert
def norm_relu_pool(dtype):
    """(forward op, backward op) of the fused batch normalisation, ReLU and 2x2 max pooling for inputs of `dtype`,
    or None if the stock ops must be used here."""
    library = _library_for(dtype)
    return None if library is None else (library.meta_lstm_norm_relu_pool, library.meta_lstm_norm_relu_pool_grad)


def _register_gradient():
    @tf.RegisterGradient("MetaLstmCoordinateStep")
    def _coordinate_step_gradient(op, *output_grads):
        library = load()
        if library is None:  # a graph saved where the kernel existed, differentiated where it does not
            raise RuntimeError("the fused coordinate-LSTM kernel is needed to differentiate this graph")
        # An unused output (the last step's cell, an empty readout) arrives as None.
        output_grads = [
            tf.zeros_like(output) if grad is None else grad
            for output, grad in zip(op.outputs, output_grads, strict=True)
        ]
        return library.meta_lstm_coordinate_step_grad(*op.inputs, *output_grads)


_register_gradient()
