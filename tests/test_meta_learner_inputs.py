"""The checks of what a MetaLearner is given, alone and through the MetaLearner: each bad input gets its own
message, good input passes through."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import as_tensors, random_episodes, small_conv4_meta

import keras_metalstm as km
from keras_metalstm.meta_learner_inputs import (
    check_adaptation_settings,
    check_episodes,
    check_mode,
    check_support,
    static_batch_size,
)


def small_learner():
    return keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Flatten(), keras.layers.Dense(3)])


def test_adaptation_settings_need_a_step_and_a_known_statistics_protocol():
    check_adaptation_settings(1, "support")
    with pytest.raises(ValueError, match="inner_steps must be a whole number of at least 1, got 0"):
        check_adaptation_settings(0, "query")
    with pytest.raises(ValueError, match="query_statistics must be one of .*'batch'"):
        check_adaptation_settings(3, "batch")


def test_mode_is_train_or_test():
    check_mode("test")
    with pytest.raises(ValueError, match="mode must be 'train' or 'test', got 'eval'"):
        check_mode("eval")


def test_episode_batch_names_the_missing_keys():
    images, labels = np.zeros((1, 3, 6, 6, 1), np.float32), np.zeros((1, 3), np.int32)
    check_episodes(small_learner(), {"support_images": images, "support_labels": labels, "query_images": images})
    with pytest.raises(ValueError, match=r"missing: \['query_images'\]"):
        check_episodes(small_learner(), {"support_images": images, "support_labels": labels, "query_labels": labels})
    with pytest.raises(ValueError, match=r"missing: \['query_labels'\]"):  # to train or evaluate on
        check_episodes(small_learner(), {"support_images": images, "support_labels": labels, "query_images": images},
                       labelled=True)


def test_episode_count_must_be_static_when_traced():
    assert static_batch_size(tf.zeros((4, 2)), "support_images") == 4
    found = []

    @tf.function(input_signature=[tf.TensorSpec((None, 2))])
    def count(images):
        found.append(static_batch_size(images, "support_images"))
        return images

    with pytest.raises(ValueError, match="support_images needs a static number of episodes.*drop_remainder"):
        count(tf.zeros((4, 2)))
    assert found == []


def test_support_set_is_converted_and_its_shape_and_labels_checked():
    learner = small_learner()
    images, labels = check_support(learner, "float64", np.zeros((3, 6, 6, 1), np.float32), np.array([0, 2, 1]))
    assert images.dtype == tf.float64 and labels.dtype == tf.int32
    np.testing.assert_array_equal(labels.numpy(), [0, 2, 1])
    with pytest.raises(ValueError, match=r"one task's images of shape .*got shape \(6, 6, 1\)"):
        check_support(learner, "float32", np.zeros((6, 6, 1)), np.arange(6))
    with pytest.raises(ValueError, match=r"have shape \(8, 8, 1\) per image but the learner expects \(6, 6, 1\)"):
        check_support(learner, "float32", np.zeros((3, 8, 8, 1)), np.arange(3))
    with pytest.raises(ValueError, match="one integer label per support image: got shape \\(2,\\) for 3"):
        check_support(learner, "float32", np.zeros((3, 6, 6, 1)), np.arange(2))
    with pytest.raises(ValueError, match="support_labels must be integers, got float32"):
        check_support(learner, "float32", np.zeros((3, 6, 6, 1)), np.zeros(3, np.float32))


def test_bad_input_gets_clear_errors():
    meta = small_conv4_meta(inner_steps=1)
    episodes = random_episodes(seed=20)
    with pytest.raises(ValueError, match="expects \\(28, 28, 1\\)"):
        meta.adapt(np.zeros((5, 32, 32, 3), np.float32), np.arange(5))
    with pytest.raises(ValueError, match="one integer label per support image"):
        meta.adapt(episodes["support_images"][0], np.arange(4))
    with pytest.raises(ValueError, match="mode='test' only"):
        meta.adapt(episodes["support_images"][0], episodes["support_labels"][0], mode="train")
    with pytest.raises(RuntimeError, match=r"runs eagerly only, not inside a tf.function: there, call "
                       r"meta.inner_loop\(support_images, support_labels\)"):
        tf.function(meta.adapt)(episodes["support_images"][0], episodes["support_labels"][0])
    with pytest.raises(ValueError, match="missing"):
        meta({"support_images": episodes["support_images"]})
    with pytest.raises(ValueError, match="build it first"):
        km.MetaLearner(keras.Sequential([keras.layers.Dense(3)]))
    with pytest.raises(TypeError, match="keras.Model"):
        km.MetaLearner(keras.layers.Dense(3))


def flat_learner(*head, dtype="float32"):
    images = keras.Input((28, 28, 1), dtype=dtype)
    outputs = keras.layers.Flatten()(images)
    for layer in head:
        outputs = layer(outputs)
    return keras.Model(images, outputs)


@pytest.mark.parametrize(
    "learner, message",
    [
        (lambda: flat_learner(keras.layers.Dense(5, activation="softmax")), "returns probabilities"),
        (lambda: flat_learner(keras.layers.Dense(5, activation="sigmoid")), "applies sigmoid"),
        (lambda: flat_learner(keras.layers.Dense(5), dtype="uint8"), "input is uint8"),
        (lambda: two_outputs(), "has 2 outputs"),
        (lambda: flat_learner(keras.layers.Lambda(lambda x: 2.0 * x), keras.layers.Dense(5)),
         "Lambda layers cannot be loaded safely, and adapt"),
    ],
)
def test_a_learner_that_cannot_give_logits_is_refused_by_the_library_too(learner, message):
    with pytest.raises(ValueError, match=message):
        km.MetaLearner(learner(), inner_steps=1)


def two_outputs():
    images = keras.Input((28, 28, 1))
    features = keras.layers.Flatten()(images)
    return keras.Model(images, [keras.layers.Dense(5)(features), keras.layers.Dense(5)(features)])


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"inner_steps": 2.7}, "inner_steps must be a whole number"),
        ({"hidden_units": 0}, "hidden_units must be a whole number of at least 1"),
        ({"p": 0}, "p, the gradient preprocessing's constant, must be positive"),
        ({"bn_momentum": 1.5}, r"bn_momentum must lie in \[0, 1\]"),
        ({"first_order": "no"}, r"first_order must be True or False, got 'no'"),  # bool("no") was True
        ({"learn_logit_scale": 2}, r"learn_logit_scale must be True or False, got 2"),
    ],
)
def test_settings_out_of_range_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        small_conv4_meta(**settings)


def test_a_support_set_adapt_cannot_use_is_refused_with_its_fix():
    meta = small_conv4_meta(inner_steps=1)
    support = random_episodes(seed=21)["support_images"][0]
    with pytest.raises(ValueError, match=r"support_labels must lie in 0\.\.4 .*got 1\.\.5: number the classes"):
        meta.adapt(support, np.arange(1, 6))
    with pytest.raises(ValueError, match=r"got -1\.\.3"):
        meta.adapt(support, np.arange(-1, 4))
    with pytest.raises(ValueError, match="support_images is empty"):
        meta.adapt(support[:0], np.arange(0))
    # a 5-way learner adapted on 2 classes: its outputs 2..4 would be classes no support image showed it
    missing = r"support_labels hold no example of class\(es\) \[2, 3, 4\] of the learner's 5 outputs"
    with pytest.raises(ValueError, match=missing):
        meta.adapt(support, [0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match="support_images are uint8; .*divided by 255"):
        meta.adapt((support * 255).astype(np.uint8), np.arange(5))
    for steps in (0, -3, 1.5):
        with pytest.raises(ValueError, match=f"inner_steps must be a whole number of at least 1, got {steps}"):
            meta.adapt(support, np.arange(5), inner_steps=steps)
    # a float64 tensor (a float64 pipeline's) is cast, as NumPy arrays are
    from_tensor = meta.adapt(tf.constant(support, tf.float64), np.arange(5))
    np.testing.assert_array_equal(from_tensor.get_weights()[0], meta.adapt(support, np.arange(5)).get_weights()[0])


def test_a_learner_on_flat_inputs_adapts_on_flat_support_sets():
    vectors = keras.Input((12,))
    meta = km.MetaLearner(keras.Model(vectors, keras.layers.Dense(3)(vectors)), inner_steps=1)
    rng = np.random.default_rng(0)
    adapted = meta.adapt(rng.random((6, 12), dtype=np.float32), np.arange(6) % 3)
    assert adapted(np.zeros((2, 12), np.float32)).shape == (2, 3)
    with pytest.raises(ValueError, match=r"shape \(examples, \*\(12,\)\), got shape \(6, 3, 4\)"):
        meta.adapt(rng.random((6, 3, 4), dtype=np.float32), np.arange(6) % 3)


def test_episode_batches_that_do_not_fit_are_refused_before_tensorflow_sees_them():
    meta = small_conv4_meta(inner_steps=1)
    episodes = random_episodes(seed=22)
    one_episode = {key: value[0] for key, value in episodes.items()}
    with pytest.raises(ValueError, match=r"support_images must be a batch of episodes .*add a first axis of 1"):
        meta(one_episode)
    with pytest.raises(ValueError, match=r"hold images of shape \(28, 28, 3\) but the learner takes \(28, 28, 1\)"):
        meta({**episodes, "query_images": np.repeat(episodes["query_images"], 3, axis=-1)})
    trainer = km.MetaTrainer(meta)
    for step in (trainer.train_step, trainer.evaluate_step):  # refused before the step is traced
        with pytest.raises(ValueError, match=r"support_images must be a batch of episodes") as raised:
            step(as_tensors(one_episode))
        assert "in user code" not in str(raised.value)
    # an N-way episode needs a learner of N outputs (this one has 5): more would train logits no class owns
    with pytest.raises(ValueError, match=r"the learner has 5 outputs but an episode's support set has 2 classes: .*"
                                         r"\(e\.g\. Dense\(2\)\)"):
        trainer.train_step(as_tensors(random_episodes(n_way=2)))
    # 5-way episodes whose support sets miss classes: the fix is the labels, not a Dense(1) learner
    one_class = {**random_episodes(), "support_labels": np.zeros((1, 5), np.int32)}
    with pytest.raises(ValueError, match=r"support set has no example of class\(es\) \[1, 2, 3, 4\] of the learner"):
        trainer.train_step(as_tensors(one_class))
    with pytest.raises(ValueError, match=r"support_labels must lie in 0\.\.4 \(the learner's 5 outputs\), got 0\.\.6"):
        trainer.evaluate_step(as_tensors(random_episodes(n_way=7)))
    assert trainer._train_function.experimental_get_tracing_count() == 0
    assert trainer._evaluate_function.experimental_get_tracing_count() == 0
    without_labels = {key: value for key, value in episodes.items() if key != "query_labels"}
    with pytest.raises(ValueError, match=r"missing: \['query_labels'\]"):
        trainer.train_step(as_tensors(without_labels))
    float_labels = {**episodes, "query_labels": episodes["query_labels"].astype(np.float32)}
    with pytest.raises(ValueError, match=r"query_labels must be \(episodes, examples\) integer labels, got .* float32"):
        trainer.train_step(as_tensors(float_labels))


def test_images_with_nan_or_inf_are_refused_before_they_reach_the_meta_parameters():
    """One NaN in a batch made the meta-gradient NaN and Adam's update every meta-parameter NaN, without an error
    (the CLI stopped as "diverged" and blamed the learning rate); in adapt, every weight of the adapted model."""
    meta = small_conv4_meta(inner_steps=1)
    meta.compile()
    trainer = km.MetaTrainer(meta)
    before = [weight.numpy() for weight in meta.trainable_weights]
    episodes = random_episodes(seed=25)
    for key, value in (("query_images", np.nan), ("support_images", np.inf)):
        bad = {key_: array.copy() for key_, array in episodes.items()}
        bad[key][0, 1, 2, 3, 0] = value
        message = rf"{key} hold 1 NaN or infinite value\(s\)"
        for step in (trainer.train_step, trainer.evaluate_step):
            with pytest.raises(ValueError, match=message):
                step(as_tensors(bad))
        with pytest.raises(ValueError, match=message):
            meta.fit(tf.data.Dataset.from_tensors(as_tensors(bad)), verbose=0)
    support = random_episodes(seed=26)["support_images"][0]
    support[4, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"support_images hold 1 NaN or infinite value\(s\)"):
        meta.adapt(support, np.arange(5))
    for weight, value in zip(meta.trainable_weights, before, strict=True):
        np.testing.assert_array_equal(weight.numpy(), value)


def test_the_keys_of_an_episode_batch_must_agree_with_each_other():
    """Each key was checked alone: query images of 2 episodes beside a support set of 1 gave the logits of 1, a
    label short was taken for a class missing, an empty set failed inside NumPy, uint8 images trained on 0..255."""
    meta = small_conv4_meta(inner_steps=1)
    trainer = km.MetaTrainer(meta)
    episodes = random_episodes(seed=23)  # one 5-way episode, 1 shot, 3 queries per class
    two = random_episodes(batch=2, seed=24)
    cases = [
        ({"query_images": two["query_images"]},
         r"different numbers of episodes \(support_images 1, support_labels 1, query_images 2, query_labels 1\)"),
        ({"support_labels": episodes["support_labels"][:, :4]},
         r"support_labels hold 4 labels per episode for 5 images in support_images: give one label per image"),
        ({"query_labels": episodes["query_labels"][:, :4]}, r"query_labels hold 4 labels per episode for 15 images"),
        ({"support_images": episodes["support_images"][:, :0], "support_labels": episodes["support_labels"][:, :0]},
         r"An episode's support set is empty \(support_images of shape \(1, 0, 28, 28, 1\)\)"),
        ({"query_images": (episodes["query_images"] * 255).astype(np.uint8)},
         r"query_images are uint8 but the learner takes floating-point images .* divide uint8 by 255"),
        ({"query_labels": episodes["query_labels"].tolist()},
         r"\['query_labels'\] must be NumPy arrays or tensors, not list"),
    ]
    for change, message in cases:
        bad = {**episodes, **change}
        with pytest.raises(ValueError, match=message):
            trainer.train_step(bad)
        with pytest.raises(ValueError, match=message):
            meta.episode_metrics(bad, mode="train")
    assert trainer._train_function.experimental_get_tracing_count() == 0


@pytest.mark.parametrize(("settings", "message"), [
    ({"clip_norm": -1.0}, "clip_norm must be a positive number (or None for no clip), got -1.0: a negative one "
                          "reverses the meta-gradient"),
    ({"clip_norm": float("nan")}, "clip_norm must be a positive number (or None for no clip), got nan"),
    ({"learning_rate": -1e-3}, "learning_rate must be a positive number, got -0.001: a negative one climbs"),
    ({"learning_rate": float("nan")}, "learning_rate must be a positive number, got nan"),
])
def test_a_meta_optimisation_that_would_climb_or_poison_the_meta_loss_is_refused(settings, message):
    meta = small_conv4_meta(inner_steps=1)
    with pytest.raises(ValueError, match=re.escape(message)):
        km.MetaTrainer(meta, **settings)
    with pytest.raises(ValueError, match=re.escape(message)):  # the Keras loop's clip, or the paper's optimizer
        meta.compile(**settings) if "clip_norm" in settings else km.meta_optimizer(**settings)
    assert km.MetaTrainer(meta, clip_norm=None).clip_norm is None
    assert km.MetaTrainer(meta, clip_norm=0).clip_norm is None


def test_a_meta_learner_built_outside_the_trainers_strategy_is_refused_with_the_fix():
    """Its variables are not the strategy's: TensorFlow refused deep inside ("colocate_vars_with must only be
    passed a variable created in this tf.distribute.Strategy.scope()")."""
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    outside = small_conv4_meta(inner_steps=1)
    with pytest.raises(ValueError, match=r"built outside this strategy's scope \(OneDeviceStrategy\).*"
                                         r"Build it within `with strategy.scope\(\):`"):
        km.MetaTrainer(outside, strategy=strategy)
    with strategy.scope():
        inside = small_conv4_meta(inner_steps=1)
    km.MetaTrainer(inside, strategy=strategy).train_step(as_tensors(random_episodes(seed=25)))
    km.MetaTrainer(outside)  # the default strategy takes any variable
