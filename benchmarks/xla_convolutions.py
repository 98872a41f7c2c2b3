"""The learner's convolutions one at a time, as the plain step runs them (TensorFlow's oneDNN kernels) and as XLA
runs them on a CPU (the forms of keras_metalstm.xla_ops): how much of XLA's gap to the plain step at a setting is
its convolution kernels alone.

    python benchmarks/xla_convolutions.py                                  # 84x84x3 5-way 1-shot, T = 12
    python benchmarks/xla_convolutions.py --setting "28x28x1 5-shot T=8"   # any setting of meta_step.py

For each conv4 layer (3x3, 32 filters, 'same') and for the support batch and the 75-image query batch it prints the
median ms of the forward convolution, the input gradient and the filter gradient, each compiled alone (eight calls
to a compiled function, so that the call's own cost hardly counts), then the sum over one training step: T support
passes and one query pass, each a forward convolution and a filter gradient per layer and an input gradient for
every layer but the first (the images need none; the meta-gradient is first order, so the support passes are not
differentiated again).
"""

import argparse

from meta_step import SETTINGS, layer_shapes, median_ms

from keras_metalstm.cpu_kernels import prefer_onednn

PARTS = ("forward", "input gradient", "filter gradient")
REPEATS = 8  # calls of a part per timed function


def convolution_part(part, images, kernel, upstream, xla):
    """A function computing one part of a 'same' 3x3 convolution of `images` with `kernel`: on TensorFlow's kernels,
    or with `xla`, compiled by XLA in the CPU forms the library traces its XLA steps with."""
    import tensorflow as tf

    from keras_metalstm import xla_ops

    def convolve(inputs):
        if xla:
            return xla_ops.conv2d(inputs, kernel, ((1, 1), (1, 1)))
        return tf.nn.conv2d(inputs, kernel, strides=1, padding="SAME")

    def once(scale):
        scaled_images = images * scale
        if part == "forward":
            return convolve(scaled_images)
        with tf.GradientTape() as tape:
            tape.watch([scaled_images, kernel])
            loss = tf.reduce_sum(convolve(scaled_images) * (upstream * scale))
        # Only the asked-for gradient is returned, so the other one and the forward convolution are pruned.
        return tape.gradient(loss, scaled_images if part == "input gradient" else kernel)

    def compute():
        # Several calls per function so that the call's own cost, a fixed ~0.2 ms, does not swamp the smaller
        # parts; their inputs are scaled apart (the input gradient depends on the upstream gradient and the kernel
        # only), so that no call is merged with another. The results are returned whole: a sum over them would
        # time XLA's CPU reductions too, which are slower than TensorFlow's (benchmarks/README.md).
        return [once(1.0 + 1e-3 * index) for index in range(REPEATS)]

    def traced():
        if not xla:
            return compute()
        with xla_ops.cpu_forms():
            return compute()

    return tf.function(traced, jit_compile=xla)


def measure(setting_name, steps, filters=32):
    """{(batch, layer, part): (oneDNN ms, XLA ms)} for the setting's support and query batches."""
    import numpy as np
    import tensorflow as tf

    setting = SETTINGS[setting_name]
    rng = np.random.default_rng(0)
    timings = {}
    for batch in (5 * setting["k_shot"], 75):
        for layer, (height, width, channels) in enumerate(layer_shapes(setting["image_shape"], filters)):
            images = tf.constant(rng.standard_normal((batch, height, width, channels), dtype=np.float32))
            kernel = tf.constant(rng.standard_normal((3, 3, channels, filters), dtype=np.float32))
            upstream = tf.constant(rng.standard_normal((batch, height, width, filters), dtype=np.float32))
            for part in PARTS:
                ms = []
                for xla in (False, True):
                    function = convolution_part(part, images, kernel, upstream, xla)
                    function()
                    # A CPU function call returns when its results are computed (TensorFlow's synchronous default).
                    ms.append(median_ms(function, steps) / REPEATS)
                timings[batch, layer, part] = tuple(ms)
    return timings


def per_step_totals(timings, inner_steps, support_batch):
    """(oneDNN ms, XLA ms) of one training step's convolutions: `inner_steps` support passes and one query pass,
    no input gradient for the first layer."""
    totals = [0.0, 0.0]
    for (batch, layer, part), ms in timings.items():
        if part == "input gradient" and layer == 0:
            continue
        repeats = inner_steps if batch == support_batch else 1
        for index in (0, 1):
            totals[index] += repeats * ms[index]
    return tuple(totals)


def main():
    prefer_onednn()  # the CPU kernels `metalstm` runs on
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=list(SETTINGS), default="84x84x3 1-shot T=12", help="the shapes")
    parser.add_argument("--steps", type=int, default=15, help="timed calls per part (median)")
    args = parser.parse_args()
    setting = SETTINGS[args.setting]
    timings = measure(args.setting, args.steps)
    print(f"{args.setting}: median ms of each convolution part compiled alone, oneDNN (plain step) / XLA CPU forms")
    for (batch, layer, part), (onednn, xla) in timings.items():
        ratio = xla / onednn
        print(f"  {batch:3d} images, layer {layer + 1}, {part:<16} {onednn:8.2f} {xla:8.2f}   XLA/oneDNN {ratio:5.2f}")
    support_batch = 5 * setting["k_shot"]
    onednn, xla = per_step_totals(timings, setting["inner_steps"], support_batch)
    print(
        f"One training step's convolutions ({setting['inner_steps']} support passes of {support_batch} images, one "
        f"query pass of 75): oneDNN {onednn:.0f} ms, XLA {xla:.0f} ms (XLA/oneDNN {xla / onednn:.2f}, "
        f"{xla - onednn:+.0f} ms)"
    )


if __name__ == "__main__":
    main()
