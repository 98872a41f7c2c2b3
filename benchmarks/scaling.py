"""Scaling of meta-training under tf.distribute on this machine: episodes/s with 1 vs 2 replicas, strategy overhead.

Each configuration runs in its own subprocess (logical CPU devices must be configured before TensorFlow starts):

    default      no strategy (the default strategy), global meta-batch G on one device
    mirrored-1   MirroredStrategy over 1 CPU device, same G: the per-step overhead of the strategy machinery
    mirrored-2   MirroredStrategy over 2 logical CPU devices, G/2 episodes per replica

All use `MetaTrainer` + `distributed_episodes`, so the three compute the same meta-updates. The two
logical devices share the machine's cores (intra-op threads are divided between them): with 2 cores the
"speed-up" can only come from running the two replicas' ops concurrently, not from more hardware.

    nice python benchmarks/scaling.py                     # tiny conv4 (8 filters), 2-way 1-shot, T=2, G=2
    nice python benchmarks/scaling.py --filters 32 --n-way 5 --inner-steps 5 --meta-batch 4 --steps 10
"""

import argparse
import json
import os
import subprocess
import sys
import time


def child(args):
    if args.devices > 1:
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * args.devices)
    import keras
    import tensorflow as tf

    import keras_metalstm as km
    from keras_metalstm.data import load_dataset
    from keras_metalstm.distribute import distributed_episodes, make_strategy

    strategy = make_strategy("default" if args.mode == "default" else "mirrored")
    split = load_dataset("fontglot").train
    with strategy.scope():
        keras.utils.set_random_seed(0)
        learner = km.learners.conv4(input_shape=(28, 28, 1), num_classes=args.n_way, filters=args.filters)
        meta = km.MetaLearner(learner, inner_steps=args.inner_steps)
        trainer = km.MetaTrainer(meta, jit_compile=args.xla, strategy=strategy)
    total = (args.warmup + args.steps) * args.meta_batch
    batches = iter(
        distributed_episodes(
            strategy, split, args.n_way, 1, args.query, global_batch=args.meta_batch, seed=0, num_episodes=total
        )
    )
    for _ in range(args.warmup):
        float(trainer.train_step(next(batches))["loss"])
    start = time.perf_counter()
    for _ in range(args.steps):
        float(trainer.train_step(next(batches))["loss"])
    seconds = time.perf_counter() - start
    return {
        "mode": args.mode,
        "replicas": strategy.num_replicas_in_sync,
        "episodes_per_s": args.steps * args.meta_batch / seconds,
        "ms_per_step": 1000 * seconds / args.steps,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--filters", type=int, default=8)
    parser.add_argument("--n-way", type=int, default=2)
    parser.add_argument("--query", type=int, default=2)
    parser.add_argument("--inner-steps", type=int, default=2)
    parser.add_argument("--meta-batch", type=int, default=2, help="global meta-batch G (even)")
    parser.add_argument("--steps", type=int, default=20, help="timed meta-updates")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--xla", action="store_true", help="XLA-compile the per-replica meta-gradient")
    parser.add_argument("--mode", choices=["default", "mirrored-1", "mirrored-2"], help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(child(args)))
        return
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    passthrough = [a for a in sys.argv[1:]]
    rows = []
    for mode, devices in (("default", 1), ("mirrored-1", 1), ("mirrored-2", 2)):
        out = subprocess.run(
            [sys.executable, __file__, *passthrough, "--mode", mode, "--devices", str(devices)],
            capture_output=True, text=True, env=env, check=False,
        )
        if out.returncode:
            sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"cores: {os.cpu_count()}  config: {vars(args)}")
    print(f"{'mode':<12}{'replicas':>9}{'episodes/s':>12}{'ms/step':>10}")
    for row in rows:
        print(f"{row['mode']:<12}{row['replicas']:>9}{row['episodes_per_s']:>12.2f}{row['ms_per_step']:>10.1f}")
    base, one, two = rows
    print(f"strategy overhead per step (mirrored-1 - default): {one['ms_per_step'] - base['ms_per_step']:+.1f} ms")
    print(f"2 replicas vs 1 (mirrored-2 / mirrored-1 episodes/s): {two['episodes_per_s'] / one['episodes_per_s']:.2f}x")


if __name__ == "__main__":
    main()
