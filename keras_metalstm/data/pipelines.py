"""Options shared by the package's tf.data pipelines: an iterator that ends as soon as its last element is read.

With tf.data's autotuning on (its default), each iterator runs a model thread that re-tunes the pipeline at
intervals that double up to a minute, and deleting the iterator waits for that thread. Measured with TensorFlow
2.21 on a 2-core CPU, with the meta-learner's steps between elements: the loop over a 200-episode evaluation
ended 5-7 s after its last step (15 s of steps), a 60-episode training loop 8-27 s after. The package's
pipelines do not need the tuning: episodes and decoded images come 100x faster than the meta-learner consumes
them, at the fixed parallelism tf.data uses without it (``AUTOTUNE`` then means the core count, at most 16, and
the prefetch buffer grows when the consumer has to wait). ``benchmarks/episodes.py --teardown`` measures it.
"""

from __future__ import annotations

import tensorflow as tf


def without_autotune_thread(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """`dataset` with tf.data's autotuning off, so that deleting an iterator over it does not wait seconds for
    the tuning thread (see the module docstring)."""
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)
