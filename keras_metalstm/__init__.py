"""keras-metalstm: the LSTM meta-learner of Ravi & Larochelle (ICLR 2017) for few-shot learning in Keras 3."""

# `export` registers AdaptedLearner, so keras.saving.load_model() reads adapted `.keras` files.
from keras_metalstm import export, learners
from keras_metalstm.layers import CoordinateLSTM, MetaLSTMCell
from keras_metalstm.learner_function import LearnerFunction
from keras_metalstm.meta_learner import MetaLearner
from keras_metalstm.preprocessing import preprocess
from keras_metalstm.trainer import MetaTrainer, meta_optimizer

__version__ = "0.1.0"

__all__ = [
    "CoordinateLSTM",
    "LearnerFunction",
    "MetaLSTMCell",
    "MetaLearner",
    "MetaTrainer",
    "export",
    "learners",
    "meta_optimizer",
    "preprocess",
]
