"""The LSTM meta-learner of Ravi & Larochelle (ICLR 2017) as a Keras model that adapts any Keras learner.

`MetaLearner` owns the meta-parameters: the learned initial parameter vector `theta0`, the coordinate-wise
LSTM (layer 1) and the meta-learner cell (layer 2). Given a batch of episodes it runs the inner loop
(learner gradient, preprocessing, coordinate LSTM, cell update) on each episode's support set, starting from
theta0, and classifies the query set with the adapted parameters theta_T. The T steps and the B episodes are
loops in the graph rather than unrolled, so tracing and XLA compilation do not grow with T or B. The same step
function serves `MetaTrainer` and Keras' own `fit` (whose steps are in keras_metalstm.meta_learner_fit).

The fused CPU kernels (keras_metalstm/ops: the coordinate-wise LSTM, and the learner's batch norm, ReLU and max
pooling) run only in the steps Keras' `fit` and `evaluate` trace (without `jit_compile`), which are never saved;
`adapt`, `call`, `inner_loop`, `meta_gradients` and `meta_train_step` use stock TensorFlow ops, so any function a
user saves around them loads without this library.
"""

import functools
import warnings

import keras
import tensorflow as tf

from keras_metalstm.distribute import clip_by_global_norm_over_replicas
from keras_metalstm.episode_loop import mean_over_episodes
from keras_metalstm.episode_passes import EpisodePasses
from keras_metalstm.inner_loop_trace import InnerLoopTrace, record_inner_loop
from keras_metalstm.layers import CoordinateLSTM, MetaLSTMCell
from keras_metalstm.learner_architecture import unregistered_names
from keras_metalstm.learner_function import LearnerFunction, accuracy, variable_dtype
from keras_metalstm.learner_spec import check_learner_form
from keras_metalstm.meta_learner_fit import KerasFitSteps
from keras_metalstm.meta_learner_inputs import (
    check_eager_adapt,
    check_episodes,
    check_inner_steps,
    check_meta_learner_settings,
    check_mode,
    check_support,
    check_switches,
    static_batch_size,
)
from keras_metalstm.ops import fused_kernels
from keras_metalstm.preprocessing import preprocess
from keras_metalstm.weight_transfer import weights_for_learner
from keras_metalstm.xla_ops import (
    in_xla_context,
    traced_for_xla,
)

# The learned logit scale is exp(LOGIT_SCALE_GAIN * weight). Adam moves a weight by about its learning rate per
# update; at meta-learning rates (1e-4..1e-3) a plain log-scale would need ~10^4 updates to change by a factor e.
LOGIT_SCALE_GAIN = 100.0


@keras.saving.register_keras_serializable(package="keras_metalstm")
class MetaLearner(KerasFitSteps, keras.Model):
    """Meta-learns an initial parameter vector and an update rule for `learner`.

    Args:
        learner: a built keras.Model mapping images to logits (conv4, a Dense-only model, a model with
            BatchNormalization or LayerNormalization, a subclassed model). Never modified: it is run with
            a `keras.StatelessScope` on parameter vectors the meta-learner owns.
        inner_steps: T, the number of updates on an episode's support set (12 for 5-way 1-shot).
        hidden_units: units of the coordinate-wise LSTM (20).
        p: the preprocessing constant (10).
        first_order: treat the learner's loss and gradient as constants in the meta-gradient (the paper's
            simplification); False differentiates through them (second order).
        bn_momentum: Keras-convention momentum (weight of the OLD value) of the per-episode batch-norm
            statistics gathered from the support batches in test mode; 0.1 matches the authors' Torch
            momentum 0.9. None keeps each layer's own momentum.
        divide_grad_by_batch: divide the learner's gradient by the support batch size once more, as the authors'
            code does (a quirk; off by default).
        query_statistics: which batch-norm statistics normalise the query pass. "query" (the authors' code):
            at meta-training the query batch's own; at meta-test the running statistics gathered from the
            support batches during the inner loop, i.e. at theta_0..theta_{T-1}, never at the theta_T the query
            pass uses. "support": the statistics of the support batch under theta_T (one more support forward
            pass after the last update), at meta-training and at meta-test alike, with the meta-gradient flowing
            through them; nothing is computed from the query batch, and training matches testing.
        learn_logit_scale: multiply the query logits by a learned scalar in the meta-loss (a temperature of the
            meta-objective; not in the paper). Without it the cross-entropy can only grow more confident through
            larger learned steps, and from a pre-trained theta_0 those steps trade accuracy for confidence. The
            scale changes no prediction: accuracies, `adapt` and exports use the learner's own logits.
        episode_batching: how the learner runs for the B episodes of a meta-batch. "batched": one evaluation
            per layer for all B, each episode with its own parameters (keras_metalstm.batched_learner), what
            lets a GPU/TPU run them in parallel; "per_episode": a tf.map_fn over the episodes, one after the
            other, for any learner (under XLA, `meta_gradients` differentiates one episode at a time and sums
            their gradients). "auto" (default): batched on a GPU/TPU, per episode on a CPU (TensorFlow has
            no CPU gradient of the grouped convolutions batching uses outside XLA, and under XLA they were
            slower there). A learner with layers that cannot be batched, or "batched" grouped convolutions on a
            CPU outside XLA, run per episode (said in a warning, once), and so does a single episode (`adapt`).
            Both give the same results.
        learner_seeds: seed states to set on the learner's random layers (Dropout...), as `get_config` saves them.
    """

    def __init__(
        self,
        learner,
        inner_steps=12,
        hidden_units=20,
        p=10.0,
        first_order=True,
        bn_momentum=0.1,
        divide_grad_by_batch=False,
        query_statistics="query",
        learn_logit_scale=False,
        episode_batching="auto",
        learner_seeds=None,
        **kwargs,
    ):
        # The meta-learner's own arithmetic (theta, the LSTM, the cell update) stays in the variable dtype of any
        # mixed-precision policy: bfloat16's 8-bit mantissa would round away an update of a few thousandths of a
        # parameter. The learner keeps its own policy and computes in it.
        kwargs["dtype"] = variable_dtype(kwargs.get("dtype"))
        super().__init__(**kwargs)
        check_meta_learner_settings(inner_steps, hidden_units, p, bn_momentum, query_statistics, episode_batching)
        check_switches(first_order=first_order, divide_grad_by_batch=divide_grad_by_batch,
                       learn_logit_scale=learn_logit_scale)
        # A plain (untracked) object: the learner's own variables are not meta-parameters and must not be
        # trained, saved or restored as part of the meta-learner.
        self._learner_function = LearnerFunction(learner, bn_momentum, random_layer_seeds=learner_seeds)
        check_learner_form(learner)
        self._episode_passes = EpisodePasses(self._learner_function, episode_batching, bn_momentum)
        self.inner_steps = int(inner_steps)
        self.hidden_units = int(hidden_units)
        self.p = float(p)
        self.first_order = bool(first_order)
        self.bn_momentum = bn_momentum
        self.divide_grad_by_batch = bool(divide_grad_by_batch)
        self.query_statistics = query_statistics
        self.learn_logit_scale = bool(learn_logit_scale)

        self.coordinate_lstm = CoordinateLSTM(
            self.hidden_units, input_dim=4, shared_input_dim=2, name="coordinate_lstm", dtype=self.dtype_policy
        )
        self.cell = MetaLSTMCell(self.hidden_units, name="meta_lstm_cell", dtype=self.dtype_policy)
        self.theta0 = self.add_weight(
            shape=(self._learner_function.num_parameters,), initializer="zeros", name="theta0"
        )
        # theta_0 starts as a freshly initialised learner's weights (the authors' code).
        self.theta0.assign(self._learner_function.initial_theta())
        # Only created when learned, so checkpoints and .keras files of meta-learners without it stay loadable.
        self.logit_scale_exponent = None
        if self.learn_logit_scale:
            self.logit_scale_exponent = self.add_weight(shape=(), initializer="zeros", name="logit_scale_exponent")
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy_tracker = keras.metrics.Mean(name="accuracy")
        self._xla_functions = {}
        self._fit_clip_norm = None
        self._one_task_functions = {}
        self.built = True

    @property
    def learner(self):
        """The learner model whose parameters are adapted (never modified)."""
        return self._learner_function.learner

    @property
    def learner_function(self):
        """The learner as a function of a flat parameter vector theta (a LearnerFunction)."""
        return self._learner_function

    @property
    def episode_batching(self):
        """How the learner runs for the episodes of a meta-batch: "auto", "batched" or "per_episode"."""
        return self._episode_passes.episode_batching

    @property
    def num_parameters(self):
        """Length of theta: the learner's trainable weights, all of them."""
        return self._learner_function.num_parameters

    @property
    def logit_scale(self):
        """The factor of the query logits in the meta-loss (1 unless learn_logit_scale)."""
        if self.logit_scale_exponent is None:
            return tf.constant(1.0)
        return tf.exp(LOGIT_SCALE_GAIN * self.logit_scale_exponent)

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy_tracker]

    def initialize_theta0_from(self, source):
        """Starts theta_0 from a trained model of the learner's architecture (e.g. a classifier pre-trained on
        the meta-train classes) instead of a freshly initialised learner.

        Weights are matched by position in `trainable_variables`. Only the output layer's weights may differ in
        shape (many classes vs N): that layer starts at zero, a new N-way layer as in the fine-tune baseline.
        An episode's labels are an arbitrary permutation of its classes, and a zero layer treats them alike;
        with a random one the untrained meta-learner scored 69% instead of 95% on fontglot 5-way 1-shot.
        Only theta_0 changes: the learner model itself is not modified.

        Returns:
            The paths of the learner weights that start at zero.
        """
        values, zeroed = weights_for_learner(self.learner, source)
        self.theta0.assign(self._learner_function.flatten(values))
        return zeroed

    # ----------------------------------------------------------------------------------------- inner loop
    def inner_loop(self, support_images, support_labels, inner_steps=None):
        """Adapts theta0 to B episodes' support sets.

        The T steps are one `tf.while_loop` and, within a step, the B episodes' learner passes one `tf.map_fn`
        (or one batched evaluation, `episode_batching`), so a traced (or XLA-compiled) graph holds one copy of
        the learner's forward and backward pass whatever T and B are. Every episode starts from the zero LSTM
        state and zero gate feedback.

        Args:
            support_images: (B, N*K, H, W, C).
            support_labels: (B, N*K) integer labels.
            inner_steps: T, a Python int (default: the meta-learner's own).

        Returns:
            theta: (B, num_parameters), theta_T of each episode (differentiable w.r.t. the meta-parameters).
            states: the learner's non-trainable state after the inner loop, one tensor per non-trainable
                variable with the episodes stacked on its first axis: the batch-norm statistics gathered from
                each episode's support batches, or with query_statistics="support" those of its support batch
                under theta_T.
        """
        steps = self.inner_steps if inner_steps is None else int(inner_steps)
        episodes = static_batch_size(support_images, "support_images")

        def update(step, *carry):
            return step + 1, *self._inner_step(*carry, support_images, support_labels)

        # maximum_iterations: a static trip count, which XLA needs to differentiate the loop.
        carry = (0, *self._initial_carry(episodes, support_images))
        _, theta, _, _, states = tf.while_loop(lambda step, *_: step < steps, update, carry, maximum_iterations=steps)
        # A learner without batch statistics (GroupNormalization, LayerNormalization, none) has no state to
        # recompute: "support" is then the same protocol as "query", so a recipe can name it for any learner.
        if self.query_statistics == "support" and states:
            states = self._episode_passes.batch_statistics(theta, support_images)
        return theta, states

    def _initial_carry(self, episodes, support_images):
        """What the inner loop carries from step to step, as each of `episodes` episodes starts: theta_0, the zero
        LSTM state (h, c), the zero gate feedback (f_logit, i_logit), the learner's state (seeded by its support)."""
        theta = tf.tile(self.theta0[tf.newaxis], [episodes, 1])
        # Zero state and zero feedback equal the "no previous step" of the first update exactly (x + 0 * w == x),
        # and give the loop variables the fixed shapes a compiled loop needs.
        zero_state = tf.zeros((self.hidden_units, *theta.shape), theta.dtype)
        zero_logits = tf.zeros_like(theta)
        initial_states = self._learner_function.stacked_initial_state(episodes, support_images)
        return theta, (zero_state, zero_state), (zero_logits, zero_logits), initial_states

    def _inner_step(self, theta, lstm_state, gate_logits, states, support_images, support_labels):
        """One inner step of B episodes (support gradient and loss, their preprocessing, the coordinate LSTM, the
        cell's update of theta): the carry of `_initial_carry` after one more update."""
        losses, gradient, states = self._episode_passes.support_passes(
            theta, states, support_images, support_labels, self.divide_grad_by_batch, self.first_order
        )
        # Features first: (2, episodes, coordinates) for the gradient; the loss is one value per episode,
        # preprocessed once and shared by all of that episode's coordinates.
        gradient_features = preprocess(gradient, self.p, axis=0)
        loss_features = preprocess(losses, self.p, axis=0)
        if self.first_order:
            # The loss and gradient are already constants; without a stop here too, TensorFlow would still
            # differentiate the preprocessing of every step (reachable from theta), only to drop the result.
            gradient_features, loss_features = tf.stop_gradient(gradient_features), tf.stop_gradient(loss_features)
        hidden, lstm_state, hidden_terms = self.coordinate_lstm.step_with_readout(
            gradient_features,
            lstm_state,
            shared_inputs=loss_features,
            readout_kernel=self.cell.hidden_kernel(),
        )
        theta, gate_logits = self.cell(hidden, theta, gradient, gate_logits, hidden_terms=hidden_terms)
        return theta, lstm_state, gate_logits, states

    def query_logits(self, theta, states, query_images, mode):
        """Logits of each episode's adapted learner on its query images: (B, N*Q, num_classes).

        mode="train" normalises with the query batch's own statistics (meta-training); mode="test" with the
        statistics gathered from the episode's support batches (meta-testing, no information shared between
        query images). With query_statistics="support" both modes normalise with the support batch's statistics
        under theta_T (the `states` of `inner_loop`). Like the inner loop, one tf.map_fn over the episodes.
        """
        check_mode(mode)
        query_batch_statistics = mode == "train" and self.query_statistics == "query"
        return self._episode_passes.query_logits(theta, states, query_images, query_batch_statistics)

    def call(self, episodes, training=False, mode=None):
        """Query logits (B, N*Q, num_classes) of a batch of episodes after the inner loop.

        `mode` defaults to "train" when training else "test" (see `query_logits`).
        """
        check_episodes(self.learner, episodes)
        mode = mode or ("train" if training else "test")
        theta, states = self.inner_loop(episodes["support_images"], episodes["support_labels"])
        return self.query_logits(theta, states, episodes["query_images"], mode)

    # ------------------------------------------------------------------------------------- meta-training
    def episode_metrics(self, episodes, mode):
        """Per-episode query loss (of the logits times `logit_scale`) and accuracy, each of shape (B,)."""
        check_episodes(self.learner, episodes, labelled=True)
        logits = self(episodes, mode=mode)
        labels = tf.cast(episodes["query_labels"], tf.int32)
        scaled_logits = logits * tf.cast(self.logit_scale, logits.dtype)
        losses = tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=scaled_logits), axis=-1
        )
        return losses, accuracy(labels, logits)

    def meta_gradients(self, episodes):
        """Mean query loss and accuracy of a batch of episodes, and the meta-gradient of the loss.

        The loss is summed over this replica's episodes and divided by the GLOBAL number of episodes, so that
        gradients summed over replicas by a tf.distribute strategy equal the gradient of the global mean.
        Traced under XLA, a per-episode meta-batch is differentiated one episode at a time and the results averaged
        (`keras_metalstm.episode_loop`): the same values, one episode's activations kept at a time.
        """
        episode_count = static_batch_size(episodes["support_images"], "support_images")
        if episode_count > 1 and in_xla_context() and not self._episode_passes.batches_episodes(episode_count):
            # theta0's dtype is the logits', so the loss's and the accuracy's.
            return mean_over_episodes(
                self.meta_gradients, episodes, episode_count, self.trainable_variables, self.theta0.dtype
            )
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as tape:
            losses, accuracies = self.episode_metrics(episodes, mode="train")
            scaled_loss = tf.reduce_sum(losses) / (losses.shape[0] * replicas)
        # With a single inner step the recurrent kernel is never used: its gradient is zero, not missing.
        zero = tf.UnconnectedGradients.ZERO
        gradients = tape.gradient(scaled_loss, self.trainable_variables, unconnected_gradients=zero)
        return tf.reduce_mean(losses), tf.reduce_mean(accuracies), gradients

    def meta_train_step(self, episodes, optimizer, clip_norm=None, jit_compile=False):
        """One meta-update of every meta-parameter on a batch of episodes; returns (loss, accuracy).

        The single step used by both `MetaTrainer` and `fit`. `clip_norm` clips the global L2 norm of the
        meta-gradient summed over all replicas (see `clip_by_global_norm_over_replicas`). With jit_compile the
        gradient computation (all but the clip and the optimizer update) is compiled by XLA; that part is valid
        under any tf.distribute strategy.
        """
        loss, accuracy, gradients = self._compiled(self.meta_gradients, jit_compile)(episodes)
        if clip_norm:
            gradients = clip_by_global_norm_over_replicas(gradients, clip_norm)
        optimizer.apply(gradients, self.trainable_variables)
        return loss, accuracy

    def test_metrics(self, episodes, jit_compile=False):
        """Test-mode per-episode query loss and accuracy, each (B,): `MetaTrainer.evaluate_step`'s replica step.
        With jit_compile it is compiled by XLA, as `meta_train_step`'s meta-gradient is: a learner batched over
        episodes runs on a CPU only under XLA, in validation as in training."""
        return self._compiled(self._test_mode_metrics, jit_compile)(episodes)

    def _test_mode_metrics(self, episodes):
        return self.episode_metrics(episodes, mode="test")

    def _compiled(self, method, jit_compile):
        """`method` of this meta-learner, or with jit_compile its XLA-compiled form, made once."""
        if not jit_compile:
            return method
        if method.__name__ not in self._xla_functions:
            # traced_for_xla() as a decorator: entered anew at every trace.
            self._xla_functions[method.__name__] = tf.function(traced_for_xla()(method), jit_compile=True)
        return self._xla_functions[method.__name__]

    # ---------------------------------------------------------------------------------------- adaptation
    def adapt(self, support_images, support_labels, inner_steps=None, mode="test"):
        """Adapts the learner to one task and returns it as a standalone keras.Model.

        Args:
            support_images: (N*K, H, W, C) images of the task, on the scale used for meta-training.
            support_labels: (N*K,) integer labels in 0..N-1.
            inner_steps: T (default: the meta-learner's own). For the shipped presets twice the trained T
                changed nothing in-domain and gained 0.4-1.2 points on another domain (docs/results.md).
            mode: "test" (the only mode a standalone model can represent): the returned model's batch-norm
                layers use the statistics gathered from this support set, so its predictions on a query image
                do not depend on the other images in the batch.

        Returns:
            A keras.Model of the learner's architecture holding theta_T and this episode's batch-norm
            statistics; its logits equal the query logits of the inner loop in test mode.
        """
        check_eager_adapt()
        if mode != "test":
            raise ValueError(
                "adapt() supports mode='test' only: mode='train' normalises each query batch with its own "
                "statistics, which a standalone model cannot reproduce for arbitrary batches."
            )
        support_images, support_labels = check_support(self.learner, self.theta0.dtype, support_images, support_labels)
        steps = self.inner_steps if inner_steps is None else check_inner_steps(inner_steps)
        adapt_one = self._for_any_support_size(self._adapt_one, support_images.shape[1:], steps)
        theta, state = adapt_one(support_images, support_labels)
        return self._learner_function.materialise(theta, state)

    def _for_any_support_size(self, method, image_shape, inner_steps):
        """`method(support_images, support_labels, inner_steps)` of one task for `inner_steps` steps, traced for a
        support set of any size, as the adapt-in-serving SavedModel traces its loop. TensorFlow's graph optimizer
        specialises a function to its static shapes: traced for 5 images, a learner with swish (x * sigmoid(x)) on
        oneDNN rounded otherwise, and the kinks of max pooling took theta 2e-3 from the SavedModel's (logits 0.14
        apart)."""
        key = (method.__name__, tuple(image_shape), inner_steps)
        if key not in self._one_task_functions:
            spec = [tf.TensorSpec([None, *image_shape], self.theta0.dtype), tf.TensorSpec([None], tf.int32)]
            self._one_task_functions[key] = tf.function(
                functools.partial(method, inner_steps=inner_steps), input_signature=spec
            )
        return self._one_task_functions[key]

    def _adapt_one(self, support_images, support_labels, inner_steps):
        # Stock ops even where a caller enabled the fused kernels, as the adapt-in-serving SavedModel runs the same
        # loop: one episode gains little from the kernels, and their other rounding, through the kinks of max
        # pooling and ReLU, gave the two adaptations of one task logits 0.03 apart.
        with fused_kernels.disabled():
            theta, states = self.inner_loop(support_images[tf.newaxis], support_labels[tf.newaxis], inner_steps)
        return theta[0], [value[0] for value in states]

    def trace(self, support_images, support_labels, inner_steps=None):
        """Adapts the learner to one task as `adapt` does and records what the meta-learner did at each step.

        Args:
            support_images, support_labels, inner_steps: as for `adapt`.

        Returns:
            An InnerLoopTrace (keras_metalstm.inner_loop_trace): per step the input and forget gates of every
            coordinate of theta, the support loss and accuracy, and per learner variable how far theta moved.

        The gates are computed with the stock TensorFlow ops of the cell, never the fused kernels, so they are
        exactly the cell's own values. The traced function holds one inner step in a loop, as `inner_loop` does.
        """
        support_images, support_labels = check_support(self.learner, self.theta0.dtype, support_images, support_labels)
        steps = self.inner_steps if inner_steps is None else check_inner_steps(inner_steps)
        record = self._for_any_support_size(self._record_inner_loop, support_images.shape[1:], steps)
        return InnerLoopTrace.from_records(self._learner_function, record(support_images, support_labels))

    def _record_inner_loop(self, support_images, support_labels, inner_steps):
        return record_inner_loop(self, support_images, support_labels, inner_steps)

    # ------------------------------------------------------------------------------------ serialisation
    def _trackable_children(self, save_type="checkpoint", **kwargs):
        children = super()._trackable_children(save_type, **kwargs)
        if save_type == "savedmodel":
            # Execution caches, not part of a model (as Keras leaves out its train_function).
            children.pop("_one_task_functions", None)
            children.pop("_xla_functions", None)
        return children

    def get_config(self):
        config = super().get_config()
        learner = keras.saving.serialize_keras_object(self.learner)
        unregistered = unregistered_names(learner)
        if unregistered:  # the .keras file is written now and fails when it is loaded, maybe elsewhere
            warnings.warn(
                f"The learner uses {', '.join(unregistered)}, not registered with Keras: a saved meta-learner will "
                "load only with custom_objects naming them. Decorate each with "
                "@keras.saving.register_keras_serializable().",
                UserWarning,
                stacklevel=2,
            )
        config.update(
            {
                "learner": learner,
                "inner_steps": self.inner_steps,
                "hidden_units": self.hidden_units,
                "p": self.p,
                "first_order": self.first_order,
                "bn_momentum": self.bn_momentum,
                "divide_grad_by_batch": self.divide_grad_by_batch,
                "query_statistics": self.query_statistics,
                "learn_logit_scale": self.learn_logit_scale,
                "episode_batching": self.episode_batching,
                "learner_seeds": self._learner_function.random_layer_seeds(),
            }
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["learner"] = keras.saving.deserialize_keras_object(config["learner"], custom_objects=custom_objects)
        return cls(**config)

    @classmethod
    def from_preset(cls, name):
        """A ready-made meta-learner shipped with the package, by name (`keras_metalstm.list_presets()`), or a
        preset folder's path; read from local files only. Its MODEL_CARD.md (data, recipe, measured accuracy)
        is in `keras_metalstm.presets.preset_dir(name)`."""
        from keras_metalstm.presets import load_preset  # presets sit above the meta-learner

        return load_preset(name)

