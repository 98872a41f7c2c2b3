"""Meta-training driver: a compiled (optionally XLA) episodic step that runs under any tf.distribute strategy."""

import keras
import tensorflow as tf


def meta_optimizer(learning_rate=1e-3, clip_norm=0.25):
    """The paper's meta-optimiser: Adam with the meta-gradient's global L2 norm clipped (theta_0 included)."""
    return keras.optimizers.Adam(learning_rate=learning_rate, global_clipnorm=clip_norm)


class MetaTrainer:
    """Trains a MetaLearner on batches of episodes, one meta-update per call to `train_step`.

    Args:
        meta: the MetaLearner to train.
        learning_rate, clip_norm: Adam's step and the global-norm clip of the meta-gradient.
        jit_compile: compile the meta-gradient computation with XLA.
        optimizer: a Keras optimizer to use instead of `meta_optimizer(learning_rate, clip_norm)`.
        strategy: the tf.distribute strategy (default: the one in scope when the trainer is made). Create the
            MetaLearner inside the same strategy's scope.
    """

    def __init__(self, meta, learning_rate=1e-3, clip_norm=0.25, jit_compile=False, optimizer=None, strategy=None):
        self.meta = meta
        self.jit_compile = bool(jit_compile)
        self.strategy = strategy or tf.distribute.get_strategy()
        with self.strategy.scope():
            self.optimizer = optimizer or meta_optimizer(learning_rate, clip_norm)
            self.optimizer.build(meta.trainable_variables)
        self._train_function = tf.function(self._distributed_train_step)
        self._evaluate_function = tf.function(self._distributed_evaluate_step)

    def _replica_train_step(self, episodes):
        return self.meta.meta_train_step(episodes, self.optimizer, jit_compile=self.jit_compile)

    def _distributed_train_step(self, episodes):
        loss, accuracy = self.strategy.run(self._replica_train_step, args=(episodes,))
        mean = tf.distribute.ReduceOp.MEAN
        return {
            "loss": self.strategy.reduce(mean, loss, axis=None),
            "accuracy": self.strategy.reduce(mean, accuracy, axis=None),
        }

    def _distributed_evaluate_step(self, episodes):
        losses, accuracies = self.strategy.run(self.meta.episode_metrics, args=(episodes, "test"))
        return {
            "loss": self.strategy.gather(losses, axis=0),
            "accuracy": self.strategy.gather(accuracies, axis=0),
        }

    def train_step(self, episodes):
        """One meta-update on a batch of episodes; returns {"loss", "accuracy"} (scalar tensors, query set)."""
        return self._train_function(episodes)

    def evaluate_step(self, episodes):
        """Test-mode query loss and accuracy of every episode of a batch (no update): {"loss", "accuracy"}."""
        return self._evaluate_function(episodes)
