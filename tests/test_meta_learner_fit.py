"""MetaLearner as a Keras model: `compile` + `fit` make MetaTrainer's updates, run callbacks, recover from a failed
trace and continue exactly from a saved .keras file."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import as_tensors, random_episodes, small_conv4_meta, twin

import keras_metalstm as km


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


def test_fit_after_a_fit_that_failed_while_tracing_trains():
    """A notebook's second try: the first fit's step fails mid-trace on bad episodes, the fixed ones must train."""
    meta = small_conv4_meta(inner_steps=1)
    meta.compile()
    good = tf.data.Dataset.from_tensors(as_tensors(random_episodes(seed=9)))
    bad = good.map(lambda episode: {**episode, "query_labels": episode["query_labels"][:, :-1]})
    with pytest.raises(Exception):  # noqa: B017 - whatever TensorFlow raises for the mismatched labels
        meta.fit(bad, verbose=0)
    history = meta.fit(good, verbose=0).history
    assert np.isfinite(history["loss"][0])


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
