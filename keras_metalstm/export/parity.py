"""Parity of exported artifacts with the Keras adapted learner: same logits (within atol) and same arg-max."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DEFAULT_ATOL = 1e-4


@dataclass
class ParityReport:
    """One row per (backend, batch size): max |logits - Keras logits| and whether every arg-max agrees."""

    atol: float
    rows: list = field(default_factory=list)

    @property
    def ok(self):
        return all(row["max_abs_diff"] <= self.atol and row["argmax_equal"] for row in self.rows)

    def summary(self):
        parts = [
            f"{row['backend']}@{row['batch']}: {row['max_abs_diff']:.1e}"
            + ("" if row["argmax_equal"] else " (arg-max differs)")
            for row in self.rows
        ]
        verdict = "OK" if self.ok else "FAILED"
        return f"parity {verdict} (max |logit diff| <= {self.atol:g}): " + ", ".join(parts)


def parity_images(image_shape, count=64, seed=0, images=None):
    """``count`` float32 images in [0, 1]: ``images`` repeated to fill, or uniform noise from ``seed``."""
    if images is not None:
        images = np.asarray(images, dtype=np.float32)
        return np.resize(images, (count, *images.shape[1:])).astype(np.float32)
    return np.random.default_rng(seed).random((count, *image_shape), dtype=np.float32)


def compare(reference, candidate, backend, batch, report):
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    report.rows.append(
        {
            "backend": backend,
            "batch": int(batch),
            "max_abs_diff": float(np.max(np.abs(reference - candidate))),
            "argmax_equal": bool(np.array_equal(reference.argmax(-1), candidate.argmax(-1))),
        }
    )


def verify_parity(
    adapted, savedmodel=None, onnx=None, images=None, batch_sizes=(1, 64), atol=DEFAULT_ATOL, seed=0
):
    """Runs the Keras adapted learner, the SavedModel's serving_default and the ONNX model on the same images.

    Args:
        adapted: the AdaptedLearner (the reference: what `evaluate` scores).
        savedmodel: a SavedModel folder (or None to skip).
        onnx: an .onnx file (or None to skip).
        images: images to check on (default: uniform noise in [0, 1], seeded).
        batch_sizes: each backend is run at each of these batch sizes.

    Returns a ParityReport (``.ok``, ``.summary()``, ``.rows``).
    """
    from keras_metalstm.export.predict import OnnxPredictor, SavedModelPredictor

    report = ParityReport(atol=float(atol))
    pool = parity_images(adapted.image_shape, max(batch_sizes), seed, images)
    backends = []
    if savedmodel is not None:
        backends.append(("savedmodel", SavedModelPredictor(savedmodel)))
    if onnx is not None:
        backends.append(("onnx", OnnxPredictor(onnx)))
    for batch in batch_sizes:
        batch_images = pool[:batch]
        reference = np.asarray(adapted(batch_images, training=False))
        for name, predictor in backends:
            outputs = predictor.predict(batch_images)
            compare(reference, outputs["logits"], name, batch, report)
            expected_names = [adapted.class_names[i] for i in reference.argmax(-1)]
            if list(outputs["class_names"]) != expected_names:
                report.rows[-1]["argmax_equal"] = False
    return report
