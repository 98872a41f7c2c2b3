"""The export step of `metalstm quickstart`: the production path on a meta-test task of the run's data set.

Writes, under ``out_dir``: ``support/<class>/*.png`` and ``query/<class>/*.png`` (one meta-test episode as image
folders, as a user would have them), ``adapted.keras`` (`metalstm adapt`), ``saved_models/task/<v>/``
(SavedModel + ONNX, parity-checked) and ``saved_models/metalstm/<v>/`` (the
adapt-in-serving SavedModel); then predicts the query files with the exported model and reports the accuracy.
"""

from __future__ import annotations

import re
from pathlib import Path


def _folder_name(name):
    return re.sub(r"[^\w+\- ]", "_", str(name)).strip() or "class"


def write_task_folders(split, out_dir, n_way, k_shot, query, seed=0, episode=0):
    """One episode of ``split`` as ``out_dir/support/<class>/`` and ``out_dir/query/<class>/`` PNG files."""
    from PIL import Image

    from keras_metalstm.data import EpisodeSampler

    sampler = EpisodeSampler(split, n_way, k_shot, query, seed=seed)
    class_ids, image_ids = (t.numpy() for t in sampler.indices(episode))
    out_dir = Path(out_dir)
    for class_id, ids in zip(class_ids, image_ids, strict=True):
        name = _folder_name(split.class_names[class_id])
        for index, image_id in enumerate(ids):
            kind = "support" if index < k_shot else "query"
            folder = out_dir / kind / name
            folder.mkdir(parents=True, exist_ok=True)
            pixels = split.images[image_id]
            image = (
                Image.fromarray(pixels[..., 0], mode="L")
                if pixels.shape[-1] == 1
                else Image.fromarray(pixels)
            )
            image.save(folder / f"{index}.png")
    return out_dir / "support", out_dir / "query"


def quickstart_export(run_dir, out_dir):
    """Adapt the run's meta-learner to a meta-test task given as image folders, export it, predict; returns a
    one-line description of what was written."""
    from keras_metalstm.export.adapted import adapt_folder, save_adapted
    from keras_metalstm.export.exporter import export_adapted, export_meta
    from keras_metalstm.export.inputs import labelled_inputs
    from keras_metalstm.export.predict import accuracy, load_predictor
    from keras_metalstm.runs import load_meta_learner, load_splits

    out_dir = Path(out_dir)
    config, meta = load_meta_learner(run_dir)
    split = load_splits(config, run_dir=run_dir).test
    support, query = write_task_folders(split, out_dir, config.n_way, config.k_shot, config.query)
    adapted = adapt_folder(meta, support, info={"run": str(run_dir)})
    save_adapted(adapted, out_dir / "adapted.keras", force=True)
    result = export_adapted(adapted, out_dir / "saved_models" / "task", format="both")
    meta_result = export_meta(meta, out_dir / "saved_models" / "metalstm")
    predictor = load_predictor(result.path / "model.onnx")
    inputs, labels = labelled_inputs(query, predictor.image_shape, predictor.class_names)
    share = accuracy(predictor.predict_inputs(inputs), labels).share
    return (
        f"{out_dir / 'adapted.keras'} (adapted on {support}), SavedModel + ONNX export {result.path} "
        f"({'parity OK' if result.parity.ok else 'parity FAILED'}; {predictor.kind} accuracy on the "
        f"{len(labels)} query images {share:.1%}), adapt-in-serving SavedModel {meta_result.path}"
    )
