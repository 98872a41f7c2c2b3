"""What the meta-learner did to one task, step by step (`MetaLearner.trace`): the records, the inner loop that
writes them (`record_inner_loop`), and their summaries per learner variable and per learner layer.

A trace holds, for the inner steps t = 1..T, the input gate i_t (the learned learning rate) and the forget gate
f_t (the learned shrinkage) of every coordinate of theta, the learner's support loss and accuracy at
theta_0..theta_T (in training mode, as the inner loop computes them), and per learner variable the norms of
theta_t - theta_0 and of the update theta_t - theta_{t-1}. Coordinates are in theta's order: the learner's
trainable variables, each flattened, one after the other. A variable is named by its Keras path ("conv1/kernel"),
a layer by that path without the variable's own name ("conv1").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from keras_metalstm.ops import fused_kernels

# The percentiles of a group's coordinates that summaries report, by name.
PERCENTILES = {"p10": 10.0, "median": 50.0, "p90": 90.0}
GATES = ("input_gate", "forget_gate")
GROUPINGS = ("variable", "layer")


def layer_of(variable_path: str) -> str:
    """The layer a variable belongs to: its path without the last part ("conv1/kernel" -> "conv1"; in a nested
    or subclassed model "net/dense/kernel" -> "net/dense")."""
    return variable_path.rpartition("/")[0] or variable_path


@dataclass
class InnerLoopTrace:
    """One task's inner loop; T steps, P coordinates, V learner variables."""

    variables: list[str]  # the paths of the learner's trainable variables, in theta's order
    sizes: list[int]  # their numbers of coordinates (sum: P)
    input_gates: np.ndarray  # (T, P) sigmoid(i_logit_t)
    forget_gates: np.ndarray  # (T, P) sigmoid(f_logit_t)
    support_loss: np.ndarray  # (T + 1,) at theta_0..theta_T
    support_accuracy: np.ndarray  # (T + 1,)
    distances: np.ndarray  # (T, V) ||theta_t - theta_0|| per variable
    update_norms: np.ndarray  # (T, V) ||theta_t - theta_{t-1}|| per variable

    # The per-step records MetaLearner.trace stacks, one row per inner step.
    STEP_RECORDS = (
        "input_gates",
        "forget_gates",
        "support_loss",
        "support_accuracy",
        "distances",
        "update_norms",
    )

    @classmethod
    def from_records(cls, learner_function, records) -> InnerLoopTrace:
        """The trace of the learner that `learner_function` runs, from the tensors `record_inner_loop` returned."""
        return cls(
            variables=[variable.path for variable in learner_function.learner.trainable_variables],
            sizes=list(learner_function.sizes),
            **{name: value.numpy() for name, value in records.items()},
        )

    def groups(self, by: str = "variable") -> dict[str, list[int]]:
        """{name: indices of its variables} in theta's order: every variable on its own (by="variable") or the
        variables of each layer together (by="layer")."""
        if by not in GROUPINGS:
            raise ValueError(f"by must be one of {GROUPINGS}, got {by!r}.")
        groups: dict[str, list[int]] = {}
        for index, path in enumerate(self.variables):
            groups.setdefault(path if by == "variable" else layer_of(path), []).append(index)
        return groups

    def gates_of(self, variable: str) -> dict[str, np.ndarray]:
        """The input and forget gates of one variable's coordinates, each (T, size of the variable)."""
        coordinates = self._coordinates([self.variables.index(variable)])
        return {
            "input_gate": self.input_gates[:, coordinates],
            "forget_gate": self.forget_gates[:, coordinates],
        }

    def statistics(self, by: str = "variable") -> dict[str, dict]:
        """Per group (see `groups`): {"input_gate": {"mean", "p10", "median", "p90"}, "forget_gate": {...},
        "distance": ..., "update_norm": ...}, every value an array over the T steps; the gate statistics are
        over the group's coordinates, the norms those of the group's coordinates together."""
        statistics = {}
        for name, indices in self.groups(by).items():
            coordinates = self._coordinates(indices)
            entry = {}
            for gate, values in zip(GATES, (self.input_gates, self.forget_gates), strict=True):
                values = values[:, coordinates]
                percentiles = np.percentile(values, list(PERCENTILES.values()), axis=1)
                entry[gate] = {
                    "mean": values.mean(axis=1, dtype=np.float64),
                    **dict(zip(PERCENTILES, percentiles, strict=True)),
                }
            entry["distance"] = _combined_norm(self.distances[:, indices])
            entry["update_norm"] = _combined_norm(self.update_norms[:, indices])
            statistics[name] = entry
        return statistics

    def _coordinates(self, indices) -> np.ndarray:
        ends = np.cumsum(self.sizes)
        return np.concatenate([np.arange(ends[i] - self.sizes[i], ends[i]) for i in indices])


def _combined_norm(norms: np.ndarray) -> np.ndarray:
    """The L2 norm of several variables together, from each one's norm: (T, k) -> (T,)."""
    return np.sqrt(np.sum(np.square(norms.astype(np.float64)), axis=1))


def record_inner_loop(meta, support_images, support_labels, inner_steps):
    """The records of an `InnerLoopTrace` of `meta` (a MetaLearner) adapting to one task: its inner loop
    (`inner_loop`'s step, one `tf.while_loop`) run with the gates, support metrics and distances of each step
    written down; tensors to trace into a tf.function."""
    learner = meta._learner_function
    images, labels = support_images[tf.newaxis], support_labels[tf.newaxis]
    variable_of_coordinate = tf.repeat(tf.range(len(learner.sizes)), learner.sizes)

    def variable_norms(difference):
        squares = tf.math.unsorted_segment_sum(
            tf.square(difference[0]), variable_of_coordinate, len(learner.sizes)
        )
        return tf.sqrt(squares)

    def support_metrics(theta):
        loss, correct = learner.loss_and_accuracy(theta[0], support_images, support_labels)
        return tf.cast(loss, theta.dtype), tf.cast(correct, theta.dtype)

    theta0, *carry = meta._initial_carry(1, images)

    def record_step(step, theta, lstm_state, gate_logits, states, records):
        new_theta, lstm_state, gate_logits, states = meta._inner_step(
            theta, lstm_state, gate_logits, states, images, labels
        )
        forget_logits, input_logits = gate_logits
        loss, correct = support_metrics(new_theta)
        values = {
            "input_gates": tf.sigmoid(input_logits[0]),
            "forget_gates": tf.sigmoid(forget_logits[0]),
            "support_loss": loss,
            "support_accuracy": correct,
            "distances": variable_norms(new_theta - theta0),
            "update_norms": variable_norms(new_theta - theta),
        }
        records = {name: records[name].write(step, value) for name, value in values.items()}
        return step + 1, new_theta, lstm_state, gate_logits, states, records

    records = {name: tf.TensorArray(theta0.dtype, size=inner_steps) for name in InnerLoopTrace.STEP_RECORDS}
    # Stock ops even where a caller has enabled the fused kernels: their activations round differently.
    with fused_kernels.disabled():
        *_, records = tf.while_loop(
            lambda step, *_: step < inner_steps,
            record_step,
            (0, theta0, *carry, records),
            maximum_iterations=inner_steps,
        )
        start_loss, start_accuracy = support_metrics(theta0)
    stacked = {name: record.stack() for name, record in records.items()}
    # The support metrics of theta_0 come first: index t holds those of theta_t.
    stacked["support_loss"] = tf.concat([[start_loss], stacked["support_loss"]], axis=0)
    stacked["support_accuracy"] = tf.concat([[start_accuracy], stacked["support_accuracy"]], axis=0)
    return stacked
