"""Custom TensorFlow kernels of keras_metalstm (optional speed-ups; stock TensorFlow ops are the reference)."""
