"""Scale-out with TensorFlow's own tf.distribute: strategy factory, distributed episodes, a distributed trainer.

Nothing here implements communication: the strategies (Mirrored, MultiWorkerMirrored, TPU) do the all-reduces.
This module only decides WHAT is reduced and WHEN, so that N replicas compute exactly the meta-update a single
device computes on the same global meta-batch:

* global meta-batch G = per-replica batch b x replicas R. Replica r of global step g sees episodes
  ``start + g*G + r*b ... start + g*G + (r+1)*b - 1`` (`distributed_episodes`): disjoint, and the union of one
  step's replicas is exactly the default strategy's batch g, so runs and resumes are comparable across strategies.
* the loss of each replica is summed over its episodes and divided by G (`MetaLearner.meta_gradients`), so the
  SUM of the replicas' gradients is the gradient of the global mean loss.
* clipping: the paper clips the global L2 norm of THE meta-gradient. Keras 3's optimizer clips (`global_clipnorm`)
  BEFORE it all-reduces, i.e. each replica's partial gradient, which is not the same thing. `MetaTrainer` (through
  `MetaLearner.meta_train_step`) all-reduces the gradient explicitly (replica context SUM), takes its global norm,
  scales every replica's partial gradient by the same factor min(1, c / ||sum||), and the optimizer (built without
  clipping) sums the scaled partials with its own all-reduce: the update is Adam(clip(sum of partials)).
* XLA: with ``jit_compile`` the meta-gradient (inner loop + query loss + backward) of each replica is one XLA
  cluster (a nested ``tf.function(jit_compile=True)``); the all-reduces, the clip and the Adam update run as
  ordinary TF ops (collectives cannot live in an XLA cluster on CPU/GPU). On TPU the whole replica step (all-reduces
  and update included) is compiled by XLA anyway: TPUStrategy compiles every function passed to `strategy.run`.
* the run directory belongs to the chief: every worker must call save (variables may need collectives), only the
  chief's files are kept: `worker_directory` gives the other workers a private temporary directory, removed with
  `remove_worker_directory`. A check only the chief makes (is the run directory free?) must still stop every
  worker when it fails: `all_workers_ok` is the collective that tells them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile

import tensorflow as tf

from keras_metalstm.config import ConfigError

logger = logging.getLogger(__name__)

STRATEGIES = ("default", "mirrored", "multiworker", "tpu")


class StrategyError(ConfigError):
    """A strategy or meta-batch setting that cannot work (a ValueError; the CLI reports it without traceback)."""


# ------------------------------------------------------------------------------------------------- factory
def make_strategy(name: str = "default", tpu: str | None = None, devices=None) -> tf.distribute.Strategy:
    """The tf.distribute strategy called `name` (one of STRATEGIES).

    * "default": the no-op default strategy (one device).
    * "mirrored": MirroredStrategy over `devices`, else every GPU, else every logical CPU device (so a CPU
      split into logical devices with `tf.config.set_logical_device_configuration` gives several replicas).
    * "multiworker": MultiWorkerMirroredStrategy; the cluster and this worker's task come from the TF_CONFIG
      environment variable exactly as TensorFlow documents it. Create it at program start, before other ops.
    * "tpu": the documented sequence TPUClusterResolver(tpu) -> experimental_connect_to_cluster ->
      initialize_tpu_system -> TPUStrategy. `tpu` is the TPU name or grpc:// address ("" or None: local TPU VM /
      the TPU_NAME environment variable, as the resolver does).
    """
    name = (name or "default").lower()
    if name not in STRATEGIES:
        raise StrategyError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    if name != "tpu" and tpu:
        raise StrategyError("--tpu only makes sense with --strategy tpu")
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        if devices is None:
            gpus = tf.config.list_logical_devices("GPU")
            devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices=list(devices))
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or None)
    except ValueError as error:  # no name given and none found (TPU_NAME, a TPU VM)
        raise StrategyError(
            f"--strategy tpu found no TPU ({str(error).strip()}): pass --tpu NAME (the TPU's name or grpc:// "
            "address), or run on a TPU VM"
        ) from None
    except OSError as error:  # a name the resolver cannot look up: it asks Google Cloud's metadata server
        raise StrategyError(
            f"--strategy tpu cannot find or reach the TPU {tpu!r} ({str(error).strip()}): check its name or pass "
            "its grpc:// address, from a machine that can reach it (on Google Cloud: the same project and zone)"
        ) from None
    # TensorFlow waits for an unreachable TPU without a word, and without end.
    logger.info("connecting to the TPU %s (it waits until the TPU answers; Ctrl-C stops)", resolver.master() or tpu)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def episodes_per_replica(batch: int, replicas: int, fix: str) -> int:
    """Episodes each of `replicas` replicas runs from a batch of `batch`. Every replica runs the same static shapes,
    so a batch that is not a positive multiple of the replicas is refused here, with `fix` (the caller's own setting,
    formatted with the nearest batch that works) rather than from inside TensorFlow (AddN of unequal shapes)."""
    if batch < 1 or batch % replicas:
        nearest = max(replicas, round(batch / replicas) * replicas)
        raise StrategyError(
            f"A batch of {batch} episodes cannot be shared by the strategy's {replicas} replicas: each must get the "
            f"same number of episodes. {fix.format(nearest)}"
        )
    return batch // replicas


def per_replica_batch(strategy: tf.distribute.Strategy, global_batch: int) -> int:
    """b = G / R for the run's meta-batch G (`--meta-batch`) over R replicas."""
    return episodes_per_replica(global_batch, strategy.num_replicas_in_sync, "Use --meta-batch {}.")


# ------------------------------------------------------------------------------------------------ episodes
def distributed_episodes(
    strategy,
    split,
    n_way,
    k_shot,
    q_query,
    *,
    global_batch,
    seed=0,
    start_episode=0,
    num_episodes=None,
    augment=None,
):
    """A distributed dataset of episode batches: each step gives every replica b = G/R DIFFERENT episodes
    (augmented by ``augment``, a `keras_metalstm.augmentation.Augmentation`, if given).

    Built with `strategy.distribute_datasets_from_function`: each input pipeline (one per worker) produces only
    its own replicas' episodes (episodes are pure functions of (seed, index): nothing is read and discarded).
    Pipeline w with L local replicas yields, for step g, the batches of global replicas w*L, ..., w*L+L-1 in that
    order (tf.distribute hands a pipeline's consecutive elements to its local replicas round-robin).
    `num_episodes` (None: endless) must be a multiple of G.
    """
    from keras_metalstm.data import EpisodeSampler

    b = per_replica_batch(strategy, global_batch)
    if num_episodes is not None and (num_episodes < 1 or num_episodes % global_batch):
        raise StrategyError(f"num_episodes ({num_episodes}) must be a positive multiple of the meta-batch ({global_batch})")
    steps = None if num_episodes is None else num_episodes // global_batch
    sampler = EpisodeSampler(split, n_way, k_shot, q_query, seed, augment)
    start = int(start_episode)

    def dataset_fn(context: tf.distribute.InputContext):
        local = context.num_replicas_in_sync // context.num_input_pipelines
        first_replica = context.input_pipeline_id * local
        counter = tf.data.Dataset.range(steps * local) if steps is not None else tf.data.Dataset.counter()

        def episode_indices(m):
            step, replica = m // local, first_replica + m % local
            base = start + step * global_batch + replica * b
            return tf.data.Dataset.range(base, base + b)

        return sampler.batches(counter.flat_map(episode_indices), b)

    options = tf.distribute.InputOptions(experimental_fetch_to_device=True)
    return strategy.distribute_datasets_from_function(dataset_fn, options)


# --------------------------------------------------------------------------------------------- checkpoints
def task_type_and_id(strategy) -> tuple[str | None, int | None]:
    """(task type, task id) of this worker in a multi-worker cluster, (None, None) on a single worker."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return None, None
    return resolver.task_type, resolver.task_id


def episodes_per_worker(strategy, global_batch: int) -> int:
    """Episodes of a global meta-batch that this worker's replicas hold at once (in one machine's memory when the
    replicas are its CPUs): all of them on a single worker, its share in a multi-worker cluster."""
    workers = 1
    if task_type_and_id(strategy)[0] is not None:
        cluster = strategy.cluster_resolver.cluster_spec().as_dict()
        workers = sum(len(cluster.get(name, ())) for name in ("chief", "worker")) or 1
    return max(1, int(global_batch) // workers)


def is_chief(strategy=None) -> bool:
    """True on the worker that writes checkpoints and logs (the single worker, "chief", or worker 0 without a
    chief task, as TensorFlow's convention is)."""
    strategy = strategy or tf.distribute.get_strategy()
    task_type, task_id = task_type_and_id(strategy)
    if task_type is None:
        return True
    cluster = strategy.cluster_resolver.cluster_spec().as_dict()
    if "chief" in cluster:
        return task_type == "chief"
    return task_type == "worker" and task_id == 0


def task_name(strategy=None) -> str | None:
    """This worker's name in a multi-worker cluster ("worker 1", "chief"), None on a single worker."""
    task_type, task_id = task_type_and_id(strategy or tf.distribute.get_strategy())
    if task_type is None:
        return None
    return task_type if task_type == "chief" else f"{task_type} {task_id}"


def all_workers_ok(strategy, ok: bool) -> bool:
    """True when `ok` is True on every worker: a collective, so every worker calls it at the same point.

    A check that can fail on one worker only (the chief's run-directory checks, data missing on one host) would
    otherwise leave the other workers waiting in their first collective until the cluster's heartbeat timeout
    aborts them with a TensorFlow error. Only MultiWorkerMirroredStrategy runs one Python program per worker; with
    any other strategy the program is alone and gets `ok` back.
    """
    multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    if not multi_worker or task_type_and_id(strategy)[0] is None:
        return ok
    failed = 0.0 if ok else 1.0

    @tf.function
    def failures():
        per_replica = strategy.run(lambda: tf.constant(failed))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    return float(failures()) == 0.0


def same_on_every_worker(strategy, fingerprint: int) -> bool:
    """True when every worker passed the same `fingerprint` (an int below 2^31, e.g. of its run settings); a
    collective, as `all_workers_ok` (every worker gets the same answer). Workers started with different settings
    would otherwise train together on mismatched tensors until the loss became NaN."""
    multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    if not multi_worker or task_type_and_id(strategy)[0] is None:
        return True
    value = float(fingerprint)

    @tf.function
    def total():
        per_replica = strategy.run(lambda: tf.constant(value, tf.float64))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    # The sum of all replicas' values equals replicas x mine on every worker only if all are mine; a worker that
    # sees otherwise tells the others through all_workers_ok.
    return all_workers_ok(strategy, float(total()) == strategy.num_replicas_in_sync * value)


def worker_directory(directory, strategy=None) -> str:
    """Where this worker writes `directory`'s files: `directory` itself on the chief, a private temporary
    directory elsewhere (every worker must take part in a save; only the chief's copy is kept)."""
    strategy = strategy or tf.distribute.get_strategy()
    if is_chief(strategy):
        return str(directory)
    task_type, task_id = task_type_and_id(strategy)
    return tempfile.mkdtemp(prefix=f"metalstm-{task_type}{task_id}-")


def remove_worker_directory(path, directory) -> None:
    """Delete a non-chief worker's temporary copy (no-op on the chief)."""
    if os.path.abspath(str(path)) != os.path.abspath(str(directory)):
        shutil.rmtree(str(path), ignore_errors=True)


def tf_config() -> dict:
    """The parsed TF_CONFIG environment variable ({} when unset)."""
    text = os.environ.get("TF_CONFIG", "")
    return json.loads(text) if text else {}


def clip_by_global_norm_over_replicas(gradients, clip_norm):
    """Scales this replica's gradients so that their SUM over replicas has global L2 norm at most `clip_norm`.

    The optimizer all-reduces (sums) the replicas' gradients after this; scaling every replica's part by
    min(1, clip_norm / ||sum||) makes that sum exactly tf.clip_by_global_norm(sum, clip_norm). Outside a
    multi-replica strategy the all-reduce is the identity and this is plain global-norm clipping.
    """
    summed = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, gradients)
    scale = clip_norm / tf.maximum(tf.linalg.global_norm(summed), clip_norm)
    return [gradient * scale for gradient in gradients]
