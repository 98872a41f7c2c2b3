"""Checks of a training run's configuration against its data and its tf.distribute strategy, made before anything
is written to the run directory, so that a run that cannot go through stops with the reason at its start."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from keras_metalstm.config import RunConfig
from keras_metalstm.runs import TrainingError


def check_theta0_source(config: RunConfig, strategy, architecture: dict) -> None:
    """Fail before anything is written when theta_0's starting point cannot be had (`architecture`: the learner's
    Keras config)."""
    import tensorflow as tf

    from keras_metalstm.baseline_cache import theta0_from_cached_classifier
    from keras_metalstm.learner_spec import check_classes_can_change

    if config.theta0_init == "pretrained" and config.pretrained_model and not Path(config.pretrained_model).is_file():
        raise TrainingError(
            f"pretrained model {config.pretrained_model} does not exist; pass a .keras classifier of the "
            "learner's architecture"
        )
    if not theta0_from_cached_classifier(config):
        return
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        raise TrainingError(
            "theta0_init 'pretrained' under a multi-worker strategy needs --pretrained-model (a file every worker "
            "reads): pre-train it once in a single-process run, e.g. `metalstm evaluate RUN --baselines` leaves "
            "one in RUN/baselines/pretrained.keras"
        )
    check_classes_can_change(architecture)  # pre-trained with one output per meta-train class


def check_episode_batching(config: RunConfig, architecture: dict) -> None:
    """Fail before anything is written when `--episode-batching batched` asks for what cannot be: batching a
    learner (`architecture`, its Keras config) with a layer the batched form does not have (mixed precision, a
    subclassed model...), or a gradient this machine cannot compute: a convolutional learner's, on a CPU outside
    XLA."""
    from keras_metalstm.batched_learner import batched_with_grouped_convolutions, unsupported_layers
    from keras_metalstm.learner_architecture import model_from_architecture
    from keras_metalstm.xla_ops import accelerator_present

    if config.episode_batching != "batched":
        return
    learner = model_from_architecture(architecture, tuple(config.image_shape))
    if problems := unsupported_layers(learner):
        raise TrainingError(
            f"--episode-batching batched: this learner cannot be evaluated for a batch of episodes at once "
            f"({'; '.join(problems[:3])}{'...' if len(problems) > 3 else ''}): use --episode-batching auto or "
            "per_episode, which run the episodes one after the other"
        )
    if config.xla or accelerator_present():
        return
    if batched_with_grouped_convolutions(learner):
        raise TrainingError(
            "--episode-batching batched convolves a convolutional learner's episodes as grouped convolutions, "
            "whose gradient TensorFlow computes on a GPU or TPU, or under XLA, not on this CPU: add --xla, or use "
            "--episode-batching auto (it picks per_episode here)"
        )


def check_episode_shapes(splits, config: RunConfig, notes: Sequence[str] = ()) -> None:
    """Raise DataError now if the training or validation split cannot give the configured episodes (instead of
    mid-training); the message adds `notes`, what loading the data left out (e.g. --drop-small-classes)."""
    from keras_metalstm.augmentation import Augmentation
    from keras_metalstm.data import DataError, EpisodeSampler

    if (augment := Augmentation.parse(config.augment)) is not None:
        try:
            augment.check_image_shape(splits.image_shape)
        except ValueError as error:
            raise DataError(f"--augment {augment}: {error}") from None
    try:
        EpisodeSampler(splits.train, config.n_way, config.k_shot, config.query)
        if config.val_episodes:
            EpisodeSampler(splits.val, config.n_way, config.k_shot, config.query)
    except DataError as error:
        raise DataError(
            f"{error} (the data set has {splits.describe()}: a split file (--split-file) or a folder split "
            "into train/val/test folders sets the split, --val-episodes 0 trains without validation)"
            + "".join(f"; {note}" for note in notes)
        ) from None


def test_split_problem(splits, config: RunConfig) -> str | None:
    """Why the test split cannot give the configured episodes (said at the start of training, since only
    `metalstm evaluate` needs it), or None."""
    from keras_metalstm.data import DataError, EpisodeSampler

    try:
        EpisodeSampler(splits.test, config.n_way, config.k_shot, config.query)
    except DataError as error:
        return f"note: `metalstm evaluate` will not find test episodes in this data: {error}"
    return None


# What a training step keeps per learner coordinate, inner step and episode: the growth of the process's peak memory
# over two steps of conv4 with 128 filters (445,701 parameters) at 28x28, T = 16, one episode, measured on the
# 2-core Xeon: 1.61 GB with the fused CPU kernel, the fewest bytes; 5.68 GB with the stock ops keeping the
# coordinate LSTM's activations (measured with KERAS_METALSTM_FUSED_KERNELS=0), the most.
FEWEST_BYTES_PER_COORDINATE_STEP = 1.61e9 / (445_701 * 16)
MOST_BYTES_PER_COORDINATE_STEP = 5.68e9 / (445_701 * 16)


def physical_memory() -> int | None:
    """Bytes of memory of this machine, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def memory_problem(num_parameters: int, inner_steps: int, episodes: int, memory: int | None) -> str | None:
    """A note when the meta-gradient of `episodes` episodes at once cannot fit in `memory` bytes even at its
    smallest footprint (the system would kill the run, with no message of ours), or None."""
    coordinate_steps = num_parameters * inner_steps * episodes
    fewest, most = (coordinate_steps * size / 1e9 for size in (FEWEST_BYTES_PER_COORDINATE_STEP,
                                                                  MOST_BYTES_PER_COORDINATE_STEP))
    if memory is None or fewest * 1e9 <= memory:
        return None
    return (
        f"note: the meta-gradient of this learner ({num_parameters:,} parameters) over T = {inner_steps} steps "
        f"for {episodes} episode(s) at once on this machine keeps about {fewest:.0f}-{most:.0f} GB, more than its "
        f"{memory / 1e9:.0f} GB: the system will likely stop the run. Lower --inner-steps or "
        "--meta-batch, or use a smaller learner (e.g. fewer --filters)"
    )
