"""The fused CPU kernels against the same computation in stock TensorFlow ops, in one run.

--kernel coordinate-lstm (the default): one step of the meta-learner's layer 1 (CoordinateLSTM.step_with_readout,
20 units, the cell's readout of h_t) over every coordinate of a learner. --kernel norm-relu-pool: a learner
block's BatchNormalization, ReLU and 2x2 max pooling in a training-mode call, run as the meta-learner runs the
learner (LearnerFunction), on activations of conv4's shapes. Each forward alone and forward + backward (the
gradient of a weighted sum of the outputs with respect to the inputs and the weights, as the meta-learner needs
it), compiled as a tf.function with the kernels (`fused_kernels.enabled()`) and without them. Rounds alternate
the two, so both see the same machine; the ratio stock / kernel is the kernel's gain on this machine, and
comparing ratios from two revisions compares two versions of a kernel on machines of different speed.

    python benchmarks/fused_kernel.py                        # conv4's coordinates at 28x28x1 and 84x84x3
    python benchmarks/fused_kernel.py --coordinates 112000 --episodes 4
    python benchmarks/fused_kernel.py --intra-op-threads 1   # one thread (the kernel's shards run in order)
    python benchmarks/fused_kernel.py --kernel norm-relu-pool   # conv4's block inputs, support and query batches
"""

import argparse
import statistics
import time

from meta_step import median_ms

from keras_metalstm.cpu_kernels import prefer_onednn

UNITS = 20
# conv4 (32 filters, 5-way): 28,485 parameters at 28x28x1, 32,901 at 84x84x3.
DEFAULT_COORDINATES = (28485, 32901)
# The inputs of conv4's first two block tails (images, height, width, channels): a 5-shot support batch and the
# 75-image query batch, at 84x84x3 and 28x28x1.
DEFAULT_BLOCK_SHAPES = ("25x84x84x32", "75x84x84x32", "25x42x42x32", "25x28x28x32", "75x28x28x32")


def build_steps(coordinates, episodes):
    """`compiled_steps` of one coordinate-LSTM step over `coordinates` coordinates of `episodes` episodes."""
    import tensorflow as tf

    from keras_metalstm.layers.coordinate_lstm import CoordinateLSTM

    layer = CoordinateLSTM(UNITS, input_dim=4, shared_input_dim=2)
    generator = tf.random.Generator.from_seed(0)
    inputs = generator.normal((2, episodes, coordinates))
    shared_inputs = generator.normal((2, episodes))
    state = tuple(generator.normal((UNITS, episodes, coordinates)) for _ in range(2))
    readout_kernel = tf.Variable(generator.normal((UNITS, 2)) * 0.1)
    output_weights = [generator.normal((UNITS, episodes, coordinates)) for _ in range(2)]
    output_weights.append(generator.normal((2, episodes, coordinates)))

    def forward():
        hidden, (_, cell), readout = layer.step_with_readout(inputs, state, shared_inputs, readout_kernel)
        return hidden, cell, readout

    def forward_and_backward():
        with tf.GradientTape() as tape:
            tape.watch(state)
            outputs = forward()
            objective = tf.add_n([tf.reduce_sum(o * w) for o, w in zip(outputs, output_weights, strict=True)])
        return tape.gradient(objective, [*state, *layer.trainable_variables, readout_kernel])

    return compiled_steps(forward, forward_and_backward)


def build_block_steps(shape):
    """As `build_steps`, for a BatchNormalization, ReLU and MaxPooling2D(2) on (images, height, width, channels)
    activations, run as the meta-learner runs a learner."""
    import keras
    import tensorflow as tf

    from keras_metalstm.learner_function import LearnerFunction

    images, height, width, channels = shape
    inputs = keras.Input((height, width, channels))
    normalized = keras.layers.BatchNormalization()(inputs)
    block = keras.Model(inputs, keras.layers.MaxPooling2D(2)(keras.layers.ReLU()(normalized)))
    learner = LearnerFunction(block)
    generator = tf.random.Generator.from_seed(0)
    activations = generator.normal(shape)
    output_weights = generator.normal((images, height // 2, width // 2, channels))
    theta, state = learner.initial_theta(), learner.initial_state()

    def forward():
        outputs, _ = learner(theta, state, activations, training=True)
        return (outputs,)

    def forward_and_backward():
        with tf.GradientTape() as tape:
            tape.watch([theta, activations])
            (outputs,) = forward()
            objective = tf.reduce_sum(outputs * output_weights)
        return tape.gradient(objective, [activations, theta])

    return compiled_steps(forward, forward_and_backward)


def compiled_steps(forward, forward_and_backward):
    """{(path, part): tf.function} for path in ("kernel", "stock") and part in ("forward", "forward+backward")."""
    import tensorflow as tf

    from keras_metalstm.ops import fused_kernels

    def compiled(function, path):
        scope = fused_kernels.enabled if path == "kernel" else fused_kernels.disabled

        def traced():
            with scope():
                return function()

        return tf.function(traced)

    steps = {}
    for path in ("kernel", "stock"):
        steps[path, "forward"] = compiled(forward, path)
        steps[path, "forward+backward"] = compiled(forward_and_backward, path)
    return steps


def measure(steps, rounds, calls):
    """{(path, part): median over rounds of the per-round median ms}, the paths alternating within each round."""
    for function in steps.values():
        function()  # trace, and load (or build) the kernel
    per_round = {key: [] for key in steps}
    for _ in range(rounds):
        for key, function in steps.items():
            # Each call waited for: its first output copied to the host.
            per_round[key].append(median_ms(lambda function=function: function()[0].numpy(), calls))
    return {key: statistics.median(times) for key, times in per_round.items()}


def main():
    prefer_onednn()  # the CPU kernels `metalstm` runs on
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", choices=("coordinate-lstm", "norm-relu-pool"), default="coordinate-lstm")
    parser.add_argument("--coordinates", type=int, nargs="+", default=DEFAULT_COORDINATES)
    parser.add_argument(
        "--shapes", nargs="+", default=DEFAULT_BLOCK_SHAPES, help="norm-relu-pool: IMAGESxHEIGHTxWIDTHxCHANNELS"
    )
    parser.add_argument("--episodes", type=int, default=1, help="episodes side by side (the meta-batch)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=30, help="timed calls per path and part in a round")
    parser.add_argument("--intra-op-threads", type=int, default=0, help="0: TensorFlow's choice")
    arguments = parser.parse_args()

    import tensorflow as tf

    if arguments.intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(arguments.intra_op_threads)
    from keras_metalstm.ops import fused_kernels

    if fused_kernels.load() is None:
        raise SystemExit("the fused kernel is unavailable here (see the warning above); nothing to compare")

    started = time.perf_counter()
    rounds = f"median ms of {arguments.rounds} alternating rounds of {arguments.calls} calls"
    if arguments.kernel == "coordinate-lstm":
        episodes = arguments.episodes
        print(f"one coordinate-LSTM step ({UNITS} units, with the cell's readout), {episodes} episode(s), {rounds}")
        sizes = {f"{count:,}": (build_steps, count, episodes) for count in arguments.coordinates}
    else:
        print(f"BatchNormalization, ReLU and MaxPooling2D(2) in a training-mode call, {rounds}")
        sizes = {shape: (build_block_steps, tuple(map(int, shape.split("x")))) for shape in arguments.shapes}
    print(f"{'size':>12} {'part':>17} {'kernel':>8} {'stock':>8} {'stock/kernel':>13}")
    for size, (build, *build_arguments) in sizes.items():
        results = measure(build(*build_arguments), arguments.rounds, arguments.calls)
        for part in ("forward", "forward+backward"):
            kernel, stock = results["kernel", part], results["stock", part]
            print(f"{size:>12} {part:>17} {kernel:8.2f} {stock:8.2f} {stock / kernel:13.2f}")
    print(f"fused_kernel: {len(sizes)} size(s) of {arguments.kernel} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
