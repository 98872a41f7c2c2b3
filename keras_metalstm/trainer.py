"""Meta-training driver: a compiled (optionally XLA) episodic step that runs under any tf.distribute strategy.

Its step functions are the library's own, never saved: without XLA they trace the fused CPU kernels (the
coordinate-wise LSTM; the learner's batch norm, ReLU and max pooling) where they can run
(keras_metalstm/ops/fused_kernels.py).
"""

import keras
import tensorflow as tf

from keras_metalstm.distribute import episodes_per_replica
from keras_metalstm.meta_learner_inputs import (
    check_clip_norm,
    check_episode_values,
    check_episodes,
    check_learning_rate,
)
from keras_metalstm.ops import fused_kernels
from keras_metalstm.optimizers import MultiplierAdam
from keras_metalstm.xla_ops import explaining_uncompilable_ops, warn_if_xla_untrusted


def meta_optimizer(learning_rate=1e-3, theta0_learning_rate_scale=1.0):
    """The paper's meta-optimiser, Adam, with theta_0's step `theta0_learning_rate_scale` times the update rule's
    (1: plain Adam; below 1 keeps a pre-trained theta_0 close to where it started while the LSTM learns its steps).

    The meta-gradient's global-norm clip is applied by the step itself (`MetaLearner.meta_train_step`), to the
    gradient summed over replicas: Keras' `global_clipnorm` would clip each replica's part before the all-reduce,
    a different update whenever the clip is active."""
    check_learning_rate(learning_rate)
    if float(theta0_learning_rate_scale) == 1.0:
        return keras.optimizers.Adam(learning_rate=learning_rate)
    return MultiplierAdam(learning_rate=learning_rate, learning_rate_multipliers={"theta0": theta0_learning_rate_scale})


class MetaTrainer:
    """Trains a MetaLearner on batches of episodes, one meta-update per call to `train_step`.

    Under a multi-replica strategy `train_step` takes an element of a distributed dataset (e.g.
    `keras_metalstm.distribute.distributed_episodes`): each replica computes the meta-gradient of its own episodes,
    the loss divided by the GLOBAL meta-batch, and the update is Adam(clip(sum over replicas)), the same update one
    device computes on the whole meta-batch.

    Args:
        meta: the MetaLearner to train (created inside the strategy's scope).
        learning_rate: Adam's step.
        clip_norm: clip of the global L2 norm of the meta-gradient, all meta-parameters (theta_0 included); None:
            no clip.
        jit_compile: compile each replica's meta-gradient computation (inner loop, query loss, backward) and its
            evaluation (`evaluate_step`) with XLA; the all-reduce, the clip and the Adam update stay ordinary
            TensorFlow ops (collectives cannot live in an XLA cluster on CPU/GPU; TPUStrategy compiles the whole
            replica step anyway).
        optimizer: a Keras optimizer to use instead of `meta_optimizer(learning_rate)`.
        strategy: the tf.distribute strategy (default: the one in scope when the trainer is made).
    """

    def __init__(self, meta, learning_rate=1e-3, clip_norm=0.25, jit_compile=False, optimizer=None, strategy=None):
        self.meta = meta
        self.clip_norm = check_clip_norm(clip_norm)
        self.jit_compile = bool(jit_compile)
        self.strategy = strategy or tf.distribute.get_strategy()
        if not self.strategy.extended.variable_created_in_scope(meta.theta0.value):
            raise ValueError(
                f"The meta-learner was built outside this strategy's scope ({type(self.strategy).__name__}): its "
                "variables must be the strategy's. Build it within `with strategy.scope():`, then make the "
                "MetaTrainer (inside or outside the scope)."
            )
        if self.jit_compile or isinstance(self.strategy, tf.distribute.TPUStrategy):
            warn_if_xla_untrusted()
        with self.strategy.scope():
            self.optimizer = optimizer or meta_optimizer(learning_rate)
            self.optimizer.build(meta.trainable_variables)
        self._train_function = tf.function(self._distributed_train_step)
        self._evaluate_function = tf.function(self._distributed_evaluate_step)

    # Each replica function enters fused_kernels.enabled() itself: MirroredStrategy traces the replicas
    # in threads of their own, and the context is thread-local. (With jit_compile the XLA part disables it.)
    def _replica_train_step(self, episodes):
        with fused_kernels.enabled():
            return self.meta.meta_train_step(
                episodes, self.optimizer, clip_norm=self.clip_norm, jit_compile=self.jit_compile
            )

    def _replica_evaluate_step(self, episodes):
        with fused_kernels.enabled():
            return self.meta.test_metrics(episodes, jit_compile=self.jit_compile)

    def _distributed_train_step(self, episodes):
        loss, accuracy = self.strategy.run(self._replica_train_step, args=(episodes,))
        mean = tf.distribute.ReduceOp.MEAN
        return {
            "loss": self.strategy.reduce(mean, loss, axis=None),
            "accuracy": self.strategy.reduce(mean, accuracy, axis=None),
        }

    def _distributed_evaluate_step(self, episodes):
        losses, accuracies = self.strategy.run(self._replica_evaluate_step, args=(episodes,))
        return {
            "loss": self.strategy.gather(losses, axis=0),
            "accuracy": self.strategy.gather(accuracies, axis=0),
        }

    def train_step(self, episodes):
        """One meta-update on a batch of episodes; returns {"loss", "accuracy"} (scalar tensors, query sets)."""
        self._check_batch(episodes)
        with explaining_uncompilable_ops(self.meta.learner):
            return self._train_function(episodes)

    def _check_batch(self, episodes):
        """A batch that is not one of episodes for the learner (keys, axes, labels for its outputs, finite images) is
        refused here, with the fix, rather than from inside the traced step; a distributed one (per-replica values)
        is checked for its keys and axes by each replica's trace."""
        values = episodes.values() if isinstance(episodes, dict) else ()
        if not any(isinstance(value, tf.distribute.DistributedValues) for value in values):
            check_episodes(self.meta.learner, episodes, labelled=True)
            check_episode_values(self.meta.learner, episodes)

    def evaluate_step(self, episodes):
        """Test-mode query loss and accuracy of every episode of a plain batch of B episodes (no update).

        Under several replicas each evaluates its own B / R consecutive episodes (B must be a multiple of R);
        the results come back in batch order: {"loss": (B,), "accuracy": (B,)}.
        """
        self._check_batch(episodes)
        replicas = self.strategy.num_replicas_in_sync
        if replicas > 1:
            size = next(iter(episodes.values())).shape[0]
            per_replica = episodes_per_replica(size, replicas, "Evaluate batches of {} episodes.")

            def replica_episodes(context):
                first = context.replica_id_in_sync_group * per_replica
                return {key: value[first : first + per_replica] for key, value in episodes.items()}

            episodes = self.strategy.experimental_distribute_values_from_function(replica_episodes)
        with explaining_uncompilable_ops(self.meta.learner):
            return self._evaluate_function(episodes)
