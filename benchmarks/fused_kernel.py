"""The fused coordinate-LSTM kernel against the same step in stock TensorFlow ops, in one run.

One step of the meta-learner's layer 1 (CoordinateLSTM.step_with_readout, 20 units, the cell's readout of h_t) over
every coordinate of a learner, forward alone and forward + backward (the gradient of a weighted sum of the outputs
with respect to the state and the weights, as the meta-gradient needs it), each compiled as a tf.function with the
kernel (`fused_coordinate_lstm.enabled()`) and without it. Rounds alternate the two, so both see the same machine;
the ratio stock / kernel is the kernel's gain on this machine, and comparing ratios from two revisions compares
two versions of the kernel on machines of different speed.

    python benchmarks/fused_kernel.py                        # conv4's coordinates at 28x28x1 and 84x84x3
    python benchmarks/fused_kernel.py --coordinates 112000 --episodes 4
    python benchmarks/fused_kernel.py --intra-op-threads 1   # one thread (the kernel's shards run in order)
"""

import argparse
import statistics
import time

from meta_step import median_ms

UNITS = 20
# conv4 (32 filters, 5-way): 28,485 parameters at 28x28x1, 32,901 at 84x84x3.
DEFAULT_COORDINATES = (28485, 32901)


def build_steps(coordinates, episodes):
    """{(path, part): tf.function} for path in ("kernel", "stock") and part in ("forward", "forward+backward")."""
    import tensorflow as tf

    from keras_metalstm.layers.coordinate_lstm import CoordinateLSTM
    from keras_metalstm.ops import fused_coordinate_lstm

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

    def compiled(function, path):
        scope = fused_coordinate_lstm.enabled if path == "kernel" else fused_coordinate_lstm.disabled

        def traced():
            with scope():
                return function()

        return tf.function(traced)

    steps = {}
    for path in ("kernel", "stock"):
        steps[path, "forward"] = compiled(forward, path)
        steps[path, "forward+backward"] = compiled(forward_and_backward, path)
    return steps


def measure(coordinates, episodes, rounds, calls):
    """{(path, part): median over rounds of the per-round median ms}, the paths alternating within each round."""
    steps = build_steps(coordinates, episodes)
    for function in steps.values():
        function()  # trace, and load (or build) the kernel
    per_round = {key: [] for key in steps}
    for _ in range(rounds):
        for key, function in steps.items():
            # Each call waited for: its first output copied to the host.
            per_round[key].append(median_ms(lambda function=function: function()[0].numpy(), calls))
    return {key: statistics.median(times) for key, times in per_round.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coordinates", type=int, nargs="+", default=DEFAULT_COORDINATES)
    parser.add_argument("--episodes", type=int, default=1, help="episodes side by side (the meta-batch)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=30, help="timed calls per path and part in a round")
    parser.add_argument("--intra-op-threads", type=int, default=0, help="0: TensorFlow's choice")
    arguments = parser.parse_args()

    import tensorflow as tf

    if arguments.intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(arguments.intra_op_threads)
    from keras_metalstm.ops import fused_coordinate_lstm

    if fused_coordinate_lstm.load() is None:
        raise SystemExit("the fused kernel is unavailable here (see the warning above); nothing to compare")

    started = time.perf_counter()
    print(
        f"one coordinate-LSTM step ({UNITS} units, with the cell's readout), {arguments.episodes} episode(s), "
        f"median ms of {arguments.rounds} alternating rounds of {arguments.calls} calls"
    )
    print(f"{'coordinates':>12} {'part':>17} {'kernel':>8} {'stock':>8} {'stock/kernel':>13}")
    for coordinates in arguments.coordinates:
        results = measure(coordinates, arguments.episodes, arguments.rounds, arguments.calls)
        for part in ("forward", "forward+backward"):
            kernel, stock = results["kernel", part], results["stock", part]
            print(f"{coordinates:>12,} {part:>17} {kernel:8.2f} {stock:8.2f} {stock / kernel:13.2f}")
    print(f"fused_kernel: {len(arguments.coordinates)} size(s) in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
