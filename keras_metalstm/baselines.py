"""The paper's two baselines (Ravi & Larochelle 2017, Table 1), built from the meta-learner's own learner architecture.

1. Pre-training: the run's learner architecture (conv4, or the user's model, with one output per class) is trained
   as an ordinary classifier on ALL images of ALL meta-train classes (Adam, cross-entropy, a fixed number of
   epochs, seeded). Its output layer must be a Dense layer (the fine-tune baseline replaces it).
2. Baseline fine-tune: per test episode, the pre-trained network's output layer is replaced by a fresh N-way one
   (zero-initialised, so every episode starts from the same weights and nothing depends on a random draw) and the
   WHOLE network is trained with plain full-batch gradient descent on the episode's support set; batch-norm
   layers use the pre-training statistics (inference mode), so a query prediction never depends on the other
   queries. The learning rate and the number of steps are chosen on validation-class episodes (grid
   `FINETUNE_LEARNING_RATES` x `FINETUNE_STEPS`, best mean query accuracy).
3. Baseline nearest neighbour: 1-NN (Euclidean distance) on the pre-trained network's penultimate features (the
   input of its output layer: conv4's flattened last conv block); each query gets the label of its nearest
   support image.

`Baselines.episode_accuracies(batch)` scores both on exactly the episodes it is given, so the evaluation feeds the
meta-learner and the baselines the same batches.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

FINETUNE_LEARNING_RATES = (0.003, 0.01, 0.03, 0.1)
FINETUNE_STEPS = (5, 10, 25, 50, 100)


@dataclass
class PretrainConfig:
    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 1e-3
    seed: int = 0


@dataclass
class FinetuneChoice:
    learning_rate: float
    steps: int
    val_accuracy: float
    val_episodes: int
    grid: dict  # "lr=..,steps=.." -> mean validation accuracy


def pretrain_classifier(train_dataset, learner, config: PretrainConfig | None = None, verbose=0):
    """A freshly initialised model of `learner`'s architecture, with one output per meta-train class, trained as a
    classifier on every meta-train image; returns (model, final training accuracy)."""
    import keras
    import tensorflow as tf

    from keras_metalstm.learner_spec import fresh_copy

    config = config or PretrainConfig()
    keras.utils.set_random_seed(int(config.seed))
    labels = np.repeat(np.arange(train_dataset.num_classes, dtype=np.int32), train_dataset.class_sizes)
    model = fresh_copy(learner, num_classes=train_dataset.num_classes)
    data = (
        tf.data.Dataset.from_tensor_slices((train_dataset.images, labels))
        .shuffle(len(labels), seed=int(config.seed), reshuffle_each_iteration=True)
        .batch(int(config.batch_size))
        .map(lambda x, y: (tf.cast(x, tf.float32) / 255.0, y))
        .prefetch(2)
    )
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    # shuffle=False: the data set shuffles itself (Keras would warn that it ignores the flag).
    history = model.fit(data, epochs=int(config.epochs), verbose=verbose, shuffle=False)
    return model, float(history.history["accuracy"][-1])


def output_layer(model):
    """The layer whose output is the model's output (a functional or Sequential model)."""
    return model.outputs[0]._keras_history.operation


def feature_model(pretrained):
    """The pre-trained network up to its penultimate features (the input of its output layer)."""
    import keras

    return keras.Model(pretrained.inputs, output_layer(pretrained).input, name="features")


class Baselines:
    """Fine-tune and nearest-neighbour baselines on top of one pre-trained classifier."""

    def __init__(self, pretrained, n_way: int):
        import keras
        import tensorflow as tf

        head = output_layer(pretrained)
        if not (isinstance(head, keras.layers.Dense) and head.use_bias and head.activation.__name__ == "linear"):
            from keras_metalstm.learner_spec import LearnerError

            raise LearnerError(
                f"the baselines replace the learner's output layer by a new N-way Dense layer with a bias and no "
                f"activation; this learner ends in {type(head).__name__} {head.name!r}"
            )
        self.pretrained = pretrained
        self.n_way = int(n_way)
        self.features = feature_model(pretrained)
        self.feature_dim = int(self.features.output.shape[-1])
        self._body_values = [tf.convert_to_tensor(v.value) for v in self.features.trainable_variables]
        self._state_values = [tf.convert_to_tensor(v.value) for v in self.features.non_trainable_variables]
        self._steps_fn = tf.function(self._steps, reduce_retracing=True)
        self._accuracy_fn = tf.function(self._accuracy, reduce_retracing=True)
        self._nn_fn = tf.function(self._nearest_neighbour, reduce_retracing=True)
        self.learning_rate = None
        self.steps = None

    # ----------------------------------------------------------------------------------------- fine-tune
    def _logits(self, params, images):
        body, (kernel, bias) = params[:-2], params[-2:]
        features, _ = self.features.stateless_call(body, self._state_values, images, training=False)
        return features @ kernel + bias

    def _steps(self, params, images, labels, learning_rate, num_steps):
        import tensorflow as tf

        params = list(params)
        for _ in tf.range(num_steps):
            with tf.GradientTape() as tape:
                tape.watch(params)
                loss = tf.reduce_mean(
                    tf.nn.sparse_softmax_cross_entropy_with_logits(
                        labels=labels, logits=self._logits(params, images)
                    )
                )
            gradients = tape.gradient(loss, params)
            params = [p - learning_rate * g for p, g in zip(params, gradients, strict=True)]
        return params

    def _accuracy(self, params, images, labels):
        import tensorflow as tf

        predictions = tf.argmax(self._logits(list(params), images), axis=-1, output_type=tf.int32)
        return tf.reduce_mean(tf.cast(tf.equal(predictions, labels), tf.float32))

    def _initial_params(self):
        import tensorflow as tf

        return [*self._body_values, tf.zeros((self.feature_dim, self.n_way)), tf.zeros((self.n_way,))]

    def finetune_curve(
        self, support_images, support_labels, query_images, query_labels, learning_rate, steps=FINETUNE_STEPS
    ):
        """Query accuracy of one episode after each number of fine-tuning steps in `steps` (increasing)."""
        import tensorflow as tf

        params = self._initial_params()
        done, out = 0, []
        lr = tf.constant(float(learning_rate), tf.float32)
        for target in steps:
            params = self._steps_fn(params, support_images, support_labels, lr, tf.constant(target - done))
            done = target
            out.append(float(self._accuracy_fn(params, query_images, query_labels)))
        return out

    def finetune_accuracy(self, support_images, support_labels, query_images, query_labels):
        if self.learning_rate is None:
            raise RuntimeError("choose the fine-tuning learning rate and steps first (select_finetune)")
        return self.finetune_curve(
            support_images, support_labels, query_images, query_labels, self.learning_rate, (self.steps,)
        )[0]

    def select_finetune(
        self, episode_batches, learning_rates=FINETUNE_LEARNING_RATES, steps=FINETUNE_STEPS, progress=None
    ) -> FinetuneChoice:
        """Pick (learning rate, steps) with the best mean query accuracy on `episode_batches` (validation-class
        episodes); sets them on this object and returns the choice with the whole grid."""
        scores = {lr: [] for lr in learning_rates}
        count = 0
        for batch in episode_batches:
            arrays = _episode_arrays(batch)
            for support_x, support_y, query_x, query_y in arrays:
                count += 1
                for lr in learning_rates:
                    scores[lr].append(self.finetune_curve(support_x, support_y, query_x, query_y, lr, steps))
                if progress is not None:
                    progress(1)
        grid = {}
        best = None
        for lr in learning_rates:
            means = np.mean(np.asarray(scores[lr]), axis=0)
            for n, mean in zip(steps, means, strict=True):
                grid[f"lr={lr:g},steps={n}"] = float(mean)
                if best is None or mean > best[2]:
                    best = (lr, n, float(mean))
        self.learning_rate, self.steps = best[0], best[1]
        return FinetuneChoice(best[0], int(best[1]), best[2], count, grid)

    # ------------------------------------------------------------------------------- nearest neighbour
    def _nearest_neighbour(self, support_images, support_labels, query_images, query_labels):
        import tensorflow as tf

        support, _ = self.features.stateless_call(
            self._body_values, self._state_values, support_images, training=False
        )
        query, _ = self.features.stateless_call(
            self._body_values, self._state_values, query_images, training=False
        )
        distances = (
            tf.reduce_sum(query**2, -1, keepdims=True)
            - 2.0 * query @ tf.transpose(support)
            + tf.reduce_sum(support**2, -1)[tf.newaxis]
        )
        nearest = tf.argmin(distances, axis=-1, output_type=tf.int32)
        predictions = tf.gather(support_labels, nearest)
        return tf.reduce_mean(tf.cast(tf.equal(predictions, query_labels), tf.float32))

    def nearest_neighbour_accuracy(self, support_images, support_labels, query_images, query_labels):
        return float(self._nn_fn(support_images, support_labels, query_images, query_labels))

    # ------------------------------------------------------------------------------------------ batches
    def episode_accuracies(self, batch) -> dict[str, np.ndarray]:
        """{"finetune": (B,), "nearest_neighbour": (B,)} query accuracies of the episodes of `batch`."""
        finetune, nearest = [], []
        for episode in _episode_arrays(batch):
            finetune.append(self.finetune_accuracy(*episode))
            nearest.append(self.nearest_neighbour_accuracy(*episode))
        return {"finetune": np.asarray(finetune), "nearest_neighbour": np.asarray(nearest)}


def _episode_arrays(batch):
    """Split a batch dict of B episodes into B (support_x, support_y, query_x, query_y) tuples of tensors."""
    count = int(batch["support_images"].shape[0])
    return [
        (
            batch["support_images"][i],
            batch["support_labels"][i],
            batch["query_images"][i],
            batch["query_labels"][i],
        )
        for i in range(count)
    ]


# -------------------------------------------------------------------------------------------- run cache
def baseline_cache_paths(run_dir):
    """(pretrained.keras, baselines.json) in RUN_DIR/baselines/: the pre-trained classifier and its settings."""
    cache = Path(run_dir) / "baselines"
    return cache / "pretrained.keras", cache / "baselines.json"


def cached_pretrained_classifier(
    run_dir, config, splits, learner, pretrain: PretrainConfig | None = None, log=print
):
    """The run's learner architecture (a model of it: `learner`) pre-trained on the run's meta-train classes,
    trained once and cached in RUN_DIR/baselines/ (pretrained.keras, and its settings in baselines.json).

    Shared by the baselines and by meta-training runs whose theta_0 starts from it, so both use one network.
    Returns (model, info) where info is the content of baselines.json.
    """
    import keras

    pretrain = pretrain or PretrainConfig(seed=config.seed)
    model_path, info_path = baseline_cache_paths(run_dir)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if info.get("pretrain") == asdict(pretrain) and model_path.is_file():
        return keras.models.load_model(str(model_path)), info
    t0 = time.time()
    log(
        f"pre-training the {learner.name} classifier on {splits.train.num_classes} meta-train classes "
        f"({splits.train.num_images} images, {pretrain.epochs} epochs) ..."
    )
    model, train_accuracy = pretrain_classifier(splits.train, learner, pretrain, verbose=0)
    tmp = model_path.with_name(f".tmp-{os.getpid()}-pretrained.keras")
    model.save(str(tmp))
    os.replace(tmp, model_path)
    # Fine-tune choices made for another pre-trained network are dropped with it.
    info = {
        "pretrain": asdict(pretrain),
        "pretrain_train_accuracy": train_accuracy,
        "pretrain_seconds": round(time.time() - t0, 1),
    }
    _write_json(info_path, info)
    return model, info


def prepare_baselines(
    run_dir,
    config,
    splits,
    learner,
    pretrain: PretrainConfig | None = None,
    val_episodes=100,
    progress=None,
    log=print,
) -> tuple[Baselines, dict]:
    """Baselines for a training run whose learner is (a model of the architecture of) `learner`: the pre-trained
    classifier (`cached_pretrained_classifier`) and the
    fine-tune choice are computed once and cached in RUN_DIR/baselines/."""
    from keras_metalstm.data import episode_dataset
    from keras_metalstm.statistics import eval_batch_size

    model, info = cached_pretrained_classifier(run_dir, config, splits, learner, pretrain, log)
    info_path = baseline_cache_paths(run_dir)[1]
    baselines = Baselines(model, config.n_way)
    key = f"finetune_{config.n_way}way_{config.k_shot}shot_q{config.query}_val{val_episodes}"
    choice = info.get(key)
    if choice is None:
        log(f"choosing the fine-tune learning rate and steps on {val_episodes} validation episodes ...")
        batches = episode_dataset(
            splits.val,
            config.n_way,
            config.k_shot,
            config.query,
            batch_size=eval_batch_size(val_episodes),
            seed=config.seed + 2,
            num_episodes=val_episodes,
        )
        choice = asdict(baselines.select_finetune(batches, progress=progress))
        info[key] = choice
        _write_json(info_path, info)
    baselines.learning_rate, baselines.steps = choice["learning_rate"], choice["steps"]
    return baselines, {
        "pretrain_train_accuracy": info.get("pretrain_train_accuracy"),
        **info["pretrain"],
        "finetune": choice,
    }


def _write_json(path, data):
    from keras_metalstm.config import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
