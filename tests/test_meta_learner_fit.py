"""MetaLearner as a Keras model: `compile` + `fit` make MetaTrainer's updates, run callbacks, recover from a failed
trace and continue exactly from a saved .keras file."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import as_tensors, random_episodes, small_conv4_meta, twin

import keras_metalstm as km
from keras_metalstm import meta_learner_fit


def test_keras_fit_makes_the_same_updates_as_meta_trainer():
    meta = small_conv4_meta(inner_steps=2)
    fitted = twin(meta)
    batches = [random_episodes(batch=2, seed=s) for s in (11, 12, 13)]
    trainer = km.MetaTrainer(meta)
    for batch in batches:
        trainer.train_step(as_tensors(batch))
    dataset = tf.data.Dataset.from_tensor_slices(
        {key: np.stack([batch[key] for batch in batches]) for key in batches[0]}
    )
    fitted.compile(optimizer=km.meta_optimizer())
    history = fitted.fit(dataset, epochs=1, verbose=0)
    assert set(history.history) >= {"loss", "accuracy"}
    for reference, variable in zip(meta.trainable_variables, fitted.trainable_variables, strict=True):
        np.testing.assert_allclose(variable.numpy(), reference.numpy(), rtol=1e-6, atol=1e-7, err_msg=variable.path)


def test_keras_callbacks_run_with_fit(tmp_path):
    meta = small_conv4_meta(inner_steps=1)
    dataset = tf.data.Dataset.from_tensor_slices(random_episodes(batch=2, seed=14)).batch(1, drop_remainder=True)
    meta.compile()
    log = tmp_path / "log.csv"
    meta.fit(
        dataset,
        epochs=2,
        verbose=0,
        validation_data=dataset,
        callbacks=[
            keras.callbacks.CSVLogger(str(log)),
            keras.callbacks.ModelCheckpoint(str(tmp_path / "best.keras"), monitor="val_accuracy", mode="max"),
            keras.callbacks.EarlyStopping(monitor="loss", patience=5),
        ],
    )
    rows = log.read_text().strip().splitlines()
    assert rows[0].split(",") == ["epoch", "accuracy", "loss", "val_accuracy", "val_loss"]
    assert len(rows) == 3
    assert (tmp_path / "best.keras").exists()


def test_fit_after_a_fit_that_failed_while_tracing_trains(monkeypatch):
    """A notebook's second try: the first fit's step fails mid-trace on bad episodes, the fixed ones must train. The
    check of a dataset's first batch (the test below) is switched off, as for batches it cannot see (a dataset whose
    bad batch is not the first), so that the trace itself fails."""
    monkeypatch.setattr(meta_learner_fit, "check_first_batch", lambda learner, data: None)
    meta = small_conv4_meta(inner_steps=1)
    meta.compile()
    good = tf.data.Dataset.from_tensors(as_tensors(random_episodes(seed=9)))
    bad = good.map(lambda episode: {**episode, "query_labels": episode["query_labels"][:, :-1]})
    with pytest.raises(ValueError, match="query_labels hold 14 labels per episode for 15 images"):
        meta.fit(bad, verbose=0)
    history = meta.fit(good, verbose=0).history
    assert np.isfinite(history["loss"][0])


@pytest.mark.parametrize("method", ["fit", "fit validation_data", "evaluate"])
def test_episodes_a_learner_cannot_take_are_refused_before_keras_traces_a_step(method):
    """Labels out of the learner's range fail deep in the traced step on a CPU and give a NaN or wrong loss without
    an error on a GPU or TPU; a learner with more outputs than the episodes' classes trains without an error."""
    meta = small_conv4_meta(inner_steps=1)
    meta.compile()
    before = [weight.numpy() for weight in meta.trainable_weights]
    good = tf.data.Dataset.from_tensors(as_tensors(random_episodes(seed=3)))
    labels_from_one = good.map(lambda episode: {**episode, "query_labels": episode["query_labels"] + 1})
    four_way = tf.data.Dataset.from_tensors(as_tensors(random_episodes(n_way=4, seed=3)))
    for bad, message in (
        (labels_from_one, r"query_labels must lie in 0\.\.4 .*got 1\.\.5"),
        (four_way, r"the learner has 5 outputs but an episode's support set has 4 classes"),
    ):
        with pytest.raises(ValueError, match=message):
            if method == "fit":
                meta.fit(bad, verbose=0)
            elif method == "fit validation_data":
                meta.fit(good, validation_data=bad, verbose=0)
            else:
                meta.evaluate(bad, verbose=0)
    assert int(meta.optimizer.iterations) == 0
    for weight, value in zip(meta.trainable_weights, before, strict=True):
        np.testing.assert_array_equal(weight.numpy(), value)


def test_fit_on_a_dict_of_arrays_or_a_dataset_of_tuples_names_the_form_it_takes():
    """A dict of arrays failed with "batch the episode dataset with drop_remainder=True" (Keras batches it with a
    batch of unknown size), a dataset of tuples with "tuple indices must be integers or slices, not str"."""
    meta = small_conv4_meta(inner_steps=1)
    meta.compile()
    episodes = random_episodes(batch=2, seed=4)
    tuples = tf.data.Dataset.from_tensors(tuple(as_tensors(episodes).values()))
    for method in (meta.fit, meta.evaluate):
        with pytest.raises(ValueError, match=r"take a tf\.data\.Dataset of episode batches.*dict of arrays into "
                                             r"batches of unknown size: give tf\.data\.Dataset\.from_tensor_slices"):
            method(episodes, verbose=0)
        with pytest.raises(ValueError, match=r"episode_dataset makes one\); got elements of tuple: map them"):
            method(tuples, verbose=0)


def test_a_compiled_meta_learner_loaded_from_keras_continues_fit_exactly(tmp_path):
    """A ModelCheckpoint .keras file of a `fit` in progress: loaded, it is compiled as saved (its optimizer, the
    optimizer's state, clip_norm), so fitting on continues exactly as the original does."""
    meta = small_conv4_meta(inner_steps=2)

    def batches(seed):
        return tf.data.Dataset.from_tensor_slices(random_episodes(batch=2, seed=seed)).batch(1, drop_remainder=True)

    meta.compile(optimizer=km.meta_optimizer(1e-2, theta0_learning_rate_scale=0.5), clip_norm=0.5)
    meta.fit(batches(21), epochs=1, verbose=0)
    path = tmp_path / "meta.keras"
    meta.save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Keras warns when it leaves a loaded model uncompiled
        loaded = keras.models.load_model(path, safe_mode=True)
    assert loaded.compiled and loaded._fit_clip_norm == 0.5
    assert int(loaded.optimizer.iterations) == int(meta.optimizer.iterations) == 2
    meta.fit(batches(22), epochs=1, verbose=0)
    loaded.fit(batches(22), epochs=1, verbose=0)
    for variable, expected in zip(loaded.trainable_variables, meta.trainable_variables, strict=True):
        np.testing.assert_array_equal(variable.numpy(), expected.numpy(), err_msg=variable.path)
