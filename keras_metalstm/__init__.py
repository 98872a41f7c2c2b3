"""keras-metalstm: the LSTM meta-learner of Ravi & Larochelle (ICLR 2017) for few-shot learning in Keras 3.

Names are resolved on first use (PEP 562), so importing the package (and its command line, `metalstm --help`)
does not import TensorFlow. Touching any name below imports what it needs; `keras.saving.load_model` on a
`.keras` file of ours needs the classes registered first: use `keras_metalstm.MetaLearner` (or
`keras_metalstm.export.load_adapted`) or `import keras_metalstm.meta_learner` before loading.
"""

import importlib

__version__ = "0.1.0"

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
