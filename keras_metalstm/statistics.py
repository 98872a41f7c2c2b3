"""Summary statistics of per-episode accuracies, and the evaluation batch size (pure functions, no TensorFlow)."""

from __future__ import annotations

import math

import numpy as np


def mean_ci95(accuracies):
    """(mean, 1.96 * std / sqrt(E)) of per-episode accuracies, std = POPULATION std (numpy's default, ddof=0)."""
    values = np.asarray(accuracies, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("no episodes to summarise")
    return float(values.mean()), float(1.96 * values.std() / math.sqrt(values.size))


def eval_batch_size(episodes: int, limit: int = 5) -> int:
    """Largest divisor of `episodes` not above `limit` (every batch full: static shapes)."""
    for size in range(min(limit, episodes), 0, -1):
        if episodes % size == 0:
            return size
    return 1
