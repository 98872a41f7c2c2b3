"""A meta-batch's meta-gradient as the mean of its episodes' own, computed one episode at a time in a compiled loop.

`MetaLearner.meta_gradients` takes this form under XLA for a meta-batch whose episodes run one after the other
(`episode_batching="per_episode"`, the default on a CPU). XLA runs a loop's iterations one at a time, so the inner
loop's per-episode `tf.map_fn`s gain nothing there, while differentiating the whole meta-batch at once makes XLA
stack every episode's saved activations inside the inner loop and keep all of them until the backward pass. One
episode at a time keeps one episode's: 28x28 1-shot with B = 8 on a 2-core CPU, 288 -> 189 ms per episode and a
peak of 2.2 -> 1.3 GB (`python benchmarks/meta_step.py --quick --meta-batch 8`). Outside XLA the `tf.map_fn`'s
iterations run side by side, which the plain step gains from, so it differentiates the whole meta-batch.
"""

import tensorflow as tf


def mean_over_episodes(episode_meta_gradients, episodes, episode_count, variables, dtype):
    """The mean over the `episode_count` stacked `episodes` of `episode_meta_gradients(episode)`, which returns
    (loss, accuracy, gradients of `variables`) for a batch of one episode: each episode's forward and backward
    pass in turn, in a `tf.while_loop`. `dtype` is the loss's and the accuracy's."""

    def add_episode(index, loss, accuracy, gradients):
        episode = {key: tf.gather(value, [index]) for key, value in episodes.items()}
        episode_loss, episode_accuracy, episode_gradients = episode_meta_gradients(episode)
        gradients = [total + gradient for total, gradient in zip(gradients, episode_gradients, strict=True)]
        return index + 1, loss + episode_loss, accuracy + episode_accuracy, gradients

    zeros = [tf.zeros_like(variable.value) for variable in variables]
    _, loss, accuracy, gradients = tf.while_loop(
        lambda index, *_: index < episode_count,
        add_episode,
        (0, tf.zeros((), dtype), tf.zeros((), dtype), zeros),
        maximum_iterations=episode_count,
    )
    return loss / episode_count, accuracy / episode_count, [gradient / episode_count for gradient in gradients]
