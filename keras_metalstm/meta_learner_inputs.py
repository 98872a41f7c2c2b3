"""Checks of what a `MetaLearner` is given: its settings, a batch of episodes, one task's support set.

Each check raises a ValueError naming the problem and the fix before TensorFlow sees the input, so a user gets
that message instead of an error from deep inside a traced graph.
"""

import tensorflow as tf

from keras_metalstm.config import EPISODE_BATCHING, QUERY_STATISTICS
from keras_metalstm.data.episodes import EPISODE_KEYS
from keras_metalstm.learner_spec import learner_image_shape

MODES = ("train", "test")


def check_adaptation_settings(inner_steps, query_statistics) -> None:
    """Raises ValueError unless `inner_steps` T >= 1 and `query_statistics` is one of QUERY_STATISTICS: what a
    meta-learner is built with, or changed to for an evaluation."""
    if int(inner_steps) < 1:
        raise ValueError(f"inner_steps must be at least 1, got {inner_steps}.")
    if query_statistics not in QUERY_STATISTICS:
        raise ValueError(f"query_statistics must be one of {QUERY_STATISTICS}, got {query_statistics!r}.")


def check_episode_batching(episode_batching) -> None:
    if episode_batching not in EPISODE_BATCHING:
        raise ValueError(f"episode_batching must be one of {EPISODE_BATCHING}, got {episode_batching!r}.")


def check_mode(mode) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be 'train' or 'test', got {mode!r}.")


def check_episode_keys(episodes) -> None:
    """A batch of episodes for the query logits needs the support set and the query images."""
    needed = EPISODE_KEYS[:3]
    missing = [key for key in needed if key not in episodes]
    if missing:
        raise ValueError(f"An episode batch needs the keys {needed}; missing: {missing}.")


def static_batch_size(tensor, name) -> int:
    """The number of episodes B of a stacked episode tensor, which the inner loop needs to know when traced."""
    batch = tensor.shape[0]
    if batch is None:
        raise ValueError(
            f"{name} needs a static number of episodes (its first axis): batch the episode dataset with "
            "drop_remainder=True."
        )
    return batch


def check_support(learner, dtype, support_images, support_labels):
    """One task's support set for `learner` as tensors: images (examples, H, W, C) in `dtype`, labels int32."""
    support_images = tf.convert_to_tensor(support_images, dtype=dtype)
    support_labels = tf.convert_to_tensor(support_labels)
    expected = learner_image_shape(learner)
    if support_images.shape.rank != 4:
        raise ValueError(
            f"support_images must be one task's images of shape (examples, height, width, channels), got "
            f"shape {tuple(support_images.shape)}."
        )
    if expected and None not in expected and tuple(support_images.shape[1:]) != expected:
        raise ValueError(
            f"support_images have shape {tuple(support_images.shape[1:])} per image but the learner "
            f"expects {expected}: resize/convert the images first."
        )
    if support_labels.shape != (support_images.shape[0],):
        raise ValueError(
            f"support_labels must hold one integer label per support image: got shape "
            f"{tuple(support_labels.shape)} for {support_images.shape[0]} images."
        )
    if not support_labels.dtype.is_integer:
        raise ValueError(f"support_labels must be integers, got {support_labels.dtype.name}.")
    return support_images, tf.cast(support_labels, tf.int32)
