"""How far the float32 meta-gradient is from a float64 one with the same weights and episode, by learner.

The float32 step is what CPU training runs (the fused coordinate-LSTM kernel, batch normalisation on fused ops);
the float64 one runs stock ops. conv4 is compared with itself made smooth step by step: average pooling in place
of max pooling, then GELU in place of ReLU as well. A last row compares float64 with float64 whose weights are
multiplied by (1 + 1e-7 noise): how much the meta-gradient moves when its inputs move by float32 rounding.

    python benchmarks/precision.py                       # 28x28x1 5-way 5-shot T=8 and 1-shot T=12, fontglot
    python benchmarks/precision.py --seeds 3 4 5 --k-shot 5 --inner-steps 8
"""

import argparse
import time

VARIANTS = ("conv4", "average pooling", "average pooling + GELU", "float64, weights x (1 + 1e-7 noise)")


def learner(variant):
    import keras

    import keras_metalstm as km

    model = km.learners.conv4(input_shape=(28, 28, 1), num_classes=5)
    if variant in ("conv4", VARIANTS[-1]):
        return model
    config = model.get_config()
    for layer in config["layers"]:
        if layer["class_name"] == "MaxPooling2D":
            layer["class_name"] = "AveragePooling2D"
        if layer["class_name"] == "ReLU" and variant.endswith("GELU"):
            layer["class_name"] = "Activation"
            layer["config"] = {"name": layer["config"]["name"], "activation": "gelu"}
    return keras.Model.from_config(config)


def compare(variant, k_shot, inner_steps, seed):
    """(worst relative error over the meta-gradient's variables, smallest cosine, float32 loss, float64 loss)."""
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_metalstm as km
    from keras_metalstm.data import episode_dataset, load_dataset
    from keras_metalstm.ops import fused_kernels

    episode = next(iter(episode_dataset(load_dataset("fontglot").test, 5, k_shot, 15, seed=seed, num_episodes=1)))
    keras.utils.set_random_seed(0)
    meta = km.MetaLearner(learner(variant), inner_steps=inner_steps)
    weights = meta.get_weights()
    floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        with fused_kernels.disabled():
            reference = km.MetaLearner(learner(variant), inner_steps=inner_steps)
            reference.set_weights([weight.astype(np.float64) for weight in weights])
            double = {key: tf.cast(value, tf.float64) if value.dtype == tf.float32 else value
                      for key, value in episode.items()}
            reference_gradients = tf.function(reference.meta_gradients)
            expected_loss, _, expected = reference_gradients(double)
            if variant == VARIANTS[-1]:
                rng = np.random.default_rng(seed)
                reference.set_weights([weight * (1 + 1e-7 * rng.normal(size=weight.shape)) for weight in
                                       reference.get_weights()])
                loss, _, gradients = reference_gradients(double)
    finally:
        keras.config.set_floatx(floatx)
        keras.config.set_dtype_policy(policy)
    if variant != VARIANTS[-1]:
        with fused_kernels.enabled():
            loss, _, gradients = tf.function(meta.meta_gradients)(episode)
    errors, cosines = [], []
    for ours, exact in zip(gradients, expected, strict=True):
        ours = tf.cast(ours, tf.float64)
        errors.append(float(tf.norm(ours - exact) / tf.norm(exact)))
        cosines.append(float(tf.reduce_sum(ours * exact) / (tf.norm(ours) * tf.norm(exact))))
    return max(errors), min(cosines), float(loss), float(expected_loss)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k-shot", type=int, nargs="+", default=[5, 1])
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[8, 12], help="T, one per --k-shot")
    parser.add_argument("--seeds", type=int, nargs="+", default=[3, 4], help="episodes (fontglot test split)")
    arguments = parser.parse_args()
    if len(arguments.k_shot) != len(arguments.inner_steps):
        parser.error("give one --inner-steps value per --k-shot value")
    started = time.perf_counter()
    print("float32 (as CPU training runs it) against float64, conv4 at 28x28x1, 5-way, 15 queries per class")
    print(f"{'setting':>14} {'learner':>38} {'episode':>8} {'worst rel. error':>17} {'min cosine':>11} "
          f"{'loss f32':>9} {'loss f64':>9}")
    for k_shot, inner_steps in zip(arguments.k_shot, arguments.inner_steps, strict=True):
        for variant in VARIANTS:
            for seed in arguments.seeds:
                error, cosine, loss, expected_loss = compare(variant, k_shot, inner_steps, seed)
                print(f"{f'{k_shot}-shot T={inner_steps}':>14} {variant:>38} {seed:>8} {error:17.1e} {cosine:11.4f} "
                      f"{loss:9.5f} {expected_loss:9.5f}", flush=True)
    print(f"precision: {len(arguments.k_shot) * len(VARIANTS) * len(arguments.seeds)} comparisons in "
          f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
