"""The learner's passes over the B episodes of a meta-batch, each episode at its own parameter vector.

The meta-learner needs three passes per episode: the support pass of every inner step (loss, gradient, updated
state), the query pass (logits), and with query_statistics="support" the support batch's statistics under
theta_T. `EpisodePasses` runs each either as one batched evaluation for all B episodes
(keras_metalstm.batched_learner: what lets a GPU/TPU run them in parallel) or one episode after the other in a
`tf.map_fn` (any Keras learner), and chooses between them per traced function (`episode_batching`). Both give
the same results; the meta-learner's own arithmetic (preprocessing, the LSTM, the cell) does not depend on the
choice.
"""

import contextlib
import warnings

import tensorflow as tf

from keras_metalstm.batched_learner import BatchedLearnerFunction
from keras_metalstm.loop_parallelism import map_learner_passes
from keras_metalstm.ops import fused_kernels
from keras_metalstm.xla_ops import accelerator_present


class EpisodePasses:
    """The learner's passes over a meta-batch's episodes for `learner_function` (a LearnerFunction).

    Args:
        learner_function: the learner as a function of a flat parameter vector.
        episode_batching: "batched", "per_episode" or "auto" (batched on a GPU/TPU, per episode on a CPU); a
            learner with layers that cannot be batched runs per episode, named in a warning, once.
        bn_momentum: as for LearnerFunction, for the batched evaluation.
    """

    def __init__(self, learner_function, episode_batching, bn_momentum):
        self.learner_function = learner_function
        self.episode_batching = episode_batching
        try:
            self.batched_function = BatchedLearnerFunction(learner_function.learner, bn_momentum=bn_momentum)
            self._not_batched_because = None
        except ValueError as error:
            self.batched_function = None
            self._not_batched_because = str(error)
        self._fallback_reported = False

    def batches_episodes(self, episodes=None):
        """Whether the function being traced evaluates the learner once for all `episodes` episodes. One episode
        (`adapt`, a meta-batch of 1) has nothing to batch: it runs as itself, without a loop, on any device. Where
        batching cannot run, the episodes run one after the other, said once: a learner with layers that cannot
        be batched, or grouped convolutions on a CPU outside XLA (a meta-learner trained batched on a GPU or TPU,
        evaluated on a CPU)."""
        if self.episode_batching == "per_episode" or episodes == 1:
            return False
        if not (self.episode_batching == "batched" or accelerator_present()):
            return False
        if self.batched_function is None:
            self._report_fallback(self._not_batched_because)
            return False
        if self.episode_batching == "batched" and not self.batched_function.differentiable_here():
            self._report_fallback(
                "a convolutional learner is batched with grouped convolutions, which TensorFlow cannot "
                "differentiate on a CPU outside XLA"
            )
            return False
        return True

    def _report_fallback(self, because):
        if not self._fallback_reported:
            self._fallback_reported = True
            warnings.warn(
                f"keras_metalstm: {because}. The episodes of a meta-batch run one after the other "
                "(episode_batching='per_episode'); the results are the same.",
                RuntimeWarning,
                stacklevel=4,
            )

    def support_passes(self, theta, states, support_images, support_labels, divide_by_batch, first_order):
        """Every episode's support loss (B,), gradient (B, P) at its own theta (B, P) and updated state.

        first_order: the loss, gradient and state are constants for the meta-gradient (theta itself stays
        differentiable through the meta-learner's update). Cut here, at the passes' outputs, the meta-gradient
        never differentiates the support passes. Otherwise they are differentiated, on stock ops: the fused
        kernels' backward ops have no gradient of their own.
        """
        if self.batches_episodes(theta.shape[0]):
            results = self.batched_function.loss_and_gradient(
                theta, states, support_images, support_labels, divide_by_batch=divide_by_batch
            )
        else:
            learner = self.learner_function

            def support_pass(episode):
                episode_theta, state, images, labels = episode
                return learner.loss_and_gradient(episode_theta, state, images, labels, divide_by_batch=divide_by_batch)

            signature = (tf.TensorSpec((), theta.dtype), tf.TensorSpec(theta.shape[1:], theta.dtype))
            signature += (self.state_signature(),)
            with contextlib.nullcontext() if first_order else fused_kernels.disabled():
                results = map_learner_passes(
                    support_pass, (theta, states, support_images, support_labels), signature, learner.learner
                )
        return tf.nest.map_structure(tf.stop_gradient, results) if first_order else results

    def query_logits(self, theta, states, query_images, batch_statistics):
        """Every episode's logits (B, N*Q, classes) on its query images at its own theta, normalised with the query
        batch's own statistics (`batch_statistics`) or with `states`."""
        if self.batches_episodes(theta.shape[0]):
            return self.batched_function(theta, states, query_images, batch_statistics)[0]
        learner = self.learner_function

        def query_pass(episode):
            episode_theta, state, images = episode
            # In theta's dtype, as the learner functions return logits: the loop's output dtype below.
            return learner(episode_theta, state, images, batch_statistics)[0]

        return map_learner_passes(query_pass, (theta, states, query_images), theta.dtype, learner.learner)

    def batch_statistics(self, theta, support_images):
        """Every episode's learner state from its support batch's statistics at its own theta."""
        if self.batches_episodes(theta.shape[0]):
            return self.batched_function.batch_statistics(theta, support_images)
        learner = self.learner_function
        return map_learner_passes(
            lambda episode: learner.batch_statistics(*episode),
            (theta, support_images),
            self.state_signature(),
            learner.learner,
        )

    def state_signature(self):
        """The TensorSpecs of one episode's non-trainable state, as a per-episode tf.map_fn returns it."""
        return [tf.TensorSpec(value.shape, value.dtype) for value in self.learner_function.initial_state()]
