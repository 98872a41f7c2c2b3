"""A training run's op determinism is scoped to the run: it must not stay on for the rest of the process."""

from tensorflow.python.framework import config

from keras_metalstm.training import _op_determinism


def test_op_determinism_is_restored_after_the_run():
    assert not config.is_op_determinism_enabled()
    with _op_determinism(True):
        assert config.is_op_determinism_enabled()
    assert not config.is_op_determinism_enabled()
    with _op_determinism(False):
        assert not config.is_op_determinism_enabled()
