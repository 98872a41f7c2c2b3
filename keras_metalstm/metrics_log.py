"""The metrics log of a training run: metrics.jsonl (appended) and metrics.csv (rewritten atomically), the
training curves drawn from it, and the same scalars for TensorBoard when it is installed."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from keras_metalstm.config import atomic_write_text

METRICS_FILE = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
CURVES_FILE = "curves.png"
CSV_COLUMNS = ["kind", "episode", "loss", "accuracy", "learning_rate", "ci95", "best", "seconds"]


class MetricsLog:
    """metrics.jsonl (appended) + metrics.csv (rewritten atomically); on resume rows past the restored episode
    are dropped so the log matches the checkpoint."""

    def __init__(self, run_dir, truncate_after: int | None = None):
        self.path = Path(run_dir) / METRICS_FILE
        self.csv_path = Path(run_dir) / METRICS_CSV
        self.rows = read_metrics(run_dir)
        if truncate_after is not None:
            kept = [r for r in self.rows if int(r.get("episode", 0)) <= truncate_after] if truncate_after else []
            if len(kept) != len(self.rows) or truncate_after == 0:
                atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
            self.rows = kept
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def append(self, row: dict) -> None:
        self.rows.append(row)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        self._write_csv()

    def _write_csv(self):
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.csv_path, buffer.getvalue())

    def close(self):
        self._file.close()


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a kill -9
    return rows


def write_curves(run_dir) -> Path | None:
    """Draw curves.png from the run's metrics log, with the baselines its saved evaluations scored (None when the
    run has logged nothing yet)."""
    from keras_metalstm.evaluation import saved_baselines
    from keras_metalstm.plots import plot_training_curves

    rows = read_metrics(run_dir)
    if not rows:
        return None
    return plot_training_curves(rows, Path(run_dir) / CURVES_FILE, baselines=saved_baselines(run_dir))


def tensorboard_writer(run_dir: Path):
    """A summary writer for the run's tensorboard/ folder, or None when the tensorboard package is not installed."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        return None
    import tensorflow as tf

    return tf.summary.create_file_writer(str(run_dir / "tensorboard"))


def write_scalars(writer, step, values):
    """The {name: value} scalars at `step` into `writer` (nothing without one)."""
    if writer is None:
        return
    import tensorflow as tf

    with writer.as_default(step=step):
        for name, value in values.items():
            tf.summary.scalar(name, value)
