"""What recomputing the coordinate LSTM's step in its backward pass (`tf.recompute_grad`, instead of keeping its
gates and activations for every step of the inner loop) costs and saves, for the stock-op training step: in plain
TensorFlow on a CPU (what float64 and a machine without the fused kernel run; the library keeps the activations
there) and under XLA (the library recomputes, as on a GPU/TPU). ms per episode and the process's peak memory,
each configuration in its own process, rounds interleaved:

    python benchmarks/recompute.py                                     # 28x28x1 1-shot T=12, conv4 (32 filters)
    python benchmarks/recompute.py --filters 128 --rounds 1            # a larger learner: the memory it saves
    python benchmarks/recompute.py --setting "84x84x3 5-shot T=8" --rounds 3
"""

import argparse
import json
import resource
import statistics
import time

from meta_step import SETTINGS, build, median_ms, run_child

CONFIGURATIONS = {  # name: (jit_compile, recompute)
    "plain, kept": (False, False),
    "plain, recomputed": (False, True),
    "XLA, kept": (True, False),
    "XLA, recomputed": (True, True),
}


def measure(setting_name, configuration, filters, steps):
    """ms per episode of the training step with the fused kernel off, its first-call seconds and peak MB."""
    import keras_metalstm as km
    from keras_metalstm.layers import coordinate_lstm
    from keras_metalstm.ops import fused_kernels

    jit_compile, recompute = CONFIGURATIONS[configuration]
    meta, episodes = build(SETTINGS[setting_name], filters=filters)
    step = km.MetaTrainer(meta, jit_compile=jit_compile).train_step
    chosen = coordinate_lstm.recomputes_backward
    coordinate_lstm.recomputes_backward = lambda: recompute  # read when the step is traced, on its first call
    try:
        with fused_kernels.disabled():
            start = time.perf_counter()
            float(step(episodes)["loss"])
            first_call = time.perf_counter() - start
            ms = median_ms(lambda: float(step(episodes)["loss"]), steps)
    finally:
        coordinate_lstm.recomputes_backward = chosen
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"ms": ms, "first_call_s": first_call, "peak_mb": peak_mb, "parameters": meta.num_parameters}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=list(SETTINGS), default="28x28x1 1-shot T=12")
    parser.add_argument("--filters", type=int, default=32, help="conv4's filters per layer (32: the paper's)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration and round (median)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.setting, args.child, args.filters, args.steps)))
        return
    common = ["--setting", args.setting, "--filters", str(args.filters), "--steps", str(args.steps)]
    rounds = [
        {name: run_child([*common, "--child", name], script=__file__) for name in CONFIGURATIONS}
        for _ in range(args.rounds)
    ]
    parameters = rounds[0]["plain, kept"]["parameters"]
    print(f"{args.setting}, conv4 with {args.filters} filters ({parameters:,} parameters), stock ops, meta-batch 1, "
          f"median of {args.rounds} interleaved rounds:")
    print(f"{'':<20}{'ms':>9}{'peak MB':>9}{'first call s':>14}")
    medians = {}
    for name in CONFIGURATIONS:
        medians[name] = {key: statistics.median(one[name][key] for one in rounds) for key in ("ms", "peak_mb")}
        first_call = statistics.median(one[name]["first_call_s"] for one in rounds)
        print(f"{name:<20}{medians[name]['ms']:9.1f}{medians[name]['peak_mb']:9.0f}{first_call:14.1f}")
    for mode in ("plain", "XLA"):
        kept, recomputed = medians[f"{mode}, kept"], medians[f"{mode}, recomputed"]
        print(f"{mode}: recomputed / kept, time {recomputed['ms'] / kept['ms']:.2f}, "
              f"peak memory {recomputed['peak_mb'] / kept['peak_mb']:.2f}")


if __name__ == "__main__":
    main()
