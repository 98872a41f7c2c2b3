"""The baselines of the paper's Table 1 (Ravi & Larochelle 2017), as the authors ran them or as this package did,
and Baseline++ (Chen et al. 2019), all built from the meta-learner's own learner architecture.

Every baseline but the pixel nearest neighbour starts from one pre-trained network: the run's learner architecture
(conv4, or the user's model, with one output per class) trained as an ordinary classifier on ALL images of ALL
meta-train classes (Adam, cross-entropy, a fixed number of epochs, seeded; keras_metalstm.pretraining). Its output
layer must be a Dense layer with a bias and no activation (the fine-tunes replace it); its penultimate features are
the input of that layer (conv4: the flattened last conv block).

Protocol "authors" (twitter/meta-learning-lstm, model/baselines/*.lua; docs/baselines.md has the details):
  finetune_authors           the output layer replaced by a new N-way one drawn as Torch's nn.Linear draws it,
                             then 15 plain SGD updates of the WHOLE network on the support set with
                             lr / (1 + update * decay) (Torch's optim.sgd), batch norm in training mode (support
                             statistics, running averages moved at Torch's momentum 0.1), queries in inference
                             mode; the learning rate x decay chosen on validation episodes.
  nearest_neighbour_authors  1-NN by cosine similarity on the penultimate features (inference mode).
  pixel_nearest_neighbour    1-NN by cosine similarity on the flattened pixels in [0, 1] (no network).
Protocol "ours" (this package's earlier protocol):
  finetune                   a zero-initialised N-way output layer, full-batch gradient descent on the whole
                             network with frozen (pre-training) batch-norm statistics; learning rate x steps chosen
                             on validation episodes.
  nearest_neighbour          1-NN by Euclidean distance on the penultimate features.
Protocol "chen2019":
  baseline_plus              Baseline++: a cosine-similarity classifier (scale * cos(feature, w_class)) trained by
                             full-batch gradient descent on the frozen features of the support set; learning rate,
                             steps and scale chosen on validation episodes.

A baseline scores one episode, a (support_images, support_labels, query_images, query_labels) tuple of tensors cut
from the episode batch dicts (`episodes_of`); `Baselines.episode_accuracies(batch)` scores all of them on exactly
the batches the meta-learner sees. Settings are chosen on validation episodes by keras_metalstm.validation_grid;
a run's pre-trained network and validation choices are cached in RUN_DIR/baselines/ by
keras_metalstm.baseline_cache.
"""

from __future__ import annotations

import numpy as np

from keras_metalstm.pretraining import PretrainedFeatures
from keras_metalstm.validation_grid import grid_points

PROTOCOLS = ("authors", "ours")
DEFAULT_PROTOCOLS = ("authors",)
# The report key of every baseline -> the protocol that produced it.
BASELINE_PROTOCOLS = {
    "finetune_authors": "authors",
    "nearest_neighbour_authors": "authors",
    "pixel_nearest_neighbour": "authors",
    "finetune": "ours",
    "nearest_neighbour": "ours",
    "baseline_plus": "chen2019",
}
# One line per protocol, for reports that name the protocol behind each number (docs/baselines.md: every detail).
PROTOCOL_SUMMARIES = {
    "authors": "as the paper's authors ran them (twitter/meta-learning-lstm): a new output layer and the whole "
    "pre-trained network fine-tuned by 15 SGD updates, learning rate and decay chosen on validation episodes; "
    "1-NN by cosine similarity on the pre-trained network's penultimate features and on the pixels",
    "ours": "this package's earlier variants: a zero-initialised output layer, the whole network fine-tuned by "
    "full-batch gradient descent with frozen batch-norm statistics, learning rate and steps chosen on "
    "validation episodes; 1-NN by Euclidean distance on the penultimate features",
    "chen2019": "Baseline++ (Chen et al. 2019): a cosine classifier trained on the frozen penultimate features, "
    "learning rate, steps and scale chosen on validation episodes",
}

# Grids of config/baselines/train-pre-trained-SGD.lua (the authors' fine-tune).
AUTHORS_LEARNING_RATES = (0.5, 0.1, 0.01, 0.001, 0.0001, 0.00001)
AUTHORS_LEARNING_RATE_DECAYS = (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 0.0)
AUTHORS_UPDATES = 15
# Torch's nn.SpatialBatchNormalization momentum 0.1 (running = 0.9 running + 0.1 batch) in Keras' convention.
TORCH_BATCHNORM_MOMENTUM = 0.9

# This package's own fine-tune grid.
FINETUNE_LEARNING_RATES = (0.003, 0.01, 0.03, 0.1)
FINETUNE_STEPS = (5, 10, 25, 50, 100)

# Baseline++ grid (Chen et al. 2019 train the head for 100 epochs of SGD; here full-batch steps on the grid).
BASELINE_PLUS_LEARNING_RATES = (0.001, 0.01, 0.1, 1.0)
BASELINE_PLUS_STEPS = (10, 25, 50, 100)
BASELINE_PLUS_SCALES = (2.0, 5.0, 10.0, 20.0)


# ------------------------------------------------------------------------------------------ pure functions
def cosine_similarities(queries, supports):
    """(Q, S) cosine similarities between the rows of `queries` (Q, D) and `supports` (S, D); a zero row has
    similarity 0 with everything (as with Torch's nn.CosineDistance, whose norms get an epsilon)."""
    import tensorflow as tf

    return tf.math.l2_normalize(queries, axis=-1) @ tf.transpose(tf.math.l2_normalize(supports, axis=-1))


def squared_euclidean_distances(queries, supports):
    """(Q, S) squared Euclidean distances between the rows of `queries` and `supports`."""
    import tensorflow as tf

    return (
        tf.reduce_sum(queries**2, -1, keepdims=True)
        - 2.0 * queries @ tf.transpose(supports)
        + tf.reduce_sum(supports**2, -1)[tf.newaxis]
    )


def nearest_neighbour_predictions(support_features, support_labels, query_features, metric: str):
    """The label of each query's nearest support example: highest cosine similarity (`metric="cosine"`) or
    smallest Euclidean distance (`"euclidean"`); ties go to the first support example."""
    import tensorflow as tf

    if metric == "cosine":
        nearest = tf.argmax(
            cosine_similarities(query_features, support_features), axis=-1, output_type=tf.int32
        )
    elif metric == "euclidean":
        nearest = tf.argmin(
            squared_euclidean_distances(query_features, support_features), axis=-1, output_type=tf.int32
        )
    else:
        raise ValueError(f"unknown nearest-neighbour metric {metric!r}; use 'cosine' or 'euclidean'")
    return tf.gather(support_labels, nearest)


def torch_sgd_learning_rate(learning_rate, decay, update):
    """The learning rate of Torch's optim.sgd at its `update`-th call (0 first): lr / (1 + update * decay)."""
    return learning_rate / (1.0 + update * decay)


def torch_linear_init(in_features: int, out_features: int, seed: int):
    """(kernel (in, out), bias (out,)) float32 drawn as Torch's nn.Linear:reset() draws them: every entry uniform
    in [-1/sqrt(in), 1/sqrt(in)]; seeded, so a run's baselines always start from the same layer."""
    bound = 1.0 / np.sqrt(in_features)
    rng = np.random.default_rng(seed)
    kernel = rng.uniform(-bound, bound, size=(in_features, out_features)).astype(np.float32)
    bias = rng.uniform(-bound, bound, size=(out_features,)).astype(np.float32)
    return kernel, bias


def cosine_classifier_logits(features, weights, scale):
    """Baseline++'s logits: scale * cos(feature, w_c) for every class column w_c of `weights` (D, N)."""
    import tensorflow as tf

    return scale * (tf.math.l2_normalize(features, axis=-1) @ tf.math.l2_normalize(weights, axis=0))


def mean_cross_entropy(labels, logits):
    """The batch mean of the softmax cross-entropy (Torch's nn.CrossEntropyCriterion with sizeAverage)."""
    import tensorflow as tf

    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))


def logits_accuracy(logits, labels):
    """The fraction of rows whose highest logit is at their label."""
    import tensorflow as tf

    predictions = tf.argmax(logits, axis=-1, output_type=tf.int32)
    return tf.reduce_mean(tf.cast(tf.equal(predictions, labels), tf.float32))


def episodes_of(batch):
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


# -------------------------------------------------------------------------------------------- baselines
class Baseline:
    """What every baseline has: its report `key`, its `protocol`, the `grid` of settings chosen on validation
    episodes (empty: nothing to choose) and the chosen `settings`."""

    key: str
    grid: tuple | list = ()
    settings: dict | None = None

    @property
    def protocol(self) -> str:
        return BASELINE_PROTOCOLS[self.key]

    def chosen(self) -> dict:
        if self.settings is None:
            raise RuntimeError(f"choose the settings of {self.key} on validation episodes first")
        return self.settings


class NearestNeighbour(Baseline):
    """1-NN on the penultimate features (`features` given) or on the flattened pixels (`features=None`)."""

    def __init__(self, key, metric, features: PretrainedFeatures | None = None):
        import tensorflow as tf

        self.key, self.metric, self.features = key, metric, features
        self._accuracy_fn = tf.function(self._accuracy, reduce_retracing=True)

    def _embed(self, images):
        import tensorflow as tf

        if self.features is None:
            return tf.reshape(images, (tf.shape(images)[0], -1))
        return self.features(images)[0]

    def predictions(self, support_images, support_labels, query_images):
        return nearest_neighbour_predictions(
            self._embed(support_images), support_labels, self._embed(query_images), self.metric
        )

    def _accuracy(self, support_images, support_labels, query_images, query_labels):
        import tensorflow as tf

        predictions = self.predictions(support_images, support_labels, query_images)
        return tf.reduce_mean(tf.cast(tf.equal(predictions, query_labels), tf.float32))

    def accuracy(self, episode) -> float:
        return float(self._accuracy_fn(*episode))


class AuthorsFinetune(Baseline):
    """The authors' pre-trained-SGD baseline (model/baselines/pre-trained-SGD.lua): a new Torch-initialised output
    layer, `updates` SGD updates of the whole network with Torch's learning-rate decay, batch norm in training mode
    during the updates and in inference mode (the moved running averages) for the queries.

    `features` should average its batch-norm statistics at Torch's rate (TORCH_BATCHNORM_MOMENTUM)."""

    key = "finetune_authors"

    def __init__(
        self,
        features: PretrainedFeatures,
        n_way,
        seed=0,
        learning_rates=AUTHORS_LEARNING_RATES,
        decays=AUTHORS_LEARNING_RATE_DECAYS,
        updates=AUTHORS_UPDATES,
    ):
        import tensorflow as tf

        self.features = features
        # One draw for every episode, as the authors clone one network with one new layer for all episodes.
        self.head = [tf.constant(v) for v in torch_linear_init(features.dim, int(n_way), seed)]
        self.updates = int(updates)
        self.grid = grid_points(learning_rate=learning_rates, decay=decays)
        self._logits_fn = tf.function(self._query_logits, reduce_retracing=True)
        self._grid_logits_fn = tf.function(self._grid_query_logits, reduce_retracing=True)

    def _logits(self, params, state, images, training):
        body, (kernel, bias) = params[:-2], params[-2:]
        features, state = self.features(images, body, state, training=training)
        return features @ kernel + bias, state

    def _query_logits(self, support_images, support_labels, query_images, learning_rate, decay):
        import tensorflow as tf

        params, state = [*self.features.body, *self.head], list(self.features.state)
        for update in tf.range(self.updates):
            with tf.GradientTape() as tape:
                tape.watch(params)
                logits, new_state = self._logits(params, state, support_images, training=True)
                loss = mean_cross_entropy(support_labels, logits)
            gradients = tape.gradient(loss, params)
            rate = torch_sgd_learning_rate(learning_rate, decay, tf.cast(update, tf.float32))
            params = [p - rate * g for p, g in zip(params, gradients, strict=True)]
            state = new_state
        return self._logits(params, state, query_images, training=False)[0]

    def _grid_query_logits(self, support_images, support_labels, query_images):
        import tensorflow as tf

        from keras_metalstm.loop_parallelism import map_learner_passes

        rates = tf.constant([point["learning_rate"] for point in self.grid], tf.float32)
        decays = tf.constant([point["decay"] for point in self.grid], tf.float32)
        # One graph for the whole grid: the settings' fine-tunes are independent, so the executor overlaps their
        # small ops (a 1-shot update is too small to keep two cores busy on its own), unless that could crash
        # TensorFlow's CPU kernels for the network (keras_metalstm.loop_parallelism).
        return map_learner_passes(
            lambda setting: self._query_logits(support_images, support_labels, query_images, *setting),
            (rates, decays),
            tf.float32,
            self.features.model,
        )

    def query_logits(self, episode, learning_rate, decay):
        """The query logits of `episode` after the fine-tune with this learning rate and decay."""
        import tensorflow as tf

        support_images, support_labels, query_images, _ = episode
        return self._logits_fn(
            support_images,
            support_labels,
            query_images,
            tf.constant(float(learning_rate), tf.float32),
            tf.constant(float(decay), tf.float32),
        )

    def grid_accuracies(self, episode):
        support_images, support_labels, query_images, query_labels = episode
        logits = self._grid_logits_fn(support_images, support_labels, query_images)
        return [float(logits_accuracy(setting_logits, query_labels)) for setting_logits in logits]

    def accuracy(self, episode) -> float:
        return float(logits_accuracy(self.query_logits(episode, **self.chosen()), episode[3]))


class StepCurveBaseline(Baseline):
    """A baseline trained by plain full-batch gradient descent from `initial_params()`, whose grid is learning
    rate x head settings x steps: one run per (learning rate, head settings) scores every step count of
    `self.steps` (increasing) on the way. Subclasses define `prepare` (the inputs the steps see), `initial_params`
    and `logits(params, inputs, **head)`."""

    def __init__(self, features: PretrainedFeatures, learning_rates, steps, **head_axes):
        import tensorflow as tf

        self.features = features
        self.settings_grid = grid_points(learning_rate=learning_rates, **head_axes)
        self.steps = tuple(int(s) for s in steps)
        self._steps_fn = tf.function(self._steps, reduce_retracing=True)

    @property
    def grid(self):
        return [{**setting, "steps": steps} for setting in self.settings_grid for steps in self.steps]

    def grid_accuracies(self, episode):
        return [value for setting in self.settings_grid for value in self.step_curve(episode, **setting)]

    def step_curve(self, episode, learning_rate, steps=None, **head):
        """Query accuracy of `episode` after each number of steps in `steps` (default: the grid's)."""
        support_images, support_labels, query_images, query_labels = episode
        support, query = self.prepare(support_images), self.prepare(query_images)
        params, done, out = self.initial_params(), 0, []
        for target in steps or self.steps:
            params = self.train(params, support, support_labels, learning_rate, target - done, **head)
            done = target
            out.append(float(logits_accuracy(self.logits(params, query, **_constants(head)), query_labels)))
        return out

    def train(self, params, support, support_labels, learning_rate, steps, **head):
        """`params` after `steps` full-batch gradient steps on the prepared support inputs."""
        import tensorflow as tf

        return self._steps_fn(
            params,
            support,
            support_labels,
            tf.constant(float(learning_rate), tf.float32),
            tf.constant(int(steps)),
            _constants(head),
        )

    def accuracy(self, episode) -> float:
        settings = dict(self.chosen())
        steps = int(settings.pop("steps"))
        return self.step_curve(episode, steps=(steps,), **settings)[0]

    def _steps(self, params, support, labels, learning_rate, num_steps, head):
        import tensorflow as tf

        params = list(params)
        for _ in tf.range(num_steps):
            with tf.GradientTape() as tape:
                tape.watch(params)
                loss = mean_cross_entropy(labels, self.logits(params, support, **head))
            gradients = tape.gradient(loss, params)
            params = [p - learning_rate * g for p, g in zip(params, gradients, strict=True)]
        return params


def _constants(settings: dict) -> dict:
    """Float32 tensors of a grid point's values: one trace of a tf.function serves every grid point."""
    import tensorflow as tf

    return {name: tf.constant(float(value), tf.float32) for name, value in settings.items()}


class FullBatchFinetune(StepCurveBaseline):
    """This package's fine-tune: a zero-initialised output layer (every episode starts from the same weights) and
    full-batch gradient descent on the whole network with the pre-training batch-norm statistics, so a query
    prediction never depends on the other queries."""

    key = "finetune"

    def __init__(
        self,
        features: PretrainedFeatures,
        n_way,
        learning_rates=FINETUNE_LEARNING_RATES,
        steps=FINETUNE_STEPS,
    ):
        super().__init__(features, learning_rates, steps)
        self.n_way = int(n_way)

    def prepare(self, images):
        return images  # the whole network is trained: the steps see the images

    def initial_params(self):
        import tensorflow as tf

        return [*self.features.body, tf.zeros((self.features.dim, self.n_way)), tf.zeros((self.n_way,))]

    def logits(self, params, images):
        body, (kernel, bias) = params[:-2], params[-2:]
        return self.features(images, body)[0] @ kernel + bias


class BaselinePlus(StepCurveBaseline):
    """Baseline++ (Chen et al. 2019): a cosine-similarity classifier scale * cos(f, w_c) trained on the frozen
    features of the support set, from class vectors drawn as Torch's nn.Linear draws its weights."""

    key = "baseline_plus"

    def __init__(
        self,
        features: PretrainedFeatures,
        n_way,
        seed=0,
        learning_rates=BASELINE_PLUS_LEARNING_RATES,
        steps=BASELINE_PLUS_STEPS,
        scales=BASELINE_PLUS_SCALES,
    ):
        import tensorflow as tf

        super().__init__(features, learning_rates, steps, scale=scales)
        self.weights = tf.constant(torch_linear_init(features.dim, int(n_way), seed)[0])
        self._features_fn = tf.function(lambda images: features(images)[0], reduce_retracing=True)

    def prepare(self, images):
        return self._features_fn(images)  # frozen features: computed once per episode

    def initial_params(self):
        return [self.weights]

    def logits(self, params, features, scale):
        return cosine_classifier_logits(features, params[0], scale)


class Baselines:
    """The baselines of one evaluation, keyed by their report key."""

    def __init__(self, methods):
        self.methods = {method.key: method for method in methods}

    def episode_accuracies(self, batch) -> dict[str, np.ndarray]:
        """{key: (B,)} query accuracies of the episodes of `batch`, for every baseline."""
        episodes = episodes_of(batch)
        return {
            key: np.asarray([method.accuracy(episode) for episode in episodes])
            for key, method in self.methods.items()
        }


def build_baselines(pretrained, n_way, protocols=DEFAULT_PROTOCOLS, baseline_plus=False, seed=0) -> Baselines:
    """The baselines of `protocols` ("authors", "ours") and, with `baseline_plus`, Baseline++, on top of the
    pre-trained classifier `pretrained`; `seed` draws the new layers of the authors' fine-tune and Baseline++."""
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown or not protocols:
        raise ValueError(f"unknown baseline protocol(s) {unknown}; choose from {', '.join(PROTOCOLS)}")
    features = PretrainedFeatures(pretrained)
    methods = []
    if "authors" in protocols:
        torch_features = PretrainedFeatures(pretrained, batchnorm_momentum=TORCH_BATCHNORM_MOMENTUM)
        methods += [
            AuthorsFinetune(torch_features, n_way, seed=seed),
            NearestNeighbour("nearest_neighbour_authors", "cosine", features),
            NearestNeighbour("pixel_nearest_neighbour", "cosine"),
        ]
    if "ours" in protocols:
        methods += [
            FullBatchFinetune(features, n_way),
            NearestNeighbour("nearest_neighbour", "euclidean", features),
        ]
    if baseline_plus:
        methods.append(BaselinePlus(features, n_way, seed=seed))
    return Baselines(methods)
