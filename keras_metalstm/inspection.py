"""`metalstm inspect`: what the meta-learner of a training run learned, seen on test episodes beside plain SGD.

`inspect_run` traces the inner loop (`MetaLearner.trace`) on E episodes of the run's test classes (the first E
that `metalstm evaluate` scores with the same seed) and summarises the gates per learner layer and per learner
variable: the mean and the 10th, 50th and 90th percentiles over each one's coordinates, per episode, then
averaged over the episodes (so memory holds one episode's gates, whatever the learner's size). Beside it, plain
SGD runs from the same theta_0 on the same support sets with the same learner function, at every fixed learning
rate of SGD_LEARNING_RATES; the rate shown is the one with the lowest support loss after T steps, averaged over
the episodes (chosen on the support sets, as an optimiser's step would be; the query sets are not used).
`Inspection.write` writes gates.png, inner_loss.png and trace.json; `Inspection.summary` says in a paragraph
what they show.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from keras_metalstm.config import atomic_write_text
from keras_metalstm.evaluation import DEFAULT_TEST_SEED
from keras_metalstm.inner_loop_trace import GROUPINGS, layer_of
from keras_metalstm.statistics import mean_ci95

SGD_LEARNING_RATES = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
INSPECTION_DIR = "inspection"  # RUN_DIR/inspection: where `metalstm inspect` writes unless told otherwise
GATES_FILE, INNER_LOSS_FILE, TRACE_FILE = "gates.png", "inner_loss.png", "trace.json"
STATISTICS_NOTE = (
    "gate statistics are over each layer's or variable's coordinates, per episode, averaged over the "
    "episodes; distance is ||theta_t - theta_0|| and update_norm ||theta_t - theta_(t-1)|| of its "
    "coordinates, averaged over the episodes; lists run over the inner steps 1..T, support curves over "
    "theta_0..theta_T"
)


@dataclass
class Inspection:
    """The numbers of trace.json: what was inspected, the statistics per layer and per variable, the curves.

    Attributes:
        run: run_dir, checkpoint, data, split, seed, episodes, n_way, k_shot, inner_steps.
        layers: per learner layer its name, variables, size, "input_gate" and "forget_gate" ({"mean", "p10",
            "median", "p90"}), "distance" and "update_norm", each a list over the inner steps 1..T.
        variables: per learner variable its name, layer, size and the same statistics.
        support: "steps" 0..T; "meta_learner" and "sgd", each "loss" and "accuracy" as {"mean", "ci95"} over
            the episodes; sgd's "learning_rate"; "sgd_grid", every rate's mean final support loss.
    """

    run: dict
    layers: list[dict]
    variables: list[dict]
    support: dict

    def to_dict(self) -> dict:
        """trace.json's object; a value that is not finite (a diverging SGD rate) is null."""
        return _finite_or_null(
            {
                **self.run,
                "statistics": STATISTICS_NOTE,
                "layers": self.layers,
                "variables": self.variables,
                "support": self.support,
                "summary": self.summary(),
            }
        )

    def summary(self) -> str:
        """One sentence per learner layer (its learning rate and forget gate across the steps, how far its
        weights moved), and one comparing the support loss after T steps with plain SGD's."""
        steps = self.run["inner_steps"]
        sentences = []
        for layer in self.layers:
            rate = layer["input_gate"]["median"]
            forget = layer["forget_gate"]["median"]
            rate_text = f"learning rate median {_number(rate[0])} at step 1"
            forget_text = f"forget gate median {_gate(forget[0])}"
            if steps > 1:
                rate_text += f", {_trend(rate[0], rate[-1])} {_number(rate[-1])} at step {steps}"
                forget_text += f" to {_gate(forget[-1])}"
            sentences.append(
                f"layer {layer['name']}: {rate_text}; {forget_text}; theta_T - theta_0 has norm "
                f"{_number(layer['distance'][-1])}."
            )
        meta, sgd = self.support["meta_learner"], self.support["sgd"]
        rates = list(self.support["sgd_grid"])
        sentences.append(
            f"Support set after {steps} steps, mean of {self.run['episodes']} {self.run['split']} "
            f"episodes: meta-learner loss {meta['loss']['mean'][-1]:.3f}, accuracy "
            f"{100 * meta['accuracy']['mean'][-1]:.1f}%; plain SGD at the best fixed learning rate "
            f"{sgd['learning_rate']:g} (the lowest final support loss of {len(rates)} rates from {rates[0]} "
            f"to {rates[-1]}) loss {sgd['loss']['mean'][-1]:.3f}, accuracy "
            f"{100 * sgd['accuracy']['mean'][-1]:.1f}%."
        )
        return "\n".join(sentences)

    def write(self, out_dir) -> list[Path]:
        """gates.png, inner_loss.png and trace.json in `out_dir`, each written to a temporary file, renamed."""
        from keras_metalstm.plots import plot_gates, plot_inner_loss

        out_dir = Path(out_dir)
        run = self.run
        episodes = (
            f"{run['episodes']} {run['split']} episodes of {run['data']}, {run['n_way']}-way "
            f"{run['k_shot']}-shot, T = {run['inner_steps']}"
        )
        gates = plot_gates(
            self.layers,
            out_dir / GATES_FILE,
            note=f"line: median over the layer's coordinates, band: 10th-90th percentile; per episode, "
            f"averaged over {episodes}",
        )
        curves = [
            {"label": "meta-learner", **self.support["meta_learner"]},
            {
                "label": f"plain SGD, learning rate {self.support['sgd']['learning_rate']:g}",
                **self.support["sgd"],
            },
        ]
        inner_loss = plot_inner_loss(
            self.support["steps"],
            curves,
            out_dir / INNER_LOSS_FILE,
            note=f"{episodes}; SGD at the fixed learning rate with the lowest final support loss, from the "
            "same theta_0",
        )
        trace = out_dir / TRACE_FILE
        atomic_write_text(trace, json.dumps(self.to_dict(), indent=2) + "\n")
        return [gates, inner_loss, trace]


def inspect_run(
    run_dir,
    episodes: int = 20,
    split: str = "test",
    seed: int = DEFAULT_TEST_SEED,
    which: str = "best",
    learning_rates=SGD_LEARNING_RATES,
    progress=None,
) -> Inspection:
    """Trace the meta-learner of `run_dir` (`which` checkpoint: "best" or "latest") on `episodes` episodes of
    the run's `split` classes drawn with `seed`, beside plain SGD at each of `learning_rates`; `progress(1)` is
    called after every episode."""
    import tensorflow as tf

    from keras_metalstm.evaluation import check_episode_count, evaluation_dataset, evaluation_episodes
    from keras_metalstm.runs import checkpoint_kind, load_meta_learner

    episodes = check_episode_count(episodes)
    read = checkpoint_kind(run_dir, which)
    config, meta = load_meta_learner(run_dir, which=which)
    data = evaluation_dataset(config, split=split, run_dir=run_dir)
    sgd = tf.function(plain_sgd)
    theta0 = tf.convert_to_tensor(meta.theta0)
    statistics = {by: [] for by in GROUPINGS}
    meta_curves = {"loss": [], "accuracy": []}
    sgd_curves = {rate: {"loss": [], "accuracy": []} for rate in learning_rates}
    for batch in evaluation_episodes(data, config, episodes, seed, batch_size=1):
        images, labels = batch["support_images"][0], batch["support_labels"][0]
        trace = meta.trace(images, labels)
        for by in GROUPINGS:
            statistics[by].append(trace.statistics(by))
        meta_curves["loss"].append(trace.support_loss)
        meta_curves["accuracy"].append(trace.support_accuracy)
        for rate in learning_rates:
            loss, accuracy = sgd(
                meta.learner_function, theta0, images, labels, tf.constant(rate), meta.inner_steps
            )
            sgd_curves[rate]["loss"].append(loss.numpy())
            sgd_curves[rate]["accuracy"].append(accuracy.numpy())
        if progress is not None:
            progress(1)

    final_losses = {
        rate: float(np.mean([loss[-1] for loss in sgd_curves[rate]["loss"]])) for rate in learning_rates
    }
    best_rate = min(learning_rates, key=lambda rate: _finite_or_inf(final_losses[rate]))
    averaged = {by: _average(statistics[by]) for by in GROUPINGS}
    return Inspection(
        run={
            "run_dir": str(run_dir),
            "checkpoint": read,
            "data": data.name,
            "split": split,
            "seed": seed,
            "episodes": episodes,
            "n_way": config.n_way,
            "k_shot": config.k_shot,
            "inner_steps": meta.inner_steps,
        },
        layers=[
            {
                "name": name,
                "variables": [trace.variables[i] for i in indices],
                "size": sum(trace.sizes[i] for i in indices),
                **_lists(averaged["layer"][name]),
            }
            for name, indices in trace.groups("layer").items()
        ],
        variables=[
            {"name": name, "layer": layer_of(name), "size": size, **_lists(averaged["variable"][name])}
            for name, size in zip(trace.variables, trace.sizes, strict=True)
        ],
        support={
            "steps": list(range(meta.inner_steps + 1)),
            "meta_learner": {key: _mean_and_interval(rows) for key, rows in meta_curves.items()},
            "sgd": {
                "learning_rate": best_rate,
                **{key: _mean_and_interval(rows) for key, rows in sgd_curves[best_rate].items()},
            },
            "sgd_grid": {f"{rate:g}": loss for rate, loss in final_losses.items()},
        },
    )


def plain_sgd(learner_function, theta0, images, labels, learning_rate, steps):
    """Plain SGD from theta0 on (images, labels), theta_t = theta_{t-1} - learning_rate * gradient, for
    `steps` steps: the loss and accuracy at theta_0..theta_T, two (steps + 1,) tensors, computed as the
    meta-learner's trace computes its own (LearnerFunction.loss_and_accuracy, training mode)."""
    import tensorflow as tf

    def step(index, theta, losses, accuracies):
        with tf.GradientTape() as tape:
            tape.watch(theta)
            loss, accuracy = learner_function.loss_and_accuracy(theta, images, labels)
        theta = theta - tf.cast(learning_rate, theta.dtype) * tape.gradient(loss, theta)
        return index + 1, theta, losses.write(index, loss), accuracies.write(index, accuracy)

    records = [tf.TensorArray(theta0.dtype, size=steps + 1) for _ in range(2)]
    _, theta, losses, accuracies = tf.while_loop(
        lambda index, *_: index < steps,
        step,
        (0, tf.convert_to_tensor(theta0), *records),
        maximum_iterations=steps,
    )
    loss, accuracy = learner_function.loss_and_accuracy(theta, images, labels)
    return losses.write(steps, loss).stack(), accuracies.write(steps, accuracy).stack()


def _average(summaries):
    """The element-wise mean of nested dicts of arrays of one shape (one per episode)."""
    if isinstance(summaries[0], dict):
        return {key: _average([summary[key] for summary in summaries]) for key in summaries[0]}
    return np.mean(summaries, axis=0)


def _lists(statistics):
    """Nested dicts of arrays as nested dicts of lists of floats."""
    if isinstance(statistics, dict):
        return {key: _lists(value) for key, value in statistics.items()}
    return [float(value) for value in statistics]


def _mean_and_interval(rows) -> dict:
    """{"mean", "ci95"} per step of per-episode curves (episodes, steps), as lists."""
    columns = [mean_ci95(column) for column in np.asarray(rows, np.float64).T]
    return {"mean": [mean for mean, _ in columns], "ci95": [ci95 for _, ci95 in columns]}


def _finite_or_null(value):
    """`value` (nested dicts and lists) with every non-finite float replaced by None: JSON has no NaN."""
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_or_null(item) for item in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _finite_or_inf(value):
    return value if math.isfinite(value) else math.inf


def _number(value) -> str:
    return f"{value:.3g}"


def _gate(value) -> str:
    """A gate value to 4 decimals, or as "1 - 2.3e-05" when that rounds to 1."""
    return f"{value:.4f}" if value < 0.99995 else f"1 - {1 - value:.1e}"


def _trend(first, last) -> str:
    """How a value went from `first` to `last`, as the words before `last`: more than 5% up or down, or not."""
    if last > 1.05 * first:
        return "rising to"
    return "falling to" if last < 0.95 * first else "steady at"
