"""Where exports are written: an existing file or version is replaced only with force, a folder that cannot be
written is refused before any work, a full disk leaves nothing behind, and version numbers and default folders;
what cannot be exported is refused before anything is written."""

import os
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
from export_helpers import CLASSES, N_WAY, SHAPE

from keras_metalstm import export


def test_save_adapted_refuses_to_overwrite_without_force(adapted, tmp_path):
    path = tmp_path / "task.keras"
    path.write_bytes(b"precious")
    with pytest.raises(export.ExportError, match="already exists.*--force"):
        export.save_adapted(adapted, path)
    assert path.read_bytes() == b"precious"
    export.save_adapted(adapted, path, force=True)
    assert export.load_adapted(path).class_names == adapted.class_names
    with pytest.raises(export.ExportError, match=r"\.keras"):
        export.save_adapted(adapted, tmp_path / "task.h5")


def test_an_output_folder_that_cannot_be_written_is_refused_before_anything_is_written(monkeypatch, tmp_path):
    (tmp_path / "a_file").write_text("in the way")
    with pytest.raises(export.ExportError, match=r"a_file is a file, not a folder"):
        export.check_adapted_path(tmp_path / "a_file" / "new" / "task.keras")
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    # As root (CI containers) a folder's permission bits do not stop a write: the system's answer is stood in for.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != read_only and real_access(path, mode))
    with pytest.raises(export.ExportError, match=r"the folder .*read_only is not writable"):
        export.check_adapted_path(read_only / "new" / "task.keras")
    export.check_adapted_path(tmp_path / "new" / "task.keras")  # a folder still to be made under a writable one
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a_file", "read_only"]


def test_a_full_disk_while_writing_names_the_target_and_leaves_nothing(tmp_path):
    import errno

    import tensorflow as tf

    from keras_metalstm.export.files import atomic_path

    target = tmp_path / "models" / "task" / "1"
    for failure in (
        OSError(errno.ENOSPC, "No space left on device"),  # the .keras and ONNX writers
        tf.errors.ResourceExhaustedError(None, None, "models/task/.1.tmp/saved_model.pb; No space left on device"),
    ):
        with pytest.raises(export.ExportError, match=rf"cannot write {target}: No space left on device; nothing"):
            with atomic_path(target, directory=True) as tmp:
                (tmp / "half_written.pb").write_text("half")
                raise failure
        assert not (tmp_path / "models").exists()
    with pytest.raises(KeyError):  # any other error is the writer's own, left as it is
        with atomic_path(target, directory=True):
            raise KeyError("not a storage failure")


def test_versions_are_never_overwritten_without_force(adapted, tmp_path):
    out = tmp_path / "task"
    first = export.export_adapted(adapted, out, format="onnx", verify=False)
    second = export.export_adapted(adapted, out, format="onnx", verify=False)
    assert (first.version, second.version) == (1, 2) and export.versions(out) == [1, 2]
    marker = out / "1" / "marker"
    marker.write_text("old")
    with pytest.raises(export.ExportError, match="already exists.*--force"):
        export.export_adapted(adapted, out, format="onnx", version=1, verify=False)
    assert marker.exists()
    export.export_adapted(adapted, out, format="onnx", version=1, force=True, verify=False)
    assert not marker.exists() and (out / "1" / "model.onnx").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["1", "2"]
    (out / "3").write_text("a stray file named like a version")
    assert export.export_adapted(adapted, out, format="onnx", verify=False).version == 4


def test_an_onnx_only_version_in_a_tensorflow_serving_folder_is_warned_of(adapted, tmp_path):
    out = tmp_path / "task"
    export.export_adapted(adapted, out, format="savedmodel", verify=False)
    with pytest.warns(RuntimeWarning, match=r"holds SavedModel versions \(1\) and version 2 will hold model.onnx only"):
        export.export_adapted(adapted, out, format="onnx", verify=False)
    with pytest.warns(RuntimeWarning, match="loses that SavedModel"):
        export.export_adapted(adapted, out, format="onnx", version=1, force=True, verify=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export.export_adapted(adapted, tmp_path / "onnx_only", format="onnx", verify=False)  # a folder of its own


def test_the_default_model_folder_is_named_after_the_source(tmp_path, monkeypatch):
    run_dir = tmp_path / "fontglot-run"
    run_dir.mkdir()
    monkeypatch.chdir(run_dir)
    assert export.default_model_folder(".") == str(Path("saved_models") / "fontglot-run")  # not saved_models/
    assert export.default_model_folder(str(run_dir)) == str(Path("saved_models") / "fontglot-run")
    assert export.default_model_folder("task.keras") == str(Path("saved_models") / "task")


def test_a_float64_learner_is_refused_for_onnx_before_anything_is_written(tmp_path):
    """ONNX Runtime has no float64 convolution on a CPU: the export failed in its parity check, calling the
    file damaged, and so did every retry."""
    import keras

    learner = keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.Conv2D(2, 3, dtype="float64"), keras.layers.Flatten(dtype="float64"),
         keras.layers.Dense(2, dtype="float64")]
    )
    adapted = export.AdaptedLearner(learner, ["a", "b"])
    with pytest.raises(export.ExportError, match=r"float64 weights .* export --format savedmodel"):
        export.export_adapted(adapted, tmp_path / "models", format="both")
    assert not (tmp_path / "models").exists()


def test_export_adapted_names_the_wrapper_a_plain_adapted_model_needs(meta, tmp_path):
    rng = np.random.default_rng(1)
    plain = meta.adapt(rng.random((N_WAY, *SHAPE), dtype=np.float32), np.arange(N_WAY))
    with pytest.raises(export.ExportError, match=r"takes an AdaptedLearner .*, got a Functional: wrap the model "
                                                 r"MetaLearner\.adapt returned with export\.AdaptedLearner"):
        export.export_adapted(plain, tmp_path / "models")
    assert not (tmp_path / "models").exists()


def test_an_inner_step_count_that_is_no_whole_number_of_at_least_one_is_refused_before_writing(meta, tmp_path):
    """int() made 0 a SavedModel whose adapt_and_predict never adapted (0 % on its own support set) and 2.7 two."""
    rng = np.random.default_rng(1)
    images, labels = rng.random((N_WAY, *SHAPE), dtype=np.float32), np.arange(N_WAY)
    for steps in (0, 2.7, -1):
        with pytest.raises(export.ExportError, match=rf"inner_steps must be a whole number of at least 1, got {steps}"):
            export.export_meta(meta, tmp_path / "meta", inner_steps=steps)
        with pytest.raises(export.ExportError, match="inner_steps must be a whole number of at least 1"):
            export.adapt(meta, images, labels, CLASSES, inner_steps=steps)
    assert not (tmp_path / "meta").exists()
    assert export.adapt(meta, images, labels, CLASSES, inner_steps=2.0).info["inner_steps"] == 2


def test_onnx_export_of_a_recurrent_layer_is_refused_before_writing_and_works_unrolled(tmp_path):
    """An LSTM runs as a while loop, which tf2onnx left as a PartitionedCall after printing its tracebacks; written
    out (unroll=True) it is plain ops, and the ONNX model reproduces Keras."""

    def adapted_lstm(unroll):
        images = keras.Input(SHAPE)
        rows = keras.layers.Reshape((SHAPE[0], SHAPE[1] * SHAPE[2]))(images)
        features = keras.layers.LSTM(4, unroll=unroll, name="rows")(rows)
        return export.AdaptedLearner(keras.Model(images, keras.layers.Dense(N_WAY)(features)), CLASSES)

    with pytest.raises(export.ExportError, match=r"recurrent layers \(rows\) run as a TensorFlow while loop.*"
                                                 r"export --format savedmodel, or build them with unroll=True"):
        export.export_adapted(adapted_lstm(unroll=False), tmp_path / "looped", format="both")
    assert not (tmp_path / "looped").exists()
    result = export.export_adapted(adapted_lstm(unroll=True), tmp_path / "unrolled", format="both")
    assert result.parity.ok, result.parity.summary()
    assert (result.path / "model.onnx").is_file()


def test_onnx_export_of_a_grouped_convolution_is_refused_before_writing(tmp_path):
    """Keras runs Conv2D(groups > 1) as an XLA-compiled function, which tf2onnx left as StatefulPartitionedCall."""
    images = keras.Input(SHAPE)
    features = keras.layers.Conv2D(2, 3, name="widen")(images)
    features = keras.layers.Conv2D(4, 3, groups=2, name="grouped")(features)
    features = keras.layers.GroupNormalization(groups=2)(features)  # groups of another kind: exported to ONNX
    learner = keras.Model(images, keras.layers.Dense(N_WAY)(keras.layers.Flatten()(features)))
    adapted = export.AdaptedLearner(learner, CLASSES)
    with pytest.raises(export.ExportError, match=r"grouped convolutions \(grouped\) run in Keras as XLA-compiled "
                                                 r"functions.*export --format savedmodel"):
        export.export_adapted(adapted, tmp_path / "models", format="both")
    assert not (tmp_path / "models").exists()
