"""How a `MetaLearner` trains and evaluates under Keras' own `compile`, `fit` and `evaluate`: the steps Keras
traces (one meta-update, one test-mode evaluation of a batch of episodes), the clip `compile` takes, and the checks
that refuse what would otherwise fail deep inside Keras' traced step. A mixin of `MetaLearner`, as Keras' own
trainers are of `keras.Model`; the meta-learning itself (`meta_train_step`, `episode_metrics`) is the model's.
"""

import keras
import tensorflow as tf

from keras_metalstm.meta_learner_inputs import (
    check_clip_norm,
    check_first_batch,
    check_jit_fit_replicas,
    check_replica_batches,
)
from keras_metalstm.ops import fused_kernels
from keras_metalstm.xla_ops import explaining_uncompilable_ops, traced_for_xla, warn_if_xla_untrusted


class KerasFitSteps:
    """`compile`, `fit`, `evaluate` and the steps they trace, for a MetaLearner."""

    def train_step(self, episodes):
        """Keras' `fit` step. It may trace the fused kernels (`_fit_kernel_scope`): a function of your own that you
        mean to save should call `meta_train_step`, which traces stock ops."""
        with self._fit_kernel_scope():
            loss, accuracy = self.meta_train_step(episodes, self.optimizer, clip_norm=self._fit_clip_norm)
        self.loss_tracker.update_state(loss)
        self.accuracy_tracker.update_state(accuracy)
        return {metric.name: metric.result() for metric in self.metrics}

    def test_step(self, episodes):
        with self._fit_kernel_scope():
            losses, accuracies = self.episode_metrics(episodes, mode="test")
        self.loss_tracker.update_state(tf.reduce_mean(losses))
        self.accuracy_tracker.update_state(tf.reduce_mean(accuracies))
        return {metric.name: metric.result() for metric in self.metrics}

    def _fit_kernel_scope(self):
        """Where Keras' fit/evaluate trace train_step/test_step (inside each replica's thread; Keras leaves these
        functions out of SavedModels): the fused kernels, unless Keras compiles the step with XLA."""
        return traced_for_xla() if self.jit_compile else fused_kernels.enabled()

    def compile(self, optimizer=None, clip_norm=0.25, **kwargs):
        """Like keras.Model.compile, for `fit`: the default optimizer is the paper's Adam(1e-3), and `clip_norm`
        clips the meta-gradient's global norm (summed over replicas) before every update, as `MetaTrainer` does.
        """
        if optimizer is None:
            from keras_metalstm.trainer import meta_optimizer

            optimizer = meta_optimizer()
        self._fit_clip_norm = check_clip_norm(clip_norm)
        super().compile(optimizer=optimizer, **kwargs)
        # Built now, not by the first traced step: a failed trace would leave a later fit creating them in one.
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def get_compile_config(self):
        config = super().get_compile_config()
        return {**config, "clip_norm": self._fit_clip_norm} if self.compiled and config else config

    def compile_from_config(self, config):
        # Keras skips compiling a loaded model whose compile() is overridden; this one compiles as it was saved,
        # so its optimizer state (loaded after this) and clip continue a `fit` where it stopped.
        self.compile(**keras.saving.deserialize_keras_object(config))

    def fit(self, x=None, *args, **kwargs):
        """keras.Model.fit; its data's first batch (and validation_data's) is checked as MetaTrainer checks a batch;
        under compile(jit_compile=True) a learner op XLA cannot compile is a LearnerError that names it and its
        layer."""
        replicas = self.distribute_strategy.num_replicas_in_sync
        if self.jit_compile:
            check_jit_fit_replicas(replicas)
            warn_if_xla_untrusted()
        for data in (x, kwargs.get("validation_data")):
            check_replica_batches(data, replicas)
            check_first_batch(self.learner, data)
        with explaining_uncompilable_ops(self.learner):
            return super().fit(x, *args, **kwargs)

    def evaluate(self, x=None, *args, **kwargs):
        """keras.Model.evaluate, refusing batches that the strategy's replicas cannot share or that are not episodes
        for the learner (the first batch is checked)."""
        check_replica_batches(x, self.distribute_strategy.num_replicas_in_sync)
        if not kwargs.get("_use_cached_eval_dataset"):  # fit's validation, every epoch: fit checked it
            check_first_batch(self.learner, x)
        return super().evaluate(x, *args, **kwargs)
