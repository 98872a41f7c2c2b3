"""keras-metalstm: the LSTM meta-learner of Ravi & Larochelle (ICLR 2017) for few-shot learning in Keras 3.

Names are resolved on first use (PEP 562), so importing the package (and its command line, `metalstm --help`)
does not import TensorFlow. Touching any name below imports what it needs; `keras.saving.load_model` on a
`.keras` file of ours needs the classes registered first: use `keras_metalstm.MetaLearner` (or
`keras_metalstm.export.load_adapted`) or `import keras_metalstm.meta_learner` before loading.
"""

import importlib
import os
import sys
import warnings

__version__ = "0.1.0"


def _use_tensorflow_backend():
    """This package runs on Keras' TensorFlow backend. Keras reads KERAS_BACKEND (before ~/.keras/keras.json) when
    it is first imported: set it here, saying so when it named another backend; if Keras already runs another
    backend in this process, nothing can switch it, so say that instead of failing later deep inside Keras."""
    keras = sys.modules.get("keras")
    if keras is not None:
        backend = keras.backend.backend()
        if backend != "tensorflow":
            raise ImportError(
                "keras-metalstm runs on Keras' TensorFlow backend, but Keras was already imported with the "
                f"{backend!r} backend in this process: import keras_metalstm first, or set KERAS_BACKEND=tensorflow"
            )
        return
    chosen = os.environ.get("KERAS_BACKEND", "tensorflow")
    if chosen != "tensorflow":
        warnings.warn(
            f"keras-metalstm runs on Keras' TensorFlow backend: KERAS_BACKEND={chosen} is replaced by tensorflow in "
            "this process",
            RuntimeWarning,
            stacklevel=3,
        )
    os.environ["KERAS_BACKEND"] = "tensorflow"


_use_tensorflow_backend()

_NAMES = {
    "CoordinateLSTM": "keras_metalstm.layers",
    "MetaLSTMCell": "keras_metalstm.layers",
    "LearnerFunction": "keras_metalstm.learner_function",
    "MetaLearner": "keras_metalstm.meta_learner",
    "MetaTrainer": "keras_metalstm.trainer",
    "list_presets": "keras_metalstm.presets",
    "meta_optimizer": "keras_metalstm.trainer",
    "preprocess": "keras_metalstm.preprocessing",
}
_SUBMODULES = ("data", "export", "learners", "layers", "presets")

__all__ = sorted([*_NAMES, *_SUBMODULES])


def __getattr__(name):
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"keras_metalstm.{name}")
    else:
        raise AttributeError(f"module 'keras_metalstm' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return __all__
