"""Adapt a meta-learner to a new task and ship it: `.keras`, SavedModel (TensorFlow Serving) and ONNX exports.

    from keras_metalstm import export
    meta = export.load_meta_learner("runs/fontglot")            # a run folder or a MetaLearner .keras file
    adapted = export.adapt_folder(meta, "my_support/")          # one sub-folder per class, names sorted
    export.save_adapted(adapted, "task.keras")
    result = export.export_adapted(adapted, "saved_models/task", format="both")   # saved_models/task/1/
    print(result.parity.summary())
    predictor = export.load_predictor("saved_models/task/1")
    predictor.predict(images)                                   # float32 (batch, H, W, C) in [0, 1]
    predictor.predict_inputs(export.ImageInputs(["photos/"], predictor.image_shape))  # files, batch by batch

See `savedmodel` for the signatures (serving_default, predict_encoded, adapt_and_predict and
adapt_and_predict_encoded) and `onnx_format` for the ONNX model.
"""

from keras_metalstm.export.adapted import (
    INPUT_SCALE,
    AdaptedLearner,
    adapt,
    adapt_folder,
    check_adapted_path,
    load_adapted,
    load_exportable,
    load_meta_learner,
    load_support_folder,
    meta_image_shape,
    meta_n_way,
    save_adapted,
)
from keras_metalstm.export.errors import ExportError
from keras_metalstm.export.exporter import (
    FORMATS,
    ONNX_FILE,
    ExportResult,
    default_model_folder,
    export_adapted,
    export_meta,
)
from keras_metalstm.export.files import next_version, versions
from keras_metalstm.export.inputs import ImageInputs, check_images, labelled_inputs, read_images
from keras_metalstm.export.onnx_format import DEFAULT_OPSET, OPSETS, to_onnx, write_onnx
from keras_metalstm.export.parity import ParityReport, verify_parity
from keras_metalstm.export.predict import (
    Accuracy,
    AdaptInServingPredictor,
    KerasPredictor,
    OnnxPredictor,
    SavedModelPredictor,
    accuracy,
    load_predictor,
    prediction_records,
)
from keras_metalstm.export.quickstart import quickstart_export
from keras_metalstm.export.rest import rest_predict
from keras_metalstm.export.savedmodel import (
    AdaptInServingModule,
    ClassifierModule,
    decode_for_serving,
    read_metadata,
    write_savedmodel,
)

__all__ = [
    "Accuracy",
    "AdaptInServingPredictor",
    "DEFAULT_OPSET",
    "FORMATS",
    "INPUT_SCALE",
    "ONNX_FILE",
    "OPSETS",
    "AdaptInServingModule",
    "AdaptedLearner",
    "ClassifierModule",
    "ExportError",
    "ExportResult",
    "ImageInputs",
    "KerasPredictor",
    "OnnxPredictor",
    "ParityReport",
    "SavedModelPredictor",
    "accuracy",
    "adapt",
    "adapt_folder",
    "check_adapted_path",
    "default_model_folder",
    "check_images",
    "decode_for_serving",
    "export_adapted",
    "export_meta",
    "labelled_inputs",
    "load_adapted",
    "load_exportable",
    "load_meta_learner",
    "load_predictor",
    "load_support_folder",
    "meta_image_shape",
    "meta_n_way",
    "next_version",
    "prediction_records",
    "quickstart_export",
    "read_images",
    "read_metadata",
    "rest_predict",
    "save_adapted",
    "to_onnx",
    "verify_parity",
    "versions",
    "write_onnx",
    "write_savedmodel",
]
