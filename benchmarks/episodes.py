"""Episodes per second of the keras_metalstm.data pipeline alone, compared with the meta-training step's rate.

    python benchmarks/episodes.py [--seconds 3] [--batch-sizes 1,4] [--no-meta-step]
    python benchmarks/episodes.py --augment flip,translate=0.1,brightness=0.2   # also the augmented pipeline
    python benchmarks/episodes.py --teardown [--episodes 200 --rounds 3]        # how long a loop takes to end

Cases: fontglot (28x28x1) 5-way 1-shot and 5-shot, and an 84x84x3 image folder (generated in a temporary
directory, 20 classes x 30 JPEGs) 5-way 1-shot and 5-shot, all with 15 queries per class. Each rate is measured
by pulling batches from the tf.data pipeline (episodes/s = batches x B / wall time, after a warm-up). If
keras_metalstm.MetaTrainer and keras_metalstm.learners.conv4 import, a few meta-steps (conv4 learner,
inner_steps 12, one episode per step, jit off) are timed in the same run and the ratio pipeline / meta-step is
printed; the requirement is >= 20x. With --augment, every case is also measured with its episodes augmented
(`metalstm train --augment`), in the same run, and the ratio is the slower pipeline's.

--teardown: an evaluation loop (`MetaTrainer.evaluate_step` on fontglot 5-way 1-shot episodes, 5 per batch) over
the package's pipeline (tf.data's autotuning off, `keras_metalstm/data/pipelines.py`) and over the same pipeline
with the autotuning on, alternating: the seconds between the last step and the end of the loop (the iterator's
deletion) against the loop's steps.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from keras_metalstm.cpu_kernels import prefer_onednn

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
prefer_onednn()  # the meta-step runs on the CPU kernels `metalstm` runs on

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from keras_metalstm.augmentation import Augmentation  # noqa: E402
from keras_metalstm.data import episode_dataset, fontglot_splits, load_image_folder  # noqa: E402

N_WAY, Q_QUERY = 5, 15


def pipeline_rate(dataset, k_shot: int, batch_size: int, seconds: float, augment=None) -> float:
    """Episodes per second pulled from the pipeline (after warming it up)."""
    batches = episode_dataset(dataset, N_WAY, k_shot, Q_QUERY, batch_size=batch_size, seed=0, augment=augment)
    iterator = iter(batches)
    for _ in range(20):
        next(iterator)
    batches, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(iterator)
        batches += 1
    return batches * batch_size / (time.perf_counter() - start)


def make_image_folder(root: str, classes: int = 20, per_class: int = 30) -> None:
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = os.path.join(root, f"class_{c:02d}")
        os.makedirs(folder)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (84, 84, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"{i:03d}.jpg"), quality=90)


def conv4_trainer(image_shape):
    """A MetaTrainer of a conv4 meta-learner (T = 12, Adam 1e-3, clip 0.25): the step each pipeline is put
    against."""
    import keras_metalstm as km

    meta = km.MetaLearner(km.learners.conv4(input_shape=image_shape, num_classes=N_WAY), inner_steps=12)
    return km.MetaTrainer(meta, learning_rate=1e-3, clip_norm=0.25)


def meta_step_rate(image_shape, k_shot: int, steps: int) -> tuple[float, str]:
    """Episodes per second of MetaTrainer.train_step (B=1), and a note saying what was timed."""
    trainer = conv4_trainer(image_shape)
    rng = np.random.default_rng(0)
    batch = {
        "support_images": tf.constant(rng.random((1, N_WAY * k_shot, *image_shape), np.float32)),
        "support_labels": tf.constant(np.repeat(np.arange(N_WAY, dtype=np.int32), k_shot)[None]),
        "query_images": tf.constant(rng.random((1, N_WAY * Q_QUERY, *image_shape), np.float32)),
        "query_labels": tf.constant(np.repeat(np.arange(N_WAY, dtype=np.int32), Q_QUERY)[None]),
    }
    for _ in range(2):  # trace / warm up
        trainer.train_step(batch)
    start = time.perf_counter()
    for _ in range(steps):
        result = trainer.train_step(batch)
    float(result["loss"])  # wait for the step's values
    elapsed = time.perf_counter() - start
    return steps / elapsed, f"{1000 * elapsed / steps:.0f} ms per meta-step (conv4, T=12, 1 episode)"


def with_autotune(batches):
    """`batches` with tf.data's autotuning switched back on (tf.data's default)."""
    options = tf.data.Options()
    options.autotune.enabled = True
    return batches.with_options(options)


def teardown_seconds(split, episodes: int, step, autotune: bool) -> tuple[float, float]:
    """(seconds of the loop's steps, seconds from the last step's return to the end of the loop) for one loop of
    `step` over `episodes` 5-way 1-shot episodes of `split`, 5 per batch."""
    batches = episode_dataset(split, N_WAY, 1, Q_QUERY, batch_size=5, seed=0, num_episodes=episodes)
    start = last = time.perf_counter()
    for batch in with_autotune(batches) if autotune else batches:
        step(batch)
        last = time.perf_counter()
    return last - start, time.perf_counter() - last


def teardown_table(split, episodes: int, rounds: int, step) -> list[str]:
    """One line per round and pipeline, then each pipeline's mean and longest wait (tf.data's tuning thread
    holds up some ends and not others)."""
    lines, waits = [], {False: [], True: []}
    for round_index in range(rounds):
        for autotune in (False, True):
            steps, wait = teardown_seconds(split, episodes, step, autotune)
            waits[autotune].append(wait)
            name = "autotune on (tf.data's default)" if autotune else "the package's (autotune off)"
            lines.append(f"round {round_index + 1}  {name:<32} steps {steps:6.1f} s, loop ended {wait:6.3f} s later")
    lines.append(
        "wait at the end, mean / longest: "
        + ", ".join(
            f"{name} {np.mean(waits[autotune]):.3f} / {max(waits[autotune]):.3f} s"
            for name, autotune in (("the package's", False), ("autotune on", True))
        )
    )
    return lines


def evaluation_step(image_shape):
    """A conv4 meta-learner's test-mode step (what validation and `metalstm evaluate` run per batch)."""
    trainer = conv4_trainer(image_shape)
    return lambda batch: trainer.evaluate_step(batch)["accuracy"].numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per case")
    parser.add_argument("--batch-sizes", default="1,4", help="episodes per batch, comma-separated")
    parser.add_argument("--meta-steps", type=int, default=5, help="meta-steps to time per case")
    parser.add_argument("--no-meta-step", action="store_true", help="time the pipeline only")
    parser.add_argument("--augment", default=None, help="also time the pipeline with this augmentation")
    parser.add_argument("--teardown", action="store_true", help="time the end of an evaluation loop instead")
    parser.add_argument("--episodes", type=int, default=200, help="--teardown: episodes per loop")
    parser.add_argument("--rounds", type=int, default=3, help="--teardown: loops per pipeline")
    args = parser.parse_args()
    if args.teardown:
        split = fontglot_splits().test
        print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPU core(s); evaluation loops of {args.episodes} "
              f"5-way 1-shot episodes")
        print("\n".join(teardown_table(split, args.episodes, args.rounds, evaluation_step(split.image_shape))))
        return
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    augment = Augmentation.parse(args.augment)
    columns = [(b, None) for b in batch_sizes] + ([(b, augment) for b in batch_sizes] if augment else [])

    print(
        f"TensorFlow {tf.__version__}, {os.cpu_count()} CPU core(s); {N_WAY}-way, {Q_QUERY} queries per class"
    )
    fontglot = fontglot_splits().train
    with tempfile.TemporaryDirectory() as root:
        make_image_folder(root)
        start = time.perf_counter()
        folder = load_image_folder(root)
        print(
            f"image folder: {folder.num_classes} classes x 30 JPEGs 84x84x3 loaded in "
            f"{time.perf_counter() - start:.2f} s"
        )
    cases = [
        ("fontglot 28x28x1", fontglot, 1),
        ("fontglot 28x28x1", fontglot, 5),
        ("folder 84x84x3", folder, 1),
        ("folder 84x84x3", folder, 5),
    ]
    print(
        f"\n{'case':<24}{'shot':>5}"
        + "".join(f"{f'B={b}' + (' aug' if a else '') + ' eps/s':>18}" for b, a in columns)
        + f"{'meta eps/s':>12}{'ratio':>9}"
    )
    for name, dataset, k_shot in cases:
        rates = [pipeline_rate(dataset, k_shot, b, args.seconds, a) for b, a in columns]
        line = f"{name:<24}{k_shot:>5}" + "".join(f"{r:>18.0f}" for r in rates)
        if args.no_meta_step:
            print(line)
            continue
        meta_rate, note = meta_step_rate(dataset.image_shape, k_shot, args.meta_steps)
        ratio = min(rates) / meta_rate
        verdict = "ok" if ratio >= 20 else "TOO SLOW"
        print(line + f"{meta_rate:>12.1f}{ratio:>8.0f}x  {verdict}; {note}")
    if augment:
        print(f"\naug: episodes augmented by {augment}")
    if args.no_meta_step:
        print("\nmeta-step not timed (--no-meta-step): pipeline numbers only")


if __name__ == "__main__":
    main()
