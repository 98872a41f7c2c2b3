"""N-way K-shot Q-query episodes as a deterministic, resumable tf.data pipeline.

Episode ``e`` of a stream with seed ``s`` is a pure function of ``(s, e)``: its classes and images are drawn
with stateless random ops keyed on ``(s, 2e)`` and ``(s, 2e + 1)`` (an augmentation's draws, if any, on a key
folded from the latter). So ``episode_dataset(..., seed=s, start_episode=i)`` yields exactly episodes i, i+1, ...
of the uninterrupted stream (exact resume), whatever the batch size, parallelism or prefetching.

One episode: N distinct classes drawn uniformly from the split, relabelled 0..N-1 in random order; for each class
K + Q distinct images drawn uniformly from its images, the first K are the support set and the other Q the query
set (so support and query never share an image). Support and query sets are CLASS-MAJOR: label 0's images
first, then label 1's ..., i.e. ``support_labels = [0]*K + [1]*K + ... + [N-1]*K``.

A batch of B episodes (B >= 1, the leading axis is always there) is a dict of tensors with static shapes:

    support_images  float32 (B, N*K, H, W, C) in [0, 1]
    support_labels  int32   (B, N*K)
    query_images    float32 (B, N*Q, H, W, C) in [0, 1]
    query_labels    int32   (B, N*Q)
"""

from __future__ import annotations

import operator

import numpy as np
import tensorflow as tf

from keras_metalstm.augmentation import Augmentation
from keras_metalstm.data.dataset import ClassIndexedDataset
from keras_metalstm.data.errors import DataError
from keras_metalstm.data.pipelines import without_autotune_thread

EPISODE_KEYS = ("support_images", "support_labels", "query_images", "query_labels")


class EpisodeSampler:
    """Draws N-way K-shot Q-query episodes from one class-indexed data set (one split).

    ``episode(index)`` builds episode ``index`` (no batch axis) in-graph; ``indices(index)`` gives the chosen
    class ids and image ids; ``dataset(...)`` is the batched tf.data pipeline.
    """

    def __init__(
        self,
        dataset: ClassIndexedDataset,
        n_way: int,
        k_shot: int,
        q_query: int,
        seed: int = 0,
        augment: Augmentation | None = None,
    ):
        self.n_way, self.k_shot, self.q_query = _check_episode_size(dataset, n_way, k_shot, q_query)
        if augment is not None:
            try:
                augment.check_image_shape(dataset.image_shape)
            except ValueError as error:
                raise DataError(f"{dataset.name}: augment {augment}: {error}") from None
        self.seed = _count("seed", seed)
        if not 0 <= self.seed < 2**63:
            raise DataError(f"seed must lie in 0..2**63 - 1 (a stateless random seed is an int64), got {self.seed}")
        self.augment = augment
        self.source_dataset = dataset
        self.image_shape = dataset.image_shape
        sizes = dataset.class_sizes
        self._num_classes = dataset.num_classes
        self._max_size = int(sizes.max())
        self._images = tf.constant(dataset.images)
        self._starts = tf.constant(dataset.class_starts[:-1], dtype=tf.int64)
        self._sizes = tf.constant(sizes, dtype=tf.int64)
        n, k, q = self.n_way, self.k_shot, self.q_query
        self._support_labels = tf.constant(np.repeat(np.arange(n, dtype=np.int32), k))
        self._query_labels = tf.constant(np.repeat(np.arange(n, dtype=np.int32), q))

    def indices(self, episode_index) -> tuple[tf.Tensor, tf.Tensor]:
        """(class_ids (N,), image_ids (N, K+Q)) of episode ``episode_index``: row n is label n's class; its
        first K image ids are support, the rest query. Ids index ``source_dataset.class_names`` / ``.images``."""
        class_key, image_key = self._key(episode_index, 0), self._key(episode_index, 1)
        # N distinct classes; top_k of i.i.d. uniforms also orders them randomly -> random relabelling.
        class_scores = tf.random.stateless_uniform([self._num_classes], seed=class_key)
        class_ids = tf.math.top_k(class_scores, k=self.n_way, sorted=True).indices
        # K+Q distinct images per class: top_k of uniforms, positions beyond the class size masked out.
        sizes = tf.gather(self._sizes, class_ids)
        scores = tf.random.stateless_uniform([self.n_way, self._max_size], seed=image_key)
        valid = tf.range(self._max_size, dtype=tf.int64)[None, :] < sizes[:, None]
        scores = tf.where(valid, scores, -1.0)
        local = tf.math.top_k(scores, k=self.k_shot + self.q_query, sorted=True).indices
        image_ids = tf.gather(self._starts, class_ids)[:, None] + tf.cast(local, tf.int64)
        return class_ids, image_ids

    def _key(self, episode_index, stream):
        """The stateless seed (s, 2e + stream) of episode e: stream 0 draws its classes, 1 its images."""
        return tf.stack([tf.constant(self.seed, tf.int64), 2 * tf.cast(episode_index, tf.int64) + stream])

    def episode(self, episode_index) -> dict[str, tf.Tensor]:
        """Episode ``episode_index`` without a batch axis: support (N*K, H, W, C), query (N*Q, H, W, C); its images
        augmented by ``augment`` (`keras_metalstm.augmentation`), if given."""
        return _to_float(self._episode_uint8(episode_index))

    def _episode_uint8(self, episode_index) -> dict[str, tf.Tensor]:
        n, k, q = self.n_way, self.k_shot, self.q_query
        _, image_ids = self.indices(episode_index)
        images = tf.gather(self._images, image_ids)  # (N, K+Q, H, W, C) uint8
        if self.augment is not None:
            # A key of its own, derived from the images' key: the episode's classes and images stay the same.
            key = tf.random.experimental.stateless_fold_in(self._key(episode_index, 1), 1)
            flat = tf.reshape(images, (n * (k + q), *self.image_shape))
            images = tf.reshape(self.augment(flat, key), (n, k + q, *self.image_shape))
        return {
            "support_images": tf.reshape(images[:, :k], (n * k, *self.image_shape)),
            "support_labels": self._support_labels,
            "query_images": tf.reshape(images[:, k:], (n * q, *self.image_shape)),
            "query_labels": self._query_labels,
        }

    def dataset(
        self, batch_size: int = 1, start_episode: int = 0, num_episodes: int | None = None
    ) -> tf.data.Dataset:
        """Batches of ``batch_size`` episodes: episodes start_episode, start_episode+1, ... (forever if
        ``num_episodes`` is None, else ``num_episodes`` of them, a multiple of ``batch_size``)."""
        batch_size, start_episode = _count("batch_size", batch_size), _count("start_episode", start_episode)
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1 (the batch axis is always kept), got {batch_size}")
        if start_episode < 0:
            raise DataError(f"start_episode must be >= 0, got {start_episode}")
        if num_episodes is None:
            indices = tf.data.Dataset.counter(start=start_episode)
        else:
            num_episodes = _count("num_episodes", num_episodes)
            if num_episodes < 1 or num_episodes % batch_size:
                raise DataError(
                    f"num_episodes ({num_episodes}) must be a positive multiple of batch_size "
                    f"({batch_size}) so every batch is full (static shapes)"
                )
            indices = tf.data.Dataset.range(start_episode, start_episode + num_episodes)
        return self.batches(indices, batch_size)

    def batches(self, episode_indices: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
        """Batches of ``batch_size`` episodes, the episodes of ``episode_indices`` (a dataset of int64 episode
        indices) in order; a last, partial batch is dropped. Every episode pipeline of the package is this one:
        `dataset` above, and `keras_metalstm.distribute.distributed_episodes` with each replica's indices."""
        # Gather uint8 episodes, batch them, then convert the whole batch to float (4x less copying).
        return without_autotune_thread(
            episode_indices.map(self._episode_uint8, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .batch(batch_size, drop_remainder=True)
            .map(_to_float, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .prefetch(tf.data.AUTOTUNE)
        )


def episode_dataset(
    dataset: ClassIndexedDataset,
    n_way: int,
    k_shot: int,
    q_query: int,
    *,
    batch_size: int = 1,
    seed: int = 0,
    start_episode: int = 0,
    num_episodes: int | None = None,
    augment: Augmentation | None = None,
) -> tf.data.Dataset:
    """A tf.data pipeline of batches of N-way K-shot Q-query episodes from ``dataset``; see the module docstring.

    Same ``seed`` -> same episodes; ``start_episode=i`` resumes the stream at episode i exactly. ``augment``
    (`keras_metalstm.augmentation`) augments the episodes' images, still as a function of (seed, episode).
    """
    return EpisodeSampler(dataset, n_way, k_shot, q_query, seed, augment).dataset(
        batch_size, start_episode, num_episodes
    )


def _to_float(episode: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """uint8 images -> float32 in [0, 1]; labels unchanged."""
    out = dict(episode)
    for key in ("support_images", "query_images"):
        out[key] = tf.cast(episode[key], tf.float32) * (1.0 / 255.0)
    return out


def _count(name: str, value) -> int:
    """A whole number of ways, shots, queries or episodes; int() would quietly turn 1.5 shots into 1."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise DataError(f"{name} must be a whole number, got {value!r}; pass an int such as {name}=5") from None


def _check_episode_size(dataset: ClassIndexedDataset, n_way, k_shot, q_query) -> tuple[int, int, int]:
    if not isinstance(dataset, ClassIndexedDataset):
        splits = hasattr(dataset, "train") and hasattr(dataset, "test")
        raise DataError(
            f"episodes are drawn from one split, a ClassIndexedDataset, got {type(dataset).__name__}"
            + (": pass splits.train, splits.val or splits.test" if splits else "")
        )
    n, k, q = _count("n_way", n_way), _count("k_shot", k_shot), _count("q_query", q_query)
    if n < 1 or k < 1 or q < 1:
        raise DataError(f"episodes need n_way >= 1, k_shot >= 1 and q_query >= 1, got N={n}, K={k}, Q={q}")
    if n > dataset.num_classes:
        raise DataError(
            f"{n}-way episodes need at least {n} classes but {dataset.name} has "
            f"{dataset.num_classes}; lower n_way or give this split more classes"
        )
    sizes = dataset.class_sizes
    short = np.flatnonzero(sizes < k + q)
    if len(short):
        i = short[0]
        others = f" ({len(short) - 1} other class(es) too)" if len(short) > 1 else ""
        raise DataError(
            f"class {dataset.class_names[i]!r} of {dataset.name} has {sizes[i]} images but {k}-shot episodes "
            f"with {q} queries need K+Q = {k + q} distinct images per class{others}: give every class at least "
            f"{k + q} images, lower the queries (--query) or, for a new run, the shots (--k-shot), or leave the "
            f"smaller classes out (a new run: metalstm train --drop-small-classes; dataset.with_min_images({k + q}) "
            "in the library)"
        )
    return n, k, q
