"""tf.distribute: mirrored == default on the same global meta-batch, 2-worker MultiWorkerMirrored, factory.

Every TensorFlow program with several (logical) devices or a TF_CONFIG cluster runs in a subprocess: device
configuration must happen before TensorFlow starts, and MultiWorkerMirroredStrategy must be created first thing.
The subprocesses run this file as a script (`python test_distribute.py <role> ...`).
"""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from cli_helpers import free_ports

HERE = os.path.abspath(__file__)
TIMEOUT = 900  # generous: the machine is shared (a mirrored role takes ~1 min alone, 5 under load)

# tiny problem: conv4 with 8 filters on 28x28 fontglot, 2-way 1-shot, 2 queries, T=2
N_WAY, K_SHOT, QUERY, INNER_STEPS, FILTERS = 2, 1, 2, 2, 8


def _env(**extra):
    env = dict(os.environ)
    env.update({"TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def _run(role, *args, env=None):
    result = subprocess.run(
        [sys.executable, HERE, role, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env or _env(),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def mirrored_report():
    return _run("mirrored")


def test_mirrored_replicas_see_disjoint_episodes_of_the_default_batch(mirrored_report):
    assert mirrored_report["replicas"] == 2
    assert mirrored_report["same_episodes"]


def test_mirrored_meta_update_equals_default_with_active_clip(mirrored_report):
    # clip 1e-3: far below the meta-gradient's norm, so the clip is active in every step
    assert mirrored_report["clip_active"]
    assert mirrored_report["distributed_vs_default"] < 1e-5, mirrored_report


# Tolerance without clip: Adam's first steps are ~ lr * sign(g) per coordinate, so coordinates whose gradient is
# near Adam's epsilon (1e-7) turn the float reordering of the replica sum into ~1e-5 weight differences (seen:
# 1.8e-5, under 1% of the 2 x 1e-3 steps taken). The clipped runs scale every coordinate alike and agree to 5e-7.
# The conv biases before batch norm (zero gradient, rounding noise only: full +-lr steps) are left out.
NOCLIP_TOLERANCE = 1e-4


def test_mirrored_meta_update_equals_default_without_clip(mirrored_report):
    assert mirrored_report["noclip_distributed_vs_default"] < NOCLIP_TOLERANCE, mirrored_report


def test_keras_global_clipnorm_clips_each_replica_not_the_sum(mirrored_report):
    # Documents why MetaTrainer clips the all-reduced gradient itself: Keras' own global_clipnorm inside
    # strategy.run clips each replica's part, a different step than the default strategy once the clip is active.
    assert mirrored_report["keras_clip_vs_default"] > 3e-4, mirrored_report  # seen: 8.2e-4
    assert mirrored_report["keras_noclip_vs_default"] < NOCLIP_TOLERANCE, mirrored_report


def test_mirrored_loss_is_the_global_mean(mirrored_report):
    assert abs(mirrored_report["loss_default"] - mirrored_report["loss_mirrored"]) < 1e-5


def test_mirrored_resume_from_checkpoint_is_exact(mirrored_report):
    assert mirrored_report["resume_vs_straight"] < 1e-6, mirrored_report


def test_mirrored_evaluate_step_returns_every_episode_in_order(mirrored_report):
    assert mirrored_report["evaluate_vs_default"] < 1e-5


def test_mirrored_validation_of_episodes_the_replicas_cannot_share_scores_the_same_episodes(mirrored_report):
    assert mirrored_report["odd_validation"][0] == 5, mirrored_report
    assert mirrored_report["odd_validation"][1] < 1e-6, mirrored_report


def test_two_worker_multiworker_mirrored_identical_weights_and_loadable_checkpoint(tmp_path):
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    checkpoint_dir = tmp_path / "checkpoints"
    processes = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        processes.append(
            subprocess.Popen(
                [sys.executable, HERE, "multiworker", str(checkpoint_dir), str(tmp_path / f"weights{index}.npz")],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=_env(TF_CONFIG=tf_config),
            )
        )
    reports = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=TIMEOUT)
            assert process.returncode == 0, err[-4000:]
            reports.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    assert [r["chief"] for r in reports] == [True, False]
    assert all(r["replicas"] == 2 for r in reports)
    first, second = np.load(tmp_path / "weights0.npz"), np.load(tmp_path / "weights1.npz")
    assert sorted(first.files) == sorted(second.files)
    for key in first.files:
        np.testing.assert_array_equal(first[key], second[key])
    # only the chief's checkpoint exists, the other worker's temporary copy is gone
    assert not os.path.exists(reports[1]["saved_to"])
    loaded = _run("load", checkpoint_dir, tmp_path / "loaded.npz")
    assert loaded["restored"]
    restored = np.load(tmp_path / "loaded.npz")
    for key in first.files:
        np.testing.assert_array_equal(first[key], restored[key])


def test_factory_rejects_unknown_strategy_and_stray_tpu_name():
    import tensorflow as tf

    from keras_metalstm.distribute import make_strategy

    with pytest.raises(ValueError, match="unknown strategy"):
        make_strategy("horovod")
    with pytest.raises(ValueError, match="--tpu"):
        make_strategy("mirrored", tpu="my-tpu")
    if not os.environ.get("TPU_NAME") and not tf.config.list_logical_devices("TPU"):
        with pytest.raises(ValueError, match=r"--strategy tpu found no TPU .*: pass --tpu NAME"):
            make_strategy("tpu")


def test_a_tpu_name_that_cannot_be_looked_up_is_named_not_taken_for_a_disk_error(monkeypatch):
    import urllib.error

    import tensorflow as tf

    from keras_metalstm.distribute import StrategyError, make_strategy

    def unreachable(tpu=None):  # what the resolver raises off Google Cloud: its metadata server has no address
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(tf.distribute.cluster_resolver, "TPUClusterResolver", unreachable)
    with pytest.raises(StrategyError, match=r"cannot find or reach the TPU 'my-tpu' \(<urlopen error .*check its name"):
        make_strategy("tpu", tpu="my-tpu")


def test_connecting_to_a_tpu_is_announced_before_tensorflow_waits_for_it(monkeypatch, caplog):
    import logging

    import tensorflow as tf

    from keras_metalstm.distribute import make_strategy

    class Resolver:
        def __init__(self, tpu=None):
            self.tpu = tpu

        def master(self):
            return "grpc://10.0.0.2:8470"

    def unanswered(resolver):  # an unreachable TPU: TensorFlow would wait here for good
        raise KeyboardInterrupt

    monkeypatch.setattr(tf.distribute.cluster_resolver, "TPUClusterResolver", Resolver)
    monkeypatch.setattr(tf.config, "experimental_connect_to_cluster", unanswered)
    with caplog.at_level(logging.INFO, logger="keras_metalstm"), pytest.raises(KeyboardInterrupt):
        make_strategy("tpu", tpu="my-tpu")
    assert "connecting to the TPU grpc://10.0.0.2:8470 (it waits until the TPU answers; Ctrl-C stops)" in caplog.text


def test_factory_default_and_per_replica_batch():
    import tensorflow as tf

    from keras_metalstm.distribute import is_chief, make_strategy, per_replica_batch

    strategy = make_strategy("default")
    assert strategy is tf.distribute.get_strategy()
    assert per_replica_batch(strategy, 3) == 3
    assert is_chief(strategy)


def test_factory_mirrored_on_two_logical_cpus():
    report = _run("factory")
    refusal = report.pop("jit_fit_refusal")
    odd_batches = report.pop("odd_batch_refusals")
    assert report == {"mirrored": 2, "per_replica": 2, "odd_batch_rejected": True}
    assert refusal.startswith("fit after compile(jit_compile=True) cannot run under a strategy of 2 replicas")
    assert "MetaTrainer(meta, jit_compile=True)" in refusal
    # Keras' fit and evaluate split each batch over the replicas: 3 episodes failed in an AddN of unequal shapes
    # One rule, one message, with the fix that fits where the batch came from (MetaTrainer.evaluate_step: its call)
    shared = "A batch of 3 episodes cannot be shared by the strategy's 2 replicas: each must get the same number"
    assert all(odd_batches[name].startswith(shared) for name in ("fit", "validation", "evaluate", "evaluate_step"))
    assert {name: odd_batches[name][len(shared):] for name in ("fit", "validation", "evaluate")} == dict.fromkeys(
        ("fit", "validation", "evaluate"),
        " of episodes. Batch the dataset accordingly (episode_dataset(..., batch_size=4)).")
    assert odd_batches["evaluate_step"].endswith("Evaluate batches of 4 episodes.")
    assert odd_batches["even_fit"] is None


# ----------------------------------------------------------------------------------------- subprocess roles
def _logical_cpus(count):
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)


def _build_meta(seed=0):
    import keras

    import keras_metalstm as km

    keras.utils.set_random_seed(seed)
    learner = km.learners.conv4(input_shape=(28, 28, 1), num_classes=N_WAY, filters=FILTERS)
    return km.MetaLearner(learner, inner_steps=INNER_STEPS)


def _weights(meta):
    return {f"{i}_{v.name}": np.array(v.numpy()) for i, v in enumerate(meta.weights)}


def _without_biases_before_batch_norm(meta, weights):
    """`weights` with theta_0's conv-bias coordinates zeroed. A bias feeding a batch norm has a zero gradient by
    construction; Adam (unclipped) turns its rounding noise, which differs with the order of the replica sum, into
    +-lr steps in either run, so the comparison leaves those coordinates out."""
    weights = dict(weights)
    index = [variable.path for variable in meta.weights].index(meta.theta0.path)
    key = f"{index}_{meta.theta0.name}"
    theta0, start = weights[key].copy(), 0
    for variable in meta.learner.trainable_variables:
        if variable.path.startswith("conv") and variable.path.endswith("/bias"):
            theta0[start : start + variable.numpy().size] = 0.0
        start += variable.numpy().size
    weights[key] = theta0
    return weights


def _max_diff(a, b):
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def _train(trainer, batches):
    losses = []
    for batch in batches:
        losses.append(float(trainer.train_step(batch)["loss"]))
    return losses


def role_factory():
    _logical_cpus(2)
    from keras_metalstm.distribute import make_strategy, per_replica_batch

    strategy = make_strategy("mirrored")
    try:
        per_replica_batch(strategy, 3)
        odd = False
    except ValueError:
        odd = True
    # fit after compile(jit_compile=True) would have Keras compile the cross-replica sum too: refused by name
    with strategy.scope():
        meta = _build_meta()
        meta.compile(jit_compile=True)
    try:
        meta.fit([], verbose=0)
        refusal = None
    except ValueError as error:
        refusal = str(error)
    return {"mirrored": strategy.num_replicas_in_sync, "per_replica": per_replica_batch(strategy, 4),
            "odd_batch_rejected": odd, "jit_fit_refusal": refusal, "odd_batch_refusals": _odd_batch_refusals(strategy)}


def _odd_batch_refusals(strategy):
    """What Keras' fit and evaluate and MetaTrainer.evaluate_step say of batches of 3 episodes for 2 replicas, and
    whether a batch of 2 trains."""
    import keras_metalstm as km
    from keras_metalstm.data import episode_dataset, load_dataset

    with strategy.scope():
        meta = _build_meta()
        meta.compile()
    split = load_dataset("fontglot").train
    odd, even = (episode_dataset(split, N_WAY, K_SHOT, QUERY, batch_size=size, num_episodes=6) for size in (3, 2))
    calls = {"fit": lambda: meta.fit(odd, verbose=0), "validation": lambda: meta.fit(even, validation_data=odd),
             "evaluate": lambda: meta.evaluate(odd, verbose=0), "even_fit": lambda: meta.fit(even, verbose=0),
             "evaluate_step": lambda: km.MetaTrainer(meta, strategy=strategy).evaluate_step(next(iter(odd)))}
    refusals = {}
    for name, call in calls.items():
        try:
            call()
            refusals[name] = None
        except ValueError as error:
            refusals[name] = str(error)
    return refusals


def _odd_validation(trainer_default, trainer_mirrored, mirrored, split):
    """A validation of 5 episodes (--val-episodes 5) on 2 replicas and on one device: (episodes scored, largest
    difference of their accuracies). It failed at the run's first validation, after hours of training."""
    from keras_metalstm.config import RunConfig
    from keras_metalstm.evaluation import evaluate_episodes

    shape = RunConfig(n_way=N_WAY, k_shot=K_SHOT, query=QUERY)
    with mirrored.scope():
        on_replicas = evaluate_episodes(trainer_mirrored, split, shape, 5, seed=4)
    on_one = evaluate_episodes(trainer_default, split, shape, 5, seed=4)
    return len(on_replicas), float(np.max(np.abs(on_replicas - on_one))) if len(on_replicas) == 5 else 1.0


def role_mirrored():
    _logical_cpus(2)
    import keras
    import tensorflow as tf

    import keras_metalstm as km
    from keras_metalstm.data import episode_dataset, load_dataset
    from keras_metalstm.distribute import distributed_episodes, make_strategy

    split = load_dataset("fontglot").train
    default = tf.distribute.get_strategy()
    mirrored = make_strategy("mirrored")
    steps, global_batch = 2, 2
    plain = list(episode_dataset(split, N_WAY, K_SHOT, QUERY, batch_size=global_batch, seed=3,
                                 num_episodes=steps * global_batch))

    def distributed(start=0, count=steps * global_batch):
        return list(distributed_episodes(mirrored, split, N_WAY, K_SHOT, QUERY, global_batch=global_batch, seed=3,
                                         start_episode=start, num_episodes=count))

    dist = distributed()
    same = True
    for whole, parts in zip(plain, dist, strict=True):
        local = mirrored.experimental_local_results(parts)
        for key in whole:
            joined = np.concatenate([p[key].numpy() for p in local])
            same = same and np.array_equal(joined, whole[key].numpy())

    reference = _build_meta()
    initial = [v.numpy() for v in reference.trainable_variables]

    def fresh(strategy):
        with strategy.scope():
            meta = _build_meta()
            for v, value in zip(meta.trainable_variables, initial, strict=True):
                v.assign(value)
        return meta

    report = {"replicas": mirrored.num_replicas_in_sync, "same_episodes": bool(same)}
    for clip, tag in ((1e-3, ""), (0.0, "noclip_")):
        meta_d = fresh(default)
        trainer_d = km.MetaTrainer(meta_d, clip_norm=clip or None, strategy=default)
        loss_d = _train(trainer_d, plain)
        meta_m = fresh(mirrored)
        with mirrored.scope():
            trainer_m = km.MetaTrainer(meta_m, clip_norm=clip, strategy=mirrored)
        loss_m = _train(trainer_m, dist)
        meta_k = fresh(mirrored)
        with mirrored.scope():
            keras_clipped = keras.optimizers.Adam(1e-3, global_clipnorm=clip or None)
            trainer_k = km.MetaTrainer(meta_k, clip_norm=None, optimizer=keras_clipped, strategy=mirrored)
        _train(trainer_k, dist)
        wd, wm, wk = _weights(meta_d), _weights(meta_m), _weights(meta_k)
        if tag:
            wd, wm, wk = (_without_biases_before_batch_norm(meta_d, weights) for weights in (wd, wm, wk))
        report[f"{tag}distributed_vs_default"] = _max_diff(wd, wm)
        report[f"keras_{tag or 'clip_'}vs_default"] = _max_diff(wd, wk)
        if not tag:
            report["loss_default"], report["loss_mirrored"] = loss_d[0], loss_m[0]
            # the clip is active: the unclipped first meta-gradient is larger than 1e-3
            _, _, grads = fresh(default).meta_gradients(plain[0])
            report["clip_active"] = bool(tf.linalg.global_norm(grads).numpy() > 1e-3)
            # evaluation: every episode once, in batch order
            ev_d = trainer_d.evaluate_step(plain[0])["loss"].numpy()
            ev_m = trainer_m.evaluate_step(plain[0])["loss"].numpy()
            report["evaluate_vs_default"] = float(np.max(np.abs(ev_d - ev_m))) if ev_d.shape == ev_m.shape else 1e9
            report["odd_validation"] = _odd_validation(trainer_d, trainer_m, mirrored, split)
    # resume: 1 step, checkpoint, fresh model + trainer restored, 1 more step == 2 straight steps (clip active)
    with tempfile.TemporaryDirectory() as directory:
        meta_a = fresh(mirrored)
        with mirrored.scope():
            trainer_a = km.MetaTrainer(meta_a, clip_norm=1e-3, strategy=mirrored)
        _train(trainer_a, distributed(0, global_batch))
        path = tf.train.Checkpoint(meta=meta_a, optimizer=trainer_a.optimizer).write(os.path.join(directory, "ckpt"))
        meta_b = fresh(mirrored)
        with mirrored.scope():
            trainer_b = km.MetaTrainer(meta_b, clip_norm=1e-3, strategy=mirrored)
            tf.train.Checkpoint(meta=meta_b, optimizer=trainer_b.optimizer).read(path).assert_consumed()
        _train(trainer_b, distributed(global_batch, global_batch))
        meta_c = fresh(mirrored)
        with mirrored.scope():
            trainer_c = km.MetaTrainer(meta_c, clip_norm=1e-3, strategy=mirrored)
        _train(trainer_c, dist)
        report["resume_vs_straight"] = _max_diff(_weights(meta_b), _weights(meta_c))
    return report


def role_multiworker(checkpoint_dir, weights_path):
    import tensorflow as tf

    import keras_metalstm as km
    from keras_metalstm.data import load_dataset
    from keras_metalstm.distribute import (
        distributed_episodes,
        is_chief,
        make_strategy,
        remove_worker_directory,
        worker_directory,
    )

    strategy = make_strategy("multiworker")  # first thing: reads TF_CONFIG
    split = load_dataset("fontglot").train
    with strategy.scope():
        meta = _build_meta()
        trainer = km.MetaTrainer(meta, clip_norm=0.25, strategy=strategy)
    batches = distributed_episodes(strategy, split, N_WAY, K_SHOT, QUERY, global_batch=2, seed=5, num_episodes=4)
    losses = _train(trainer, batches)
    episode = tf.Variable(4, dtype=tf.int64)
    checkpoint = tf.train.Checkpoint(meta=meta, optimizer=trainer.optimizer, episode=episode)
    directory = worker_directory(checkpoint_dir, strategy)
    manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=1)
    saved = manager.save(checkpoint_number=4)
    remove_worker_directory(directory, checkpoint_dir)
    np.savez(weights_path, **_weights(meta))
    return {"chief": is_chief(strategy), "replicas": strategy.num_replicas_in_sync, "losses": losses,
            "saved_to": os.path.dirname(saved)}


def role_load(checkpoint_dir, weights_path):
    import tensorflow as tf

    import keras_metalstm as km

    meta = _build_meta(seed=99)
    trainer = km.MetaTrainer(meta)
    episode = tf.Variable(0, dtype=tf.int64)
    path = tf.train.latest_checkpoint(checkpoint_dir)
    status = tf.train.Checkpoint(meta=meta, optimizer=trainer.optimizer, episode=episode).read(path)
    status.assert_existing_objects_matched()
    np.savez(weights_path, **_weights(meta))
    return {"restored": int(episode.numpy()) == 4}


if __name__ == "__main__":
    role, *arguments = sys.argv[1:]
    print(json.dumps(globals()[f"role_{role}"](*arguments)))
