"""Keras layers of the meta-learner: the coordinate-wise LSTM (layer 1) and the meta-learner cell (layer 2)."""

from keras_metalstm.layers.coordinate_lstm import CoordinateLSTM
from keras_metalstm.layers.meta_lstm_cell import MetaLSTMCell

__all__ = ["CoordinateLSTM", "MetaLSTMCell"]
