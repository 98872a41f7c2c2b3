"""Where the time of one meta-training episode goes: the parts of the step (support passes, query pass, the
meta-learner's own layers, the whole meta-gradient) each compiled as the step 'ours' is (with the fused kernel)
and timed alone, and the whole training step's time by op type from the TensorFlow profiler (ms per step inside
each op type, summed over TensorFlow's compute threads; oneDNN parallelises inside an op), and how long the step ran
no op, one op alone, or several at once.

    python benchmarks/step_profile.py                                  # 28x28x1 5-way 1-shot, T = 12
    python benchmarks/step_profile.py --setting "84x84x3 5-shot T=8"   # any setting of meta_step.py
    python benchmarks/step_profile.py --xla       # the XLA-compiled step, by HLO instruction kind
    python benchmarks/step_profile.py --intra-op-threads 1   # TensorFlow's ops (oneDNN's included) on one thread
"""

import argparse
import collections
import re
from pathlib import Path

from meta_step import SETTINGS, build, median_ms

from keras_metalstm.cpu_kernels import prefer_onednn


def profile(setting_name, steps):
    """Times the parts of a step separately, each compiled on its own, and the whole step's CPU time by op type."""
    import tensorflow as tf

    import keras_metalstm as km

    meta, episodes = build(SETTINGS[setting_name])
    learner = meta._learner_function
    support, labels = episodes["support_images"][0], episodes["support_labels"][0]
    theta = meta.theta0.value

    def support_passes():
        state, total = learner.initial_state(), 0.0
        for step in range(meta.inner_steps):
            loss, gradient, state = learner.loss_and_gradient(theta + 1e-3 * step, state, support, labels)
            total += tf.reduce_sum(gradient)
        return total

    def query_pass():
        with tf.GradientTape() as tape:
            tape.watch(theta)
            logits, _ = learner(theta, learner.initial_state(), episodes["query_images"][0], training=True)
            loss = tf.reduce_mean(logits)
        return tf.reduce_sum(tape.gradient(loss, theta))

    gradients = tf.random.normal((meta.inner_steps, 1, meta.num_parameters)) * 1e-2
    losses = tf.random.uniform((meta.inner_steps, 1))

    def meta_learner_layers():
        from keras_metalstm.preprocessing import preprocess

        with tf.GradientTape() as tape:
            state, logits, params = None, None, meta.theta0[None]
            for step in range(meta.inner_steps):
                hidden, state = meta.coordinate_lstm(
                    preprocess(gradients[step], axis=0), state, shared_inputs=preprocess(losses[step], axis=0)
                )
                params, logits = meta.cell(hidden, params, gradients[step], logits)
            total = tf.reduce_sum(params * params)
        return tf.reduce_sum([tf.reduce_sum(g) for g in tape.gradient(total, meta.trainable_variables)])

    def full_step():
        # The gradients' norm, not the loss: a step that returns only the loss has its backward pass pruned.
        return tf.linalg.global_norm(meta.meta_gradients(episodes)[2])

    parts = {}
    support_images = episodes["support_images"].shape[1]
    for name, function in [
        (f"{meta.inner_steps} support passes (loss + gradient, {support_images} images)", support_passes),
        ("query pass (forward + backward, 75 images)", query_pass),
        (f"meta-learner layers, {meta.inner_steps} steps (forward + backward)", meta_learner_layers),
        ("whole meta-gradient", full_step),
    ]:
        compiled = tf.function(with_fused_kernel(function))
        float(compiled())
        parts[name] = median_ms(lambda compiled=compiled: float(compiled()), steps)
    events = list(profiled_events(km.MetaTrainer(meta).train_step, episodes, steps))
    return {"parts": parts, "op_types": cpu_ms_by_op_type(events, steps), "at_once": ops_at_once(events, steps)}


def with_fused_kernel(function):
    """`function`, traced as the training step 'ours' traces its step: with the fused kernel where it can run."""
    from keras_metalstm.ops import fused_kernels

    def traced():
        with fused_kernels.enabled():
            return function()

    return traced


# Profiler events that contain the ops' own events (executor and thread-pool wrappers), not ops.
CONTAINER_EVENTS = {"Process", "ParallelFor", "ExecutorDoneCallback"}
# Events beside the compiled instructions' on the threads that run an XLA cluster. Before TensorFlow 2.18 XLA's
# CPU runtime recorded only the memory events, with no instructions' own.
XLA_RUNTIME_EVENTS = {"BlockUntilReady", "ExecutorDoneCallback", "MemoryAllocation", "MemoryDeallocation"}


ProfiledEvent = collections.namedtuple("ProfiledEvent", "line name start_ms ms")


def profiled_events(step, episodes, steps):
    """ProfiledEvent (line name, event name, start and duration in ms) of every event the TensorFlow profiler
    records on the host CPU while `step` runs `steps` times (after two warm-up calls)."""
    import tempfile

    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    for _ in range(2):
        float(step(episodes)["loss"])
    with tempfile.TemporaryDirectory() as log_directory:
        tf.profiler.experimental.start(log_directory)
        for _ in range(steps):
            float(step(episodes)["loss"])
        tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        space.ParseFromString(next(Path(log_directory).rglob("*.xplane.pb")).read_bytes())
    for plane in (plane for plane in space.planes if plane.name == "/host:CPU"):
        names = {key: metadata.name for key, metadata in plane.event_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                start_ms = line.timestamp_ns / 1e6 + event.offset_ps / 1e9
                yield ProfiledEvent(line.name, names[event.metadata_id], start_ms, event.duration_ps / 1e9)


def sorted_totals(pairs):
    """{key: summed ms}, largest first, of (key, ms) pairs."""
    totals = collections.Counter()
    for key, ms in pairs:
        totals[key] += ms
    return dict(totals.most_common())


def op_events(events):
    """The TensorFlow ops among profiled events, as (op type, event): those on TensorFlow's compute threads
    (oneDNN's and the fused kernels' own threads run inside them), without the executor's wrapper events."""
    return [
        (op_type, event)
        for event in events
        if event.line.startswith("tf_Compute") and (op_type := event.name.rsplit(":", 1)[-1]) not in CONTAINER_EVENTS
    ]


def cpu_ms_by_op_type(events, steps):
    """CPU ms per step spent in each op type (summed over TensorFlow's threads) in the profiled events of `steps`
    steps."""
    return sorted_totals((op_type, event.ms / steps) for op_type, event in op_events(events))


def ops_at_once(events, steps):
    """How the ops of `steps` profiled steps overlap in time: ({n: ms per step with n ops running} for n = 0, 1
    and 2, 2 counting two or more, from the first op's start to the last op's end; {op type: ms per step it ran
    while no other op did}). An op runs its own work on several threads (oneDNN, the fused kernels): one op
    running is not one busy core, but time with one op running is time the executor had nothing else to run."""
    ops = [(op_type, event) for op_type, event in op_events(events) if event.ms > 0]  # markers have no duration
    boundaries = sorted(
        [(event.start_ms, 1, index) for index, (_, event) in enumerate(ops)]
        + [(event.start_ms + event.ms, -1, index) for index, (_, event) in enumerate(ops)]
    )
    running, at_once, alone = set(), collections.Counter({0: 0.0, 1: 0.0, 2: 0.0}), collections.Counter()
    previous = boundaries[0][0] if boundaries else 0.0
    for time_ms, change, index in boundaries:
        span = (time_ms - previous) / steps
        at_once[min(len(running), 2)] += span
        if len(running) == 1:
            alone[ops[next(iter(running))][0]] += span
        previous = time_ms
        (running.add if change > 0 else running.discard)(index)
    return dict(at_once), dict(alone.most_common())


def xla_ms_by_instruction(step, episodes, steps):
    """CPU ms per step in each kind of instruction of an XLA-compiled step, summed over threads: the optimised
    HLO's instruction names without their numbers (`dot`, `multiply_reduce_fusion`; see them with
    `XLA_FLAGS=--xla_dump_to=DIR`) as they run inside a TensorFlow function, like the compiled meta-gradient inside
    the training step. TensorFlow ops ("name:Type") and runtime events ("A::B", XLA_RUNTIME_EVENTS) are left out."""
    return sorted_totals(
        (re.sub(r"\.\d+$", "", event.name), event.ms / steps)
        for event in profiled_events(step, episodes, steps)
        if event.line != "python" and ":" not in event.name and event.name not in XLA_RUNTIME_EVENTS
    )


def profile_xla(setting_name, steps):
    """The XLA-compiled training step (`--xla`, with the CPU forms on a CPU-only machine) by instruction kind."""
    import keras_metalstm as km

    meta, episodes = build(SETTINGS[setting_name])
    return xla_ms_by_instruction(km.MetaTrainer(meta, jit_compile=True).train_step, episodes, steps)


def print_shares(title, totals, rows):
    total = sum(totals.values())
    print(f"{title} ({total:.0f} in all):")
    for name, ms in list(totals.items())[:rows]:
        print(f"  {name:<55} {ms:8.1f} ms {100 * ms / total:5.1f} %")


def main():
    prefer_onednn()  # the CPU kernels `metalstm` runs on
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=list(SETTINGS), default="28x28x1 1-shot T=12", help="what to profile")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per part (median)")
    parser.add_argument("--xla", action="store_true", help="profile the XLA-compiled step by HLO instruction kind")
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=0,
        help="threads of TensorFlow's intra-op pool, which every oneDNN op and the fused kernel use (default: "
        "TensorFlow's choice, one per core)",
    )
    args = parser.parse_args()
    if args.intra_op_threads:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.intra_op_threads)
    if args.xla:
        title = f"{args.setting}, the XLA-compiled training step: CPU ms per step by HLO instruction, summed over threads"
        instructions = profile_xla(args.setting, args.steps)
        if not instructions:
            import tensorflow as tf

            raise SystemExit(f"TensorFlow {tf.__version__}'s XLA records no per-instruction events: use 2.18 or later")
        print_shares(title, instructions, rows=25)
        return
    result = profile(args.setting, args.steps)
    print(f"{args.setting}, 5-way, conv4, median ms of each part compiled alone:")
    for name, ms in result["parts"].items():
        print(f"  {name:<55} {ms:8.1f} ms")
    title = "The whole training step ('ours'): CPU ms per step by op type, summed over threads"
    print_shares(title, result["op_types"], rows=15)
    at_once, alone = result["at_once"]
    print(
        f"Ops running at once in the training step, ms per step: none {at_once[0]:.1f}, one {at_once[1]:.1f}, two "
        f"or more {at_once[2]:.1f} (under the profiler). Running alone:"
    )
    for op_type, ms in list(alone.items())[:6]:
        print(f"  {op_type:<55} {ms:8.1f} ms")


if __name__ == "__main__":
    main()
