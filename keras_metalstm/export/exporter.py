"""Writing serving artifacts: `export_adapted` (SavedModel and/or ONNX of an adapted learner, parity-checked) and
`export_meta` (the meta-learner's adapt-in-serving SavedModel).

Layout: ``OUT/<version>/`` with ``saved_model.pb`` + ``variables/`` (TensorFlow Serving) and/or ``model.onnx``
(the Triton / ONNX Runtime convention), version = the next free integer unless given. Everything is written to
a hidden temporary folder beside it, verified, then renamed; an existing version folder is only replaced with
``force=True``.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import keras

from keras_metalstm.export.adapted import AdaptedLearner, meta_in_variable_precision
from keras_metalstm.export.errors import ExportError
from keras_metalstm.export.files import atomic_path, check_target, next_version, versions
from keras_metalstm.export.onnx_format import DEFAULT_OPSET, write_onnx
from keras_metalstm.export.parity import DEFAULT_ATOL, verify_parity
from keras_metalstm.export.savedmodel import (
    AdaptInServingModule,
    ClassifierModule,
    adapted_metadata,
    meta_metadata,
    write_savedmodel,
)
from keras_metalstm.paths import refuse_url

FORMATS = ("savedmodel", "onnx", "both")
ONNX_FILE = "model.onnx"


@dataclass
class ExportResult:
    path: Path
    version: int
    files: list = field(default_factory=list)
    parity: object = None
    seconds: float = 0.0


def default_model_folder(source) -> str:
    """Where `metalstm export SOURCE` writes without --out: saved_models/<name of SOURCE>, a model file's name
    without .keras, a run folder's own name (also when it is given as "." from inside it)."""
    return str(Path("saved_models") / Path(source).resolve().name.removesuffix(".keras"))


def _formats(format):
    if format not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {format!r}.")
    return ("savedmodel", "onnx") if format == "both" else (format,)


def _version_target(out, version, force):
    refuse_url(out, "the export target", ExportError)  # before Path() turns gs://b into gs:/b
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(
            f"{out} is a file; the export target is a model folder (NAME), versions go inside it."
        )
    version = next_version(out) if version is None else int(version)
    if version < 1:
        raise ExportError(f"version must be a positive integer, got {version}.")
    return check_target(out / str(version), force), version


def _warn_if_serving_loses_its_savedmodel(out: Path, version: int, formats) -> None:
    """TensorFlow Serving serves a model folder's newest version: an ONNX-only version among SavedModel ones (or
    replacing one) leaves it nothing to load, or the SavedModel gone."""
    if "savedmodel" in formats:
        return
    served = [number for number in versions(out) if (out / str(number) / "saved_model.pb").is_file()]
    if served and (version > max(served) or version in served):
        warnings.warn(
            f"keras_metalstm: {out} holds SavedModel versions ({', '.join(map(str, served))}) and version {version} "
            "will hold model.onnx only: TensorFlow Serving, which serves the newest version, "
            f"{'would find no SavedModel in it' if version > max(served) else 'loses that SavedModel'}. Export "
            "--format both, or write ONNX exports to a folder of their own.",
            RuntimeWarning,
            stacklevel=3,
        )


def export_adapted(
    adapted,
    out,
    format="savedmodel",
    version=None,
    force=False,
    opset=DEFAULT_OPSET,
    verify=True,
    atol=DEFAULT_ATOL,
    parity_images=None,
):
    """Exports an AdaptedLearner to ``out/<version>/``; returns an ExportResult (raises if parity fails)."""
    started = time.perf_counter()
    if not isinstance(adapted, AdaptedLearner):
        raise ExportError(
            f"export_adapted takes an AdaptedLearner (the model with its class names), got a "
            f"{type(adapted).__name__}: wrap the model MetaLearner.adapt returned with "
            "export.AdaptedLearner(model, class_names), or adapt with export.adapt / export.adapt_folder"
        )
    formats = _formats(format)
    if "onnx" in formats and any(weight.dtype == "float64" for weight in adapted.learner.weights):
        raise ExportError(
            "the adapted learner holds float64 weights (keras.config.set_floatx('float64')), and ONNX Runtime has "
            "no float64 convolution on a CPU: export --format savedmodel, or adapt a float32 meta-learner for ONNX"
        )
    convolutions = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
    grouped = [
        layer.name
        for layer in adapted.learner._flatten_layers()
        if isinstance(layer, convolutions) and layer.groups != 1  # not GroupNormalization's groups
    ]
    if "onnx" in formats and grouped:
        raise ExportError(
            f"the learner's grouped convolutions ({', '.join(grouped)}) run in Keras as XLA-compiled functions, which "
            "the ONNX converter cannot read: export --format savedmodel, or build the learner with groups=1"
        )
    looping = [
        layer.name
        for layer in adapted.learner._flatten_layers()
        if isinstance(layer, keras.layers.RNN) and not layer.unroll
    ]
    if "onnx" in formats and looping:
        raise ExportError(
            f"the learner's recurrent layers ({', '.join(looping)}) run as a TensorFlow while loop, which the ONNX "
            "converter cannot read (it left a PartitionedCall): export --format savedmodel, or build them with "
            "unroll=True (a loop of fixed length written out as plain ops, which ONNX has)"
        )
    target, version = _version_target(out, version, force)
    _warn_if_serving_loses_its_savedmodel(Path(out), version, formats)
    with atomic_path(target, force=force, directory=True) as tmp:
        files = []
        if "savedmodel" in formats:
            module = ClassifierModule(adapted)
            write_savedmodel(module, tmp, adapted_metadata(adapted, module))
            files.append("saved_model.pb")
        if "onnx" in formats:
            write_onnx(adapted, tmp / ONNX_FILE, opset=opset)
            files.append(ONNX_FILE)
        report = None
        if verify:
            report = verify_parity(
                adapted,
                savedmodel=tmp if "savedmodel" in formats else None,
                onnx=tmp / ONNX_FILE if "onnx" in formats else None,
                images=parity_images,
                atol=atol,
            )
            if not report.ok:
                raise ExportError(
                    f"the exported model does not reproduce the adapted learner; nothing written. "
                    f"{report.summary()}"
                )
    return ExportResult(target, version, files, report, time.perf_counter() - started)


def export_meta(meta, out, version=None, force=False, inner_steps=None, format="savedmodel"):
    """Exports the meta-learner's ``adapt_and_predict`` SavedModel to ``out/<version>/``."""
    if format != "savedmodel":
        raise ExportError(
            "a meta-learner exports to SavedModel only: adapt-in-serving runs the inner loop's gradient ops, "
            "which ONNX cannot represent. Use --format savedmodel, or adapt first (`metalstm adapt`) and export "
            "the adapted learner to ONNX."
        )
    started = time.perf_counter()
    target, version = _version_target(out, version, force)
    # In float32, as the adapted exports: a server's CPU has no bfloat16 convolutions.
    module = AdaptInServingModule(meta_in_variable_precision(meta), inner_steps=inner_steps)
    with atomic_path(target, force=force, directory=True) as tmp:
        write_savedmodel(module, tmp, meta_metadata(module))
    return ExportResult(target, version, ["saved_model.pb"], None, time.perf_counter() - started)
