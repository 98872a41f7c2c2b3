"""Prediction with an exported or adapted model: the predictors (Keras file, SavedModel, ONNX) agree, check their
inputs and work a batch at a time; `ImageInputs` / `read_images` turn files and .npy arrays into batches by the
training rule; `accuracy` scores labelled predictions. The task they predict with is conftest.py's."""

import os
import shutil

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from export_helpers import SHAPE  # noqa: E402

from keras_metalstm import export  # noqa: E402
from keras_metalstm.data import DataError  # noqa: E402


def test_accuracy_counts_right_predictions_per_true_class():
    records = [{"class_name": name} for name in ("cat", "dog", "cat", "cat", "owl")]
    score = export.accuracy(records, ["cat", "cat", "cat", "dog", "owl"])
    assert score.per_class == {"cat": (2, 3), "dog": (0, 1), "owl": (1, 1)}
    assert (score.right, score.images, score.share) == (3, 5, 0.6)
    assert score.summary() == "accuracy 60.00% (3 of 5 images): cat 2/3, dog 0/1, owl 1/1"
    assert [r["label"] for r in records] == ["cat", "cat", "cat", "dog", "owl"]


def test_predictors_classify_many_images_a_batch_at_a_time_with_the_same_results(exported, queries, monkeypatch):
    predictor = export.load_predictor(exported.path)
    whole = predictor.predict(queries)
    calls, run = [], predictor._run
    monkeypatch.setattr(predictor, "batch_size", 24)
    monkeypatch.setattr(predictor, "_run", lambda images: calls.append(len(images)) or run(images))
    chunked = predictor.predict(queries)
    assert calls == [24, 24, 16]
    for key in ("logits", "probabilities"):
        np.testing.assert_allclose(chunked[key], whole[key], atol=1e-6)
    for key in ("class_ids", "class_names"):
        np.testing.assert_array_equal(chunked[key], whole[key])


def test_predictors_agree_and_resolve_paths(exported, adapted, queries, tmp_path):
    keras_file = export.save_adapted(adapted, tmp_path / "task.keras")
    model_folder = exported.path.parent
    outputs = {
        kind: export.load_predictor(path).predict(queries[:3])
        for kind, path in [
            ("keras", keras_file),
            ("sm", model_folder),
            ("onnx", exported.path / "model.onnx"),
        ]
    }
    for result in outputs.values():
        np.testing.assert_allclose(result["logits"], outputs["keras"]["logits"], atol=1e-4)
        assert list(result["class_names"]) == list(outputs["keras"]["class_names"])
        np.testing.assert_allclose(result["probabilities"].sum(-1), 1.0, atol=1e-5)
    with pytest.raises(export.ExportError, match="version folders") as refusal:
        export.load_predictor(tmp_path)
    assert "training run" not in str(refusal.value)
    run = tmp_path / "run"  # a training run's folder: the two ways from it to a model that predicts
    run.mkdir()
    (run / "config.yaml").write_text("n_way: 5\n")
    with pytest.raises(export.ExportError, match=rf"is a training run: adapt it .*metalstm adapt {run} --support DIR"
                                                 rf".*or export the run \(metalstm export {run}\)"):
        export.load_predictor(run)


@pytest.mark.parametrize(
    "images, message",
    [
        (np.zeros((2, 28, 28, 1), np.uint8), "uint8.*divide by 255"),
        (np.zeros((2, 28, 28, 1), np.int32), "dtype int32"),
        (np.zeros((2, 32, 32, 1), np.float32), r"shape \(32, 32, 1\).*takes \(28, 28, 1\)"),
        (np.zeros((28, 28), np.float32), r"batch of shape \(batch, 28, 28, 1\)"),
        (np.full((1, 28, 28, 1), 255.0, np.float32), r"in \[0, 1\].*divide"),
        # NaN fails every comparison, so a range test alone passed it on to a confident-looking class
        (np.where(np.arange(784).reshape(1, 28, 28, 1) == 5, np.nan, 0.5).astype(np.float32),
         r"must be finite numbers in \[0, 1\], got 1 NaN or infinite value"),
    ],
)
def test_predict_rejects_wrong_dtype_shape_and_scale_with_a_clear_message(exported, images, message):
    predictor = export.load_predictor(exported.path / "model.onnx")
    with pytest.raises(export.ExportError, match=message):
        predictor.predict(images)


def test_read_images_converts_files_by_the_training_rule_and_checks_npy(encoded_files, tmp_path):
    from keras_metalstm.data import decode_image_files

    arrays, names = export.read_images(encoded_files, SHAPE)
    expected, _ = decode_image_files([str(p) for p in encoded_files], SHAPE)
    np.testing.assert_array_equal(arrays, expected.astype(np.float32) * np.float32(1 / 255))
    assert names == [str(p) for p in encoded_files]
    np.save(tmp_path / "ok.npy", arrays[:2])
    np.save(tmp_path / "bad.npy", (arrays[:1] * 255).astype(np.uint8))
    batch, names = export.read_images([tmp_path / "ok.npy", encoded_files[0]], SHAPE)
    assert batch.shape == (3, *SHAPE) and names[:2] == [
        f"{tmp_path / 'ok.npy'}[0]",
        f"{tmp_path / 'ok.npy'}[1]",
    ]
    with pytest.raises(export.ExportError, match="bad.npy.*uint8"):
        export.read_images([tmp_path / "bad.npy"], SHAPE)
    np.save(tmp_path / "flat.npy", np.zeros((5, 5), np.float32))
    with pytest.raises(export.ExportError, match=r"flat.npy: an array of shape \(5, 5\); expected one image"):
        export.read_images([tmp_path / "flat.npy"], SHAPE)
    (tmp_path / "text.npy").write_text("0.1 0.2 0.3\n")  # named .npy, written as text: not NumPy's format
    with pytest.raises(export.ExportError, match=r"text.npy: not a NumPy \.npy file.*numpy\.save") as refusal:
        export.read_images([tmp_path / "text.npy"], SHAPE)
    assert "pickled" not in str(refusal.value)  # NumPy's own guess for a file without its header


def test_predict_inputs_reads_and_predicts_a_batch_at_a_time_with_the_whole_batchs_results(
    exported, encoded_files, queries, tmp_path, monkeypatch
):
    """A folder of any size fits in memory: `predict_inputs` decodes and predicts at most `batch_size` images at a
    time, and gives what reading everything and predicting it at once gives."""
    import keras_metalstm.data as data

    np.save(tmp_path / "batch.npy", queries[:5])
    paths = [*encoded_files[:4], tmp_path / "batch.npy", encoded_files[0]]
    predictor = export.load_predictor(exported.path)
    images, names = export.read_images(paths, SHAPE)
    expected = export.prediction_records(names, predictor.predict(images))

    decoded, run, decode = [], predictor._run, data.decode_image_files
    monkeypatch.setattr(
        data, "decode_image_files", lambda files, shape: decoded.append(len(files)) or decode(files, shape)
    )
    calls, done = [], []
    monkeypatch.setattr(predictor, "batch_size", 2)
    monkeypatch.setattr(predictor, "_run", lambda batch: calls.append(len(batch)) or run(batch))
    inputs = export.ImageInputs(paths, SHAPE)
    assert len(inputs) == len(names) == 10
    records = predictor.predict_inputs(inputs, progress=done.append)
    assert decoded == [2, 2, 1] and calls == [2, 2, 2, 2, 2] and done == [2, 2, 2, 2, 2]
    assert [r["image"] for r in records] == names
    assert [r["class_name"] for r in records] == [r["class_name"] for r in expected]
    np.testing.assert_allclose([r["logits"] for r in records], [r["logits"] for r in expected], atol=1e-5)


def test_image_inputs_check_every_path_and_array_before_any_prediction(encoded_files, tmp_path):
    np.save(tmp_path / "wrong_shape.npy", np.zeros((3, 9, 9, 1), np.float32))
    with pytest.raises(export.ExportError, match=r"wrong_shape.npy.*\(9, 9, 1\)"):
        export.ImageInputs([*encoded_files, tmp_path / "wrong_shape.npy"], SHAPE)
    np.save(tmp_path / "no_channel_axis.npy", np.zeros((3, 28, 28), np.float32))  # was read as one image
    with pytest.raises(export.ExportError, match=r"no_channel_axis.npy: an array of shape \(3, 28, 28\), 3 grey "
                                                 r"images without their channel axis: save them as \(3, 28, 28, 1\)"):
        export.ImageInputs([tmp_path / "no_channel_axis.npy"], SHAPE)
    with pytest.raises(export.ExportError, match="gone.png not found"):
        export.ImageInputs([*encoded_files, tmp_path / "gone.png"], SHAPE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(export.ExportError, match="holds no image files"):
        export.ImageInputs([tmp_path / "empty"], SHAPE)
    (tmp_path / "empty" / "scan.tiff").write_bytes(b"II*\x00")
    with pytest.raises(export.ExportError, match=r"holds no image files .*; it holds 1 .tiff file\(s\), a format not"):
        export.ImageInputs([tmp_path / "empty"], SHAPE)
    (tmp_path / "mixed" / "more").mkdir(parents=True)
    for name in ("a.png", "more/b.png"):
        shutil.copy(encoded_files[0], tmp_path / "mixed" / name)
    (tmp_path / "mixed" / "scan.tif").write_bytes(b"II*\x00")
    (tmp_path / "mixed" / "notes.txt").write_text("not an image: not counted")
    with pytest.warns(RuntimeWarning, match=r"mixed: not predicted: 1 in its sub-folders \(e\.g\. more/b\.png; pass "
                      r"those too\); 1 of a format not read \(e\.g\. scan\.tif"):
        assert len(export.ImageInputs([tmp_path / "mixed"], SHAPE)) == 1
    (tmp_path / "held_out" / "alpha").mkdir(parents=True)
    shutil.copy(encoded_files[0], tmp_path / "held_out" / "alpha")
    with pytest.raises(export.ExportError, match=r"1 folder\(s\) of images \(e\.g\. alpha\): .*with --labelled"):
        export.ImageInputs([tmp_path / "held_out"], SHAPE)
    latin1 = os.fsdecode(os.fsencode(encoded_files[0].parent) + b"/caf\xe9.png")
    with pytest.raises(DataError, match=r"the file path .*caf\\xe9\.png is not valid UTF-8"):
        export.ImageInputs([*encoded_files, latin1], SHAPE)
    # Values are checked as they are read: the batch holding the bad row names its file.
    values = np.zeros((5, *SHAPE), np.float32)
    values[4] = 2.0
    np.save(tmp_path / "scaled.npy", values)
    batches = export.ImageInputs([tmp_path / "scaled.npy"], SHAPE).batches(batch_size=2)
    assert [len(names) for _, names in [next(batches), next(batches)]] == [2, 2]
    with pytest.raises(export.ExportError, match=r"scaled.npy: image values must be in \[0, 1\]"):
        next(batches)


def test_image_inputs_of_many_arrays_hold_no_file_open_until_read(tmp_path):
    """Thousands of .npy inputs must not exhaust the process's file descriptors (a memory map holds one)."""
    import os

    paths = []
    for index in range(60):
        paths.append(tmp_path / f"{index}.npy")
        np.save(paths[-1], np.full(SHAPE, index / 60, np.float32))
    open_before = len(os.listdir("/proc/self/fd"))
    inputs = export.ImageInputs(paths, SHAPE)
    assert len(os.listdir("/proc/self/fd")) - open_before < 5
    images, names = next(inputs.batches(batch_size=100))
    assert names == [str(p) for p in paths] and images[7, 0, 0, 0] == np.float32(7 / 60)


def test_a_learner_on_four_channels_exports_without_the_image_file_signatures(tmp_path):
    """Image files decode to 1 or 3 channels: the encoded signatures made the export of a 2- or 4-channel learner
    fail while tracing them, in an autograph stack; it is now served on arrays only."""
    import keras
    import tensorflow as tf

    import keras_metalstm as km

    shape = (12, 12, 4)
    learner = keras.Sequential([keras.Input(shape), keras.layers.Conv2D(4, 3), keras.layers.Flatten(),
                                keras.layers.Dense(3)])
    meta = km.MetaLearner(learner, inner_steps=1)
    rng = np.random.default_rng(2)
    support, queries = rng.random((3, *shape), dtype=np.float32), rng.random((4, *shape), dtype=np.float32)
    adapted = export.adapt(meta, support, np.arange(3), ["a", "b", "c"])
    result = export.export_adapted(adapted, tmp_path / "task", format="both")
    assert result.parity.ok, result.parity.summary()
    served = tf.saved_model.load(str(result.path))
    assert sorted(served.signatures) == ["serving_default"]
    logits = served.signatures["serving_default"](images=tf.constant(queries))["logits"].numpy()
    np.testing.assert_allclose(logits, adapted(queries).numpy(), atol=1e-5)
    in_serving = tf.saved_model.load(str(export.export_meta(meta, tmp_path / "meta").path))
    assert sorted(in_serving.signatures) == ["adapt_and_predict"]
    outputs = in_serving.signatures["adapt_and_predict"](support_images=tf.constant(support),
                                                         support_labels=tf.constant([0, 1, 2], tf.int32),
                                                         query_images=tf.constant(queries))
    np.testing.assert_allclose(outputs["logits"].numpy(), logits, atol=1e-5)
