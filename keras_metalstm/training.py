"""Meta-training runs: their checks and setup, exact resume, validation with best-checkpoint keeping, NaN guard,
logs (the loop of a session itself: keras_metalstm.training_session).

`TrainingRun(config, run_dir).run()` checks the run directory, the data and the learner before anything is
written, then trains to `config.episodes` (the run directory's layout: keras_metalstm.runs). Under a multi-worker
strategy only the chief (keras_metalstm.distribute.is_chief) checks and writes the run directory; the other
workers read it only to resume from the chief's latest checkpoint, and write their copies of the checkpoints
(every worker takes part in a save) to a private temporary directory they delete.

Exact resume: episode e of the training stream is a pure function of (seed, e) (stateless sampling in
`keras_metalstm.data`), the meta-learner itself draws no random numbers while training, and the optimizer's
state and the episode counter are in the checkpoint. So the only "RNG state" is (seed, episode counter), both
checkpointed; a run resumed from episode c sees exactly the episodes c, c+1, ... of the uninterrupted run, and
with `tf.config.experimental.enable_op_determinism()` ends with bitwise-identical weights if its steps round as
those of the session that wrote the checkpoint did (keras_metalstm.numerics; a resume says when they do not). The
metrics row in progress (the losses since the last row) and the training seconds of earlier sessions are kept in
state.json at every checkpoint, so a resumed run's log and times continue as if uninterrupted.

state.json always says how the last session ended: running (or, seen from a later session whose writer is gone,
crashed), finished, interrupted, diverged, or "failed: <reason>".
"""

from __future__ import annotations

import concurrent.futures
import contextlib
from pathlib import Path

from keras_metalstm.config import CONFIG_FILE_NAME, RunConfig
from keras_metalstm.learner_architecture import ARCHITECTURE_FILE
from keras_metalstm.metrics_log import (
    read_metrics,
)
from keras_metalstm.paths import refuse_url
from keras_metalstm.run_checks import (
    check_episode_batching,
    check_episode_shapes,
    check_theta0_source,
    test_split_problem,
)
from keras_metalstm.runs import (
    SPLITS_FILE,
    STATE_FILE,
    RunDirError,
    TrainingError,
    latest_checkpoint,
    learner_architecture,
    live_owner,
    load_run_config,
    load_splits,
    read_state,
    record_splits,
    run_exists,
    start_failed,
    write_state,
)
from keras_metalstm.training_session import Callback, TrainingResult, TrainingSession, checkpoint_episode


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


def _outside_any_strategy(function, *args):
    """`function(*args)` in a new thread. tf.distribute strategy scopes belong to a thread, so the variables it
    creates are plain ones: under a multi-worker strategy, creating variables is a collective that every worker
    must join, and checking the learner before the workers agree to start must not depend on that."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(function, *args).result()


class TrainingRun:
    """One meta-training run in `run_dir`; `run()` trains to `config.episodes` and returns a TrainingResult.

    The run trains under the tf.distribute strategy in scope when `run()` is called (the CLI enters
    keras_metalstm.distribute.make_strategy(...).scope()); under a multi-worker strategy every worker runs the same
    program and only the chief writes into `run_dir`.

    Args:
        config: the RunConfig (with resume=True, the stored config is used and `config` may only change
            non-shape settings such as `episodes`, `learning_rate`, intervals or `xla`).
        run_dir: the run directory (created by the chief).
        resume: continue the run stored in `run_dir` (RunDirError if it holds none).
        deterministic: enable TensorFlow op determinism, process-wide (bitwise-reproducible runs; the command line
            turns it on by default). Ignored with `config.xla` (XLA has no deterministic MaxPool gradient).

    `run()` checks the run directory, the data and the learner before anything is written, and raises RunDirError,
    DataError, LearnerError ... on every worker when any worker cannot start. A directory whose run never reached
    its first checkpoint (a start that failed or was interrupted) is started afresh.
    """

    def __init__(self, config: RunConfig, run_dir, resume: bool = False, deterministic: bool = False):
        refuse_url(run_dir, "the run directory", RunDirError)
        self.run_dir = Path(run_dir)
        self.resume = bool(resume)
        self.deterministic = deterministic
        self.config = config  # completed by run() from the stored run and the data
        self.chief = True
        self.task = None
        self.started = False  # the directory holds a run that reached its first checkpoint
        self.architecture = None
        self.data_notes = []  # what loading the data found, said when training starts

    # --- run directory handling ----------------------------------------------------------------------
    def _prepare_config(self, config: RunConfig) -> RunConfig:
        run_dir = self.run_dir
        if run_dir.exists() and not run_dir.is_dir():
            raise RunDirError(f"{run_dir} exists and is not a directory")
        exists = run_exists(run_dir)
        self.started = exists and bool(latest_checkpoint(run_dir) or read_metrics(run_dir))
        # Only the chief guards the directory: another worker may find the run the chief is creating at this
        # very moment and cannot tell it from an old one. A refusal still stops every worker (all_workers_ok).
        if self.chief:
            self._check_directory(exists)
        if exists and self.resume:
            config = self._resumed_config(config)
        return config

    def _check_directory(self, exists: bool) -> None:
        run_dir = self.run_dir
        # Two sessions in one directory would each restore, train and write its files over the other's.
        if exists and (owner := live_owner(run_dir)) is not None:
            raise RunDirError(
                f"{run_dir} is being trained now by process {owner} on this machine ({STATE_FILE}); wait for it to "
                "finish, or stop it (Ctrl-C saves a checkpoint) and then --resume (nothing was changed)"
            )
        if self.resume and not exists:
            raise RunDirError(
                f"--resume: {run_dir} holds no training run to resume (no {CONFIG_FILE_NAME}); check the path, or "
                "leave out --resume to start a new run there"
            )
        if exists and not self.resume and not start_failed(run_dir):
            if not (run_dir / STATE_FILE).is_file() and not latest_checkpoint(run_dir):
                raise RunDirError(
                    f"{run_dir} holds a run that was set up but never started ({CONFIG_FILE_NAME}, no {STATE_FILE}: "
                    "another run's, or a start that failed early, e.g. on a full disk); pass --resume to start it "
                    "with its settings, or choose another --run-dir (nothing was overwritten)"
                )
            raise RunDirError(
                f"{run_dir} already holds a training run; pass --resume to continue it, or choose another "
                "--run-dir (nothing was overwritten)"
            )
        if not exists and run_dir.is_dir() and any(run_dir.iterdir()):
            raise RunDirError(
                f"{run_dir} is not empty and holds no training run; choose an empty or new --run-dir "
                "(nothing was overwritten)"
            )

    def _resumed_config(self, config: RunConfig) -> RunConfig:
        stored = load_run_config(self.run_dir)
        if config.image_shape is None:
            config = config.replace(image_shape=stored.image_shape)
        differences = stored.shape_differences(config)
        if differences:
            listed = ", ".join(f"{k}: run has {a!r}, requested {b!r}" for k, (a, b) in differences.items())
            raise RunDirError(
                f"cannot resume {self.run_dir} with a different learner, episode shape, step schedule or start "
                f"({listed}); "
                "use another --run-dir for a new run"
            )
        # config.yaml says 0 after a session that did not validate; state.json keeps what the best was measured on.
        measured = read_state(self.run_dir).get("best_val_episodes") or stored.val_episodes
        if measured and config.val_episodes and config.val_episodes != measured:
            raise RunDirError(
                f"cannot resume {self.run_dir} with --val-episodes {config.val_episodes}: its validations ran "
                f"{measured} episodes, and the best checkpoint is chosen by comparing them; keep "
                f"--val-episodes {measured} (or pass 0 to stop validating), or train a new run"
            )
        done = checkpoint_episode(latest_checkpoint(self.run_dir))
        if config.episodes < done:
            raise RunDirError(
                f"cannot resume {self.run_dir} with --episodes {config.episodes}: the run is already at episode "
                f"{done}; pass --episodes above {done} to train longer (nothing was changed)"
            )
        if config.data_dir is None:
            config = config.replace(data_dir=stored.data_dir)
        return config

    # --- main loop -------------------------------------------------------------------------------------
    def run(self, callbacks: Callback | None = None) -> TrainingResult:
        import tensorflow as tf

        from keras_metalstm.distribute import all_workers_ok, is_chief, same_on_every_worker, task_name

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
            if not same_on_every_worker(strategy, self.config.fingerprint()):
                raise TrainingError(
                    f"{self.task}: stopped before training: the workers were given different run settings (a "
                    "meta-batch, seed, learner...); start every worker with the same command, --config file and "
                    "METALSTM_* variables (only TF_CONFIG differs)"
                )
            return TrainingSession(self, callbacks, splits, strategy).train()

    def _start(self, strategy):
        """Check the run directory, the data and the learner, then (chief) write config.yaml, learner.json and, for
        a new run, splits.json; returns the data splits."""
        config = self._prepare_config(self.config)
        self.data_notes = []
        # A run that reached a checkpoint continues on the classes it started with (RUN_DIR/splits.json).
        splits = load_splits(config, report=self.data_notes.append, run_dir=self.run_dir if self.started else None)
        source = f"{config.dataset} {config.data_dir}" if config.data_dir else config.dataset
        self.data_notes.insert(0, f"data: {source}: {splits.describe()} (which classes: {self.run_dir / SPLITS_FILE})")
        image_shape = list(splits.image_shape)
        if config.image_shape is not None and list(config.image_shape) != image_shape:
            raise RunDirError(
                f"the run was trained on images of shape {tuple(config.image_shape)} but the data set now has "
                f"{tuple(image_shape)}"
            )
        self.config = config.replace(image_shape=image_shape)
        # Check the episode shape fits the data before anything is written.
        check_episode_shapes(splits, self.config, self.data_notes[1:])
        from keras_metalstm.distribute import per_replica_batch

        per_replica_batch(strategy, self.config.meta_batch)  # refused now, not after the run directory is written
        if problem := test_split_problem(splits, self.config):
            self.data_notes.append(problem)
        # A run that reached a checkpoint keeps its stored learner; a new one builds and checks config.learner.
        stored = self.run_dir if self.started else None
        self.architecture = _outside_any_strategy(learner_architecture, self.config, stored)
        check_theta0_source(self.config, strategy, self.architecture)
        _outside_any_strategy(check_episode_batching, self.config, self.architecture)
        if self.chief:
            from keras_metalstm.learner_architecture import save_architecture

            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.config.save(self.run_dir / CONFIG_FILE_NAME)
            if not self.started or not (self.run_dir / ARCHITECTURE_FILE).is_file():
                save_architecture(self.architecture, self.run_dir)
            if not self.started or not (self.run_dir / SPLITS_FILE).is_file():
                record_splits(splits, self.run_dir)
            if not self.started:  # until the first checkpoint, a failed start leaves a directory to start again
                write_state(self.run_dir, "starting", 0, self.config.episodes, None, None, 0.0)
        return splits

    def _theta0_source(self, config, splits, learner, callbacks, should_stop=None):
        """The trained classifier theta_0 starts from: config.pretrained_model, the saved model a `.keras` learner
        was given as, or the learner's architecture pre-trained on the meta-train classes and cached in
        RUN_DIR/baselines/ (where `metalstm evaluate --baselines` finds it)."""
        from keras_metalstm.baseline_cache import (
            baseline_cache_paths,
            cached_pretrained_classifier,
            theta0_from_cached_classifier,
        )
        from keras_metalstm.learner_spec import load_learner_file

        if not theta0_from_cached_classifier(config):
            source = config.pretrained_model or config.learner
            callbacks.on_message(f"theta_0 starts from the weights of {source}")
            return load_learner_file(source)
        model, info = cached_pretrained_classifier(
            self.run_dir, config, splits, learner, log=callbacks.on_message, should_stop=should_stop
        )
        callbacks.on_message(
            f"theta_0 starts from the classifier pre-trained on the meta-train classes "
            f"({baseline_cache_paths(self.run_dir)[0]}, training accuracy "
            f"{100 * info['pretrain_train_accuracy']:.1f}%)"
        )
        return model


def train(
    config: RunConfig,
    run_dir,
    resume: bool = False,
    callbacks: Callback | None = None,
    deterministic: bool = False,
) -> TrainingResult:
    """Meta-train `config` in `run_dir` (see TrainingRun)."""
    return TrainingRun(config, run_dir, resume=resume, deterministic=deterministic).run(callbacks)
