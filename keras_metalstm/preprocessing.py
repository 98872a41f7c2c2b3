"""Coordinate-wise preprocessing of gradients and losses (Andrychowicz et al. 2016): the
meta-learner's inputs.

Each value x becomes two numbers: (log|x| / p, sign x) when |x| > exp(-p), else (-1, exp(p) * x). The log
term carries the magnitude on a scale the LSTM can read, the second term the sign (or, for tiny values, a
linear copy), so gradients spanning many orders of magnitude land in a small, bounded input range.
"""

import math

import tensorflow as tf


def preprocess(values, p=10.0, axis=-1):
    """Maps values of shape (...,) to preprocessed features of shape (..., 2) (the new axis at `axis`).

    Finite for every finite input, 0 and tiny values included, and with finite derivatives everywhere (the
    second-order meta-gradient differentiates through it): the log is taken of max(|x|, exp(-p)), never of 0.
    """
    values = tf.convert_to_tensor(values)
    threshold = math.exp(-p)
    magnitude = tf.abs(values)
    is_large = magnitude > threshold
    safe_log = tf.math.log(tf.maximum(magnitude, threshold)) / p
    log_feature = tf.where(is_large, safe_log, -tf.ones_like(values))
    sign_feature = tf.where(is_large, tf.sign(values), values * math.exp(p))
    return tf.stack([log_feature, sign_feature], axis=axis)
