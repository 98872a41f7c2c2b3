"""Choosing a baseline's settings on validation episodes: the grid of candidate settings, and the point with the
best mean query accuracy (ties to the earlier point, as the authors' strict comparison)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ValidationChoice:
    settings: dict  # the chosen grid point, e.g. {"learning_rate": 0.1, "decay": 0.001}
    val_accuracy: float
    val_episodes: int
    grid: dict  # setting_label(point) -> mean validation query accuracy, in grid order


def setting_label(settings: dict) -> str:
    """A grid point as a key of ValidationChoice.grid: "learning_rate=0.1,decay=0.001"."""
    return ",".join(f"{name}={value:g}" for name, value in settings.items())


def grid_points(**axes) -> list[dict]:
    """Every combination of the axes' values, the first axis varying slowest (the authors' loop order)."""
    points = [{}]
    for name, values in axes.items():
        points = [{**point, name: value} for point in points for value in values]
    return points


def choose_on_validation(episodes, grid, score, progress=None) -> ValidationChoice:
    """The grid point with the best mean query accuracy over `episodes`.

    `score(episode)` returns one accuracy per point of `grid`, in its order (so a baseline can share work between
    points, e.g. score several step counts on one run). Ties go to the earlier point, as the authors' strict
    `>` comparison does.
    """
    scores = []
    for episode in episodes:
        values = list(score(episode))
        if len(values) != len(grid):
            raise ValueError(f"score returned {len(values)} accuracies for a grid of {len(grid)} points")
        scores.append(values)
        if progress is not None:
            progress(1)
    if not scores:
        raise ValueError("no validation episodes to choose the baseline's settings on")
    means = np.mean(np.asarray(scores, np.float64), axis=0)
    best = int(np.argmax(means))  # the first maximum
    return ValidationChoice(
        settings=dict(grid[best]),
        val_accuracy=float(means[best]),
        val_episodes=len(scores),
        grid={setting_label(point): float(mean) for point, mean in zip(grid, means, strict=True)},
    )
