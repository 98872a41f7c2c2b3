"""Speed of one meta-training episode (ms): ours with the fused CPU kernel, with stock TensorFlow ops and with
XLA, against a straightforward TensorFlow version and a PyTorch reference port, all measured here.

Each configuration runs in its own process (so peak memory is its own and XLA state does not leak) and
all are measured in one invocation, so the printed ratios compare like with like on this machine:

    python benchmarks/meta_step.py                 # the four standard settings, ours (plain, XLA) and baseline
    python benchmarks/meta_step.py --quick         # 28x28 1-shot only
    python benchmarks/meta_step.py --quick --rounds 5   # a noisy machine: the median of 5 interleaved rounds
    python benchmarks/meta_step.py --settings "84x84x3 1-shot T=12" --rounds 3   # chosen settings only
    python benchmarks/meta_step.py --quick --meta-batch 4   # ms per episode when 4 episodes share a meta-update
    python benchmarks/meta_step.py --compile-scaling  # first-call seconds and graph ops vs T and meta-batch B

--compile-scaling prints, for T = 12, 24 and meta-batches B = 1, 8 (28x28 1-shot), the first-call seconds (trace,
compile and one step) of the training step and of the test-mode step, plain and XLA, the number of ops in the
traced training graph (loop and gradient bodies included), and the steady ms per episode at B = 1, 4, 8 (XLA with
the episodes batched, as MetaLearner does under XLA, and with the per-episode loop): how tracing and compiling
scale with T and B.

"ours" is keras_metalstm's MetaTrainer.train_step as users get it (on a CPU-only machine: the fused
coordinate-LSTM kernel); "stock ops" the same step with the kernel switched off (what runs on GPU/TPU and
under XLA); "ours+xla" with jit_compile. "baseline" is the straightforward TensorFlow version of the same step
(coordinates-first (P, 4) LSTM inputs, the loss copied to every coordinate, per-gate slices along the last
axis), sharing the learner code. "pytorch" is benchmarks/pytorch_reference.py, a PyTorch port of the
same step re-measured in the same run (only when PyTorch is installed; it is not a dependency). The requirement is
pytorch / ours >= 2. TensorFlow runs on the CPU kernels `metalstm` chooses (keras_metalstm.cpu_kernels: oneDNN's
on an x86 CPU unless TF_ENABLE_ONEDNN_OPTS is set); the first line after the title names them.

Under each setting a second line puts "ours" against the convolution FLOP floor: the learner's convolutions in one
episode (T support passes and one query pass; forward, filter gradient and, after the first layer, input gradient;
a multiply-add is two FLOPs) at the rate of a large float32 matrix product measured in the same run. No step can
be faster than its convolutions at the machine's matmul rate; the goal at 84x84 is ours / floor <= 2. The "step
floor" adds the coordinate LSTM's matrix products at each inner step (forward and backward, over every learner
coordinate), about half of the step's arithmetic at 28x28, where the convolutions are small.
"""

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from keras_metalstm.cpu_kernels import ONEDNN_VARIABLE, kernels_description, onednn_enabled, prefer_onednn

SETTINGS = {
    "28x28x1 1-shot T=12": dict(image_shape=(28, 28, 1), k_shot=1, inner_steps=12),
    "28x28x1 5-shot T=8": dict(image_shape=(28, 28, 1), k_shot=5, inner_steps=8),
    "84x84x3 1-shot T=12": dict(image_shape=(84, 84, 3), k_shot=1, inner_steps=12),
    "84x84x3 5-shot T=8": dict(image_shape=(84, 84, 3), k_shot=5, inner_steps=8),
}
SCALING_SETTING = "28x28x1 1-shot T=12"  # --compile-scaling replaces its T
VARIANTS = ("ours", "stock ops", "ours+xla", "baseline")
N_WAY, QUERY_PER_CLASS = 5, 15
MATMUL_SIZE = 4096  # large enough for oneDNN's matmul to reach its peak rate (2048: 2 % slower on a 2-core Zen 4)


def median_ms(call, calls):
    """Median ms of `calls` calls of `call`, which must wait for its result (a value copied to the host)."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def build(setting, meta_batch=1, episode_batching="auto", filters=32):
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_metalstm as km

    keras.utils.set_random_seed(0)
    n_way, query = N_WAY, QUERY_PER_CLASS
    learner = km.learners.conv4(input_shape=setting["image_shape"], num_classes=n_way, filters=filters)
    meta = km.MetaLearner(learner, inner_steps=setting["inner_steps"], episode_batching=episode_batching)
    rng = np.random.default_rng(0)
    k_shot = setting["k_shot"]
    batch = int(meta_batch)
    shape = setting["image_shape"]
    episodes = {
        "support_images": tf.constant(rng.random((batch, n_way * k_shot, *shape), dtype=np.float32)),
        "support_labels": tf.constant(np.tile(np.repeat(np.arange(n_way), k_shot), (batch, 1)).astype(np.int32)),
        "query_images": tf.constant(rng.random((batch, n_way * query, *shape), dtype=np.float32)),
        "query_labels": tf.constant(np.tile(np.repeat(np.arange(n_way), query), (batch, 1)).astype(np.int32)),
    }
    return meta, episodes


def layer_shapes(image_shape, filters=32):
    """(height, width, channels) of each convolution's input in the library's conv4 for `image_shape`."""
    import keras

    import keras_metalstm as km

    learner = km.learners.conv4(input_shape=image_shape, filters=filters)
    return [tuple(layer.input.shape[1:]) for layer in learner.layers if isinstance(layer, keras.layers.Conv2D)]


def convolution_gflop(setting, filters=32):
    """GFLOP of conv4's 3x3 'same' convolutions in one meta-training episode: T support passes and one query
    pass, each a forward convolution and a filter gradient per layer and an input gradient for every layer but
    the first (the images need none; the meta-gradient is first order, so the support passes are not
    differentiated again). All three cost the forward's multiply-adds, two FLOPs each."""
    images = setting["inner_steps"] * N_WAY * setting["k_shot"] + N_WAY * QUERY_PER_CLASS
    per_image = sum(
        2 * height * width * 9 * channels * filters * (2 if layer == 0 else 3)
        for layer, (height, width, channels) in enumerate(layer_shapes(setting["image_shape"], filters))
    )
    return images * per_image / 1e9


def matmul_gflops(repeats=5):
    """GFLOP/s of a MATMUL_SIZE-square float32 matrix product on TensorFlow's CPU kernels, the best of `repeats`
    calls: the rate the machine reaches on the densest work a convolution can become."""
    import tensorflow as tf

    left, right = (tf.random.stateless_normal((MATMUL_SIZE, MATMUL_SIZE), seed=(seed, 0)) for seed in (1, 2))
    product = tf.function(lambda: tf.linalg.matmul(left, right))
    product().numpy()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        product().numpy()
        seconds.append(time.perf_counter() - start)
    return 2 * MATMUL_SIZE**3 / min(seconds) / 1e9


def coordinate_lstm_gflop(setting, filters=32):
    """GFLOP of the coordinate LSTM's matrix products in one meta-training episode, a lower bound: at each of the T
    inner steps and for each learner coordinate, forward the gates' product ([features; h] by 4 x units) and the
    meta-learner cell's readout of h; backward the kernel's gradient (as many multiply-adds as the gates'
    product), the gradient of h through the gates (the features are constants of a first-order meta-gradient) and
    through the readout, and the readout kernel's gradient. Activations, elementwise work and the fused kernel's
    recomputation of the gates are left out. Sizes are read off conv4's MetaLearner."""
    import keras_metalstm as km

    learner = km.learners.conv4(input_shape=setting["image_shape"], num_classes=N_WAY, filters=filters)
    meta = km.MetaLearner(learner, inner_steps=setting["inner_steps"])
    lstm = meta.coordinate_lstm
    units, features = lstm.units, lstm.input_dim - lstm.shared_input_dim
    readouts = meta.cell.hidden_kernel().shape[1]
    gate_product = (features + units) * 4 * units
    multiply_adds = 2 * gate_product + units * 4 * units + 3 * units * readouts
    return 2 * multiply_adds * meta.num_parameters * setting["inner_steps"] / 1e9


def floor_summary(floor, ours_ms):
    """The line that puts `ours_ms` against the floors of `floor` ({"convolution_gflop", "lstm_gflop": the coordinate
    LSTM's products, "gflops": the matmul rate}): the convolutions alone, and with the LSTM (the step)."""
    convolutions_ms = floor["convolution_gflop"] / floor["gflops"] * 1000
    step_ms = convolutions_ms + floor["lstm_gflop"] / floor["gflops"] * 1000
    return (f"convolutions {floor['convolution_gflop']:.1f} GFLOP + coordinate LSTM {floor['lstm_gflop']:.1f}, at the "
            f"{floor['gflops']:.0f} GFLOP/s matmul rate {convolutions_ms:.0f} + {step_ms - convolutions_ms:.0f} ms: "
            f"ours / floor {ours_ms / convolutions_ms:.2f}, ours / step floor {ours_ms / step_ms:.2f}")


def baseline_meta_gradients(meta, episodes):
    """The same first-order meta-gradient, written the straightforward way: coordinates first, one episode
    after the other, mean query loss over the meta-batch."""
    import tensorflow as tf

    batch = episodes["support_images"].shape[0]
    with tf.GradientTape() as tape:
        query_loss = tf.add_n(
            [baseline_query_loss(meta, {key: value[index] for key, value in episodes.items()}) for index in range(batch)]
        ) / batch
    return query_loss, tape.gradient(query_loss, meta.trainable_variables)


def baseline_query_loss(meta, episode):
    import tensorflow as tf

    from keras_metalstm.learner_function import cross_entropy
    from keras_metalstm.preprocessing import preprocess

    learner = meta._learner_function
    lstm, cell, units = meta.coordinate_lstm, meta.cell, meta.hidden_units
    support, labels = episode["support_images"], episode["support_labels"]
    theta = tf.identity(meta.theta0)
    coordinates = theta.shape[0]
    hidden = cell_state = tf.zeros((coordinates, units))
    f_logit = i_logit = tf.zeros((coordinates,))
    state = learner.initial_state()
    for _ in range(meta.inner_steps):
        loss, gradient, state = learner.loss_and_gradient(tf.stop_gradient(theta), state, support, labels)
        inputs = tf.concat([tf.broadcast_to(preprocess(loss)[None], (coordinates, 2)), preprocess(gradient)], axis=1)
        gates = inputs @ lstm.kernel + hidden @ lstm.recurrent_kernel + lstm.bias
        gate_i, gate_f, gate_c, gate_o = tf.split(gates, 4, axis=1)
        cell_state = tf.sigmoid(gate_f) * cell_state + tf.sigmoid(gate_i) * tf.tanh(gate_c)
        hidden = tf.sigmoid(gate_o) * tf.tanh(cell_state)
        f_logit = tf.concat([hidden, theta[:, None], f_logit[:, None]], 1) @ cell.W_f + cell.b_f
        i_logit = tf.concat([hidden, theta[:, None], i_logit[:, None]], 1) @ cell.W_i + cell.b_i
        f_logit, i_logit = f_logit[:, 0], i_logit[:, 0]
        theta = tf.sigmoid(f_logit) * theta - tf.sigmoid(i_logit) * gradient
    logits, _ = learner(theta, state, episode["query_images"], training=True)
    return cross_entropy(episode["query_labels"], logits)


def measure(setting_name, variant, steps, meta_batch=1):
    import contextlib

    from keras_metalstm.ops import fused_kernels

    # The kernel choice is made while the step is traced, on its first call below.
    with fused_kernels.disabled() if variant == "stock ops" else contextlib.nullcontext():
        result = _measure(setting_name, variant, steps, meta_batch)
    result["fused_kernel"] = variant == "ours" and fused_kernels.load() is not None
    return result


def _measure(setting_name, variant, steps, meta_batch):
    import tensorflow as tf

    import keras_metalstm as km

    meta, episodes = build(SETTINGS[setting_name], meta_batch)
    if variant == "baseline":
        optimizer = km.meta_optimizer()

        @tf.function
        def step(batch):
            loss, gradients = baseline_meta_gradients(meta, batch)
            optimizer.apply(gradients, meta.trainable_variables)
            return {"loss": loss}
    else:
        step = km.MetaTrainer(meta, jit_compile=variant == "ours+xla").train_step
    start = time.perf_counter()
    float(step(episodes)["loss"])
    compile_seconds = time.perf_counter() - start
    for _ in range(2):
        float(step(episodes)["loss"])
    return {
        "ms": median_ms(lambda: float(step(episodes)["loss"]), steps) / meta_batch,
        "compile_s": compile_seconds,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "parameters": meta.num_parameters,
    }


def graph_op_count(concrete_function):
    """Ops in a traced function's graph, the bodies of the functions it calls (loops, XLA clusters,
    gradients) included: what tracing builds and XLA compiles."""
    graph = concrete_function.graph.as_graph_def()
    return len(graph.node) + sum(len(function.node_def) for function in graph.library.function)


def test_mode_step(meta, jit_compile):
    """The test-mode (evaluation) step: every episode's query loss and accuracy after the inner loop."""
    import tensorflow as tf

    from keras_metalstm.xla_ops import traced_for_xla

    if not jit_compile:
        return tf.function(lambda episodes: meta.episode_metrics(episodes, "test"))

    def for_xla(episodes):
        with traced_for_xla():
            return meta.episode_metrics(episodes, "test")

    return tf.function(for_xla, jit_compile=True)


def seconds_of_first_call(function, episodes):
    import tensorflow as tf

    start = time.perf_counter()
    tf.nest.flatten(function(episodes))[0].numpy()  # waits for the step to finish
    return time.perf_counter() - start


# --compile-scaling's variants: the plain step; XLA with the episodes of a meta-batch batched (one learner
# evaluation per layer for all of them: episode_batching="batched", what "auto" picks on a GPU/TPU); XLA with the
# per-episode loop ("auto" on a CPU).
COMPILE_VARIANTS = ("plain", "xla", "xla-per-episode")


def measure_compile_scaling(inner_steps, meta_batch, variant, steps):
    """First-call seconds of the training and test-mode steps, the training graph's op count and (steps > 0)
    the steady ms per episode of the training step, for one T, B and variant (COMPILE_VARIANTS)."""
    import keras_metalstm as km

    batching = {"plain": "auto", "xla": "batched", "xla-per-episode": "per_episode"}[variant]
    meta, episodes = build(dict(SETTINGS[SCALING_SETTING], inner_steps=inner_steps), meta_batch, batching)
    jit_compile = variant != "plain"
    trainer = km.MetaTrainer(meta, jit_compile=jit_compile)
    result = {"train_first_s": seconds_of_first_call(trainer.train_step, episodes)}
    result["train_ops"] = graph_op_count(trainer._train_function.get_concrete_function(episodes))
    if steps:
        for _ in range(2):
            float(trainer.train_step(episodes)["loss"])
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            float(trainer.train_step(episodes)["loss"])
            times.append((time.perf_counter() - start) * 1000)
        result["train_ms_per_episode"] = statistics.median(times) / meta_batch
    result["test_first_s"] = seconds_of_first_call(test_mode_step(meta, jit_compile), episodes)
    return result


def compile_scaling_rows(inner_steps_list, meta_batches, steady_meta_batches, steps):
    """The children to run, one printed line each: (T, B, steady steps, variants) for every T and B, plus the
    steady-state B at the first T. Every line runs plain and XLA; steady times are measured at the first T only,
    where XLA with the per-episode loop runs too (for the steady time it gives up by not batching)."""
    first = inner_steps_list[0]
    pairs = [(t, b) for t in inner_steps_list for b in meta_batches]
    pairs += [(first, b) for b in steady_meta_batches if (first, b) not in pairs]
    rows = []
    for t, b in pairs:
        steady = t == first and b in steady_meta_batches
        rows.append((t, b, steps if steady else 0, COMPILE_VARIANTS if steady else COMPILE_VARIANTS[:2]))
    return rows


def compile_scaling(args):
    rows = compile_scaling_rows(args.scaling_inner_steps, args.scaling_meta_batches, args.scaling_steady_meta_batches,
                                args.steps)
    print(f"28x28x1 5-way 1-shot, conv4 (32 filters), 15 queries/class, {os.cpu_count()} CPU cores; each cell in its "
          "own process.\nFirst call = trace + compile + one step, seconds; ops = training graph with function "
          "bodies; steady = median ms per episode over " f"{args.steps} meta-updates; xla batches the episodes, "
          "xla per-ep runs them one after the other (what --xla does on a CPU); xla/plain = xla per-ep / plain.")
    print(f"{'T':>4}{'B':>4}{'train s':>9}{'train s xla':>12}{'test s':>8}{'test s xla':>11}{'ops':>8}{'ops xla':>9}"
          f"{'steady ms/ep':>13}{'steady xla':>11}{'xla per-ep':>11}{'xla/plain':>10}")
    for inner_steps, meta_batch, steps, variants in rows:
        results = {
            variant: run_child(
                ["--child-compile", str(inner_steps), str(meta_batch), variant, "--steps", str(steps)]
            )
            for variant in variants
        }
        plain, compiled = results["plain"], results["xla"]
        steady = ""
        if steps:
            steady = (f"{plain['train_ms_per_episode']:13.1f}{compiled['train_ms_per_episode']:11.1f}"
                      f"{results['xla-per-episode']['train_ms_per_episode']:11.1f}"
                      f"{results['xla-per-episode']['train_ms_per_episode'] / plain['train_ms_per_episode']:10.2f}")
        print(f"{inner_steps:4d}{meta_batch:4d}{plain['train_first_s']:9.1f}{compiled['train_first_s']:12.1f}"
              f"{plain['test_first_s']:8.1f}{compiled['test_first_s']:11.1f}{plain['train_ops']:8d}"
              f"{compiled['train_ops']:9d}{steady}", flush=True)


def run_child(arguments, script=__file__):
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    output = subprocess.run(
        [sys.executable, script, *arguments], capture_output=True, text=True, env=environment, check=False
    )
    if output.returncode != 0:
        raise SystemExit(f"benchmark child {arguments} failed:\n{output.stderr[-3000:]}")
    return json.loads(output.stdout.strip().splitlines()[-1])


def measure_round(name, args, with_pytorch):
    """Every column of one setting once, each in its own process, and its floors (the convolutions' and the
    coordinate LSTM's counts and the machine's matmul rate, in a child too: this process stays without TensorFlow)."""
    results = {
        variant: run_child(["--child", name, variant, "--steps", str(args.steps), "--meta-batch", str(args.meta_batch)])
        for variant in VARIANTS
    }
    results["floor"] = run_child(["--child-floor", name])
    if with_pytorch:
        setting = SETTINGS[name]
        shape = [str(size) for size in setting["image_shape"]]
        results["pytorch"] = run_child(
            ["--steps", str(args.steps), "--image-shape", *shape, "--k-shot", str(setting["k_shot"]),
             "--inner-steps", str(setting["inner_steps"])],
            script=str(Path(__file__).with_name("pytorch_reference.py")),
        )
    return results


def median_over_rounds(rounds):
    """Per column, the median over rounds of every number it reports (PyTorch's reports fewer); the fused
    kernel counts as used only if every round used it."""
    results = {
        column: {
            key: statistics.median(one_round[column][key] for one_round in rounds)
            for key, value in measured.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        for column, measured in rounds[0].items()
    }
    results["ours"]["fused_kernel"] = all(one_round["ours"]["fused_kernel"] for one_round in rounds)
    return results


def per_round_summary(rounds):
    """Our time in each round and, with PyTorch measured, the ratio of each round: the spread behind a median."""
    summary = "ours per round: " + ", ".join(f"{one_round['ours']['ms']:.1f}" for one_round in rounds) + " ms"
    if "pytorch" in rounds[0]:
        ratios = [one_round["pytorch"]["ms"] / one_round["ours"]["ms"] for one_round in rounds]
        summary += "; torch/ours per round: " + ", ".join(f"{ratio:.2f}" for ratio in ratios)
    return summary


def main():
    onednn_chosen = prefer_onednn()  # in this process and the measuring processes it starts
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration (median)")
    parser.add_argument("--quick", action="store_true", help="28x28 1-shot only")
    parser.add_argument(
        "--settings", nargs="+", choices=list(SETTINGS), default=None, help="measure these settings only"
    )
    parser.add_argument(
        "--rounds", type=int, default=1,
        help="measure every column this many times, interleaved, and report the median (a noisy machine)",
    )
    parser.add_argument(
        "--meta-batch", type=int, default=1, help="episodes per meta-update; times are per episode (default 1)"
    )
    parser.add_argument(
        "--compile-scaling", action="store_true",
        help="first-call (trace + compile) seconds, graph ops and steady ms per episode against T and meta-batch",
    )
    parser.add_argument("--scaling-inner-steps", type=int, nargs="+", default=[12, 24], help="T values to scale over")
    parser.add_argument("--scaling-meta-batches", type=int, nargs="+", default=[1, 8], help="B values to scale over")
    parser.add_argument(
        "--scaling-steady-meta-batches", type=int, nargs="+", default=[1, 4, 8],
        help="B values whose steady ms per episode is measured (at the first T)",
    )
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--child-compile", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--child-floor", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")

    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1], args.steps, args.meta_batch)))
        return
    if args.child_floor:
        setting = SETTINGS[args.child_floor]
        counts = {"convolution_gflop": convolution_gflop(setting), "lstm_gflop": coordinate_lstm_gflop(setting)}
        print(json.dumps({**counts, "gflops": matmul_gflops()}))
        return
    if args.child_compile:
        inner_steps, meta_batch, variant = args.child_compile
        print(json.dumps(measure_compile_scaling(int(inner_steps), int(meta_batch), variant, args.steps)))
        return
    if args.compile_scaling:
        compile_scaling(args)
        return

    names = ["28x28x1 1-shot T=12"] if args.quick else args.settings or list(SETTINGS)
    with_pytorch = importlib.util.find_spec("torch") is not None and args.meta_batch == 1
    print(f"ms per 5-way meta-training episode (conv4, 15 queries/class, meta-batch {args.meta_batch}, median of "
          f"{args.steps} meta-updates" + (f", median of {args.rounds} interleaved rounds" if args.rounds > 1 else "")
          + f"), {os.cpu_count()} CPU cores")
    print(kernels_description(onednn_enabled(), os.environ.get(ONEDNN_VARIABLE), onednn_chosen))
    columns = [*VARIANTS, "pytorch"] if with_pytorch else list(VARIANTS)
    header = f"{'setting':<22}" + "".join(f"{v:>11}" for v in columns)
    header += f"{'stock/ours':>11}{'xla/ours':>9}{'base/ours':>10}"
    header += f"{'torch/ours':>11}" if with_pytorch else ""
    print(header + f"{'peak MB':>9}{'xla MB':>8}{'compile s':>10}")
    for name in names:
        rounds = [measure_round(name, args, with_pytorch) for _ in range(args.rounds)]
        results = median_over_rounds(rounds)
        ours = results["ours"]["ms"]
        line = f"{name:<22}" + "".join(f"{results[v]['ms']:11.1f}" for v in columns)
        line += f"{results['stock ops']['ms'] / ours:11.2f}{results['ours+xla']['ms'] / ours:9.2f}"
        line += f"{results['baseline']['ms'] / ours:10.2f}"
        line += f"{results['pytorch']['ms'] / ours:11.2f}" if with_pytorch else ""
        print(line + f"{results['ours']['peak_mb']:9.0f}{results['ours+xla']['peak_mb']:8.0f}"
              f"{results['ours+xla']['compile_s']:10.1f}")
        if args.rounds > 1:
            print(f"{'':<22}{per_round_summary(rounds)}")
        print(f"{'':<22}{floor_summary(results['floor'], ours)}")
    if not results["ours"]["fused_kernel"]:
        print("Note: the fused CPU kernel was not available, 'ours' ran on stock TensorFlow ops.")
    if not with_pytorch:
        print("PyTorch is not installed: the pytorch column is missing (pip install torch, a CPU build). A PyTorch "
              "port was measured at ~400 ms (1-shot T=12, 28x28) and ~320 ms (5-shot T=8) on a 2-core machine.")
    print("Target: pytorch/ours >= 2 in every setting; goals: 5 at 28x28, ours / floor <= 2 at 84x84.")


if __name__ == "__main__":
    main()
