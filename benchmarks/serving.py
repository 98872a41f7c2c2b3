"""Serving latency per batch: Keras `predict`, the SavedModel's serving_default and ONNX Runtime, on this CPU.

    python benchmarks/serving.py [--model adapted.keras] [--image-shape 28,28,1] [--filters 32]
                                 [--batches 1,64] [--seconds 2]

Without --model, a conv4 learner (the paper's: 32 filters, 5 classes; fontglot's 28x28x1 by default) is adapted
by a fresh meta-learner (T = 2) on random support images; the timed model is the exported artifact of
`metalstm export --format both`. Each latency is the median of repeated calls on the same batch after a warm-up
(inputs already in memory, outputs fetched as NumPy). Also shown: Keras `predict_on_batch` (the same compiled
function without `predict`'s per-call tf.data iterator, ~0.2 s here) and calling the model eagerly
(`model(x, training=False)`). Ratios are Keras predict's
latency divided by each backend's (higher = faster). Target: ONNX Runtime at batch 1 at least 2x faster than Keras.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_metalstm as km  # noqa: E402
from keras_metalstm import export  # noqa: E402


def median_latency(call, seconds, min_calls=20, warmup=5):
    for _ in range(warmup):
        call()
    times, start = [], time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < seconds:
        begin = time.perf_counter()
        call()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def time_backends(adapted, signature, onnx, images, seconds):
    """Median latency (s) of each backend on one batch."""
    tensor = tf.constant(images)
    return {
        "keras predict": median_latency(lambda: adapted.predict(images, verbose=0), seconds),
        "keras on_batch": median_latency(lambda: adapted.predict_on_batch(images), seconds),
        "keras call": median_latency(lambda: adapted(tensor, training=False).numpy(), seconds),
        "savedmodel": median_latency(
            lambda: {k: v.numpy() for k, v in signature(images=tensor).items()}, seconds
        ),
        "onnxruntime": median_latency(
            lambda: onnx.session.run(onnx.output_names, {"images": images}), seconds
        ),
    }


def build_adapted(image_shape, filters, n_way=5):
    learner = km.learners.conv4(input_shape=image_shape, num_classes=n_way, filters=filters)
    meta = km.MetaLearner(learner, inner_steps=2)
    rng = np.random.default_rng(0)
    support = rng.random((n_way, *image_shape), dtype=np.float32)
    return export.adapt(meta, support, np.arange(n_way), [f"class_{i}" for i in range(n_way)])


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="an adapted learner .keras file (default: a conv4 adapted on noise)")
    parser.add_argument("--image-shape", default="28,28,1")
    parser.add_argument("--filters", type=int, default=32)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing budget per measurement")
    args = parser.parse_args()
    image_shape = tuple(int(v) for v in args.image_shape.split(","))
    batches = [int(v) for v in args.batches.split(",")]

    adapted = export.load_adapted(args.model) if args.model else build_adapted(image_shape, args.filters)
    with tempfile.TemporaryDirectory() as tmp:
        result = export.export_adapted(adapted, os.path.join(tmp, "model"), format="both")
        signature = tf.saved_model.load(str(result.path)).signatures["serving_default"]
        onnx = export.OnnxPredictor(result.path / "model.onnx")
        rng = np.random.default_rng(1)
        rows = []
        for batch in batches:
            images = rng.random((batch, *adapted.image_shape), dtype=np.float32)
            latencies = time_backends(adapted, signature, onnx, images, args.seconds)
            rows.append((batch, latencies))

    print(
        f"model: {adapted.learner.name} {adapted.image_shape} -> {adapted.num_classes} classes, "
        f"{sum(int(np.prod(v.shape)) for v in adapted.learner.trainable_variables):,} trainable parameters; tf {tf.__version__}, {os.cpu_count()} CPU(s); "
        f"{result.parity.summary()}"
    )
    header = f"{'backend':<14}" + "".join(f"{f'batch {b} ms':>14}{'x keras':>10}" for b in batches)
    print(header)
    print("-" * len(header))
    for backend in rows[0][1]:
        line = f"{backend:<14}"
        for _, latencies in rows:
            base = latencies["keras predict"]
            line += f"{latencies[backend] * 1e3:>14.3f}{base / latencies[backend]:>9.1f}x"
        print(line)
    onnx_speedup = rows[0][1]["keras predict"] / rows[0][1]["onnxruntime"]
    fair = rows[0][1]["keras on_batch"] / rows[0][1]["onnxruntime"]
    verdict = "met" if onnx_speedup >= 2 else "NOT met"
    print(
        f"target ONNX Runtime >= 2x Keras predict at batch {rows[0][0]}: {onnx_speedup:.1f}x ({verdict}); "
        f"vs Keras predict_on_batch: {fair:.1f}x"
    )


if __name__ == "__main__":
    main()
