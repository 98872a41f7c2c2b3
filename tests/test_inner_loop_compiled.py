"""The inner loop as compiled loops: B episodes together equal one at a time, XLA equals plain, the traced graph
does not grow with T or B, the whole training step compiles with XLA as a TPUStrategy would compile it, and what
the loop keeps per step for the meta-gradient."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import as_tensors, float64_policy, graph_nodes, graph_op_types, random_episodes, twin

import keras_metalstm as km
from keras_metalstm.layers import coordinate_lstm
from keras_metalstm.ops import fused_kernels


def conv4_learner():
    keras.utils.set_random_seed(0)
    return km.learners.conv4(input_shape=(28, 28, 1), num_classes=5, filters=4)


def dropout_skip_learner():
    """Functional, with a skip connection and dropout (whose seed is per-episode non-trainable state)."""
    keras.utils.set_random_seed(1)
    images = keras.Input((28, 28, 1))
    features = keras.layers.Conv2D(4, 3, strides=2, activation="relu")(images)
    skip = keras.layers.Conv2D(4, 1, padding="same")(features)
    features = keras.layers.Add()([skip, keras.layers.Conv2D(4, 3, padding="same", activation="relu")(features)])
    features = keras.layers.Dropout(0.3)(keras.layers.GlobalAveragePooling2D()(features))
    return keras.Model(images, keras.layers.Dense(5)(features))


def group_norm_learner():
    keras.utils.set_random_seed(2)
    images = keras.Input((28, 28, 1))
    features = keras.layers.Conv2D(4, 3, strides=2)(images)
    features = keras.layers.ReLU()(keras.layers.GroupNormalization(groups=2)(features))
    return keras.Model(images, keras.layers.Dense(5)(keras.layers.GlobalAveragePooling2D()(features)))


def dense_batchnorm_learner():
    keras.utils.set_random_seed(3)
    images = keras.Input((28, 28, 1))
    features = keras.layers.BatchNormalization()(keras.layers.Dense(6)(keras.layers.Flatten()(images)))
    return keras.Model(images, keras.layers.Dense(5)(keras.layers.ReLU()(features)))


LEARNERS = {
    "conv4": conv4_learner,
    "dropout_skip": dropout_skip_learner,
    "group_norm": group_norm_learner,
    "dense_batchnorm": dense_batchnorm_learner,
}


def episode(episodes, index):
    return {key: value[index : index + 1] for key, value in episodes.items()}


def graph_op_count(concrete_function):
    """Ops of a traced function, the bodies of its loops and gradients (the function library) included."""
    return len(graph_nodes(concrete_function))


@pytest.mark.parametrize(
    "learner_name, options",
    [("conv4", {}), ("dropout_skip", {"first_order": False, "query_statistics": "support"})],
)
def test_episodes_together_equal_the_same_episodes_one_at_a_time(learner_name, options):
    meta = km.MetaLearner(LEARNERS[learner_name](), inner_steps=3, **options)
    episodes = as_tensors(random_episodes(batch=3, query=2, seed=4))

    @tf.function
    def outcomes(batch):
        theta, states = meta.inner_loop(batch["support_images"], batch["support_labels"])
        # Test mode reads every episode's own batch-norm statistics from the inner loop.
        test_logits = meta.query_logits(theta, states, batch["query_images"], "test")
        loss, _, gradients = meta.meta_gradients(batch)
        return theta, test_logits, loss, gradients

    theta, test_logits, loss, gradients = outcomes(episodes)
    singles = [outcomes(episode(episodes, index)) for index in range(3)]
    assert not np.allclose(singles[0][0].numpy(), singles[1][0].numpy(), atol=1e-4)  # the episodes differ
    np.testing.assert_allclose(theta.numpy(), np.concatenate([one[0] for one in singles]), rtol=0, atol=1e-5)
    np.testing.assert_allclose(test_logits.numpy(), np.concatenate([one[1] for one in singles]), rtol=0, atol=1e-5)
    np.testing.assert_allclose(loss.numpy(), np.mean([one[2] for one in singles]), rtol=1e-6)
    # meta_gradients averages over the meta-batch.
    for index, variable in enumerate(meta.trainable_variables):
        expected = np.mean([one[3][index].numpy() for one in singles], axis=0)
        np.testing.assert_allclose(gradients[index].numpy(), expected, rtol=1e-5, atol=1e-5, err_msg=variable.path)


def test_xla_and_plain_second_order_meta_gradients_agree():
    meta = km.MetaLearner(
        dense_batchnorm_learner(), inner_steps=3, first_order=False, query_statistics="support"
    )
    compiled = twin(meta)
    episodes = as_tensors(random_episodes(batch=2, query=2, seed=5))
    plain_loss, _, plain_gradients = tf.function(meta.meta_gradients)(episodes)
    xla_loss, _, xla_gradients = compiled._compiled(compiled.meta_gradients, jit_compile=True)(episodes)
    np.testing.assert_allclose(xla_loss.numpy(), plain_loss.numpy(), rtol=1e-5)
    for variable, plain, xla in zip(meta.trainable_variables, plain_gradients, xla_gradients, strict=True):
        assert float(tf.norm(plain)) > 0, variable.path
        assert float(tf.norm(xla - plain)) <= 1e-4 * float(tf.norm(plain)) + 1e-8, variable.path


def test_under_xla_a_per_episode_meta_batch_is_differentiated_one_episode_at_a_time(monkeypatch):
    """XLA runs the episodes one after the other anyway: the meta-gradient of each in turn, summed, keeps one
    episode's activations instead of the meta-batch's. It equals the plain step's meta-gradient of the whole batch."""
    traced_batches = []
    episode_metrics = km.MetaLearner.episode_metrics

    def recording(self, episodes, mode):
        traced_batches.append(episodes["support_images"].shape[0])
        return episode_metrics(self, episodes, mode)

    monkeypatch.setattr(km.MetaLearner, "episode_metrics", recording)
    with float64_policy():  # float64: the two summation orders agree to far below the tolerance
        meta = km.MetaLearner(conv4_learner(), inner_steps=2, learn_logit_scale=True)
        episodes = as_tensors(random_episodes(batch=3, query=2, seed=8), float_dtype=np.float64)
        plain_loss, plain_accuracy, plain_gradients = tf.function(meta.meta_gradients)(episodes)
        assert traced_batches == [3]
        xla_loss, xla_accuracy, xla_gradients = meta._compiled(meta.meta_gradients, jit_compile=True)(episodes)
    assert traced_batches == [3, 1]
    np.testing.assert_allclose(xla_loss.numpy(), plain_loss.numpy(), rtol=1e-10)
    np.testing.assert_allclose(xla_accuracy.numpy(), plain_accuracy.numpy(), rtol=1e-12)
    for variable, plain, xla in zip(meta.trainable_variables, plain_gradients, xla_gradients, strict=True):
        assert xla.dtype == tf.float64 and float(tf.norm(plain)) > 0, variable.path
        assert float(tf.norm(xla - plain)) <= 1e-9 * float(tf.norm(plain)), variable.path


@pytest.mark.parametrize("options", [{}, {"first_order": False, "query_statistics": "support"}])
def test_the_traced_training_graph_does_not_grow_with_inner_steps_or_episodes(options):
    def ops(inner_steps, batch):
        meta = km.MetaLearner(conv4_learner(), inner_steps=inner_steps, **options)
        episodes = as_tensors(random_episodes(batch=batch, query=2, seed=6))
        return graph_op_count(tf.function(meta.meta_gradients).get_concrete_function(episodes))

    # A single episode skips the loop over episodes (a smaller graph); from two episodes on, one loop.
    assert ops(6, 1) <= 1.2 * ops(2, 1) <= 1.2 * ops(2, 2)
    assert ops(6, 2) <= 1.2 * ops(2, 2)
    assert ops(2, 8) <= 1.2 * ops(2, 2)


@pytest.mark.parametrize("learner_name", ["conv4", "group_norm"])
def test_the_whole_training_step_compiles_with_xla_and_makes_the_plain_update(learner_name):
    """Inner loop, meta-gradient, clip and Adam update in ONE XLA computation, as a TPUStrategy compiles a
    replica's step (the episodes batched, as on a TPU); the update equals the plain per-episode step's."""
    meta = km.MetaLearner(LEARNERS[learner_name](), inner_steps=2)
    compiled = twin(meta, episode_batching="batched")
    episodes = as_tensors(random_episodes(batch=2, query=2, seed=7))
    optimizer = km.meta_optimizer()
    optimizer.build(compiled.trainable_variables)

    @tf.function(jit_compile=True)
    def xla_step(batch):
        with fused_kernels.disabled():  # XLA cannot compile the fused CPU kernel
            return compiled.meta_train_step(batch, optimizer, clip_norm=0.25)

    theta0_before = compiled.theta0.numpy().copy()
    xla_loss, _ = xla_step(episodes)
    plain = km.MetaTrainer(meta, clip_norm=0.25).train_step(episodes)
    np.testing.assert_allclose(xla_loss.numpy(), plain["loss"].numpy(), rtol=1e-5)
    assert int(optimizer.iterations.numpy()) == 1
    assert not np.allclose(compiled.theta0.numpy(), theta0_before, atol=1e-4)  # the update was applied
    for reference, variable in zip(meta.trainable_variables, compiled.trainable_variables, strict=True):
        # Adam's first step is ~lr * sign(g): compare whole tensors, not coordinates whose gradient is ~0.
        assert float(tf.norm(reference - variable) / tf.norm(reference)) <= 1e-4, variable.path


@pytest.mark.parametrize("first_order", [True, False])
def test_only_the_second_order_meta_gradient_differentiates_the_gradient_preprocessing(first_order):
    """First order, the preprocessed loss and gradient are constants: their derivative (the log's gives the
    only Reciprocal in this graph) must not be built into the loop's gradient, where it would be computed at
    every step and its inputs kept for it, only to be dropped."""
    meta = km.MetaLearner(conv4_learner(), inner_steps=2, first_order=first_order)
    episodes = as_tensors(random_episodes(batch=1, query=2, seed=8))
    traced = tf.function(meta.meta_gradients).get_concrete_function(episodes)
    assert ("Reciprocal" in graph_op_types(traced)) is not first_order


def values_kept_per_inner_step(concrete_function):
    """How many values the inner loop's While op stacks per step for its gradient (its accumulators' elements)."""
    library = concrete_function.graph._functions
    bodies = [op.get_attr("body").name for op in concrete_function.graph.get_operations() if op.type == "While"]
    return sum(
        op.inputs[1].shape.num_elements()
        for body in bodies
        for op in library[body].graph.get_operations()
        if op.type == "TensorListPushBack"
    )


def kept_per_coordinate(trace):
    """Values the inner loop keeps per learner coordinate and step: the growth from a smaller conv4 to a larger
    one (weights of fixed size, the meta-learner's own, cancel out). trace(meta, episodes) -> concrete function."""
    episodes = as_tensors(random_episodes(batch=1, query=2, seed=9))

    def kept_and_coordinates(filters):
        meta = km.MetaLearner(km.learners.conv4(input_shape=(28, 28, 1), num_classes=5, filters=filters), inner_steps=2)
        return values_kept_per_inner_step(trace(meta, episodes)), meta.num_parameters

    (small_kept, small), (large_kept, large) = kept_and_coordinates(4), kept_and_coordinates(8)
    return (large_kept - small_kept) / (large - small)


def test_under_xla_the_loop_keeps_about_what_the_next_step_reads_per_coordinate():
    """Under XLA (and on a GPU/TPU) the coordinate LSTM's backward pass recomputes its gates from the step's
    inputs: per coordinate and step the loop keeps h and c (20 + 20 values), the gradient's two features and six
    values of the cell (48), not also the LSTM's five 20-unit activations and its product's operands (168)."""
    def compiled_gradients(meta, episodes):
        return meta._compiled(meta.meta_gradients, jit_compile=True).get_concrete_function(episodes)

    assert kept_per_coordinate(compiled_gradients) <= 50


def test_plain_tensorflow_on_a_cpu_keeps_the_lstm_activations_where_recomputing_them_is_slower():
    """The library's choice for this configuration (benchmarks/recompute.py: recomputing cost 1.08-1.36x here)."""
    assert kept_per_coordinate(lambda meta, episodes: tf.function(meta.meta_gradients).get_concrete_function(episodes)) > 150


@pytest.mark.parametrize("options", [{}, {"first_order": False, "query_statistics": "support"}])
def test_the_recomputed_backward_pass_of_plain_tensorflow_on_a_gpu_gives_the_same_meta_gradient(options, monkeypatch):
    """What a GPU runs outside XLA (stock ops, the backward pass recomputed), on this CPU: the same meta-gradient
    as the stored activations give, to float32 rounding, first and second order, and the smaller loop."""
    meta = km.MetaLearner(conv4_learner(), inner_steps=3, **options)
    episodes = as_tensors(random_episodes(batch=2, query=2, seed=10))
    stored = tf.function(meta.meta_gradients)(episodes)[2]
    monkeypatch.setattr(coordinate_lstm, "recomputes_backward", lambda: True)
    recomputed = tf.function(meta.meta_gradients)(episodes)[2]
    for variable, expected, actual in zip(meta.trainable_variables, stored, recomputed, strict=True):
        assert float(tf.norm(expected)) > 0, variable.path
        np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=1e-5, atol=1e-7, err_msg=variable.path)
    assert kept_per_coordinate(lambda meta, episodes: tf.function(meta.meta_gradients).get_concrete_function(episodes)) <= 50
