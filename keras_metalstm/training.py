"""Meta-training runs on disk: checkpoints, exact resume, validation with best-checkpoint keeping, NaN guard, logs.

A run directory holds:

    config.yaml            the run's full RunConfig (written before training starts)
    checkpoints/           tf.train.CheckpointManager: meta-learner, optimizer state, episode counter, best
                           validation accuracy (the latest `keep_checkpoints`)
    best/                  the checkpoint with the best validation accuracy so far
    metrics.jsonl          one JSON object per log interval ({"kind": "train", ...}) and validation ({"kind": "val"})
    metrics.csv            the same rows as CSV (rewritten atomically)
    curves.png             training curves (Pillow)
    state.json             status (running/finished/interrupted/diverged), episode, best validation, wall time
    tensorboard/           event files, when the tensorboard package is installed

Under a multi-worker strategy only the chief (keras_metalstm.distribute.is_chief) checks and writes the run
directory; the other workers read it only to resume from the chief's latest checkpoint, and write their copies of
the checkpoints (every worker takes part in a save) to a private temporary directory they delete.

Exact resume: episode e of the training stream is a pure function of (seed, e) (stateless sampling in
`keras_metalstm.data`), the meta-learner itself draws no random numbers while training, and the optimizer's
state and the episode counter are in the checkpoint. So the only "RNG state" is (seed, episode counter), both
checkpointed; a run resumed from episode c sees exactly the episodes c, c+1, ... of the uninterrupted run, and
with `tf.config.experimental.enable_op_determinism()` ends with bitwise-identical weights.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from keras_metalstm.config import CONFIG_FILE_NAME, ConfigError, RunConfig, atomic_write_text
from keras_metalstm.learner_spec import ARCHITECTURE_FILE

CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"
METRICS_FILE = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
CURVES_FILE = "curves.png"
STATE_FILE = "state.json"
BEST_MODEL_FILE = "best.keras"


class TrainingError(RuntimeError):
    """A training run cannot start or continue (base class of the errors below)."""


class RunDirError(TrainingError):
    """The run directory holds another run, holds no run to resume, or its run has a different shape."""


class CheckpointMismatchError(TrainingError):
    """A checkpoint does not fit the meta-learner built from the configuration (different learner/episode shape)."""


class DivergedError(TrainingError):
    """The meta-training loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainingResult:
    run_dir: Path
    status: str  # finished | interrupted
    episode: int
    best_val_accuracy: float | None
    best_episode: int | None
    seconds: float
    last_train: dict = field(default_factory=dict)
    chief: bool = True  # False on the other workers of a cluster: they wrote nothing into run_dir
    task: str | None = None  # "worker 1", "chief" ... in a multi-worker cluster, None on a single worker


# --------------------------------------------------------------------------------------------- building
def load_splits(config: RunConfig):
    """The data set's (train, val, test) splits for `config` (raises keras_metalstm.data.DataError)."""
    from keras_metalstm.data import load_dataset

    options = {}
    if config.rotations:
        options["rotations"] = True
    return load_dataset(config.dataset, config.data_dir, **options)


def build_meta_learner(config: RunConfig, architecture: dict | None = None):
    """A fresh MetaLearner of the configured shape (learner seeded by config.seed) around `architecture`, the
    learner's Keras config (`learner_spec.architecture_config`); None builds the run's built-in learner (runs
    written before learner.json existed are conv4 runs)."""
    import keras

    import keras_metalstm as km
    from keras_metalstm.learner_spec import build_learner, learner_kind, model_from_architecture

    if config.image_shape is None:
        raise ConfigError("image_shape is unknown: load the data set first (train() fills it in)")
    keras.utils.set_random_seed(int(config.seed))
    if architecture is not None:
        learner = model_from_architecture(architecture, tuple(config.image_shape))
    elif learner_kind(config.learner) == "built-in":
        learner = build_learner(config.learner, config.image_shape, config.n_way, config.filters)
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
    )


def learner_architecture(config: RunConfig, run_dir=None) -> dict | None:
    """The learner architecture of a run: RUN_DIR/learner.json when the run has one, else (a new run) the
    learner of `config.learner` built and checked on the episode shape (LearnerError saying what is wrong)."""
    import keras

    from keras_metalstm.learner_spec import (
        architecture_config,
        build_learner,
        check_learner,
        model_from_architecture,
        read_architecture,
    )

    stored = read_architecture(run_dir) if run_dir is not None else None
    if stored is not None:
        return stored
    keras.utils.set_random_seed(int(config.seed))
    learner = build_learner(config.learner, config.image_shape, config.n_way, config.filters)
    check_learner(learner, config.image_shape, config.n_way, batch=config.n_way * config.k_shot)
    architecture = architecture_config(learner)
    model_from_architecture(architecture, tuple(config.image_shape))  # what evaluate and resume will load
    return architecture

def learning_rate_schedule(config: RunConfig):
    """The meta-optimiser's step for `config`: the constant `learning_rate`, or a cosine decay from it to
    `final_learning_rate` (default learning_rate / 100) over the run's meta-updates (episodes / meta_batch)."""
    if config.lr_schedule == "constant":
        return float(config.learning_rate)
    import keras

    initial = float(config.learning_rate)
    final = initial / 100 if config.final_learning_rate is None else float(config.final_learning_rate)
    return keras.optimizers.schedules.CosineDecay(
        initial, decay_steps=config.episodes // config.meta_batch, alpha=final / initial
    )


def _checkpoint(meta, optimizer=None, episode=None, best_accuracy=None, best_episode=None):
    import tensorflow as tf

    objects = {"meta": meta}
    if optimizer is not None:
        objects["optimizer"] = optimizer
    if episode is not None:
        objects.update(episode=episode, best_accuracy=best_accuracy, best_episode=best_episode)
    return tf.train.Checkpoint(**objects)


def restore_checkpoint(checkpoint, path, what="checkpoint"):
    """Restore `checkpoint` from `path`, turning shape/structure mismatches into CheckpointMismatchError."""
    try:
        status = checkpoint.read(str(path))
        status.assert_existing_objects_matched()
        status.expect_partial()
    except (ValueError, AssertionError) as error:
        raise CheckpointMismatchError(
            f"the {what} at {path} does not fit this meta-learner (different learner shape, image shape, "
            f"N-way or hidden units?): {str(error).splitlines()[0][:300]}"
        ) from None
    except Exception as error:  # noqa: BLE001 - NotFoundError, DataLossError ... one clear message
        raise CheckpointMismatchError(
            f"cannot read the {what} at {path}: {str(error).splitlines()[0][:300]}"
        ) from None


def run_exists(run_dir: str | os.PathLike) -> bool:
    run_dir = Path(run_dir)
    return (run_dir / CONFIG_FILE_NAME).is_file() or (run_dir / CHECKPOINT_DIR).is_dir()


def load_run_config(run_dir: str | os.PathLike) -> RunConfig:
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE_NAME
    if not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} does not exist")
    if not path.is_file():
        raise RunDirError(
            f"{run_dir} holds no training run (no {CONFIG_FILE_NAME}); train one with `metalstm train`"
        )
    return RunConfig.load(path)


def load_meta_learner(run_dir: str | os.PathLike, which: str = "best"):
    """(config, meta-learner) of a run directory; `which` = "best" (best validation, falling back to the latest
    checkpoint when no validation ran) or "latest"."""
    import tensorflow as tf

    from keras_metalstm.learner_spec import read_architecture

    config = load_run_config(run_dir)
    meta = build_meta_learner(config, read_architecture(run_dir))
    run_dir = Path(run_dir)
    path = None
    if which == "best":
        path = tf.train.latest_checkpoint(str(run_dir / BEST_DIR))
    if path is None:
        path = tf.train.latest_checkpoint(str(run_dir / CHECKPOINT_DIR))
    if path is None:
        raise RunDirError(f"{run_dir} holds no checkpoint yet (training never reached its first checkpoint)")
    restore_checkpoint(_checkpoint(meta), path)
    return config, meta


# ----------------------------------------------------------------------------------------------- training
class _StopFlag:
    """Set by SIGINT/SIGTERM: the loop saves a checkpoint and stops after the current meta-update."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: give up at once
        self.signal = signum

    def uninstall(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class Callback:
    """Hooks for progress display; every method is optional."""

    def on_start(self, run, start_episode, total_episodes):
        pass

    def on_step(self, episode, loss, accuracy):
        pass

    def on_validation(self, episode, accuracy, ci95, is_best):
        pass

    def on_checkpoint(self, episode, path):
        pass

    def on_message(self, text):
        """A line about work outside the episode loop (e.g. pre-training the classifier theta_0 starts from)."""

    def on_end(self, result):
        pass


@contextlib.contextmanager
def _op_determinism(enabled):
    """Deterministic TensorFlow ops for the duration of a run, then the process's previous setting again (it is
    process-global: left on, it would break XLA work that follows in the same process)."""
    from tensorflow.python.framework import config as tf_config  # the only place with a public-to-TF toggle

    previously = tf_config.is_op_determinism_enabled()
    if enabled and not previously:
        tf_config.enable_op_determinism()
    try:
        yield
    finally:
        if enabled and not previously:
            tf_config.disable_op_determinism()


class TrainingRun:
    """One meta-training run in `run_dir`; `run()` trains to `config.episodes` and returns a TrainingResult.

    The run trains under the tf.distribute strategy in scope when `run()` is called (the CLI enters
    keras_metalstm.distribute.make_strategy(...).scope()); under a multi-worker strategy every worker runs the same
    program and only the chief writes into `run_dir`.

    Args:
        config: the RunConfig (with resume=True, the stored config is used and `config` may only change
            non-shape settings such as `episodes`, `learning_rate`, intervals or `xla`).
        run_dir: the run directory (created by the chief).
        resume: continue the run stored in `run_dir` (a missing or empty directory starts a new run).
        deterministic: enable TensorFlow op determinism, process-wide (bitwise-reproducible runs; the command line
            turns it on by default). Ignored with `config.xla` (XLA has no deterministic MaxPool gradient).

    `run()` checks the run directory and the data before anything is written, and raises RunDirError,
    DataError ... on every worker when any worker cannot start.
    """

    def __init__(self, config: RunConfig, run_dir, resume: bool = False, deterministic: bool = False):
        self.run_dir = Path(run_dir)
        self.resume = bool(resume)
        self.deterministic = deterministic
        self.config = config  # completed by run() from the stored run and the data
        self.chief = True
        self.task = None

    # --- run directory handling ----------------------------------------------------------------------
    def _prepare_config(self, config: RunConfig) -> RunConfig:
        run_dir = self.run_dir
        if run_dir.exists() and not run_dir.is_dir():
            raise RunDirError(f"{run_dir} exists and is not a directory")
        exists = run_exists(run_dir)
        # Only the chief guards the directory: another worker may find the run the chief is creating at this
        # very moment and cannot tell it from an old one. A refusal still stops every worker (all_workers_ok).
        if self.chief and exists and not self.resume:
            raise RunDirError(
                f"{run_dir} already holds a training run; pass --resume to continue it, or choose another "
                "--run-dir (nothing was overwritten)"
            )
        if self.chief and not exists and run_dir.is_dir() and any(run_dir.iterdir()):
            raise RunDirError(
                f"{run_dir} is not empty and holds no training run; choose an empty or new --run-dir "
                "(nothing was overwritten)"
            )
        if exists and self.resume:
            stored = load_run_config(run_dir)
            if config.image_shape is None:
                config = config.replace(image_shape=stored.image_shape)
            differences = stored.shape_differences(config)
            if differences:
                listed = ", ".join(
                    f"{k}: run has {a!r}, requested {b!r}"
                    for k, a, b in ((k, *v) for k, v in differences.items())
                )
                raise RunDirError(
                    f"cannot resume {run_dir} with a different learner, episode shape or step schedule ({listed}); "
                    "use another --run-dir for a new run"
                )
            if config.data_dir is None:
                config = config.replace(data_dir=stored.data_dir)
        return config

    # --- main loop -------------------------------------------------------------------------------------
    def run(self, callbacks: Callback | None = None) -> TrainingResult:
        import tensorflow as tf

        from keras_metalstm.distribute import all_workers_ok, is_chief, task_name

        callbacks = callbacks or Callback()
        strategy = tf.distribute.get_strategy()
        self.chief, self.task = is_chief(strategy), task_name(strategy)
        # XLA has no deterministic MaxPool gradient: with --xla, runs are not bitwise reproducible.
        with _op_determinism(self.deterministic and not self.config.xla):
            # Every worker must reach the agreement, whatever failed before it.
            failure = None
            try:
                splits = self._start(strategy)
            except Exception as error:
                failure = error
            if not all_workers_ok(strategy, failure is None):
                raise failure or TrainingError(
                    f"{self.task}: stopped before training: another worker could not start the run (its output "
                    "says why)"
                )
            return self._run(callbacks, self.config, splits, strategy)

    def _start(self, strategy):
        """Check the run directory and the data, then (chief) write config.yaml; returns the data splits."""
        config = self._prepare_config(self.config)
        splits = load_splits(config)
        image_shape = list(splits.image_shape)
        if config.image_shape is not None and list(config.image_shape) != image_shape:
            raise RunDirError(
                f"the run was trained on images of shape {tuple(config.image_shape)} but the data set now has "
                f"{tuple(image_shape)}"
            )
        self.config = config.replace(image_shape=image_shape)
        # Check the episode shape fits the data before anything is written.
        km_data_check(splits, self.config)
        _check_theta0_source(self.config, strategy)
        self.architecture = learner_architecture(self.config, self.run_dir)
        if self.chief:
            from keras_metalstm.learner_spec import save_architecture

            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.config.save(self.run_dir / CONFIG_FILE_NAME)
            if not (self.run_dir / ARCHITECTURE_FILE).is_file():
                save_architecture(self.architecture, self.run_dir)
        return splits

    def _run(self, callbacks, config, splits, strategy):
        import numpy as np
        import tensorflow as tf

        import keras_metalstm as km
        from keras_metalstm.distribute import distributed_episodes, remove_worker_directory, worker_directory

        chief = self.chief
        with strategy.scope():
            meta = build_meta_learner(config, self.architecture)
            trainer = km.MetaTrainer(
                meta,
                optimizer=km.meta_optimizer(learning_rate_schedule(config), config.theta0_lr_scale),
                clip_norm=config.clip_norm,
                jit_compile=config.xla,
                strategy=strategy,
            )
            episode = tf.Variable(0, dtype=tf.int64, trainable=False, name="episode")
            best_accuracy = tf.Variable(-1.0, dtype=tf.float64, trainable=False, name="best_accuracy")
            best_episode = tf.Variable(-1, dtype=tf.int64, trainable=False, name="best_episode")
        checkpoint = _checkpoint(meta, trainer.optimizer, episode, best_accuracy, best_episode)
        # Every worker resumes from the chief's latest checkpoint.
        latest = tf.train.latest_checkpoint(str(self.run_dir / CHECKPOINT_DIR))
        pretrain_seconds = 0.0
        if latest:
            restore_checkpoint(checkpoint, latest)
            if config.lr_schedule == "constant":
                # A constant rate is a checkpointed variable: a resumed run uses the configured one. A schedule is
                # a function of the restored update count, so it continues exactly.
                trainer.optimizer.learning_rate = config.learning_rate
        elif config.theta0_init == "pretrained":
            pretrain_start = time.time()
            try:
                meta.initialize_theta0_from(self._theta0_source(config, splits, meta.learner, callbacks))
            except ValueError as error:  # a model of another architecture
                raise TrainingError(str(error)) from None
            pretrain_seconds = time.time() - pretrain_start
        start = int(episode.numpy())
        state = self._read_state()
        seconds_before = float(state.get("seconds", 0.0)) if start else pretrain_seconds
        log = MetricsLog(self.run_dir, truncate_after=start) if chief else None
        writer = _tensorboard_writer(self.run_dir) if chief else None

        callbacks.on_start(self, start, config.episodes)
        # Every worker saves (a save may need collectives); only the chief's copy is kept.
        output_dir = Path(worker_directory(self.run_dir, strategy))
        manager = tf.train.CheckpointManager(
            checkpoint, str(output_dir / CHECKPOINT_DIR), max_to_keep=config.keep_checkpoints
        )
        best_manager = tf.train.CheckpointManager(checkpoint, str(output_dir / BEST_DIR), max_to_keep=1)
        stop = _StopFlag().install()
        t0 = time.time()
        status = "finished"
        window_loss, window_acc = [], []
        last_train = {}

        def seconds():
            return seconds_before + time.time() - t0

        def save(path_manager=manager):
            path = path_manager.save(checkpoint_number=int(episode.numpy()))
            callbacks.on_checkpoint(int(episode.numpy()), path)
            return path

        def record(row, scalars):
            if chief:
                log.append(row)
                _tb_scalars(writer, row["episode"], scalars)

        try:
            self._write_state("running", start, best_accuracy, best_episode, seconds())
            remaining = config.episodes - start
            if remaining > 0:
                # Replica r of step g gets episodes start + g*G + r*G/R ...: the same global batches as one device.
                batches = distributed_episodes(
                    strategy,
                    splits.train,
                    config.n_way,
                    config.k_shot,
                    config.query,
                    global_batch=config.meta_batch,
                    seed=config.seed,
                    start_episode=start,
                    num_episodes=remaining,
                )
                for batch in batches:
                    out = trainer.train_step(batch)
                    loss, accuracy = float(out["loss"]), float(out["accuracy"])
                    current = int(episode.numpy()) + config.meta_batch
                    if not (math.isfinite(loss) and math.isfinite(accuracy)):
                        last_good = tf.train.latest_checkpoint(str(self.run_dir / CHECKPOINT_DIR))
                        self._write_state("diverged", current, best_accuracy, best_episode, seconds())
                        raise DivergedError(
                            f"the meta-training loss became {loss} at episode {current}; training stopped. "
                            f"The last good checkpoint is kept: {last_good or 'none (no checkpoint yet)'}. "
                            "Try a smaller --learning-rate or --clip-norm, then --resume."
                        )
                    episode.assign(current)
                    window_loss.append(loss)
                    window_acc.append(accuracy)
                    callbacks.on_step(current, loss, accuracy)
                    if current % config.log_every == 0 or current == config.episodes:
                        last_train = {
                            "episode": current,
                            "loss": float(np.mean(window_loss)),
                            "accuracy": float(np.mean(window_acc)),
                            "learning_rate": float(tf.convert_to_tensor(trainer.optimizer.learning_rate)),
                            "seconds": round(seconds(), 3),
                        }
                        record(
                            {"kind": "train", **last_train},
                            {"train/loss": last_train["loss"], "train/accuracy": last_train["accuracy"]},
                        )
                        window_loss, window_acc = [], []
                    validate_now = config.val_episodes > 0 and (
                        current % config.validate_every == 0 or current == config.episodes
                    )
                    if validate_now:
                        accuracies = evaluate_episodes(
                            trainer, splits.val, config, config.val_episodes, seed=config.seed + 1
                        )
                        mean, ci = mean_ci95(accuracies)
                        is_best = mean > float(best_accuracy.numpy())
                        if is_best:
                            best_accuracy.assign(mean)
                            best_episode.assign(current)
                        record(
                            {
                                "kind": "val",
                                "episode": current,
                                "accuracy": mean,
                                "ci95": ci,
                                "best": bool(is_best),
                                "seconds": round(seconds(), 3),
                            },
                            {"val/accuracy": mean},
                        )
                        if is_best:
                            best_manager.save(checkpoint_number=current)
                        callbacks.on_validation(current, mean, ci, is_best)
                    if current % config.checkpoint_every == 0 or current == config.episodes or validate_now:
                        save()
                    if stop.signal is not None:
                        if manager.latest_checkpoint is None or not manager.latest_checkpoint.endswith(
                            f"-{current}"
                        ):
                            save()
                        status = "interrupted"
                        break
            if status == "finished":
                validated = float(best_accuracy.numpy()) >= 0
                _save_best_model(self.run_dir, meta, best_manager, validated, write=chief)
        finally:
            stop.uninstall()
            remove_worker_directory(output_dir, self.run_dir)
            if chief:
                if writer is not None:
                    writer.flush()
                log.close()
                if status in ("finished", "interrupted") and self._read_state().get("status") != "diverged":
                    self._write_state(status, int(episode.numpy()), best_accuracy, best_episode, seconds())
                write_curves(self.run_dir)
        best = float(best_accuracy.numpy())
        result = TrainingResult(
            run_dir=self.run_dir,
            status=status,
            episode=int(episode.numpy()),
            best_val_accuracy=best if best >= 0 else None,
            best_episode=int(best_episode.numpy()) if best >= 0 else None,
            seconds=seconds(),
            last_train=last_train,
            chief=chief,
            task=self.task,
        )
        callbacks.on_end(result)
        return result

    def _theta0_source(self, config, splits, learner, callbacks):
        """The trained classifier theta_0 starts from: config.pretrained_model, the saved model a `.keras` learner
        was given as, or the learner's architecture pre-trained on the meta-train classes and cached in
        RUN_DIR/baselines/ (where `metalstm evaluate --baselines` finds it)."""
        from keras_metalstm.learner_spec import learner_kind, load_learner_file

        if config.pretrained_model:
            return load_learner_file(config.pretrained_model)
        if learner_kind(config.learner) == "file":
            return load_learner_file(config.learner)
        from keras_metalstm.baselines import (
            PretrainConfig,
            baseline_cache_paths,
            cached_pretrained_classifier,
        )

        model, info = cached_pretrained_classifier(
            self.run_dir,
            config,
            splits,
            learner,
            PretrainConfig(epochs=config.pretrain_epochs, seed=config.seed),
            log=callbacks.on_message,
        )
        callbacks.on_message(
            f"theta_0 starts from the classifier pre-trained on the meta-train classes "
            f"({baseline_cache_paths(self.run_dir)[0]}, training accuracy "
            f"{100 * info['pretrain_train_accuracy']:.1f}%)"
        )
        return model

    # --- state file ------------------------------------------------------------------------------------
    def _read_state(self) -> dict:
        path = self.run_dir / STATE_FILE
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def _write_state(self, status, episode, best_accuracy, best_episode, seconds):
        if not self.chief:  # the run directory is the chief's
            return
        best = float(best_accuracy.numpy())
        atomic_write_text(
            self.run_dir / STATE_FILE,
            json.dumps(
                {
                    "status": status,
                    "episode": int(episode),
                    "episodes": self.config.episodes,
                    "best_val_accuracy": best if best >= 0 else None,
                    "best_episode": int(best_episode.numpy()) if best >= 0 else None,
                    "seconds": round(float(seconds), 3),
                },
                indent=2,
            )
            + "\n",
        )


def train(
    config: RunConfig,
    run_dir,
    resume: bool = False,
    callbacks: Callback | None = None,
    deterministic: bool = False,
) -> TrainingResult:
    """Meta-train `config` in `run_dir` (see TrainingRun)."""
    return TrainingRun(config, run_dir, resume=resume, deterministic=deterministic).run(callbacks)


def _check_theta0_source(config: RunConfig, strategy) -> None:
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


def km_data_check(splits, config: RunConfig) -> None:
    """Raise DataError now if the splits cannot give the configured episodes (instead of mid-training)."""
    from keras_metalstm.data import EpisodeSampler

    EpisodeSampler(splits.train, config.n_way, config.k_shot, config.query)
    if config.val_episodes:
        EpisodeSampler(splits.val, config.n_way, config.k_shot, config.query)


def _save_best_model(run_dir: Path, meta, best_manager, validated: bool, write: bool = True) -> None:
    """Write best.keras (the best-validation meta-learner, or the final one when no validation ran).

    Every worker of a cluster calls this: with `validated` (the same on every worker) the best meta-learner is
    built anew, and creating variables is a collective under a multi-worker strategy. Only `write` (the chief,
    whose best/ holds the best checkpoint of every session) restores and saves it.
    """
    best = type(meta).from_config(meta.get_config()) if validated else meta
    if not write:
        return
    if validated:
        restore_checkpoint(_checkpoint(best), best_manager.latest_checkpoint, "best checkpoint")
    target = run_dir / BEST_MODEL_FILE
    tmp = run_dir / f".tmp-{os.getpid()}-{BEST_MODEL_FILE}"
    best.save(str(tmp))
    os.replace(tmp, target)


# ---------------------------------------------------------------------------------------------- evaluation
def mean_ci95(accuracies):
    """(mean, 1.96 * std / sqrt(E)) of per-episode accuracies, std = POPULATION std (numpy's default, ddof=0)."""
    import numpy as np

    values = np.asarray(accuracies, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("no episodes to summarise")
    return float(values.mean()), float(1.96 * values.std() / math.sqrt(values.size))


def eval_batch_size(episodes: int, limit: int = 5) -> int:
    """Largest divisor of `episodes` not above `limit` (every batch full: static shapes)."""
    for size in range(min(limit, episodes), 0, -1):
        if episodes % size == 0:
            return size
    return 1


def evaluate_episodes(trainer, dataset, config: RunConfig, episodes: int, seed: int, progress=None):
    """Per-episode test-mode query accuracies of the meta-learner on `episodes` episodes of `dataset`."""
    import numpy as np
    import tensorflow as tf

    from keras_metalstm.data import episode_dataset

    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    batch = eval_batch_size(episodes)
    if batch % replicas:  # each replica evaluates batch/R episodes (MetaTrainer.evaluate_step)
        batch = replicas * eval_batch_size(episodes // replicas) if episodes % replicas == 0 else batch
    stream = episode_dataset(
        dataset, config.n_way, config.k_shot, config.query, batch_size=batch, seed=seed, num_episodes=episodes
    )
    out = []
    for episodes_batch in stream:
        out.append(trainer.evaluate_step(episodes_batch)["accuracy"].numpy())
        if progress is not None:
            progress(batch)
    return np.concatenate(out)


# ------------------------------------------------------------------------------------------------ logging
class MetricsLog:
    """metrics.jsonl (appended) + metrics.csv (rewritten atomically); on resume rows past the restored episode
    are dropped so the log matches the checkpoint."""

    def __init__(self, run_dir: Path, truncate_after: int | None = None):
        self.path = Path(run_dir) / METRICS_FILE
        self.csv_path = Path(run_dir) / METRICS_CSV
        self.rows = read_metrics(run_dir)
        if truncate_after is not None:
            kept = [r for r in self.rows if int(r.get("episode", 0)) <= truncate_after]
            if len(kept) != len(self.rows) or truncate_after == 0:
                kept = kept if truncate_after else []
                atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
            self.rows = kept
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def append(self, row: dict) -> None:
        self.rows.append(row)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        self._write_csv()

    def _write_csv(self):
        keys = ["kind", "episode", "loss", "accuracy", "learning_rate", "ci95", "best", "seconds"]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.csv_path, buffer.getvalue())

    def close(self):
        self._file.close()


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a kill -9
    return rows


def write_curves(run_dir) -> Path | None:
    from keras_metalstm.plots import plot_training_curves

    rows = read_metrics(run_dir)
    if not rows:
        return None
    return plot_training_curves(rows, Path(run_dir) / CURVES_FILE)


def _tensorboard_writer(run_dir: Path):
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        return None
    import tensorflow as tf

    return tf.summary.create_file_writer(str(run_dir / "tensorboard"))


def _tb_scalars(writer, step, values):
    if writer is None:
        return
    import tensorflow as tf

    with writer.as_default(step=step):
        for name, value in values.items():
            tf.summary.scalar(name, value)
