"""The run directory of a meta-training run: its configuration, learner, checkpoints, state file and best model.

A run directory holds:

    config.yaml            the run's full RunConfig (written before training starts)
    learner.json           the learner's architecture as its Keras config (keras_metalstm.learner_spec)
    splits.json            the classes of each split when the run started: resume, evaluate and the baselines use
                           these, whatever was added to or moved in the data set since
    checkpoints/           tf.train.CheckpointManager: meta-learner, optimizer state, episode counter, best
                           validation accuracy (the latest `keep_checkpoints`)
    best/                  the checkpoint with the best validation accuracy so far
    best.keras             the best meta-learner as one Keras file (written when training finishes)
    metrics.jsonl/.csv     the metrics log (keras_metalstm.metrics_log); curves.png drawn from it
    state.json             status, episode, best validation, training seconds of all sessions and the metrics
                           row in progress (now and at the newest checkpoint), how the steps of the session that
                           wrote the newest checkpoint round (keras_metalstm.numerics), the writing process
    baselines/             the classifier pre-trained on the meta-train classes, shared with the baselines
    tensorboard/           event files, when the tensorboard package is installed

Everything that opens a run directory (training, evaluation, the export commands) comes through here.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
import warnings
from pathlib import Path

from keras_metalstm.config import CONFIG_FILE_NAME, ConfigError, RunConfig, atomic_write_text, first_line
from keras_metalstm.learner_architecture import ARCHITECTURE_FILE
from keras_metalstm.paths import refuse_url, replaced_in_place
from keras_metalstm.processes import process_alive, process_start_time

CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"
STATE_FILE = "state.json"
CHECKPOINT_INDEX = re.compile(r"ckpt-(\d+)\.index")
SPLITS_FILE = "splits.json"
BEST_MODEL_FILE = "best.keras"
# Reads of the newest checkpoint while a running training may replace it (`load_meta_learner`).
CHECKPOINT_READ_ATTEMPTS = 5


class TrainingError(RuntimeError):
    """A training run cannot start or continue (base class of the errors below)."""


class RunDirError(TrainingError):
    """The run directory holds another run, holds no run to resume, or its run has a different shape."""


class CheckpointMismatchError(TrainingError):
    """A checkpoint does not fit the meta-learner built from the configuration (different learner/episode shape)."""


# ------------------------------------------------------------------------------------------- what is there
def run_exists(run_dir) -> bool:
    run_dir = Path(run_dir)
    return (run_dir / CONFIG_FILE_NAME).is_file() or (run_dir / CHECKPOINT_DIR).is_dir()


def latest_checkpoint(run_dir, which: str = CHECKPOINT_DIR) -> str | None:
    """The newest checkpoint of RUN_DIR/`which` (its path prefix), or None. Without TensorFlow's list of them (the
    "checkpoint" file, e.g. left out of a copy), the highest-numbered one whose index is there: a resume would
    otherwise start again from episode 0 and overwrite them."""
    import tensorflow as tf

    folder = Path(run_dir) / which
    listed = tf.train.latest_checkpoint(str(folder))
    if listed or not folder.is_dir():
        return listed
    numbered = [(int(match[1]), path) for path in folder.iterdir() if (match := CHECKPOINT_INDEX.fullmatch(path.name))]
    return str(max(numbered)[1].with_suffix("")) if numbered else None


def load_run_config(run_dir) -> RunConfig:
    refuse_url(run_dir, "the run directory", RunDirError)
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE_NAME
    if not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} does not exist")
    if not path.is_file():
        raise RunDirError(
            f"{run_dir} holds no training run (no {CONFIG_FILE_NAME}); train one with `metalstm train`"
        )
    return RunConfig.load(path)


def load_splits(config: RunConfig, report=None, run_dir=None):
    """The data set's (train, val, test) splits for `config`, images converted to `config.image_shape` when it is
    set, without the classes of fewer than K + Q images with `config.drop_small_classes`; for a run whose
    `run_dir` recorded its splits (SPLITS_FILE), that run's classes in each split. `report` (a callable taking a
    line of text) is told what was left out or kept (raises keras_metalstm.data.DataError)."""
    from keras_metalstm.data import DataError, DatasetSplits, convert_dataset, dataset_options, load_dataset

    accepted = dataset_options(config.dataset)
    options = {}
    if config.rotations or "rotations" in accepted:  # explicitly: omniglot's loader adds them by default
        options["rotations"] = config.rotations
    if config.split_file is not None:
        if "split_file" not in accepted:
            raise DataError(
                f"a split file splits an omniglot or folder data set, not {config.dataset} (its split is fixed): "
                "leave out --split-file"
            )
        options["split_file"] = config.split_file
    target = tuple(config.image_shape) if config.image_shape is not None else None
    if target is not None and "image_shape" in accepted:
        options["image_shape"] = target  # an image folder converts while decoding: its images may be of mixed sizes
    elif target is not None and "image_size" in accepted and target[0] == target[1]:
        options["image_size"] = target[0]  # resized once from the original files, not again from the default size
    splits = load_dataset(config.dataset, config.data_dir, **options)
    if target is not None and tuple(splits.image_shape) != target:
        splits = DatasetSplits(*(convert_dataset(part, target) for part in splits))
    recorded = None if run_dir is None else Path(run_dir) / SPLITS_FILE
    kept = splits.with_min_images(config.k_shot + config.query) if config.drop_small_classes else splits
    if recorded is not None and recorded.is_file():
        return _as_recorded(splits, kept, recorded, report)
    if recorded is not None and "split_file" in accepted and config.split_file is None:
        # This data set is split by its classes as they are now: one that gained or lost classes splits otherwise.
        warnings.warn(
            f"{recorded} is missing: the run's splits are taken from the data set as it is now, which gives the "
            "run's own classes only if none was added, removed or renamed since the run started; restore the file "
            "from a copy of the run if you have one",
            RuntimeWarning,
            stacklevel=2,
        )
    dropped = [before.num_classes - after.num_classes for before, after in zip(splits, kept, strict=True)]
    if sum(dropped) and report is not None:
        report(
            f"left out {sum(dropped)} of {sum(part.num_classes for part in splits)} classes with fewer than "
            f"K + Q = {config.k_shot + config.query} images (--drop-small-classes): train {dropped[0]}, "
            f"val {dropped[1]}, test {dropped[2]}"
        )
    return kept


def record_splits(splits, run_dir) -> None:
    """Write the classes of each split to RUN_DIR/SPLITS_FILE (once, when the run starts)."""
    from keras_metalstm.data import split_file_text

    atomic_write_text(Path(run_dir) / SPLITS_FILE, split_file_text(splits.class_names()))


def _as_recorded(splits, kept, path: Path, report):
    """The run's recorded classes (RUN_DIR/SPLITS_FILE at `path`): `kept` (the splits the configuration gives the
    data set now) when they are the same, else `splits` (before --drop-small-classes) regrouped into them, as
    after classes were added to or moved in the data set; a recorded class the data set lost is an error."""
    from keras_metalstm.data import DataError, read_split_file

    recorded = read_split_file(path)
    if kept.class_names() == recorded:
        return kept
    present = {name for part in splits for name in part.class_names}
    lost = [name for names in recorded.values() for name in names if name not in present]
    if lost:
        raise DataError(
            f"{len(lost)} class(es) of the run's splits ({path}) are no longer in the data set, e.g. {lost[:3]}: "
            "restore them, or train a new run on the data as it is now"
        )
    if report is not None:
        unseen = len(present) - sum(len(names) for names in recorded.values())
        report(
            f"the data set's classes changed since the run started: the run's own splits are used ({path.name}; "
            f"{unseen} class(es) it did not see are left out)"
        )
    return splits.regrouped(recorded)


# ------------------------------------------------------------------------------------------ the meta-learner
def build_meta_learner(config: RunConfig, architecture: dict | None = None):
    """A fresh MetaLearner of the configured shape (learner seeded by config.seed) around `architecture`, the
    learner's Keras config (`learner_architecture.architecture_config`); None builds the run's built-in learner (runs
    written before learner.json existed are conv4 runs)."""
    import keras

    import keras_metalstm as km
    from keras_metalstm.learner_architecture import model_from_architecture
    from keras_metalstm.learner_spec import build_learner, learner_kind

    if config.image_shape is None:
        raise ConfigError("image_shape is unknown: load the data set first (train() fills it in)")
    keras.utils.set_random_seed(int(config.seed))
    if architecture is not None:
        learner = model_from_architecture(architecture, tuple(config.image_shape))
    elif learner_kind(config.learner) == "built-in":
        learner = build_learner(config.learner, config.image_shape, config.n_way, config.filters, config.dtype_policy)
    else:
        raise RunDirError(f"the run's learner {config.learner!r} needs its stored architecture ({ARCHITECTURE_FILE})")
    return km.MetaLearner(
        learner,
        inner_steps=config.inner_steps,
        hidden_units=config.hidden_units,
        first_order=config.first_order,
        bn_momentum=config.bn_momentum,
        divide_grad_by_batch=config.divide_grad_by_batch,
        query_statistics=config.query_statistics,
        learn_logit_scale=config.learn_logit_scale,
        episode_batching=config.episode_batching,
    )


def learner_architecture(config: RunConfig, run_dir=None) -> dict:
    """The learner architecture of a run: RUN_DIR/learner.json when the run has one, else (a new run) the
    learner of `config.learner` built and checked on the episode shape (LearnerError saying what is wrong)."""
    import keras

    from keras_metalstm.learner_architecture import (
        architecture_config,
        check_weights_survive_rebuilding,
        model_from_architecture,
        read_architecture,
    )
    from keras_metalstm.learner_spec import build_learner, check_learner, learner_kind

    stored = read_architecture(run_dir) if run_dir is not None else None
    if stored is not None:
        return stored
    keras.utils.set_random_seed(int(config.seed))
    learner = build_learner(config.learner, config.image_shape, config.n_way, config.filters, config.dtype_policy)
    check_learner(learner, config.image_shape, config.n_way, batch=config.n_way * config.k_shot)
    architecture = architecture_config(learner)
    keras.utils.set_random_seed(int(config.seed))  # as build_meta_learner seeds it
    rebuilt = model_from_architecture(architecture, tuple(config.image_shape))  # what evaluate and resume will load
    check_weights_survive_rebuilding(learner, rebuilt, from_file=learner_kind(config.learner) == "file")
    return architecture


def checkpoint_object(meta, optimizer=None, progress=None):
    """The tf.train.Checkpoint of a run: the meta-learner, and while training its optimizer and the progress
    variables ({"episode": ..., "best_accuracy": ..., ...})."""
    import tensorflow as tf

    objects = {"meta": meta}
    if optimizer is not None:
        objects["optimizer"] = optimizer
    objects.update(progress or {})
    return tf.train.Checkpoint(**objects)


def remove_partial_checkpoints(directory, episode="*") -> None:
    """The temporary folders ("ckpt-N_temp") TensorFlow writes a checkpoint of episode `episode` (any: "*") into
    before renaming it, left by a save that failed or a process killed during one: never read, only disk used."""
    for partial in Path(directory).glob(f"ckpt-{episode}_temp*"):
        shutil.rmtree(partial, ignore_errors=True)


def restore_checkpoint(checkpoint, path, what="checkpoint"):
    """Restore `checkpoint` from `path`, turning shape/structure mismatches into CheckpointMismatchError."""
    try:
        status = checkpoint.read(str(path))
        status.assert_existing_objects_matched()
        status.expect_partial()
    except (ValueError, AssertionError) as error:
        raise CheckpointMismatchError(
            f"the {what} at {path} does not fit this meta-learner (different learner shape, image shape, "
            f"N-way or hidden units?): {first_line(error)}"
        ) from None
    except Exception as error:  # noqa: BLE001 - NotFoundError, DataLossError ... one clear message
        older = _older_checkpoints(Path(path))
        fix = (
            f"; the older {', '.join(older)} beside it may be whole: move {Path(path).name}.* away to use the newest "
            "of them"
            if older
            else ""
        )
        from keras_metalstm.data.errors import tensorflow_error_text

        cause = tensorflow_error_text(error)
        raise CheckpointMismatchError(f"cannot read the {what} at {path}: {cause}{fix}") from None


def _older_checkpoints(path: Path) -> list[str]:
    """The names of the numbered checkpoints beside `path` (a checkpoint's prefix) older than it, newest first."""
    newest = CHECKPOINT_INDEX.fullmatch(f"{path.name}.index")
    if newest is None or not path.parent.is_dir():
        return []
    numbers = [int(match[1]) for p in path.parent.iterdir() if (match := CHECKPOINT_INDEX.fullmatch(p.name))]
    return [f"ckpt-{number}" for number in sorted(numbers, reverse=True) if number < int(newest[1])]


def load_meta_learner(run_dir, which: str = "best"):
    """(config, meta-learner) of a run directory; `which` = "best" (best validation, falling back to the latest
    checkpoint when no validation ran) or "latest"."""
    from keras_metalstm.learner_architecture import read_architecture

    config = load_run_config(run_dir)
    meta = build_meta_learner(config, read_architecture(run_dir))
    path = _newest_checkpoint(run_dir, which)
    if path is None:
        raise RunDirError(f"{run_dir} holds no checkpoint yet (training never reached its first checkpoint)")
    # A run still training replaces its checkpoints: the one found newest may be deleted before it is read (an
    # evaluation during training). A failed read whose checkpoint is no longer the newest reads the new one.
    for _ in range(CHECKPOINT_READ_ATTEMPTS - 1):
        try:
            restore_checkpoint(checkpoint_object(meta), path)
            return config, meta
        except CheckpointMismatchError:
            newer = _newest_checkpoint(run_dir, which)
            if newer in (None, path):
                raise
            path = newer
    restore_checkpoint(checkpoint_object(meta), path)
    return config, meta


def checkpoint_kind(run_dir, which: str = "best") -> str:
    """Which checkpoint `load_meta_learner(run_dir, which)` reads: "best", or "latest" when asked for or when the
    run has no best one yet (no validation ran): what a report or message calls it."""
    return "best" if which == "best" and latest_checkpoint(run_dir, BEST_DIR) else "latest"


def _newest_checkpoint(run_dir, which):
    path = latest_checkpoint(run_dir, BEST_DIR) if which == "best" else None
    return path or latest_checkpoint(run_dir)


def save_best_model(run_dir: Path, meta, validated: bool, best_checkpoint: str | None, write: bool = True) -> None:
    """Write best.keras: with `validated`, the meta-learner of `best_checkpoint` (the best validation), else `meta`
    itself (no validation ran).

    Every worker of a cluster calls this: with `validated` (the same on every worker) the best meta-learner is
    built anew, and creating variables is a collective under a multi-worker strategy. Only `write` (the chief,
    whose best/ holds the best checkpoint of every session) restores and saves it.
    """
    best = type(meta).from_config(meta.get_config()) if validated else meta
    if not write:
        return
    if validated and best_checkpoint is None:
        logging.getLogger(__name__).warning(
            "%s holds no best checkpoint (deleted, or left out of a copy): %s gets the run's final weights instead",
            Path(run_dir) / BEST_DIR,
            BEST_MODEL_FILE,
        )
        best, validated = meta, False
    if validated:
        # The learner's weights are in no checkpoint (theta_0 is): a frozen layer's, made from the architecture
        # with the run's seed, must be the run's, not what rebuilding drew from the random state of the moment.
        best.learner.set_weights(meta.learner.get_weights())
        restore_checkpoint(checkpoint_object(best), best_checkpoint, "best checkpoint")
    with replaced_in_place(Path(run_dir) / BEST_MODEL_FILE) as tmp:
        best.save(str(tmp))


def start_failed(run_dir) -> bool:
    """True for a run directory set up by a start that never reached its first checkpoint (it failed or was
    interrupted): state.json says so, or says "starting" or "running" and the process that wrote it is gone
    (killed)."""
    if latest_checkpoint(run_dir):
        return False
    state = read_state(run_dir)
    status = str(state.get("status", ""))
    if status in ("starting", "running"):
        return state.get("host") == socket.gethostname() and not process_alive(state.get("pid", -1))
    return status == "interrupted" or status.startswith("failed")


# ---------------------------------------------------------------------------------------------- state.json
def read_state(run_dir) -> dict:
    try:
        return json.loads((Path(run_dir) / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def write_state(
    run_dir,
    status: str,
    episode: int,
    episodes: int,
    best_accuracy,
    best_episode,
    seconds,
    window=None,
    numerics=None,
    checkpoint=None,
    best_val_episodes=None,
) -> None:
    """state.json, atomically: the status (running, finished, interrupted, diverged, failed: <reason>), where the
    run is, the training seconds of all sessions, the metrics row in progress (`window`: loss sum, accuracy sum,
    episodes), the newest checkpoint's episode, training seconds and metrics row in progress (`checkpoint`,
    {"episode", "seconds", "window"}: where a session that stopped after it without saving resumes), how the steps
    of the session that wrote it round (`numerics`: keras_metalstm.numerics, so that a resumed run can tell whether
    it continues bitwise) and which process wrote the file (so that a later session can tell a crash from a run
    still going). `best_val_episodes` is the number of episodes of the validation that set the best accuracy: the
    one a resumed run's validations must use to be compared with it, even after sessions that did not validate."""
    atomic_write_text(
        Path(run_dir) / STATE_FILE,
        json.dumps(
            {
                "status": status,
                "episode": int(episode),
                "episodes": int(episodes),
                "best_val_accuracy": best_accuracy,
                "best_episode": best_episode,
                "best_val_episodes": best_val_episodes,
                "seconds": round(float(seconds), 3),
                "window": list(window or [0.0, 0.0, 0]),
                "checkpoint": checkpoint,
                "numerics": numerics,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
            indent=2,
        )
        + "\n",
    )


def live_owner(run_dir) -> int | None:
    """The process id of another process on this host training `run_dir` now (state.json says "starting" or
    "running" and was written by it), else None. A process started after state.json was last written has only
    reused a dead session's id."""
    state = read_state(run_dir)
    pid = state.get("pid")
    if state.get("status") not in ("starting", "running") or state.get("host") != socket.gethostname():
        return None
    if not isinstance(pid, int) or pid == os.getpid() or not process_alive(pid):
        return None
    started = process_start_time(pid)
    written = (Path(run_dir) / STATE_FILE).stat().st_mtime
    return pid if started is None or started <= written + 1.0 else None  # /proc's start: to the second


def crashed(state: dict) -> bool:
    """True when `state` says "running" but the process that wrote it, on this host, is gone (kill -9, power
    loss). A state written on another host cannot be checked and is taken as it says."""
    if state.get("status") != "running" or state.get("host") != socket.gethostname():
        return False
    pid = state.get("pid")
    return isinstance(pid, int) and not process_alive(pid)
