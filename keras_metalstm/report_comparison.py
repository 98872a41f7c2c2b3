"""Comparison of two saved evaluation reports (`metalstm compare`): one method's per-episode accuracies minus
another's, paired episode by episode, for reports that scored the very same episodes."""

from __future__ import annotations

import numpy as np

from keras_metalstm.evaluation import summarise

# What makes two saved reports score the same episodes (episodes are a function of these and the seed).
SAME_EPISODES_KEYS = ("dataset", "data_dir", "split", "seed", "n_way", "k_shot", "query", "episodes")


def compare_reports(first: dict, second: dict, method: str = "meta_lstm", second_method: str | None = None) -> dict:
    """`method` of the saved report `first` minus `second_method` (default: the same method) of `second`, paired
    episode by episode: {"mean", "ci95", "episodes"} in percentage points. Both reports must have scored the same
    episodes (SAME_EPISODES_KEYS) and saved their per-episode accuracies."""
    second_method = second_method or method
    for report, which in ((first, "first"), (second, "second")):
        if not isinstance(report.get("results"), dict):  # a state.json, a config, another tool's JSON
            raise ValueError(f"the {which} file is not an evaluation report: `metalstm evaluate RUN` writes those to "
                             "RUN/evaluation/*.json")
        unrecorded = [key for key in SAME_EPISODES_KEYS if key not in report]
        if unrecorded:
            raise ValueError(f"the {which} report does not record its episodes' {', '.join(unrecorded)} (saved by an "
                             "older version): evaluate its run again to compare it")
    differing = [key for key in SAME_EPISODES_KEYS if first.get(key) != second.get(key)]
    if differing:
        details = ", ".join(f"{key} {first.get(key)!r} vs {second.get(key)!r}" for key in differing)
        raise ValueError(f"the two reports did not score the same episodes ({details}): evaluate both with the same "
                         "--dataset, --data-dir, --split, --seed, --query and --episodes")
    values = []
    for report, name, which in ((first, method, "first"), (second, second_method, "second")):
        saved = report.get("episode_accuracies")
        if saved is None:
            raise ValueError(f"the {which} report has no per-episode accuracies (saved before they were): "
                             "evaluate its run again to compare it")
        if name not in saved:
            raise ValueError(f"the {which} report has no {name!r} (it has {', '.join(saved)})")
        values.append(np.asarray(saved[name], np.float64))
    return summarise(values[0] - values[1])
