"""One session of a meta-training run: from the run's latest checkpoint (or its start) to `config.episodes` or a
stop (a signal, a NaN loss), with validation and best-checkpoint keeping, checkpoints and state.json, the metrics
log and the progress callbacks. `keras_metalstm.training.TrainingRun` checks and prepares a run, then hands it to
a `TrainingSession`."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from keras_metalstm.config import RunConfig, first_line
from keras_metalstm.data.errors import tensorflow_error_text
from keras_metalstm.metrics_log import (
    MetricsLog,
    read_metrics,
    tensorboard_writer,
    write_curves,
    write_scalars,
)
from keras_metalstm.numerics import numerics_differences, resume_note, step_numerics
from keras_metalstm.run_checks import memory_problem, physical_memory
from keras_metalstm.runs import (
    BEST_DIR,
    CHECKPOINT_DIR,
    TrainingError,
    build_meta_learner,
    checkpoint_object,
    crashed,
    latest_checkpoint,
    read_state,
    remove_partial_checkpoints,
    restore_checkpoint,
    save_best_model,
    write_state,
)
from keras_metalstm.stop_signals import OutputMayHangUp, StopFlag, StopRequested

if TYPE_CHECKING:
    from keras_metalstm.training import TrainingRun

XLA_ON_CPU_NOTE = (
    "XLA compiles this run's step for a CPU (no GPU or TPU is visible): there it is up to 1.4x slower than "
    "without XLA for 28x28 images and up to 2x for 84x84 (in good part its CPU convolutions, slower than "
    "TensorFlow's; the project's benchmarks/README.md). XLA is for GPU/TPU."
)


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
    signal: int | None = None  # the signal (SIGINT, SIGTERM, SIGHUP) that interrupted the run


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


def checkpoint_episode(path: str | None) -> int:
    """The episode a checkpoint path (".../ckpt-120") was saved at; 0 for None."""
    return int(path.rsplit("-", 1)[-1]) if path else 0


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


class TrainingSession:
    """One session of a run: from the latest checkpoint (or the start) to `config.episodes` or a stop.

    Holds what the loop changes: the meta-learner and its trainer, the checkpointed progress variables, the
    metrics row in progress, the managers of checkpoints/ and best/, and the status the session will end with.
    """

    def __init__(self, run: TrainingRun, callbacks: Callback, splits, strategy):
        import tensorflow as tf

        import keras_metalstm as km
        from keras_metalstm.distribute import worker_directory

        self.run, self.splits, self.strategy = run, splits, strategy
        self.callbacks = OutputMayHangUp(callbacks)
        self.config, self.chief, self.run_dir = run.config, run.chief, run.run_dir
        config = self.config
        self.schedule = learning_rate_schedule(config)
        with strategy.scope():
            self.meta = build_meta_learner(config, run.architecture)
            self.trainer = km.MetaTrainer(
                self.meta,
                optimizer=km.meta_optimizer(self.schedule, config.theta0_lr_scale),
                clip_norm=config.clip_norm,
                jit_compile=config.xla,
                strategy=strategy,
            )
            self.episode = tf.Variable(0, dtype=tf.int64, trainable=False, name="episode")
            self.best_accuracy = tf.Variable(-1.0, dtype=tf.float64, trainable=False, name="best_accuracy")
            self.best_episode = tf.Variable(-1, dtype=tf.int64, trainable=False, name="best_episode")
        progress = {"episode": self.episode, "best_accuracy": self.best_accuracy, "best_episode": self.best_episode}
        self.checkpoint = checkpoint_object(self.meta, self.trainer.optimizer, progress)
        # Every worker saves (a save may need collectives); only the chief's copy is kept.
        self.output_dir = Path(worker_directory(self.run_dir, strategy))
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, str(self.output_dir / CHECKPOINT_DIR), max_to_keep=config.keep_checkpoints
        )
        self.best_manager = tf.train.CheckpointManager(self.checkpoint, str(self.output_dir / BEST_DIR), max_to_keep=1)
        # How this session's steps round, and how those of the session that wrote the newest checkpoint did:
        # state.json keeps the latter, which a resumed run compares with.
        self.numerics = step_numerics(strategy, config.xla)
        self.checkpoint_numerics = None
        self.checkpoint_clock = None  # the newest checkpoint's episode, training seconds and row window, for state.json
        self.best_val_episodes = None  # the episodes of the validation that set the best accuracy, for state.json
        self.status = "running"
        self.stop = StopFlag()
        self.window = [0.0, 0.0, 0]  # loss sum, accuracy sum, episodes of the metrics row in progress
        self.last_train = {}
        self.log = self.writer = None
        self._began = False  # a checkpoint restored (or theta_0 set): from then on state.json speaks for this session

    # --- start ---------------------------------------------------------------------------------------------
    def _restore_or_initialise(self) -> float:
        """Restore the latest checkpoint of the run (every worker reads the chief's), or start theta_0 where the
        configuration says; returns the seconds spent before this session (earlier sessions, pre-training)."""
        config, meta = self.config, self.meta
        if self.chief:  # a session killed while it saved a checkpoint left the folder it was writing
            for folder in (CHECKPOINT_DIR, BEST_DIR):
                remove_partial_checkpoints(self.run_dir / folder)
        latest = latest_checkpoint(self.run_dir)
        if latest:
            restore_checkpoint(self.checkpoint, latest)
            if config.lr_schedule == "constant":
                # A constant rate is a checkpointed variable: a resumed run uses the configured one. A schedule is
                # a function of the restored update count, so it continues exactly.
                self.trainer.optimizer.learning_rate = config.learning_rate
            state = read_state(self.run_dir)
            if crashed(state):
                self.callbacks.on_message(
                    f"the previous session ended without a word (its process {state.get('pid')} is gone: killed or "
                    f"crashed); resuming from its last checkpoint, episode {checkpoint_episode(latest)}"
                )
            self.checkpoint_numerics = state.get("numerics")
            # A run from before state.json recorded it: the resume was checked to validate as the run did.
            self.best_val_episodes = state.get("best_val_episodes") or config.val_episodes or None
            if differences := numerics_differences(self.checkpoint_numerics, self.numerics):
                self.callbacks.on_message(resume_note(differences))
            done = checkpoint_episode(latest)
            if state.get("episode") == done:
                self.callbacks.on_message(f"resuming from the checkpoint of episode {done} ({latest})")
                self.window = list(state.get("window", self.window))
                self.checkpoint_clock = {"episode": done, "seconds": float(state.get("seconds", 0.0)),
                                         "window": list(self.window)}
                return self.checkpoint_clock["seconds"]
            if not crashed(state) and isinstance(state.get("episode"), int) and state["episode"] > done:
                self.callbacks.on_message(
                    f"the previous session stopped at episode {state['episode']} ({state.get('status')}) after the "
                    f"last checkpoint it could save; resuming from that checkpoint, episode {done}"
                )
            at_checkpoint = state.get("checkpoint")
            if isinstance(at_checkpoint, dict) and at_checkpoint.get("episode") == done:
                self.checkpoint_clock = at_checkpoint
                self.window = list(at_checkpoint.get("window", self.window))  # absent in older state files
                return float(at_checkpoint.get("seconds", 0.0))
            return 0.0
        if config.theta0_init != "pretrained":
            return 0.0
        started = time.time()
        try:
            source = self.run._theta0_source(
                config, self.splits, meta.learner, self.callbacks, should_stop=lambda: self.stop.signal is not None
            )
            meta.initialize_theta0_from(source)
        except ValueError as error:  # a model of another architecture
            raise TrainingError(str(error)) from None
        return time.time() - started

    def _open_log(self, start):
        if self.chief:
            self.log = MetricsLog(self.run_dir, truncate_after=start)
            self.writer = tensorboard_writer(self.run_dir)

    def _say_memory_problem(self):
        from keras_metalstm.distribute import episodes_per_worker
        from keras_metalstm.xla_ops import accelerator_present

        if accelerator_present():  # a GPU's or TPU's memory: TensorFlow says how much only once it is used
            return
        episodes = episodes_per_worker(self.strategy, self.config.meta_batch)
        problem = memory_problem(int(self.meta.theta0.shape[0]), self.config.inner_steps, episodes, physical_memory())
        if problem:
            self.callbacks.on_message(problem)

    # --- the loop -----------------------------------------------------------------------------------------
    def seconds(self) -> float:
        """Training seconds of all sessions of the run, pre-training included."""
        before, started = self._clock
        return before + time.time() - started

    def train(self) -> TrainingResult:
        self._clock = (0.0, time.time())
        try:
            for note in self.run.data_notes:
                self.callbacks.on_message(note)
            self._say_memory_problem()
            if self.config.xla:
                from keras_metalstm.xla_ops import accelerator_present

                if not accelerator_present():
                    self.callbacks.on_message(XLA_ON_CPU_NOTE)
            self.stop.install()  # before pre-training theta_0's classifier, which a signal stops too
            try:
                self._clock = (self._restore_or_initialise(), time.time())
            except StopRequested:  # nothing of the run is saved yet: a resume pre-trains again
                self.status = "interrupted"
            else:
                self._meta_train()
        except KeyboardInterrupt:
            self.status = "interrupted"
            raise
        except DivergedError:
            self.status = "diverged"
            raise
        except Exception as error:
            self.status = f"failed: {type(error).__name__}: {first_line(error, 200)}"
            raise
        finally:
            self._close()
        return self._result()

    def _meta_train(self) -> None:
        """From the restored checkpoint (or theta_0) to the end of the run or a stop."""
        self._began = True
        start = int(self.episode.numpy())
        self._open_log(start)
        self.callbacks.on_start(self.run, start, self.config.episodes)
        self._write_state()
        self._loop(start)
        if self.status == "running":
            self.status = "finished"
            validated = float(self.best_accuracy.numpy()) >= 0  # the same on every worker
            save_best_model(self.run_dir, self.meta, validated, self.best_manager.latest_checkpoint, self.chief)

    def _loop(self, start: int) -> None:
        from keras_metalstm.augmentation import Augmentation
        from keras_metalstm.distribute import distributed_episodes

        config = self.config
        remaining = config.episodes - start
        if remaining <= 0:
            # A session stopped between its last update and that episode's validation (Ctrl-C), resumed with
            # --episodes at its checkpoint: the run ends validated, as one that was not stopped.
            validated = {int(row["episode"]) for row in read_metrics(self.run_dir) if row.get("kind") == "val"}
            if start > 0 and start not in validated and self._maybe_validate(start):
                self._save()
            return
        # Replica r of step g gets episodes start + g*G + r*G/R ...: the same global batches as one device.
        batches = distributed_episodes(
            self.strategy,
            self.splits.train,
            config.n_way,
            config.k_shot,
            config.query,
            global_batch=config.meta_batch,
            seed=config.seed,
            start_episode=start,
            num_episodes=remaining,
            augment=Augmentation.parse(config.augment),
        )
        for batch in batches:
            current = self._update(batch)
            validated = self._maybe_validate(current)
            if self._due(current, config.checkpoint_every) or validated:
                self._save()
            if self.stop.signal is not None:
                if checkpoint_episode(self.manager.latest_checkpoint) != current:
                    self._save()
                self.status = "interrupted"
                return

    def _update(self, batch) -> int:
        """One meta-update; returns the episode count after it (DivergedError on a NaN/inf loss)."""
        out = self.trainer.train_step(batch)
        loss, accuracy = float(out["loss"]), float(out["accuracy"])
        current = int(self.episode.numpy()) + self.config.meta_batch
        if not (math.isfinite(loss) and math.isfinite(accuracy)):
            last_good = latest_checkpoint(self.run_dir)
            raise DivergedError(
                f"the meta-training loss became {loss} at episode {current}; training stopped. "
                f"The last good checkpoint is kept: {last_good or 'none (no checkpoint yet)'}. "
                "Try a smaller --learning-rate or --clip-norm, then --resume."
            )
        self.episode.assign(current)
        self.window = [self.window[0] + loss, self.window[1] + accuracy, self.window[2] + 1]
        self.callbacks.on_step(current, loss, accuracy)
        if self._due(current, self.config.log_every):
            self._log_train(current)
        return current

    def _due(self, current: int, every: int) -> bool:
        """Whether the update that reached episode `current` passed a multiple of `every`, or ended the run: with
        a meta-batch that does not divide `every`, "every 500 episodes" falls on the first update past each 500."""
        before = current - self.config.meta_batch
        return current // every > before // every or current == self.config.episodes

    def _log_train(self, current: int) -> None:

        loss_sum, accuracy_sum, count = self.window
        self.last_train = {
            "episode": current,
            "loss": loss_sum / count,
            "accuracy": accuracy_sum / count,
            "learning_rate": self._last_learning_rate(),
            "seconds": round(self.seconds(), 3),
        }
        self._record({"kind": "train", **self.last_train},
                     {"train/loss": self.last_train["loss"], "train/accuracy": self.last_train["accuracy"]})
        self.window = [0.0, 0.0, 0]

    def _last_learning_rate(self) -> float:
        """The step the last meta-update took. A schedule's is its value at that update; the optimizer's
        `learning_rate` is already the next update's (its counter has moved on)."""
        import tensorflow as tf

        optimizer = self.trainer.optimizer
        if callable(self.schedule):
            return float(self.schedule(optimizer.iterations - 1))
        return float(tf.convert_to_tensor(optimizer.learning_rate))

    def _maybe_validate(self, current: int) -> bool:
        from keras_metalstm.evaluation import evaluate_episodes
        from keras_metalstm.statistics import mean_ci95

        config = self.config
        if not (config.val_episodes > 0 and self._due(current, config.validate_every)):
            return False
        accuracies = evaluate_episodes(self.trainer, self.splits.val, config, config.val_episodes, seed=config.seed + 1)
        mean, ci = mean_ci95(accuracies)
        is_best = mean > float(self.best_accuracy.numpy())
        if is_best:
            self.best_accuracy.assign(mean)
            self.best_episode.assign(current)
            self.best_val_episodes = config.val_episodes
        row = {"kind": "val", "episode": current, "accuracy": mean, "ci95": ci, "best": bool(is_best),
               "seconds": round(self.seconds(), 3)}
        self._record(row, {"val/accuracy": mean})
        if is_best:
            self._saved(self.best_manager, current, BEST_DIR, "best checkpoint")
        self.callbacks.on_validation(current, mean, ci, is_best)
        return True

    def _save(self) -> None:
        episode = int(self.episode.numpy())
        # Before the checkpoint too: a process killed once it is written, before the write after it, leaves a
        # state.json of this episode (its seconds and metrics row in progress), not of an earlier one.
        self._write_state()
        path = self._saved(self.manager, episode, CHECKPOINT_DIR, "checkpoint")
        self.checkpoint_numerics = self.numerics
        self.checkpoint_clock = {"episode": episode, "seconds": round(self.seconds(), 3), "window": list(self.window)}
        self._write_state()  # after the checkpoint: state.json describes the newest checkpoint
        self.callbacks.on_checkpoint(episode, path)

    def _saved(self, manager, episode, folder, what):
        """`manager.save` at `episode` into the run's `folder`, or TrainingError naming it, the cause (the system's
        words, not TensorFlow's op decoration) and the checkpoint kept; the half-written checkpoint is removed."""
        try:
            return manager.save(checkpoint_number=episode)
        except Exception as error:  # noqa: BLE001 - a full disk, a read-only or vanished directory ...
            remove_partial_checkpoints(manager.directory, episode)
            # TensorFlow's text is "<its temporary path>; <cause>": the folder is named here.
            cause = tensorflow_error_text(error).rsplit("; ", 1)[-1]
            kept = latest_checkpoint(self.run_dir, folder)
            raise TrainingError(
                f"cannot save the {what} of episode {episode} in {self.output_dir / folder}: {cause}. The last "
                f"{what} is kept ({kept or 'none yet'}); free space or fix the directory, then --resume"
            ) from None

    def _record(self, row, scalars) -> None:
        if self.chief:
            self.log.append(row)
            write_scalars(self.writer, row["episode"], scalars)

    # --- the end ---------------------------------------------------------------------------------------------
    def _write_state(self) -> None:
        if not self.chief:  # the run directory is the chief's
            return
        best = float(self.best_accuracy.numpy())
        write_state(
            self.run_dir,
            self.status,
            int(self.episode.numpy()),
            self.config.episodes,
            best if best >= 0 else None,
            int(self.best_episode.numpy()) if best >= 0 else None,
            self.seconds(),
            window=self.window,
            numerics=self.checkpoint_numerics,
            checkpoint=self.checkpoint_clock,
            best_val_episodes=self.best_val_episodes if best >= 0 else None,
        )

    def _close(self) -> None:
        from keras_metalstm.distribute import remove_worker_directory

        self.stop.uninstall()
        remove_worker_directory(self.output_dir, self.run_dir)
        if not self.chief:
            return
        if self.writer is not None:
            self.writer.flush()
        if self.log is not None:
            self.log.close()
        with contextlib.suppress(OSError):  # a full or read-only disk must not hide the error that ended the run
            if self._began or not self.run.started:  # a started run's state is kept when its restore failed
                self._write_state()
            write_curves(self.run_dir)

    def _result(self) -> TrainingResult:
        best = float(self.best_accuracy.numpy())
        result = TrainingResult(
            run_dir=self.run_dir,
            status=self.status,
            episode=int(self.episode.numpy()),
            best_val_accuracy=best if best >= 0 else None,
            best_episode=int(self.best_episode.numpy()) if best >= 0 else None,
            seconds=self.seconds(),
            last_train=self.last_train,
            chief=self.chief,
            task=self.run.task,
            signal=self.stop.signal,
        )
        self.callbacks.on_end(result)
        return result
