"""`MetaLearner.adapt` computes the adaptation the adapt-in-serving SavedModel computes: the same loop on stock ops,
traced for a support set of any size. TensorFlow's graph optimizer specialises a function to its static shapes,
and on oneDNN a learner with swish adapted otherwise when traced for its 5 images; through the kinks of max
pooling a trained meta-learner's logits came out 0.14 apart."""

import keras
import numpy as np
import tensorflow as tf

import keras_metalstm as km
from keras_metalstm.data import load_dataset
from keras_metalstm.export.savedmodel import AdaptInServingModule
from keras_metalstm.ops import fused_kernels

SHAPE = (28, 28, 1)
N_WAY = 5


def swish_learner():
    keras.utils.set_random_seed(3)
    images = keras.Input(SHAPE)
    features = images
    for _ in range(2):
        features = keras.layers.Conv2D(4, 3, padding="same")(features)
        features = keras.layers.BatchNormalization()(features)
        features = keras.layers.Activation("swish")(features)
        features = keras.layers.MaxPooling2D(2)(features)
    return keras.Model(images, keras.layers.Dense(N_WAY)(keras.layers.Flatten()(features)))


def support_and_queries():
    split = load_dataset("fontglot").test
    names = split.class_names[:N_WAY]
    support = np.concatenate([split[name][:1] for name in names]).astype(np.float32) / 255
    queries = np.concatenate([split[name][1:11] for name in names]).astype(np.float32) / 255
    return support, np.arange(N_WAY, dtype=np.int32), queries


def test_adapt_gives_the_adapt_in_serving_savedmodels_theta_and_logits():
    meta = km.MetaLearner(swish_learner(), inner_steps=6)
    support, labels, queries = support_and_queries()
    adapted = meta.adapt(support, labels)

    # The SavedModel's signature takes support sets of any size: its loop, traced so, on the same stock ops.
    @tf.function(input_signature=[tf.TensorSpec([None, *SHAPE], tf.float32), tf.TensorSpec([None], tf.int32)])
    def served_theta(images, image_labels):
        with fused_kernels.disabled():
            theta, _ = meta.inner_loop(images[tf.newaxis], image_labels[tf.newaxis])
        return theta[0]

    expected = tf.split(served_theta(support, labels), [int(np.prod(v.shape)) for v in adapted.trainable_weights])
    for weight, value in zip(adapted.trainable_weights, expected, strict=True):
        np.testing.assert_array_equal(weight.numpy().ravel(), value.numpy(), err_msg=weight.path)
    served = AdaptInServingModule(meta).adapt_and_predict(support, labels, queries)["logits"].numpy()
    np.testing.assert_allclose(adapted(queries).numpy(), served, rtol=0, atol=1e-6)
