"""The baselines against independent NumPy computations on tiny fixed networks and episodes: the authors' cosine
1-NN, pixel 1-NN and fine-tune (15 SGD updates with Torch's learning-rate decay, batch norm in training mode),
Baseline++'s cosine classifier, and the choice of settings on validation episodes."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_metalstm import baselines as bl
from keras_metalstm import validation_grid
from keras_metalstm.pretraining import PretrainedFeatures

N_WAY = 3


def dense_learner(hidden=5, classes=7, batchnorm=False, seed=0):
    """images (2, 3, 1) -> flatten -> Dense(hidden, tanh) [-> BatchNorm] -> Dense(classes), fixed weights."""
    keras.utils.set_random_seed(seed)
    images = keras.Input((2, 3, 1))
    features = keras.layers.Dense(hidden, activation="tanh", name="hidden")(keras.layers.Flatten()(images))
    if batchnorm:
        features = keras.layers.BatchNormalization(epsilon=1e-3, name="bn")(features)
    model = keras.Model(images, keras.layers.Dense(classes, name="logits")(features))
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(0, 0.7, w.shape).astype(np.float32) for w in model.get_weights()])
    if batchnorm:  # a moving variance must be positive
        bn = model.get_layer("bn")
        bn.moving_variance.assign(rng.uniform(0.5, 2.0, bn.moving_variance.shape).astype(np.float32))
    return model


def episode(seed=1, shots=2, queries=4):
    rng = np.random.default_rng(seed)
    support_labels = np.repeat(np.arange(N_WAY), shots).astype(np.int32)
    query_labels = np.tile(np.arange(N_WAY), queries).astype(np.int32)
    return (
        tf.constant(rng.random((len(support_labels), 2, 3, 1), np.float32)),
        tf.constant(support_labels),
        tf.constant(rng.random((len(query_labels), 2, 3, 1), np.float32)),
        tf.constant(query_labels),
    )


def numpy_hidden(model, images):
    kernel, bias = model.get_layer("hidden").get_weights()
    return np.tanh(np.asarray(images).reshape(len(images), -1) @ kernel + bias)


def softmax(logits):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def one_hot(labels, n=N_WAY):
    return np.eye(n)[np.asarray(labels)]


# --------------------------------------------------------------------------------------- nearest neighbour
def test_cosine_nearest_neighbour_on_the_penultimate_features_matches_numpy():
    model = dense_learner(hidden=6)
    support, support_labels, query, _ = episode(queries=10)
    baseline = bl.NearestNeighbour("nearest_neighbour_authors", "cosine", PretrainedFeatures(model))
    s, q = numpy_hidden(model, support), numpy_hidden(model, query)
    cosine = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (s / np.linalg.norm(s, axis=1, keepdims=True)).T
    expected = np.asarray(support_labels)[cosine.argmax(1)]
    euclidean = np.asarray(support_labels)[((q[:, None] - s[None]) ** 2).sum(-1).argmin(1)]
    assert not np.array_equal(expected, euclidean)  # the episode tells the two metrics apart
    np.testing.assert_array_equal(baseline.predictions(support, support_labels, query).numpy(), expected)
    ours = bl.NearestNeighbour("nearest_neighbour", "euclidean", PretrainedFeatures(model))
    np.testing.assert_array_equal(ours.predictions(support, support_labels, query).numpy(), euclidean)
    assert (baseline.protocol, ours.protocol) == ("authors", "ours")


def test_pixel_nearest_neighbour_is_cosine_on_the_pixels():
    # Class 0 is bright on the left half, class 1 is uniform. Each query has its class's pattern at another
    # brightness: cosine similarity ignores brightness (all right), the Euclidean distance does not (all wrong).
    left = np.zeros((2, 3, 1), np.float32)
    left[:, 0] = 1.0
    uniform = np.ones((2, 3, 1), np.float32)
    support = tf.constant(np.stack([left, 0.1 * uniform]))
    query = tf.constant(np.stack([0.2 * left, 0.9 * uniform, 0.3 * left]))
    support_labels, query_labels = tf.constant([0, 1]), tf.constant([0, 1, 0])
    pixel = bl.NearestNeighbour("pixel_nearest_neighbour", "cosine")
    assert pixel.accuracy((support, support_labels, query, query_labels)) == 1.0
    euclidean = bl.NearestNeighbour("pixel_nearest_neighbour", "euclidean")
    assert euclidean.accuracy((support, support_labels, query, query_labels)) == 0.0


def test_unknown_metric_is_refused():
    with pytest.raises(ValueError, match="metric"):
        bl.nearest_neighbour_predictions(tf.ones((1, 2)), tf.constant([0]), tf.ones((1, 2)), "manhattan")


# --------------------------------------------------------------------------------------- authors' fine-tune
def test_new_output_layer_is_drawn_as_torch_nn_linear_draws_it():
    kernel, bias = bl.torch_linear_init(400, 5, seed=3)
    bound = 1 / np.sqrt(400)
    assert kernel.shape == (400, 5) and bias.shape == (5,) and kernel.dtype == np.float32
    assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound
    # uniform on [-bound, bound]: mean 0, variance bound^2 / 3
    assert abs(kernel.mean()) < 0.1 * bound and kernel.var() == pytest.approx(bound**2 / 3, rel=0.1)
    assert np.abs(bias).min() > 0  # drawn too, not zero
    np.testing.assert_array_equal(bl.torch_linear_init(400, 5, seed=3)[0], kernel)  # seeded
    assert not np.array_equal(bl.torch_linear_init(400, 5, seed=4)[0], kernel)


def test_torch_sgd_learning_rate_decay():
    assert [bl.torch_sgd_learning_rate(0.5, 0.1, n) for n in range(3)] == [0.5, 0.5 / 1.1, 0.5 / 1.2]
    assert bl.torch_sgd_learning_rate(0.5, 0.0, 14) == 0.5


def numpy_authors_finetune(model, head, support, support_labels, query, learning_rate, decay, updates):
    """The whole Dense-only network trained by 15 SGD updates of the mean cross-entropy, lr / (1 + n * decay)."""
    w1, b1 = (np.asarray(v, np.float64) for v in model.get_layer("hidden").get_weights())
    w2, b2 = (np.asarray(v, np.float64) for v in head)
    x = np.asarray(support, np.float64).reshape(len(support), -1)
    y = one_hot(support_labels)
    for n in range(updates):
        h = np.tanh(x @ w1 + b1)
        d_logits = (softmax(h @ w2 + b2) - y) / len(x)
        d_h = d_logits @ w2.T * (1 - h**2)
        rate = learning_rate / (1 + n * decay)
        w2, b2 = w2 - rate * h.T @ d_logits, b2 - rate * d_logits.sum(0)
        w1, b1 = w1 - rate * x.T @ d_h, b1 - rate * d_h.sum(0)
    q = np.asarray(query, np.float64).reshape(len(query), -1)
    return np.tanh(q @ w1 + b1) @ w2 + b2


def test_authors_finetune_is_15_sgd_updates_of_the_whole_network_with_decay():
    model = dense_learner()
    ep = episode()
    features = PretrainedFeatures(model, batchnorm_momentum=bl.TORCH_BATCHNORM_MOMENTUM)
    baseline = bl.AuthorsFinetune(features, N_WAY, seed=5)
    head = bl.torch_linear_init(5, N_WAY, seed=5)
    for kernel, drawn in zip(head, baseline.head, strict=True):
        np.testing.assert_array_equal(drawn.numpy(), kernel)
    got = baseline.query_logits(ep, learning_rate=0.5, decay=0.1).numpy()
    expected = numpy_authors_finetune(model, head, ep[0], ep[1], ep[2], 0.5, 0.1, 15)
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-5)
    # the decay matters: without it the network ends elsewhere
    undecayed = numpy_authors_finetune(model, head, ep[0], ep[1], ep[2], 0.5, 0.0, 15)
    assert np.abs(undecayed - expected).max() > 1e-2
    # the pre-trained network itself is left as it was
    np.testing.assert_array_equal(model.get_layer("hidden").get_weights()[0],
                                  dense_learner().get_layer("hidden").get_weights()[0])


def test_authors_finetune_runs_batch_norm_in_training_mode_and_queries_on_the_moved_running_averages():
    model = dense_learner(batchnorm=True)
    ep = episode()
    features = PretrainedFeatures(model, batchnorm_momentum=bl.TORCH_BATCHNORM_MOMENTUM)
    baseline = bl.AuthorsFinetune(features, N_WAY, seed=5)
    # learning rate 0: the weights stay, so only the 15 training-mode forward passes change the statistics
    got = baseline.query_logits(ep, learning_rate=0.0, decay=0.0).numpy()
    bn = model.get_layer("bn")
    gamma, beta, mean, variance = (np.asarray(v, np.float64) for v in bn.get_weights())
    h = numpy_hidden(model, ep[0])
    for _ in range(15):  # Torch's momentum 0.1: running = 0.9 running + 0.1 batch (biased batch variance)
        mean, variance = 0.9 * mean + 0.1 * h.mean(0), 0.9 * variance + 0.1 * h.var(0)
    kernel, bias = bl.torch_linear_init(5, N_WAY, seed=5)
    hq = numpy_hidden(model, ep[2])
    expected = (gamma * (hq - mean) / np.sqrt(variance + 1e-3) + beta) @ kernel + bias
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    frozen = (gamma * (hq - bn.moving_mean.numpy()) / np.sqrt(bn.moving_variance.numpy() + 1e-3) + beta) @ kernel
    assert np.abs(frozen + bias - expected).max() > 1e-2  # the statistics did move
    assert bn.momentum == 0.99  # the pre-trained network's own layer is untouched


def test_authors_grid_is_their_configs():
    baseline = bl.AuthorsFinetune(PretrainedFeatures(dense_learner()), N_WAY)
    assert baseline.updates == 15 and len(baseline.grid) == 6 * 7
    assert {p["learning_rate"] for p in baseline.grid} == {0.5, 0.1, 0.01, 0.001, 0.0001, 0.00001}
    assert {p["decay"] for p in baseline.grid} == {1, 0.1, 0.01, 0.001, 0.0001, 0.00001, 0}
    assert baseline.grid[:2] == [{"learning_rate": 0.5, "decay": 1.0}, {"learning_rate": 0.5, "decay": 0.1}]


def test_authors_grid_scored_in_one_call_equals_each_setting_on_its_own():
    baseline = bl.AuthorsFinetune(
        PretrainedFeatures(dense_learner(), batchnorm_momentum=bl.TORCH_BATCHNORM_MOMENTUM),
        N_WAY,
        learning_rates=(0.5, 0.01),
        decays=(1.0, 0.0),
    )
    ep = episode()
    one_by_one = [np.mean(baseline.query_logits(ep, **p).numpy().argmax(1) == ep[3].numpy()) for p in baseline.grid]
    assert len(set(one_by_one)) > 1  # the settings do differ, so a mix-up would show
    np.testing.assert_allclose(baseline.grid_accuracies(ep), one_by_one, atol=1e-7)


# ----------------------------------------------------------------------------------------- validation choice
def test_validation_choice_picks_the_grid_point_with_the_best_mean():
    grid = validation_grid.grid_points(learning_rate=(0.1, 0.01), decay=(1.0, 0.0))
    assert grid == [{"learning_rate": 0.1, "decay": 1.0}, {"learning_rate": 0.1, "decay": 0.0},
                    {"learning_rate": 0.01, "decay": 1.0}, {"learning_rate": 0.01, "decay": 0.0}]
    # per-episode scores: the third point is best on average though not on every episode
    scores = {"a": [0.5, 0.6, 0.9, 0.2], "b": [0.5, 0.6, 0.5, 0.9], "c": [0.2, 0.3, 0.8, 0.1]}
    ticks = []
    choice = validation_grid.choose_on_validation(["a", "b", "c"], grid, lambda e: scores[e], progress=ticks.append)
    assert choice.settings == {"learning_rate": 0.01, "decay": 1.0}
    assert choice.val_accuracy == pytest.approx(2.2 / 3) and choice.val_episodes == 3 and ticks == [1, 1, 1]
    assert choice.grid == pytest.approx({"learning_rate=0.1,decay=1": 0.4, "learning_rate=0.1,decay=0": 0.5,
                                         "learning_rate=0.01,decay=1": 2.2 / 3, "learning_rate=0.01,decay=0": 0.4})
    # a tie goes to the earlier point (the authors' strict comparison)
    assert validation_grid.choose_on_validation([0], grid, lambda e: [0.1, 0.7, 0.7, 0.2]).settings == grid[1]
    with pytest.raises(ValueError, match="grid of 4"):
        validation_grid.choose_on_validation([0], grid, lambda e: [0.1])


def test_a_baseline_scores_only_after_its_settings_are_chosen():
    baseline = bl.AuthorsFinetune(PretrainedFeatures(dense_learner()), N_WAY)
    with pytest.raises(RuntimeError, match="choose the settings of finetune_authors"):
        baseline.accuracy(episode())
    baseline.settings = {"learning_rate": 0.5, "decay": 0.0}
    ep = episode()
    expected = np.mean(baseline.query_logits(ep, 0.5, 0.0).numpy().argmax(1) == ep[3].numpy())
    assert baseline.accuracy(ep) == pytest.approx(expected)


# ------------------------------------------------------------------------------------------------ Baseline++
def numpy_cosine_classifier(weights, support, labels, query, learning_rate, steps, scale):
    """Full-batch gradient descent on the mean cross-entropy of scale * cos(feature, w_c); returns (weights,
    query logits)."""
    w = np.asarray(weights, np.float64)
    f = support / np.linalg.norm(support, axis=1, keepdims=True)
    y = one_hot(labels)
    for _ in range(steps):
        norms = np.linalg.norm(w, axis=0, keepdims=True)
        unit = w / norms
        d_unit = scale * f.T @ (softmax(scale * f @ unit) - y) / len(f)
        w = w - learning_rate * (d_unit - unit * (unit * d_unit).sum(0, keepdims=True)) / norms
    fq = query / np.linalg.norm(query, axis=1, keepdims=True)
    return w, scale * fq @ (w / np.linalg.norm(w, axis=0, keepdims=True))


def test_baseline_plus_head_is_a_cosine_classifier_trained_on_the_frozen_features():
    model = dense_learner(hidden=6)
    ep = episode(queries=6)
    baseline = bl.BaselinePlus(PretrainedFeatures(model), N_WAY, seed=2, learning_rates=(0.5,), steps=(1, 4),
                               scales=(4.0,))
    start = bl.torch_linear_init(6, N_WAY, seed=2)[0]
    np.testing.assert_array_equal(baseline.initial_params()[0].numpy(), start)
    support, query = numpy_hidden(model, ep[0]), numpy_hidden(model, ep[2])
    np.testing.assert_allclose(baseline.prepare(ep[0]).numpy(), support, rtol=1e-5, atol=1e-6)
    for steps in (1, 4):
        trained = baseline.train(baseline.initial_params(), baseline.prepare(ep[0]), ep[1], 0.5, steps, scale=4.0)
        weights, logits = numpy_cosine_classifier(start, support, ep[1], query, 0.5, steps, 4.0)
        np.testing.assert_allclose(trained[0].numpy(), weights, rtol=1e-4, atol=1e-5)
        got = baseline.logits(trained, baseline.prepare(ep[2]), scale=tf.constant(4.0)).numpy()
        np.testing.assert_allclose(got, logits, rtol=1e-4, atol=1e-5)
    # one step moved the head; the curve scores each step count of the grid on one run
    assert np.abs(numpy_cosine_classifier(start, support, ep[1], query, 0.5, 1, 4.0)[0] - start).max() > 1e-3
    curve = baseline.step_curve(ep, learning_rate=0.5, scale=4.0)
    expected = [np.mean(numpy_cosine_classifier(start, support, ep[1], query, 0.5, n, 4.0)[1].argmax(1)
                        == ep[3].numpy()) for n in (1, 4)]
    assert curve == pytest.approx(expected)
    assert baseline.protocol == "chen2019" and len(baseline.grid) == 2
    assert {p["scale"] for p in bl.BaselinePlus(PretrainedFeatures(model), N_WAY).grid} == {2, 5, 10, 20}


# ----------------------------------------------------------------------------------------------- assembling
def test_build_baselines_per_protocol_and_batch_accuracies():
    model = dense_learner()
    authors = bl.build_baselines(model, N_WAY)
    assert list(authors.methods) == ["finetune_authors", "nearest_neighbour_authors", "pixel_nearest_neighbour"]
    both = bl.build_baselines(model, N_WAY, ("ours", "authors"), baseline_plus=True)
    assert {m.protocol for m in both.methods.values()} == {"authors", "ours", "chen2019"}
    assert set(both.methods) == set(bl.BASELINE_PROTOCOLS)
    with pytest.raises(ValueError, match="unknown baseline protocol"):
        bl.build_baselines(model, N_WAY, ("theirs",))
    ep = episode()
    batch = {"support_images": tf.stack([ep[0], ep[0]]), "support_labels": tf.stack([ep[1], ep[1]]),
             "query_images": tf.stack([ep[2], ep[2]]), "query_labels": tf.stack([ep[3], ep[3]])}
    for method in authors.methods.values():
        method.settings = method.grid[0] if method.grid else None
    scores = authors.episode_accuracies(batch)
    assert {k: v.shape for k, v in scores.items()} == {k: (2,) for k in authors.methods}
    assert scores["nearest_neighbour_authors"][0] == authors.methods["nearest_neighbour_authors"].accuracy(ep)


def test_a_learner_without_a_dense_output_layer_is_refused():
    from keras_metalstm.learner_spec import LearnerError

    images = keras.Input((2, 3, 1))
    model = keras.Model(images, keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(images)))
    with pytest.raises(LearnerError, match="new N-way Dense layer"):
        bl.build_baselines(model, N_WAY)
