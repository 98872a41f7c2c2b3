"""Checks of a training run's configuration against its data and its tf.distribute strategy, made before anything
is written to the run directory, so that a run that cannot go through stops with the reason at its start."""

from __future__ import annotations

from pathlib import Path

from keras_metalstm.config import RunConfig
from keras_metalstm.runs import TrainingError


def check_theta0_source(config: RunConfig, strategy) -> None:
    """Fail before anything is written when theta_0's starting point cannot be had."""
    import tensorflow as tf

    from keras_metalstm.learner_spec import learner_kind

    if config.theta0_init != "pretrained":
        return
    if config.pretrained_model:
        if not Path(config.pretrained_model).is_file():
            raise TrainingError(
                f"pretrained model {config.pretrained_model} does not exist; pass a .keras classifier of the "
                "learner's architecture"
            )
    elif learner_kind(config.learner) != "file" and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        raise TrainingError(
            "theta0_init 'pretrained' under a multi-worker strategy needs --pretrained-model (a file every worker "
            "reads): pre-train it once in a single-process run, e.g. `metalstm evaluate RUN --baselines` leaves "
            "one in RUN/baselines/pretrained.keras"
        )


def check_episode_shapes(splits, config: RunConfig) -> None:
    """Raise DataError now if the training or validation split cannot give the configured episodes (instead of
    mid-training)."""
    from keras_metalstm.data import EpisodeSampler

    EpisodeSampler(splits.train, config.n_way, config.k_shot, config.query)
    if config.val_episodes:
        EpisodeSampler(splits.val, config.n_way, config.k_shot, config.query)


def test_split_problem(splits, config: RunConfig) -> str | None:
    """Why the test split cannot give the configured episodes (said at the start of training, since only
    `metalstm evaluate` needs it), or None."""
    from keras_metalstm.data import DataError, EpisodeSampler

    try:
        EpisodeSampler(splits.test, config.n_way, config.k_shot, config.query)
    except DataError as error:
        return f"note: `metalstm evaluate` will not find test episodes in this data: {error}"
    return None
