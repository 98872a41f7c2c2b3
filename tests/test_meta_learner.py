"""MetaLearner and MetaTrainer: the inner loop against plain SGD, the meta-gradient, adaptation, BN protocol, saving."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import as_tensors, random_episodes, small_conv4_meta, twin

import keras_metalstm as km
from keras_metalstm.learner_function import cross_entropy


def learner_snapshot(learner):
    return [variable.numpy().copy() for variable in learner.variables]


def set_gradient_descent_gates(meta, alpha):
    """W = 0, b_f = 30 (sigmoid == 1.0 in float32) and sigmoid(b_i) == alpha: the cell is plain SGD."""
    meta.cell.W_f.assign(np.zeros((meta.hidden_units + 2, 1)))
    meta.cell.W_i.assign(np.zeros((meta.hidden_units + 2, 1)))
    meta.cell.b_f.assign(30.0)
    meta.cell.b_i.assign(math.log(alpha / (1.0 - alpha)))
    return float(tf.sigmoid(meta.cell.b_i).numpy())


def reference_sgd(learner, theta0, images, labels, alpha, steps):
    """Plain SGD on a copy of the learner, with tf.GradientTape and nothing from the package."""
    model = keras.models.clone_model(learner)
    model.set_weights(learner.get_weights())
    flat_sizes = [int(np.prod(v.shape)) for v in model.trainable_variables]
    for variable, piece in zip(model.trainable_variables, np.split(theta0, np.cumsum(flat_sizes)[:-1]), strict=True):
        variable.assign(piece.reshape(variable.shape))
    for _ in range(steps):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))
        gradients = tape.gradient(loss, model.trainable_variables)
        for variable, gradient in zip(model.trainable_variables, gradients, strict=True):
            variable.assign(variable - alpha * gradient)
    return np.concatenate([v.numpy().ravel() for v in model.trainable_variables])


@pytest.mark.parametrize("learner_name", ["conv4_with_batchnorm", "dense"])
def test_inner_loop_with_sgd_gates_equals_plain_sgd(learner_name):
    keras.utils.set_random_seed(7)
    if learner_name == "dense":
        learner = keras.Sequential(
            [keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(16, activation="tanh"),
             keras.layers.Dense(5)]
        )
    else:
        learner = km.learners.conv4(input_shape=(28, 28, 1), num_classes=5, filters=8)
    meta = km.MetaLearner(learner, inner_steps=5)
    alpha = set_gradient_descent_gates(meta, 0.1)
    assert float(tf.sigmoid(meta.cell.b_f).numpy()) == 1.0
    episodes = random_episodes(n_way=5, k_shot=2, seed=1)

    theta, _ = meta.inner_loop(tf.constant(episodes["support_images"]), tf.constant(episodes["support_labels"]))
    expected = reference_sgd(
        learner, meta.theta0.numpy(), episodes["support_images"][0], episodes["support_labels"][0], alpha, 5
    )
    assert not np.allclose(expected, meta.theta0.numpy(), atol=1e-4)  # SGD did move the parameters
    np.testing.assert_allclose(theta.numpy()[0], expected, rtol=0, atol=1e-6)


def test_meta_gradient_reaches_every_meta_parameter():
    meta = small_conv4_meta()
    _, _, gradients = meta.meta_gradients(as_tensors(random_episodes(batch=2, seed=2)))
    names = [variable.path for variable in meta.trainable_variables]
    assert len(names) == 8  # theta0, layer 1 (kernel, recurrent kernel, bias), W_f, W_i, b_f, b_i
    for name, gradient in zip(names, gradients, strict=True):
        assert gradient is not None, name
        assert float(tf.norm(gradient)) > 0.0, name


def test_second_order_meta_gradient_differs_from_first_order():
    meta = small_conv4_meta()
    second = twin(meta, first_order=False)
    episodes = as_tensors(random_episodes(seed=3))
    first_grads = meta.meta_gradients(episodes)[2]
    second_grads = second.meta_gradients(episodes)[2]
    np.testing.assert_allclose(meta.meta_gradients(episodes)[0], second.meta_gradients(episodes)[0], rtol=1e-5)
    relative = [
        float(tf.norm(a - b) / (tf.norm(a) + 1e-12)) for a, b in zip(first_grads, second_grads, strict=True)
    ]
    assert max(relative) > 1e-3, relative


def test_first_order_meta_gradient_equals_chain_with_precomputed_constant_gradients():
    """The meta-gradient treats each step's loss and gradient as constants, and nothing else."""
    meta = small_conv4_meta(inner_steps=3)
    episodes = random_episodes(seed=4)
    support, labels = episodes["support_images"][0], episodes["support_labels"][0]
    query, query_labels = episodes["query_images"][0], episodes["query_labels"][0]
    learner = km.LearnerFunction(meta.learner, bn_momentum=0.1)

    # Pass 1: record every step's loss and gradient as plain NumPy constants.
    def update(theta, loss, gradient, lstm_state, logits):
        hidden, lstm_state = meta.coordinate_lstm(
            km.preprocess(gradient, axis=0)[:, tf.newaxis], lstm_state, shared_inputs=km.preprocess(loss)[:, tf.newaxis]
        )
        theta, logits = meta.cell(hidden, theta[tf.newaxis], gradient[tf.newaxis], logits)
        return theta[0], lstm_state, logits

    recorded = []
    theta, lstm_state, logits = meta.theta0.numpy(), None, None
    state = learner.initial_state()
    for _ in range(3):
        loss, gradient, state = learner.loss_and_gradient(tf.constant(theta), state, support, labels)
        recorded.append((loss.numpy(), gradient.numpy()))
        theta, lstm_state, logits = update(tf.constant(theta), loss, gradient, lstm_state, logits)
        theta = theta.numpy()

    # Pass 2: the same chain, differentiable in theta and the meta-parameters, fed the constants.
    with tf.GradientTape() as tape:
        theta, lstm_state, logits = tf.identity(meta.theta0), None, None
        for loss, gradient in recorded:
            theta, lstm_state, logits = update(theta, tf.constant(loss), tf.constant(gradient), lstm_state, logits)
        query_logits, _ = learner(theta, learner.initial_state(), query, training=True)
        query_loss = cross_entropy(query_labels, query_logits)
    expected = tape.gradient(query_loss, meta.trainable_variables)

    loss, _, actual = meta.meta_gradients(as_tensors(episodes))
    np.testing.assert_allclose(loss.numpy(), query_loss.numpy(), rtol=1e-6)
    for variable, mine, reference in zip(meta.trainable_variables, actual, expected, strict=True):
        np.testing.assert_allclose(mine.numpy(), reference.numpy(), rtol=1e-4, atol=1e-7, err_msg=variable.path)


def test_adapted_model_reproduces_inner_loop_logits_and_does_not_depend_on_batching():
    meta = small_conv4_meta(inner_steps=3)
    episodes = random_episodes(n_way=5, k_shot=1, query=15, seed=5)
    adapted = meta.adapt(episodes["support_images"][0], episodes["support_labels"][0])
    query = episodes["query_images"][0]
    assert query.shape[0] == 75

    inner_loop_logits = meta(as_tensors(episodes), mode="test").numpy()[0]
    batch_logits = adapted(query, training=False).numpy()
    single_logits = np.concatenate([adapted(query[i : i + 1], training=False).numpy() for i in range(75)])
    np.testing.assert_allclose(batch_logits, inner_loop_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(single_logits, batch_logits, rtol=1e-5, atol=1e-5)
    assert isinstance(adapted, keras.Model)
    assert adapted is not meta.learner


def test_train_mode_query_uses_the_query_batch_statistics():
    meta = small_conv4_meta(inner_steps=2)
    episodes = as_tensors(random_episodes(seed=6))
    train_logits = meta(episodes, mode="train").numpy()
    test_logits = meta(episodes, mode="test").numpy()
    assert not np.allclose(train_logits, test_logits, atol=1e-4)
    # In train mode one query image's logits depend on the rest of the query batch.
    halved = dict(episodes, query_images=episodes["query_images"][:, :5])
    assert not np.allclose(meta(halved, mode="train").numpy()[0], train_logits[0, :5], atol=1e-5)


def test_test_mode_statistics_come_from_this_episodes_support_set_only():
    meta = small_conv4_meta(inner_steps=1, bn_momentum=0.1)
    first = random_episodes(seed=7)
    other = random_episodes(seed=8)
    support, labels = first["support_images"][0], first["support_labels"][0]
    before = [w.numpy() for w in meta.adapt(support, labels).weights]
    meta.adapt(other["support_images"][0], other["support_labels"][0])
    after = [w.numpy() for w in meta.adapt(support, labels).weights]
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)

    # One inner step, momentum m: moving_mean = (1 - m) * batch mean, moving_var = m + (1 - m) * batch var,
    # the batch being conv1's output on the support images with theta_0.
    adapted = meta.adapt(support, labels)
    reference = keras.models.clone_model(meta.learner)
    sizes = [int(np.prod(v.shape)) for v in reference.trainable_variables]
    for variable, piece in zip(
        reference.trainable_variables, np.split(meta.theta0.numpy(), np.cumsum(sizes)[:-1]), strict=True
    ):
        variable.assign(piece.reshape(variable.shape))
    conv1 = keras.Model(reference.input, reference.get_layer("conv1").output)(support).numpy()
    batch_mean, batch_var = conv1.mean(axis=(0, 1, 2)), conv1.var(axis=(0, 1, 2))
    bn1 = adapted.get_layer("bn1")
    np.testing.assert_allclose(bn1.moving_mean.numpy(), 0.9 * batch_mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(bn1.moving_variance.numpy(), 0.1 + 0.9 * batch_var, rtol=1e-4, atol=1e-6)


def test_learner_variables_are_bit_identical_after_adapt_and_train_step():
    meta = small_conv4_meta(inner_steps=2)
    before = learner_snapshot(meta.learner)
    assert any("moving_mean" in v.path for v in meta.learner.variables)
    episodes = random_episodes(seed=9)
    meta.adapt(episodes["support_images"][0], episodes["support_labels"][0])
    theta0_before = meta.theta0.numpy().copy()
    km.MetaTrainer(meta).train_step(as_tensors(episodes))
    assert not np.array_equal(theta0_before, meta.theta0.numpy())  # theta_0 is trained
    for original, now in zip(before, learner_snapshot(meta.learner), strict=True):
        np.testing.assert_array_equal(original, now)


@pytest.mark.parametrize(
    "options", [{"query_statistics": "query"}, {"query_statistics": "support"}, {"learn_logit_scale": True}]
)
def test_xla_and_non_xla_train_steps_agree(options):
    meta = small_conv4_meta(inner_steps=2, **options)
    compiled = twin(meta)
    episodes = as_tensors(random_episodes(batch=2, seed=10))
    plain_loss, _, plain_grads = meta.meta_gradients(episodes)
    xla_loss, _, xla_grads = compiled._compiled(compiled.meta_gradients, jit_compile=True)(episodes)
    np.testing.assert_allclose(xla_loss.numpy(), plain_loss.numpy(), rtol=1e-4)
    for variable, plain, xla in zip(meta.trainable_variables, plain_grads, xla_grads, strict=True):
        # Relative, with a floor for gradients that are themselves ~1e-5 (float32 rounding, not a difference).
        assert float(tf.norm(xla - plain)) <= 1e-4 * float(tf.norm(plain)) + 1e-8, variable.path

    plain_metrics = km.MetaTrainer(meta, jit_compile=False).train_step(episodes)
    xla_metrics = km.MetaTrainer(compiled, jit_compile=True).train_step(episodes)
    np.testing.assert_allclose(xla_metrics["loss"].numpy(), plain_metrics["loss"].numpy(), rtol=1e-4)
    for plain, xla in zip(meta.trainable_variables, compiled.trainable_variables, strict=True):
        # Adam's first step is ~lr * sign(g): compare whole tensors, not coordinates whose gradient is ~0.
        assert float(tf.norm(plain - xla) / tf.norm(plain)) <= 1e-4, plain.path


@pytest.mark.parametrize("learner", ["conv4", "adapted_normalization"])
def test_keras_file_round_trip_gives_identical_adaptation(tmp_path, learner):
    """Keras makes the loaded meta-learner before it loads the learner's weights: the episodes must start from
    the loaded non-trainable ones (here an adapted Normalization layer's statistics), not the fresh ones."""
    meta = small_conv4_meta(None if learner == "conv4" else build_learner(learner), inner_steps=2, bn_momentum=0.05)
    km.MetaTrainer(meta).train_step(as_tensors(random_episodes(seed=15)))
    path = tmp_path / "meta.keras"
    meta.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert isinstance(loaded, km.MetaLearner)
    assert loaded.inner_steps == 2 and loaded.bn_momentum == 0.05
    episodes = random_episodes(seed=16)
    support, labels, query = episodes["support_images"][0], episodes["support_labels"][0], episodes["query_images"][0]
    np.testing.assert_array_equal(
        loaded.adapt(support, labels)(query).numpy(), meta.adapt(support, labels)(query).numpy()
    )


@keras.saving.register_keras_serializable(package="tests")
class SubclassedLearner(keras.Model):
    """A user-written learner: conv, layer normalisation, dense head."""

    def __init__(self, num_classes=5, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.conv = keras.layers.Conv2D(4, 3, strides=2, activation="relu")
        self.norm = keras.layers.LayerNormalization()
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.head = keras.layers.Dense(num_classes)

    def call(self, images):
        return self.head(self.pool(self.norm(self.conv(images))))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


def build_learner(kind):
    keras.utils.set_random_seed(17)
    if kind == "dense":
        return keras.Sequential(
            [keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(12, activation="relu"),
             keras.layers.Dense(5)]
        )
    if kind == "layernorm":
        inputs = keras.Input((28, 28, 1))
        features = keras.layers.Flatten()(inputs)
        features = keras.layers.Dense(12)(features)
        features = keras.layers.LayerNormalization()(features)
        return keras.Model(inputs, keras.layers.Dense(5)(keras.layers.ReLU()(features)))
    if kind == "batchnorm_dense":
        inputs = keras.Input((28, 28, 1))
        features = keras.layers.Dense(12)(keras.layers.Flatten()(inputs))
        features = keras.layers.BatchNormalization()(features)
        return keras.Model(inputs, keras.layers.Dense(5)(keras.layers.ReLU()(features)))
    if kind == "adapted_normalization":  # its mean and variance are tensors Keras computes from its weights
        normalization = keras.layers.Normalization()
        normalization.adapt(0.5 + 0.1 * np.random.default_rng(17).random((16, 28, 28, 1), dtype=np.float32))
        inputs = keras.Input((28, 28, 1))
        features = keras.layers.Dense(12)(keras.layers.Flatten()(normalization(inputs)))
        return keras.Model(inputs, keras.layers.Dense(5)(keras.layers.ReLU()(features)))
    learner = SubclassedLearner(5)
    learner(np.zeros((1, 28, 28, 1), np.float32))
    return learner


@pytest.mark.parametrize("kind", ["dense", "layernorm", "batchnorm_dense", "adapted_normalization", "subclassed"])
def test_any_keras_learner_can_be_meta_learned_and_adapted(kind):
    learner = build_learner(kind)
    meta = km.MetaLearner(learner, inner_steps=2)
    assert meta.num_parameters == sum(int(np.prod(v.shape)) for v in learner.trainable_variables)
    episodes = random_episodes(seed=18)
    theta0_before = meta.theta0.numpy().copy()
    metrics = km.MetaTrainer(meta).train_step(as_tensors(episodes))
    assert np.isfinite(metrics["loss"].numpy())
    assert not np.array_equal(theta0_before, meta.theta0.numpy())
    adapted = meta.adapt(episodes["support_images"][0], episodes["support_labels"][0])
    np.testing.assert_allclose(
        adapted(episodes["query_images"][0]).numpy(),
        meta(as_tensors(episodes), mode="test").numpy()[0],
        rtol=1e-5,
        atol=1e-5,
    )


def test_a_frozen_batch_norm_keeps_its_pretrained_statistics_in_every_episode(tmp_path):
    """Keras normalises with a frozen layer's moving statistics even in training; the meta-learner must too,
    not restart them at 0 and 1 as it does a trainable layer's each episode."""
    images = keras.Input((28, 28, 1))
    frozen = keras.layers.BatchNormalization(name="frozen_bn")
    features = frozen(keras.layers.Conv2D(4, 3, strides=2, name="conv")(images))
    learner = keras.Model(images, keras.layers.Dense(5)(keras.layers.Flatten()(features)))
    frozen.moving_mean.assign(np.full(4, 3.0, "float32"))
    frozen.moving_variance.assign(np.full(4, 9.0, "float32"))
    frozen.trainable = False
    meta = km.MetaLearner(learner, inner_steps=1)
    function = meta.learner_function
    episodes = as_tensors(random_episodes(seed=4))
    support = episodes["support_images"][0]
    logits, state = function(meta.theta0, function.initial_state(), support, training=True)
    np.testing.assert_allclose(logits.numpy(), learner(support, training=True).numpy(), rtol=1e-5, atol=1e-5)
    statistics = {v.path: value.numpy() for v, value in zip(learner.non_trainable_variables, state, strict=True)}
    np.testing.assert_array_equal(statistics["frozen_bn/moving_mean"], np.full(4, 3.0, "float32"))
    adapted = meta.adapt(support, episodes["support_labels"][0])
    np.testing.assert_array_equal(adapted.get_layer("frozen_bn").moving_variance.numpy(), np.full(4, 9.0, "float32"))


def test_dropout_draws_other_masks_in_other_episodes_and_the_same_for_the_same_support_set():
    images = keras.Input((28, 28, 1))
    features = keras.layers.Dropout(0.5, name="dropout")(keras.layers.Flatten()(images))
    meta = km.MetaLearner(keras.Model(images, keras.layers.Dense(5)(features)), inner_steps=2)
    support = random_episodes(batch=2, seed=5)["support_images"]
    support[1] = support[0][::-1] + 0.001  # the same task's images, almost: another episode all the same
    support = tf.constant(np.concatenate([support, support[:1]]))  # the third repeats the first
    function = meta.learner_function
    states = function.stacked_initial_state(3, support)
    (seed_index,) = [i for i, v in enumerate(meta.learner.non_trainable_variables) if "seed_generator" in v.path]
    seeds = states[seed_index].numpy()
    assert not np.array_equal(seeds[0], seeds[1]) and np.array_equal(seeds[0], seeds[2])
    # What it changes: the training-mode pass of two episodes on the same images drops other pixels.
    logits = [function(meta.theta0, [s[e] for s in states], support[0], training=True)[0] for e in range(3)]
    assert not np.allclose(logits[0], logits[1]) and np.array_equal(logits[0].numpy(), logits[2].numpy())
    adapted = meta.adapt(support[0], np.arange(5))
    np.testing.assert_array_equal(adapted.get_weights()[0], meta.adapt(support[0], np.arange(5)).get_weights()[0])


def test_saving_a_learner_keras_cannot_find_by_name_warns_at_once(tmp_path):
    """An unregistered class or function is saved under its bare name, and the file fails only when it is loaded,
    maybe on another machine: the save says so, naming each, and a registered learner saves silently."""

    class Unregistered(SubclassedLearner):
        pass

    def doubled_relu(values):
        return 2.0 * keras.ops.relu(values)

    unregistered = Unregistered(5)
    unregistered(np.zeros((1, 28, 28, 1), np.float32))
    with_function = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                                      keras.layers.Dense(5, activation=doubled_relu), keras.layers.Dense(5)])
    for learner, name in ((unregistered, "Unregistered"), (with_function, "doubled_relu")):
        with pytest.warns(UserWarning, match=rf"The learner uses {name}, not registered with Keras") as caught:
            km.MetaLearner(learner, inner_steps=1).save(tmp_path / f"{name}.keras")
        assert len([w for w in caught if "not registered" in str(w.message)]) == 1
        with pytest.raises(TypeError, match=name):  # as the warning said
            keras.saving.load_model(tmp_path / f"{name}.keras")
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not registered with Keras")
        for kind in ("subclassed", "layernorm"):
            km.MetaLearner(build_learner(kind), inner_steps=1).save(tmp_path / f"{kind}.keras")


def test_a_saved_meta_learner_with_dropout_draws_the_masks_it_drew_before(tmp_path):
    """Keras draws an unseeded Dropout's seed from Python's `random` as it is built, and a .keras file does not keep
    it: loaded with keras.saving.load_model, the meta-learner adapted to another model (logits 3 apart), and `fit`
    resumed from a ModelCheckpoint file did not continue where it stood."""
    images = keras.Input((28, 28, 1))
    features = keras.layers.Dropout(0.5)(keras.layers.Flatten()(images))
    meta = km.MetaLearner(keras.Model(images, keras.layers.Dense(5)(features)), inner_steps=2)
    episodes = as_tensors(random_episodes(seed=6))
    drawn = meta(episodes, training=True).numpy()
    meta.learner(episodes["support_images"][0], training=True)  # moves the learner's own seed state, not theirs
    meta.save(tmp_path / "meta.keras")
    loaded = keras.saving.load_model(tmp_path / "meta.keras")
    assert loaded.get_config()["learner_seeds"] == meta.get_config()["learner_seeds"]
    np.testing.assert_array_equal(meta(episodes, training=True).numpy(), drawn)
    np.testing.assert_array_equal(loaded(episodes, training=True).numpy(), drawn)
    with pytest.raises(ValueError, match="learner_seeds holds 2 seed states but the learner has 1 random layers"):
        km.MetaLearner(meta.learner, learner_seeds=[[1, 0], [2, 0]])


def test_a_learners_regularizers_are_named_in_a_warning_as_not_part_of_the_inner_loss():
    images = keras.Input((28, 28, 1))
    features = keras.layers.Conv2D(2, 3, kernel_regularizer="l2", name="decayed")(images)
    learner = keras.Model(images, keras.layers.Dense(5, name="plain")(keras.layers.Flatten()(features)))
    with pytest.warns(RuntimeWarning, match=r"regularizers of the learner's layers decayed are not part"):
        meta = km.MetaLearner(learner, inner_steps=1)
    # The inner loop's loss is the cross-entropy alone, as the warning says.
    episodes = as_tensors(random_episodes(seed=3))
    function = meta._learner_function
    loss, _, _ = function.loss_and_gradient(
        function.initial_theta(), function.initial_state(), episodes["support_images"][0],
        episodes["support_labels"][0],
    )
    logits = learner(episodes["support_images"][0], training=True)
    np.testing.assert_allclose(float(loss), float(cross_entropy(episodes["support_labels"][0], logits)),
                               rtol=1e-5)


def test_a_learners_weight_constraints_are_named_in_a_warning_as_not_applied():
    images = keras.Input((28, 28, 1))
    features = keras.layers.Conv2D(2, 3, kernel_constraint=keras.constraints.MaxNorm(1.0), name="bounded")(images)
    learner = keras.Model(images, keras.layers.Dense(5, name="plain")(keras.layers.Flatten()(features)))
    with pytest.warns(RuntimeWarning, match=r"constraints of the learner's layers bounded are not applied"):
        km.MetaLearner(learner, inner_steps=1)


def test_official_gradient_division_option_scales_the_learner_gradient():
    meta = small_conv4_meta(inner_steps=1)
    divided = twin(meta, divide_grad_by_batch=True)
    alpha = set_gradient_descent_gates(meta, 0.2)
    set_gradient_descent_gates(divided, 0.2)
    episodes = random_episodes(n_way=5, k_shot=2, seed=19)
    support, labels = tf.constant(episodes["support_images"]), tf.constant(episodes["support_labels"])
    step = meta.inner_loop(support, labels)[0].numpy() - meta.theta0.numpy()
    divided_step = divided.inner_loop(support, labels)[0].numpy() - meta.theta0.numpy()
    assert alpha > 0
    np.testing.assert_allclose(divided_step * 10, step, rtol=1e-3, atol=1e-7)


def test_clip_over_replicas_is_plain_global_norm_clipping_on_one_device():
    from keras_metalstm.distribute import clip_by_global_norm_over_replicas

    gradients = [tf.constant([3.0, 4.0]), tf.constant([[12.0]])]  # global norm 13
    clipped = clip_by_global_norm_over_replicas(gradients, 1.3)
    expected, _ = tf.clip_by_global_norm(gradients, 1.3)
    for mine, reference in zip(clipped, expected, strict=True):
        np.testing.assert_allclose(mine.numpy(), reference.numpy(), rtol=1e-6)
    unclipped = clip_by_global_norm_over_replicas(gradients, 100.0)
    np.testing.assert_array_equal(unclipped[0].numpy(), gradients[0].numpy())


def test_theta0_can_start_from_a_pretrained_classifier_with_another_output_size():
    meta = small_conv4_meta()
    before = learner_snapshot(meta.learner)
    fresh_theta0 = meta.theta0.numpy().copy()
    keras.utils.set_random_seed(7)
    pretrained = km.learners.conv4(input_shape=(28, 28, 1), num_classes=40, filters=8, name="pretrained")

    zeroed = meta.initialize_theta0_from(pretrained)

    # Independent flattening: every body weight comes from the pretrained model, the new 5-way head is zero.
    sizes = [int(np.prod(v.shape)) for v in meta.learner.trainable_variables]
    pieces = np.split(meta.theta0.numpy(), np.cumsum(sizes)[:-1])
    for index, (piece, source) in enumerate(zip(pieces, pretrained.trainable_variables, strict=True)):
        if index < len(pieces) - 2:
            np.testing.assert_array_equal(piece, source.numpy().ravel())
        else:
            np.testing.assert_array_equal(piece, np.zeros_like(piece))
    head_kernel_before = np.split(fresh_theta0, np.cumsum(sizes)[:-1])[-2]
    assert np.count_nonzero(head_kernel_before) == head_kernel_before.size  # the fresh head was not zero
    assert zeroed == [v.path for v in meta.learner.trainable_variables[-2:]]
    for old, new in zip(before, learner_snapshot(meta.learner), strict=True):
        np.testing.assert_array_equal(old, new)


def test_theta0_from_a_model_of_another_architecture_is_refused():
    meta = small_conv4_meta()
    theta0 = meta.theta0.numpy().copy()
    other = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(5)])
    with pytest.raises(ValueError, match="learner's architecture"):
        meta.initialize_theta0_from(other)
    wider = km.learners.conv4(input_shape=(28, 28, 1), num_classes=7, filters=16)
    with pytest.raises(ValueError, match="Only the output layer may differ"):
        meta.initialize_theta0_from(wider)
    np.testing.assert_array_equal(meta.theta0.numpy(), theta0)


def test_theta0_from_a_model_whose_frozen_weights_differ_is_refused_not_half_taken():
    def build(num_classes, backbone_value):
        images = keras.Input((28, 28, 1))
        backbone = keras.layers.Conv2D(4, 3, strides=2, name="backbone", kernel_initializer="zeros")
        backbone.trainable = False
        learner = keras.Model(images, keras.layers.Dense(num_classes, name="head")(
            keras.layers.Flatten()(backbone(images))))
        backbone.kernel.assign(np.full((3, 3, 1, 4), backbone_value, "float32"))
        return learner

    meta = km.MetaLearner(build(5, 0.0), inner_steps=1)
    theta0 = meta.theta0.numpy().copy()
    # theta_0 would take the head alone and keep the learner's own backbone: not the pre-trained model
    with pytest.raises(ValueError, match=r"frozen weights differ from the learner's \(backbone/kernel\)"):
        meta.initialize_theta0_from(build(20, 0.5))
    np.testing.assert_array_equal(meta.theta0.numpy(), theta0)
    assert meta.initialize_theta0_from(build(20, 0.0)) == ["head/kernel", "head/bias"]  # the same frozen weights
