"""The checks of what a MetaLearner is given: each bad input gets its own message, good input passes through."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_metalstm.meta_learner_inputs import (
    check_adaptation_settings,
    check_episodes,
    check_mode,
    check_support,
    static_batch_size,
)


def small_learner():
    return keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Flatten(), keras.layers.Dense(3)])


def test_adaptation_settings_need_a_step_and_a_known_statistics_protocol():
    check_adaptation_settings(1, "support")
    with pytest.raises(ValueError, match="inner_steps must be a whole number of at least 1, got 0"):
        check_adaptation_settings(0, "query")
    with pytest.raises(ValueError, match="query_statistics must be one of .*'batch'"):
        check_adaptation_settings(3, "batch")


def test_mode_is_train_or_test():
    check_mode("test")
    with pytest.raises(ValueError, match="mode must be 'train' or 'test', got 'eval'"):
        check_mode("eval")


def test_episode_batch_names_the_missing_keys():
    images, labels = np.zeros((1, 3, 6, 6, 1), np.float32), np.zeros((1, 3), np.int32)
    check_episodes(small_learner(), {"support_images": images, "support_labels": labels, "query_images": images})
    with pytest.raises(ValueError, match=r"missing: \['query_images'\]"):
        check_episodes(small_learner(), {"support_images": images, "support_labels": labels, "query_labels": labels})
    with pytest.raises(ValueError, match=r"missing: \['query_labels'\]"):  # to train or evaluate on
        check_episodes(small_learner(), {"support_images": images, "support_labels": labels, "query_images": images},
                       labelled=True)


def test_episode_count_must_be_static_when_traced():
    assert static_batch_size(tf.zeros((4, 2)), "support_images") == 4
    found = []

    @tf.function(input_signature=[tf.TensorSpec((None, 2))])
    def count(images):
        found.append(static_batch_size(images, "support_images"))
        return images

    with pytest.raises(ValueError, match="support_images needs a static number of episodes.*drop_remainder"):
        count(tf.zeros((4, 2)))
    assert found == []


def test_support_set_is_converted_and_its_shape_and_labels_checked():
    learner = small_learner()
    images, labels = check_support(learner, "float64", np.zeros((3, 6, 6, 1), np.float32), np.array([0, 2, 1]))
    assert images.dtype == tf.float64 and labels.dtype == tf.int32
    np.testing.assert_array_equal(labels.numpy(), [0, 2, 1])
    with pytest.raises(ValueError, match=r"one task's images of shape .*got shape \(6, 6, 1\)"):
        check_support(learner, "float32", np.zeros((6, 6, 1)), np.arange(6))
    with pytest.raises(ValueError, match=r"have shape \(8, 8, 1\) per image but the learner expects \(6, 6, 1\)"):
        check_support(learner, "float32", np.zeros((3, 8, 8, 1)), np.arange(3))
    with pytest.raises(ValueError, match="one integer label per support image: got shape \\(2,\\) for 3"):
        check_support(learner, "float32", np.zeros((3, 6, 6, 1)), np.arange(2))
    with pytest.raises(ValueError, match="support_labels must be integers, got float32"):
        check_support(learner, "float32", np.zeros((3, 6, 6, 1)), np.zeros(3, np.float32))
