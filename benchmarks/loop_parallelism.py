"""What running the episodes of a meta-batch one at a time costs on a CPU: ms per episode of the plain training step
(conv4, per-episode loop) with TensorFlow's default 10 parallel iterations and with one, measured interleaved in one
process. Chains of Keras layers such as conv4 keep the default; other learners run one at a time on a CPU, where
TensorFlow's fused convolution + add crashes otherwise (keras_metalstm/loop_parallelism.py).

    python benchmarks/loop_parallelism.py                       # 28x28x1 1-shot T=12, meta-batch 4
    python benchmarks/loop_parallelism.py --meta-batch 8 --setting "28x28x1 5-shot T=8"
"""

import argparse
import statistics

from meta_step import SETTINGS, build, median_ms


def traced_steps(setting_name, meta_batch):
    """{parallel_iterations: (trainer, episodes)} for None (TensorFlow's default) and 1: conv4's training step
    traced (and run once) with each."""
    import keras_metalstm as km
    import keras_metalstm.loop_parallelism as loop_parallelism_module

    chosen = loop_parallelism_module.learner_parallel_iterations
    steps = {}
    try:
        for parallel_iterations in (None, 1):
            # The choice is read when the step is traced.
            loop_parallelism_module.learner_parallel_iterations = lambda _, value=parallel_iterations: value
            meta, episodes = build(SETTINGS[setting_name], meta_batch)
            trainer = km.MetaTrainer(meta)
            float(trainer.train_step(episodes)["loss"])
            steps[parallel_iterations] = (trainer, episodes)
    finally:
        loop_parallelism_module.learner_parallel_iterations = chosen
    return steps


def measure(setting_name, meta_batch, rounds, calls):
    """{parallel_iterations: median ms per episode over `rounds` interleaved rounds}, for None (default) and 1."""
    steps = traced_steps(setting_name, meta_batch)
    times = {parallel_iterations: [] for parallel_iterations in steps}
    for _ in range(rounds):
        for parallel_iterations, (trainer, episodes) in steps.items():
            def call(trainer=trainer, episodes=episodes):
                return float(trainer.train_step(episodes)["loss"])

            times[parallel_iterations].append(median_ms(call, calls) / meta_batch)
    return {parallel_iterations: statistics.median(values) for parallel_iterations, values in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=list(SETTINGS), default="28x28x1 1-shot T=12")
    parser.add_argument("--meta-batch", type=int, default=4, help="episodes per step (at least 2: one skips the loop)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)")
    parser.add_argument("--calls", type=int, default=3, help="timed calls per round (median)")
    args = parser.parse_args()
    if args.meta_batch < 2:
        parser.error("--meta-batch must be at least 2: a single episode runs without the loop over episodes")
    result = measure(args.setting, args.meta_batch, args.rounds, args.calls)
    print(f"{args.setting}, conv4, meta-batch {args.meta_batch}, ms per episode (median of {args.rounds} rounds):")
    print(f"  10 parallel iterations (TensorFlow's default, kept for chains of Keras layers) {result[None]:8.1f}")
    print(f"  one at a time (other learners on a CPU)                                      {result[1]:8.1f}")
    print(f"  one at a time / parallel: {result[1] / result[None]:.2f}")


if __name__ == "__main__":
    main()
