"""Adapt -> .keras -> SavedModel / ONNX: metadata round trip, parity (fresh process), encoded-image and REST
signatures, adapt-in-serving, and the bad-input messages. The task they adapt and export (`meta`, `support_dir`,
`adapted`, `exported`, ...) is conftest.py's; prediction and its inputs: test_export_predict.py; where exports are
written (atomic writes, versions): test_export_targets.py."""

import base64
import io
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from conftest import graph_def_nodes  # noqa: E402
from export_helpers import CLASSES, N_WAY, SHAPE, make_meta, write_support  # noqa: E402

import keras_metalstm as km  # noqa: E402
from keras_metalstm import export  # noqa: E402
from keras_metalstm.data import DataError  # noqa: E402


@pytest.fixture(scope="module")
def meta_export(meta, tmp_path_factory):
    return export.export_meta(meta, tmp_path_factory.mktemp("models") / "meta")


# ------------------------------------------------------------------------------------------------- adapt
def test_adapt_folder_uses_sorted_class_names_and_reproduces_test_mode_logits(
    meta, support_dir, adapted, queries
):
    images, labels, names = export.load_support_folder(support_dir, SHAPE, n_way=N_WAY)
    assert names == sorted(CLASSES) and list(adapted.class_names) == sorted(CLASSES)
    assert (
        images.dtype == np.float32 and images.shape == (10, *SHAPE) and 0 <= images.min() <= images.max() <= 1
    )
    np.testing.assert_array_equal(labels, np.repeat(np.arange(N_WAY), 2))
    # Images are prepared as training data are: uint8-rounded, then / 255.
    np.testing.assert_allclose(images * 255, np.round(images * 255), atol=1e-4)
    episode = {
        "support_images": images[None],
        "support_labels": labels[None],
        "query_images": queries[None, :15],
    }
    expected = meta(episode, mode="test").numpy()[0]
    # adapt's own compiled function runs the fused CPU kernels, meta(...) the stock ops: the two round float32
    # differently, and the inner steps carry the difference on (measured: up to 1.6e-5).
    np.testing.assert_allclose(adapted(queries[:15]).numpy(), expected, atol=5e-5)
    assert adapted.info["shots_per_class"] == [2] * N_WAY and adapted.info["inner_steps"] == 2


def test_adapted_keras_file_round_trips_weights_bn_statistics_and_metadata(adapted, queries, tmp_path):
    path = export.save_adapted(adapted, tmp_path / "task.keras")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task.keras"]  # no temporary left behind
    loaded = export.load_adapted(path)
    assert isinstance(loaded, export.AdaptedLearner)
    assert loaded.class_names == adapted.class_names and loaded.image_shape == SHAPE
    assert loaded.info == adapted.info
    np.testing.assert_array_equal(loaded(queries).numpy(), adapted(queries).numpy())
    moving_means = [v for v in loaded.non_trainable_variables if "moving_mean" in v.path]
    assert moving_means and any(np.abs(v.numpy()).max() > 0 for v in moving_means)  # the episode's statistics


def test_a_meta_learner_file_whose_learner_class_is_unknown_names_the_class(tmp_path):
    @keras.saving.register_keras_serializable(package="only_in_this_process")
    class Tiny(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.flat, self.head = keras.layers.Flatten(), keras.layers.Dense(5)

        def call(self, images):
            return self.head(self.flat(images))

    learner = Tiny()
    learner(np.zeros((1, *SHAPE), np.float32))
    km.MetaLearner(learner, inner_steps=1).save(tmp_path / "meta.keras")
    script = f"from keras_metalstm import export; export.load_meta_learner({str(tmp_path / 'meta.keras')!r})"
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    (message,) = [line for line in process.stderr.splitlines() if line.startswith("keras_metalstm.export.errors")]
    # Keras' first line names the meta-learner; the learner's class that is missing ends its long text
    assert "MetaLearner'> could not be deserialized" in message and "Could not locate class 'Tiny'" in message
    # and the module that defines it, which this process could not import, with the fix
    assert "the module(s) defining its custom classes could not be imported: test_export (No module named " in message
    assert message.endswith("run from the folder that holds them, or add it to PYTHONPATH"), message
    assert len(message) < 1000, message


def test_a_meta_learner_file_with_dropout_adapts_to_the_same_model_on_every_load(tmp_path):
    """Dropout runs in the inner loop: its seeds, which a .keras file does not keep, must not differ per load."""
    keras.utils.set_random_seed(4)
    learner = keras.Sequential([keras.Input(SHAPE), keras.layers.Flatten(), keras.layers.Dropout(0.5),
                                keras.layers.Dense(N_WAY)])
    km.MetaLearner(learner, inner_steps=2).save(tmp_path / "meta.keras")
    rng = np.random.default_rng(0)
    support_images = rng.random((N_WAY * 2, *SHAPE), dtype=np.float32)
    support_labels = np.repeat(np.arange(N_WAY), 2)
    adapted = [export.load_meta_learner(tmp_path / "meta.keras").adapt(support_images, support_labels)
               for _ in range(2)]
    first, second = (model.get_weights() for model in adapted)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], learner.get_weights()[0])  # the loop did adapt the learner


def test_adapt_rejects_a_support_set_with_another_number_of_classes(meta, tmp_path):
    root = write_support(tmp_path / "four", classes=CLASSES[:4])
    with pytest.raises(export.ExportError, match=r"4 class folder\(s\).*5-way.*exactly 5 sub-folders"):
        export.adapt_folder(meta, root)


def test_adapt_rejects_unreadable_images_naming_the_file(meta, tmp_path):
    root = write_support(tmp_path / "bad")
    (root / "beta" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    with pytest.raises(DataError, match="broken.png"):
        export.adapt_folder(meta, root)


def test_load_adapted_rejects_other_models(meta, tmp_path):
    meta.save(tmp_path / "meta.keras")
    with pytest.raises(export.ExportError, match="not an adapted learner.*metalstm adapt"):
        export.load_adapted(tmp_path / "meta.keras")
    assert isinstance(export.load_meta_learner(tmp_path / "meta.keras"), km.MetaLearner)
    # In a new process, where nothing has made MetaLearner known to Keras yet (the package imports lazily).
    script = f"from keras_metalstm import export; export.load_adapted({str(tmp_path / 'meta.keras')!r})"
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "holds a MetaLearner, not an adapted learner" in process.stderr, process.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- export
def test_export_writes_tf_serving_layout_and_reports_parity(exported):
    assert exported.path.name == "1" and exported.version == 1
    names = {p.name for p in exported.path.iterdir()}
    assert {"saved_model.pb", "variables", "model.onnx"} <= names
    assert not [p for p in exported.path.parent.iterdir() if p.name.startswith(".")]  # temp folder renamed
    report = exported.parity
    assert report.ok and {(r["backend"], r["batch"]) for r in report.rows} == {
        (b, n) for b in ("savedmodel", "onnx") for n in (1, 64)
    }
    assert "parity OK" in report.summary()
    metadata = export.read_metadata(exported.path)
    assert metadata["class_names"] == sorted(CLASSES) and metadata["image_shape"] == list(SHAPE)


def test_failed_parity_writes_nothing(adapted, tmp_path):
    with pytest.raises(export.ExportError, match="nothing written"):
        export.export_adapted(adapted, tmp_path / "task", format="onnx", atol=-1.0)
    assert not (tmp_path / "task").exists()  # not even the model folder made for the version


def test_verify_parity_detects_a_different_model(adapted, exported, meta, support_dir):
    other = export.adapt_folder(meta, support_dir, inner_steps=1)
    report = export.verify_parity(other, savedmodel=exported.path, onnx=exported.path / "model.onnx")
    assert not report.ok and "FAILED" in report.summary()


def test_onnx_model_has_named_io_dynamic_batch_and_class_names_metadata(exported, adapted):
    import onnx

    model = onnx.load(str(exported.path / "model.onnx"))
    assert [i.name for i in model.graph.input] == ["images"]
    assert {o.name for o in model.graph.output} == {"logits", "probabilities", "class_ids", "class_names"}
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    # ONNX Runtime 1.17.3 (setup.py's floor) ran this IR 8 model with parity (docs/serving.md#versions): a newer
    # IR from a tf2onnx upgrade needs that check again.
    assert model.ir_version <= 8
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["class_names"]) == list(adapted.class_names)
    assert json.loads(props["image_shape"]) == list(SHAPE)
    with pytest.raises(export.ExportError, match="between 13 and 18"):
        export.to_onnx(adapted, opset=19)
    assert [o.version for o in export.to_onnx(adapted, opset=13).opset_import if o.domain == ""] == [13]


PARITY_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, tensorflow as tf, onnxruntime as ort
    saved, onnx_path, meta_dir, data, out = sys.argv[1:]
    d = np.load(data)
    results = {}
    signature = tf.saved_model.load(saved).signatures["serving_default"]
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    for batch in (1, 64):
        images = d["queries"][:batch]
        sm = signature(images=tf.constant(images))
        results[f"sm_logits_{batch}"] = sm["logits"].numpy()
        results[f"sm_names_{batch}"] = sm["class_names"].numpy().astype(str)
        onnx_out = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"images": images})))
        results[f"onnx_logits_{batch}"] = onnx_out["logits"]
        results[f"onnx_names_{batch}"] = onnx_out["class_names"].astype(str)
        results[f"onnx_ids_{batch}"] = onnx_out["class_ids"]
    adapt_fn = tf.saved_model.load(meta_dir).signatures["adapt_and_predict"]
    res = adapt_fn(
        support_images=tf.constant(d["support_images"]),
        support_labels=tf.constant(d["support_labels"]),
        query_images=tf.constant(d["queries"]),
    )
    results["adapt_and_predict"] = res["logits"].numpy()
    results["adapt_and_predict_ids"] = res["class_ids"].numpy()
    np.savez(out, **results)
    """
)


@pytest.fixture(scope="module")
def fresh_process_results(exported, meta_export, support_dir, queries, tmp_path_factory):
    """SavedModels loaded with tf.saved_model.load and the ONNX model in ONNX Runtime, in a fresh process."""
    work = tmp_path_factory.mktemp("fresh")
    images, labels, _ = export.load_support_folder(support_dir, SHAPE)
    np.savez(work / "in.npz", queries=queries, support_images=images, support_labels=labels)
    script = work / "run.py"
    script.write_text(PARITY_SCRIPT)
    args = [exported.path, exported.path / "model.onnx", meta_export.path, work / "in.npz", work / "out.npz"]
    subprocess.run(
        [sys.executable, str(script), *map(str, args)], check=True, capture_output=True, timeout=300
    )
    return dict(np.load(work / "out.npz"))


@pytest.mark.parametrize("batch", [1, 64])
def test_keras_savedmodel_and_onnx_agree_in_a_fresh_process(fresh_process_results, adapted, queries, batch):
    keras_logits = adapted(queries[:batch]).numpy()
    names = np.array(adapted.class_names)[keras_logits.argmax(-1)]
    for backend in ("sm", "onnx"):
        logits = fresh_process_results[f"{backend}_logits_{batch}"]
        assert logits.shape == (batch, N_WAY)
        np.testing.assert_allclose(logits, keras_logits, atol=1e-4, rtol=0)
        np.testing.assert_array_equal(logits.argmax(-1), keras_logits.argmax(-1))
        np.testing.assert_array_equal(fresh_process_results[f"{backend}_names_{batch}"], names)
    np.testing.assert_array_equal(fresh_process_results[f"onnx_ids_{batch}"], keras_logits.argmax(-1))


def test_adapt_and_predict_equals_adapt_then_predict(fresh_process_results, adapted, queries):
    np.testing.assert_allclose(
        fresh_process_results["adapt_and_predict"], adapted(queries).numpy(), atol=1e-4
    )
    np.testing.assert_array_equal(
        fresh_process_results["adapt_and_predict_ids"], adapted(queries).numpy().argmax(-1)
    )


def test_the_adapt_in_serving_predictor_equals_adapt_then_predict(meta_export, support_dir, adapted, queries):
    """Both adapt with stock ops: with the fused kernels, `adapt` rounded otherwise (1e-6), which the kinks of max
    pooling and ReLU turned into logits up to 0.03 apart for support images with many equal pixels."""
    outputs = export.load_predictor(meta_export.path, support=support_dir).predict(queries)
    expected = adapted(queries).numpy()
    np.testing.assert_allclose(outputs["logits"], expected, rtol=0, atol=1e-6)
    assert list(outputs["class_names"]) == [adapted.class_names[i] for i in expected.argmax(-1)]


def test_adapting_on_an_unbalanced_support_set_warns_with_the_counts(meta, tmp_path):

    rng = np.random.default_rng(1)
    images = rng.random((8, *SHAPE), dtype=np.float32)
    with pytest.warns(RuntimeWarning, match=r"unbalanced \(a 4, b 1, c 1, d 1, e 1 images\).*same number"):
        export.adapt(meta, images, [0, 0, 0, 0, 1, 2, 3, 4], list("abcde"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export.adapt(meta, images[:5], [0, 1, 2, 3, 4], list("abcde"))


def test_the_adapt_in_serving_predictor_warns_of_an_unbalanced_support_folder_too(meta_export, tmp_path):

    support = write_support(tmp_path / "support")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export.load_predictor(meta_export.path, support=support)
    (support / "gamma" / "1.png").unlink()
    with pytest.warns(RuntimeWarning, match=r"unbalanced \(alpha 2, beta 2, delta 2, gamma 1, zeta 2 images\)"):
        export.load_predictor(meta_export.path, support=support)


def test_adapt_in_serving_on_files_equals_it_on_the_files_decoded_by_the_client(
    meta_export, support_dir, encoded_files
):
    """adapt_and_predict_encoded (support and query files as bytes, for a client without the conversion rule)
    gives what adapt_and_predict gives on the same files read by the package, directly and as a REST body."""
    import tensorflow as tf

    from keras_metalstm.data.folder import list_image_folder

    classes = list_image_folder(support_dir)  # load_support_folder's order: classes sorted, files sorted
    support_files = [path for name in sorted(classes) for path in classes[name]]
    images, labels, _ = export.load_support_folder(support_dir, SHAPE)
    np.testing.assert_array_equal(labels, [index for index, name in enumerate(sorted(classes)) for _ in classes[name]])
    queries, _ = export.read_images(encoded_files, SHAPE)
    loaded = tf.saved_model.load(str(meta_export.path))
    expected = loaded.signatures["adapt_and_predict"](
        support_images=tf.constant(images), support_labels=tf.constant(labels), query_images=tf.constant(queries)
    )["logits"].numpy()
    encoded = loaded.signatures["adapt_and_predict_encoded"](
        support_image_bytes=tf.constant([path.read_bytes() for path in support_files]),
        support_labels=tf.constant(labels),
        query_image_bytes=tf.constant([path.read_bytes() for path in encoded_files]),
    )
    np.testing.assert_allclose(encoded["logits"].numpy(), expected, atol=1e-5)

    def b64(paths):
        return [{"b64": base64.b64encode(path.read_bytes()).decode()} for path in paths]

    body = {"inputs": {"support_image_bytes": b64(support_files), "support_labels": labels.tolist(),
                       "query_image_bytes": b64(encoded_files)}}
    reply = export.rest_predict(loaded.signatures["adapt_and_predict_encoded"], json.dumps(body))
    np.testing.assert_allclose(reply["outputs"]["logits"], expected, atol=1e-5)


def test_adapt_and_predict_rejects_labels_outside_n_way(meta_export, support_dir, queries):
    import tensorflow as tf

    images, labels, _ = export.load_support_folder(support_dir, SHAPE)
    signature = tf.saved_model.load(str(meta_export.path)).signatures["adapt_and_predict"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="n_way = 5"):
        signature(
            support_images=tf.constant(images),
            support_labels=tf.constant(labels + 1),
            query_images=tf.constant(queries[:2]),
        )
    # a class without support images (here all but class 0), and no support set at all
    for support_images, support_labels in ((images, np.zeros_like(labels)), (images[:0], labels[:0])):
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"every class 0\.\.4 needs at least one support"):
            signature(support_images=tf.constant(support_images), support_labels=tf.constant(support_labels),
                      query_images=tf.constant(queries[:2]))
    metadata = json.loads((meta_export.path / "assets.extra" / "keras_metalstm.json").read_text())
    assert sorted(metadata["signatures"]) == sorted(tf.saved_model.load(str(meta_export.path)).signatures)


def test_meta_learner_cannot_be_exported_to_onnx(meta, tmp_path):
    with pytest.raises(export.ExportError, match="ONNX cannot represent"):
        export.export_meta(meta, tmp_path / "meta", format="onnx")


def saved_model_op_types(directory):
    """The op types of a SavedModel's graph and of the functions it holds."""
    from tensorflow.core.protobuf import saved_model_pb2

    model = saved_model_pb2.SavedModel.FromString((directory / "saved_model.pb").read_bytes())
    return {node.op for node in graph_def_nodes(model.meta_graphs[0].graph_def)}


def test_exported_savedmodels_use_no_op_that_tensorflow_2_16_lacks(exported, meta_export):
    """A TensorFlow Serving in production may be older than the TensorFlow that exports. Checked by hand: the
    SavedModels TensorFlow 2.21 writes here (all four signatures) load and run on 2.16.2-2.20.0 with the same
    outputs to 1.5e-6. A later op in the graph (DecodeWebP, say) would make the model fail to load there."""
    listing = Path(__file__).parent / "data" / "ops_added_after_tensorflow_2_16.txt"
    added = {line for line in listing.read_text().splitlines() if line and not line.startswith("#")}
    assert "DecodeWebP" in added
    for directory in (exported.path, meta_export.path):
        used = saved_model_op_types(directory)
        assert {"Conv2D", "DecodeImage"} <= used, directory
        assert not used & added, directory


def test_saved_model_cli_lists_the_signatures(exported, meta_export):
    def show(path):
        result = subprocess.run(
            ["saved_model_cli", "show", "--dir", str(path), "--all"],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        return result.stdout

    text = show(exported.path)
    assert "signature_def['serving_default']" in text and "signature_def['predict_encoded']" in text
    for name in ("inputs['images']", "inputs['image_bytes']", "(-1, 28, 28, 1)", "DT_STRING"):
        assert name in text
    for name in ("logits", "probabilities", "class_ids", "class_names"):
        assert f"outputs['{name}']" in text
    text = show(meta_export.path)
    assert "signature_def['adapt_and_predict']" in text and "signature_def['adapt_and_predict_encoded']" in text
    for name in ("support_images", "support_labels", "query_images", "support_image_bytes", "query_image_bytes"):
        assert f"inputs['{name}']" in text


# ------------------------------------------------------------------------------------ encoded images / REST
@pytest.fixture(scope="module")
def loaded_savedmodel(exported):
    import tensorflow as tf

    return tf.saved_model.load(str(exported.path))


def test_predict_encoded_equals_serving_default_on_decoded_arrays(loaded_savedmodel, encoded_files):
    import tensorflow as tf

    arrays, _ = export.read_images(encoded_files, SHAPE)  # the training preparation, client side
    contents = [path.read_bytes() for path in encoded_files]
    encoded = loaded_savedmodel.signatures["predict_encoded"](image_bytes=tf.constant(contents))
    direct = loaded_savedmodel.signatures["serving_default"](images=tf.constant(arrays))
    np.testing.assert_allclose(encoded["logits"].numpy(), direct["logits"].numpy(), atol=1e-6)
    np.testing.assert_array_equal(encoded["class_names"].numpy(), direct["class_names"].numpy())
    # The colour-palette BMP as the server decodes it: its colours (Pillow's reading), not its palette indices.
    from PIL import Image

    from keras_metalstm.data import convert_images

    bmp = next(index for index, path in enumerate(encoded_files) if path.suffix == ".bmp")
    colours = np.asarray(Image.open(encoded_files[bmp]).convert("RGB"))
    as_stored = np.round(convert_images(colours, SHAPE).numpy() * 255) / 255  # the rule's uint8 step
    pillow = loaded_savedmodel.signatures["serving_default"](images=tf.constant(as_stored[None], tf.float32))
    np.testing.assert_allclose(encoded["logits"].numpy()[bmp], pillow["logits"].numpy()[0], atol=1e-5)


def test_an_animated_webp_sent_to_predict_encoded_is_an_error_not_a_crashed_server(loaded_savedmodel):
    """TensorFlow's WebP decoder corrupts the heap on an animated file: one such request ended the serving process
    (abort, no message). The signature refuses it before decoding, as TF Serving's error reply to the client."""
    import tensorflow as tf

    from keras_metalstm.data.images import READS_WEBP

    if not READS_WEBP:
        pytest.skip("this TensorFlow does not decode WebP")
    from PIL import Image

    frames = [Image.new("RGB", (9, 7), colour) for colour in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "WEBP", save_all=True, append_images=frames[1:], duration=100)
    with pytest.raises(tf.errors.InvalidArgumentError, match="an animated WebP, .* save its first frame as PNG"):
        loaded_savedmodel.signatures["predict_encoded"](image_bytes=tf.constant([buffer.getvalue()]))


def test_rest_json_requests_give_the_same_answer(loaded_savedmodel, encoded_files, adapted):
    arrays, _ = export.read_images(encoded_files, SHAPE)
    keras_logits = adapted(arrays).numpy()
    names = [adapted.class_names[i] for i in keras_logits.argmax(-1)]
    body = json.dumps({"instances": arrays.tolist()})
    reply = export.rest_predict(loaded_savedmodel.signatures["serving_default"], body)
    assert [row["class_names"] for row in reply["predictions"]] == names
    np.testing.assert_allclose([row["logits"] for row in reply["predictions"]], keras_logits, atol=1e-4)
    b64 = [{"b64": base64.b64encode(path.read_bytes()).decode()} for path in encoded_files]
    reply = export.rest_predict(loaded_savedmodel.signatures["predict_encoded"], {"instances": b64})
    assert [row["class_names"] for row in reply["predictions"]] == names
    columnar = export.rest_predict(
        loaded_savedmodel.signatures["predict_encoded"], {"inputs": {"image_bytes": b64}}
    )
    assert columnar["outputs"]["class_names"] == names
    with pytest.raises(export.ExportError, match="instances"):
        export.rest_predict(loaded_savedmodel.signatures["serving_default"], {"examples": []})
    # an empty batch answers with no predictions, as the encoded signature does
    for signature in ("serving_default", "predict_encoded"):
        assert export.rest_predict(loaded_savedmodel.signatures[signature], {"instances": []}) == {"predictions": []}


def test_adapt_in_serving_follows_the_meta_learners_query_statistics(support_dir, queries, tmp_path):
    """With query_statistics="support" the adapt-in-serving SavedModel normalises with the support statistics
    under theta_T, as `adapt` does; the authors' running statistics would give other logits."""
    import tensorflow as tf

    meta = make_meta()
    support_meta = km.MetaLearner.from_config({**meta.get_config(), "query_statistics": "support"})
    support_meta.set_weights(meta.get_weights())
    images, labels, _ = export.load_support_folder(support_dir, SHAPE)
    signature = tf.saved_model.load(str(export.export_meta(support_meta, tmp_path / "meta").path)).signatures[
        "adapt_and_predict"
    ]
    served = signature(
        support_images=tf.constant(images), support_labels=tf.constant(labels), query_images=tf.constant(queries)
    )["logits"].numpy()
    np.testing.assert_allclose(served, support_meta.adapt(images, labels)(queries).numpy(), atol=1e-4)
    assert not np.allclose(served, meta.adapt(images, labels)(queries).numpy(), atol=1e-3)


def test_the_adapt_in_serving_model_exported_on_a_gpu_serves_the_same_logits(
    support_dir, queries, tmp_path, monkeypatch
):
    """On a GPU/TPU the coordinate LSTM's step is wrapped for a recomputed backward pass (`tf.recompute_grad`);
    the adapt-in-serving SavedModel traced that way saves, loads and serves what `adapt` gives."""
    import tensorflow as tf

    from keras_metalstm.layers import coordinate_lstm

    monkeypatch.setattr(coordinate_lstm, "recomputes_backward", lambda: True)
    meta = make_meta()
    images, labels, _ = export.load_support_folder(support_dir, SHAPE)
    exported_meta = export.export_meta(meta, tmp_path / "meta")
    signature = tf.saved_model.load(str(exported_meta.path)).signatures["adapt_and_predict"]
    served = signature(
        support_images=tf.constant(images), support_labels=tf.constant(labels), query_images=tf.constant(queries)
    )["logits"].numpy()
    np.testing.assert_allclose(served, meta.adapt(images, labels)(queries).numpy(), atol=1e-4)


def test_a_learner_for_images_of_any_size_is_adapted_and_exported_for_the_support_images_shape(tmp_path):
    import keras
    images = keras.Input((None, None, 1))
    features = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(images))
    meta = km.MetaLearner(keras.Model(images, keras.layers.Dense(N_WAY)(features)), inner_steps=1)
    support = np.random.default_rng(0).random((N_WAY, 14, 12, 1), dtype=np.float32)
    adapted = export.adapt(meta, support, np.arange(N_WAY), CLASSES)
    assert adapted.image_shape == (14, 12, 1)
    result = export.export_adapted(adapted, tmp_path / "task", format="both")
    assert result.parity.ok, result.parity.summary()
