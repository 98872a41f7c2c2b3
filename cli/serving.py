"""`metalstm adapt / export / predict`: adapt a meta-learner to a new task and ship it (SavedModel, ONNX).

Only parsing, calling `keras_metalstm.export` and printing happen here; TensorFlow is imported inside the
commands.
"""

from __future__ import annotations

import json
import time

import click
from keras_metalstm.cli.common import progress_bar, quiet_tensorflow, user_errors


@click.command()
@click.argument("source", metavar="NAME_OR_RUN_DIR")
@click.option(
    "--support",
    "support_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Folder with one sub-folder per class (a few images each); folder names, sorted, are the class names.",
)
@click.option(
    "--out", "out", required=True, type=click.Path(dir_okay=False), help="Adapted learner file (.keras)."
)
@click.option(
    "--inner-steps", type=click.IntRange(min=1), default=None, help="Inner-loop updates T (default: the run's own)."
)
@click.option("--force", is_flag=True, help="Overwrite an existing --out file.")
def adapt(source, support_dir, out, inner_steps, force):
    """Adapt a trained meta-learner to a new task given by a few labelled images.

    NAME_OR_RUN_DIR is a ready-made meta-learner's name (a preset, e.g. fontglot_5way_1shot), a `metalstm
    train` run folder (its best checkpoint) or a meta-learner .keras file; an existing path wins over a preset
    of the same name. The support folder must hold exactly N class folders for an N-way meta-learner. Images
    are converted to the learner's input shape by the training conversion rule. The result is one .keras file
    holding the adapted weights, the support set's batch-norm statistics, the class names and the input spec.
    """
    quiet_tensorflow()
    started = time.perf_counter()
    with user_errors():
        from keras_metalstm import export
        from keras_metalstm.presets import load_path_or_preset

        export.check_adapted_path(out, force)  # before adapting, not after
        meta, provenance = load_path_or_preset(source, export.load_meta_learner)
        adapted = export.adapt_folder(meta, support_dir, inner_steps=inner_steps, info=provenance)
        export.save_adapted(adapted, out, force=force)
    shots = adapted.info["shots_per_class"]
    click.echo(
        f"adapted {adapted.num_classes}-way ({', '.join(adapted.class_names)}) on {sum(shots)} support images "
        f"with T={adapted.info['inner_steps']} -> {out} in {time.perf_counter() - started:.1f}s"
    )


@click.command(name="export")
@click.argument("model")
@click.option(
    "--format",
    "format_",
    type=click.Choice(["savedmodel", "onnx", "both"]),
    default="savedmodel",
    show_default=True,
    help="Artifact(s) to write into OUT/<version>/.",
)
@click.option(
    "--out",
    "out",
    type=click.Path(),
    default=None,
    help="Model folder NAME (versions go inside); default saved_models/<MODEL name>.",
)
@click.option("--version", "version", type=int, default=None, help="Version folder (default: the next free).")
@click.option("--opset", type=click.IntRange(13, 18), default=17, show_default=True, help="ONNX opset.")
@click.option("--force", is_flag=True, help="Replace an existing version folder.")
@click.option("--no-verify", is_flag=True, help="Skip the parity check of an adapted learner against the Keras model.")
def export_command(model, format_, out, version, opset, force, no_verify):
    """Export an adapted learner (SavedModel and/or ONNX), or a meta-learner for adapt-in-serving.

    \b
    MODEL = adapted .keras file (`metalstm adapt`): SavedModel signatures serving_default (input `images`
      float32 (batch, H, W, C) in [0, 1], outputs logits, probabilities, class_ids, class_names) and
      predict_encoded (input `image_bytes`: PNG/JPEG/GIF/BMP files); ONNX model.onnx with the same input/outputs.
    MODEL = run folder, meta-learner .keras file or preset name (a ready-made meta-learner; an existing path
      wins): SavedModel signatures adapt_and_predict (support_images, support_labels, query_images -> logits,
      probabilities, class_ids) and adapt_and_predict_encoded (the same on PNG/JPEG/GIF/BMP files:
      support_image_bytes, support_labels, query_image_bytes). SavedModel only: ONNX has no gradient ops.

    Writes OUT/<version>/ (TensorFlow Serving's layout) via a temporary folder; an adapted learner's export
    only after checking that it reproduces the Keras model's logits (within 1e-4) at batch 1 and 64 (an
    adapt-in-serving export is checked by the tests, not at each export).
    """
    quiet_tensorflow()
    started = time.perf_counter()
    with user_errors():
        from keras_metalstm import export
        from keras_metalstm.presets import load_path_or_preset

        out = out or export.default_model_folder(model)
        loaded, _ = load_path_or_preset(model, export.load_exportable)
        if isinstance(loaded, export.AdaptedLearner):
            result = export.export_adapted(
                loaded, out, format=format_, version=version, force=force, opset=opset, verify=not no_verify
            )
            what = f"{format_} export of the adapted learner ({', '.join(loaded.class_names)})"
        else:
            result = export.export_meta(loaded, out, version=version, force=force, format=format_)
            what = f"adapt-in-serving SavedModel of the {export.meta_n_way(loaded)}-way meta-learner"
    if result.parity is not None:
        click.echo(result.parity.summary())
    click.echo(f"{what} -> {result.path} ({', '.join(result.files)}) in {time.perf_counter() - started:.1f}s")


@click.command()
@click.argument("model", type=click.Path(exists=True))
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True))
@click.option(
    "--json", "as_json", is_flag=True, help="Print a JSON list of {image, class_name, probability, logits}."
)
@click.option(
    "--support",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="With a meta-learner's adapt-in-serving SavedModel: the support set (one sub-folder of images per class) "
    "it adapts to inside the SavedModel before classifying.",
)
@click.option(
    "--labelled",
    is_flag=True,
    help="IMAGES is one folder of class sub-folders named after the model's classes: also print each image's true "
    "class and the accuracy, overall and per class (check an adapted model before shipping it).",
)
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
def predict(model, images, as_json, support, labelled, progress):
    """Classify image files with an exported model.

    MODEL is a SavedModel version folder (saved_models/NAME/<version>; a NAME folder means its newest
    version), an .onnx file or an adapted .keras file; or, with --support, a meta-learner's adapt-in-serving
    SavedModel. IMAGES are PNG/JPEG/GIF/BMP files (WebP too with TensorFlow 2.20 or later; converted to the model's
    input shape by the training rule), folders of them (their image files, sorted by name) or .npy arrays already
    float32 in [0, 1] at that shape.
    """
    quiet_tensorflow()
    started = time.perf_counter()
    with user_errors():
        from keras_metalstm import export

        predictor = export.load_predictor(model, support=support)
        if labelled and len(images) != 1:
            raise export.ExportError("--labelled takes one folder of class sub-folders as IMAGES.")
        if labelled:
            inputs, labels = export.labelled_inputs(images[0], predictor.image_shape, predictor.class_names)
        else:
            inputs = export.ImageInputs(images, predictor.image_shape)
        with progress_bar("predict", len(inputs), "img", enabled=progress) as bar:
            records = predictor.predict_inputs(inputs, progress=bar.update)
        score = export.accuracy(records, labels) if labelled else None
    if as_json:
        click.echo(json.dumps(records, indent=2, ensure_ascii=False))
    else:
        width = max(len(r["image"]) for r in records)
        for record in records:
            truth = f"  (true: {record['label']})" if labelled else ""
            click.echo(f"{record['image']:<{width}}  {record['class_name']}  {record['probability']:.4f}{truth}")
    if score is not None:
        click.echo(score.summary(), err=as_json)
    click.echo(
        f"predicted {len(records)} image(s) with {predictor.kind} model {predictor.path} in "
        f"{time.perf_counter() - started:.1f}s",
        err=True,
    )


# `metalstm export` (the module-level name `export` is what cli/main.py registers).
export = export_command
