"""Evaluation of a training run: E test episodes, mean accuracy and 95% interval, the baselines, Table 1.

The 95% interval is 1.96 * std / sqrt(E) over the E per-episode query accuracies, with std the POPULATION
standard deviation (numpy's default, ddof=0; the sample std, ddof=1, differs by a factor sqrt(E/(E-1)), 1.0008
for E=600). The meta-learner is evaluated with the inner steps T of training (the run's config) unless a
test-time ablation changes them, in test mode, from the best-validation checkpoint.
The meta-learner and the baselines are scored on the very same episode batches (one pass over the stream).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from keras_metalstm.baselines import BASELINE_PROTOCOLS, DEFAULT_PROTOCOLS
from keras_metalstm.statistics import eval_batch_size, mean_ci95

METHOD_NAMES = {
    "finetune_authors": "Baseline fine-tune",
    "nearest_neighbour_authors": "Baseline nearest neighbour",
    "pixel_nearest_neighbour": "Baseline pixel nearest neighbour",
    "finetune": "Baseline fine-tune",
    "nearest_neighbour": "Baseline nearest neighbour",
    "baseline_plus": "Baseline++",
    "meta_lstm": "Meta-Learner LSTM",
}
# A baseline's label names the protocol that produced it: "Baseline fine-tune (authors)".
METHOD_LABELS = {
    method: f"{name} ({BASELINE_PROTOCOLS[method]})" if method in BASELINE_PROTOCOLS else name
    for method, name in METHOD_NAMES.items()
}
# The paper's row order (baselines, then the meta-learner), each protocol's rows together.
TABLE_ORDER = (
    "finetune_authors",
    "nearest_neighbour_authors",
    "pixel_nearest_neighbour",
    "finetune",
    "nearest_neighbour",
    "baseline_plus",
    "meta_lstm",
)
SPLITS = ("train", "val", "test", "all")
DEFAULT_TEST_SEED = 1000
# `metalstm evaluate` saves every report as RUN_DIR/evaluation/<report_file_name>.
EVALUATION_DIR = "evaluation"


def summarise(accuracies) -> dict:
    """{"mean", "ci95", "episodes"} in percent from per-episode accuracies in [0, 1]."""
    mean, ci95 = mean_ci95(accuracies)
    return {"mean": 100.0 * mean, "ci95": 100.0 * ci95, "episodes": int(np.size(accuracies))}


@dataclass
class EvaluationReport:
    results: dict  # method -> {"mean", "ci95", "episodes"} (percent)
    n_way: int
    k_shot: int
    inner_steps: int
    dataset: str
    split: str
    seed: int
    seconds: float
    data_dir: str | None = None  # the directory the episodes came from (None: the built-in fontglot)
    query: int | None = None  # query images per class of the episodes
    details: dict = field(default_factory=dict)
    accuracies: dict = field(default_factory=dict, repr=False)  # method -> per-episode accuracies

    @property
    def episodes(self) -> int:
        return int(np.size(self.accuracies["meta_lstm"]))

    @property
    def column(self) -> str:
        return f"{self.n_way}-way {self.k_shot}-shot"

    def rows(self) -> dict:
        """The results, each baseline's row with its "protocol" and its "paired_difference" (Meta-LSTM minus
        it, as in `paired_differences`): what `--json` prints and the saved report keeps as "results"."""
        rows = {}
        for method, summary in self.results.items():
            row = dict(summary)
            if method in BASELINE_PROTOCOLS:
                row["protocol"] = BASELINE_PROTOCOLS[method]
                if method in self.paired_differences:
                    row["paired_difference"] = self.paired_differences[method]
            rows[method] = row
        return rows

    def to_json(self) -> str:
        return json.dumps(self.rows())

    def to_dict(self) -> dict:
        """The saved report (`save_report`): the rows, the paired differences and the evaluation's settings."""
        return {
            "results": self.rows(),
            "paired_differences": self.paired_differences,
            "n_way": self.n_way,
            "k_shot": self.k_shot,
            "query": self.query,
            "inner_steps": self.inner_steps,
            "dataset": self.dataset,
            "data_dir": self.data_dir,
            "split": self.split,
            "seed": self.seed,
            "episodes": self.episodes,
            "seconds": round(self.seconds, 1),
            "details": self.details,
            # Per episode, in episode order: two reports on the same episodes can then be compared paired
            # (`report_comparison.compare_reports`), e.g. an ablation against the run as trained.
            "episode_accuracies": {
                method: [round(float(value), 6) for value in values] for method, values in self.accuracies.items()
            },
        }

    def table(self) -> str:
        return format_table({self.column: self.results})

    @cached_property
    def paired_differences(self) -> dict:
        """Meta-LSTM minus each baseline, episode by episode: {baseline: {"mean", "ci95", "episodes"}} in
        percentage points. All methods scored the same episodes, so the interval of the per-episode difference
        leaves out what the episodes' varying difficulty adds to each method's own interval."""
        if "meta_lstm" not in self.accuracies:
            return {}
        meta = np.asarray(self.accuracies["meta_lstm"], np.float64)
        return {
            method: summarise(meta - np.asarray(self.accuracies[method], np.float64))
            for method in TABLE_ORDER
            if method != "meta_lstm" and method in self.accuracies
        }

    def differences_text(self) -> str:
        """One line per baseline: "Meta-Learner LSTM - Baseline fine-tune: +0.63 +- 0.30 points (paired, ...)"."""
        return "\n".join(
            f"{METHOD_LABELS['meta_lstm']} - {METHOD_LABELS[method]}: {value['mean']:+.2f} +- {value['ci95']:.2f} "
            f"points (paired over the same {value['episodes']} episodes)"
            for method, value in self.paired_differences.items()
        )


def report_file_name(report: EvaluationReport) -> str:
    """<data source>-<split>-<N>way<K>shot-<E>ep[-baselines-<protocols>][-<test-time changes>][-latest]
    [-seed<S>].json: one file per data source, set of compared methods, test-time change, checkpoint and test
    seed (the default best checkpoint and seed add nothing). The data source is the data set's name and,
    for data read from a directory, the directory's name and a digest of its absolute path: evaluating one run on
    two folders, or its latest checkpoint beside its best, keeps both reports."""
    source = report.dataset
    if report.data_dir:
        folder = Path(report.data_dir)
        readable = re.sub(r"[^A-Za-z0-9_.]+", "_", folder.name)[:40] or "root"
        source += f"-{readable}-{hashlib.sha1(str(folder).encode()).hexdigest()[:8]}"
    protocols = report.details.get("baselines", {}).get("protocols")
    suffix = f"-baselines-{'-'.join(protocols)}" if protocols else ""
    changed = report.details.get("test_time", {})
    if "inner_steps" in changed:
        suffix += f"-T{changed['inner_steps']}"
    if "query_statistics" in changed:
        suffix += f"-{changed['query_statistics']}-statistics"
    if "query" in changed:
        suffix += f"-{changed['query']}q"
    checkpoint = report.details.get("checkpoint", "best")
    if checkpoint != "best":
        suffix += f"-{checkpoint}"
    if report.seed != DEFAULT_TEST_SEED:
        suffix += f"-seed{report.seed}"
    return f"{source}-{report.split}-{report.n_way}way{report.k_shot}shot-{report.episodes}ep{suffix}.json"


def save_report(report: EvaluationReport, run_dir) -> Path:
    """Writes the report as RUN_DIR/evaluation/<report_file_name> (atomically) and returns its path."""
    from keras_metalstm.config import atomic_write_text

    path = Path(run_dir) / EVALUATION_DIR / report_file_name(report)
    atomic_write_text(path, json.dumps(report.to_dict(), indent=2) + "\n")
    return path


def format_table(columns: dict[str, dict]) -> str:
    """A table shaped like the paper's Table 1: one row per method, one column per setting ("5-way 1-shot"),
    cells "mean +- ci95%"."""
    methods = [m for m in TABLE_ORDER if any(m in results for results in columns.values())]
    width = max(len("Model"), *(len(METHOD_LABELS[m]) for m in methods))
    header = f"| {'Model'.ljust(width)} | " + " | ".join(name.center(15) for name in columns) + " |"
    rule = f"|{'-' * (width + 2)}|" + "|".join("-" * 17 for _ in columns) + "|"
    lines = [header, rule]
    for method in methods:
        cells = []
        for results in columns.values():
            value = results.get(method)
            cells.append((f"{value['mean']:.2f} +- {value['ci95']:.2f}%" if value else "-").center(15))
        lines.append(f"| {METHOD_LABELS[method].ljust(width)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- evaluation data
def check_split(split: str, dataset: str | None):
    """Raises keras_metalstm.data.DataError unless `split` names classes that can be evaluated on: the run's own
    test, val or train classes, or all classes of another data set."""
    from keras_metalstm.data import DataError

    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if dataset is None and split == "all":
        raise DataError("--split all needs --dataset: the run's own train/val classes were seen in training")


def evaluation_dataset(
    config,
    dataset: str | None = None,
    data_dir=None,
    split: str = "test",
    run_dir=None,
    report=None,
    run_splits=None,
):
    """The class-indexed data set to evaluate on: the run's own test classes by default (those it recorded in
    `run_dir` when it started, `keras_metalstm.runs.load_splits`, which tells `report` when the data set's own
    split has changed since; `run_splits` when the caller has loaded them already), or `split` of another data
    set (`split="all"`: all its classes), converted to the run's image shape by the package's conversion rule
    (keras_metalstm.data.CONVERSION_RULE) when its images differ."""
    from keras_metalstm.data import DataError, convert_dataset, load_dataset
    from keras_metalstm.runs import load_splits

    check_split(split, dataset)
    target = tuple(config.image_shape)
    if dataset is None:
        splits = run_splits if run_splits is not None else load_splits(config, report=report, run_dir=run_dir)
    else:
        options = {"image_shape": target} if dataset == "folder" else {}
        splits = load_dataset(dataset, data_dir, **options)
    parts = list(splits) if split == "all" else [getattr(splits, split)]
    parts = [p for p in parts if p.num_classes]
    classes = sum(part.num_classes for part in parts)
    if dataset is not None and split != "all" and classes < config.n_way:
        # Another data set's default split keeps a share of its classes, too few for a small folder.
        raise DataError(
            f"the {split} split of {dataset} has {classes} classes, fewer than the run's {config.n_way}-way "
            f"episodes: --split all draws them from all {sum(part.num_classes for part in splits)} classes of "
            f"{dataset} (split='all' in the library)"
        )
    if not parts:
        raise DataError(f"the {split} split of {dataset or config.dataset} has no classes")
    data = parts[0] if len(parts) == 1 else _concatenate(parts, f"{dataset}/all")
    if data.image_shape != target:
        data = convert_dataset(data, target)
    return data


def _data_source_dir(config, dataset, data_dir) -> str | None:
    """The absolute directory the evaluation episodes were read from: --data-dir, else the run's own."""
    chosen = data_dir if dataset is not None else config.data_dir
    return str(Path(chosen).resolve()) if chosen else None


def _concatenate(parts, name):
    from keras_metalstm.data import ClassIndexedDataset, convert_dataset

    shapes = {p.image_shape for p in parts}
    if len(shapes) > 1:
        parts = [convert_dataset(p, parts[0].image_shape) for p in parts]
    return ClassIndexedDataset(
        np.concatenate([p.images for p in parts]),
        np.concatenate([p.class_sizes for p in parts]),
        [n for p in parts for n in p.class_names],
        name=name,
    )


def evaluation_episodes(data, config, episodes: int, seed: int, batch_size: int):
    """The stream of `episodes` test episodes of `data` in the run's episode shape, `batch_size` per batch.
    Episode i is the same whatever the batch size, so every command scoring a run with one seed sees the same
    first episodes."""
    from keras_metalstm.data import episode_dataset

    return episode_dataset(
        data, config.n_way, config.k_shot, config.query, batch_size=batch_size, seed=seed, num_episodes=episodes
    )


def check_episode_count(episodes) -> int:
    """`episodes` as an int, or DataError when it is not at least 1."""
    from keras_metalstm.data import DataError

    if int(episodes) < 1:
        raise DataError(f"--episodes must be at least 1, got {episodes}")
    return int(episodes)


def saved_baselines(run_dir) -> list[dict]:
    """The baselines' accuracies in the run's saved evaluation reports on its own data (data set and directory)
    and its test or validation classes: one {"method", "label", "accuracy" (a fraction), "split", "episodes"}
    per baseline, from the report that scored it on the most episodes (the newest among equals). Empty when no
    report holds a baseline."""
    from keras_metalstm.config import ConfigError
    from keras_metalstm.runs import TrainingError, load_run_config

    run_dir = Path(run_dir)
    try:
        config = load_run_config(run_dir)
    except (ConfigError, TrainingError):  # no (readable) run: nothing to compare with
        return []
    own_data = (config.dataset, _data_source_dir(config, None, None))
    best = {}
    reports = sorted((run_dir / EVALUATION_DIR).glob("*.json"), key=lambda path: path.stat().st_mtime)
    for path in reports:
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
            rows = {method: (float(row["mean"]), int(row["episodes"])) for method, row in report["results"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # not a report this package wrote
            continue
        if (report.get("dataset"), report.get("data_dir")) != own_data or report.get("split") not in ("test", "val"):
            continue
        for method, (mean, episodes) in rows.items():
            if method in BASELINE_PROTOCOLS and episodes >= best.get(method, {}).get("episodes", 0):
                best[method] = {
                    "method": method,
                    "label": METHOD_LABELS[method],
                    "accuracy": mean / 100.0,
                    "split": report["split"],
                    "episodes": episodes,
                }
    return [best[method] for method in TABLE_ORDER if method in best]


# -------------------------------------------------------------------------------------------- evaluate
def change_at_test_time(meta, inner_steps: int | None = None, query_statistics: str | None = None) -> dict:
    """Changes a trained meta-learner's inner steps T or query batch-norm statistics for its evaluation (an
    ablation: what adaptation at test time contributes); None keeps the trained value. Returns the changes made,
    {} when both equal the trained values."""
    from keras_metalstm.meta_learner_inputs import check_adaptation_settings

    changes = {}
    if inner_steps is not None and int(inner_steps) != meta.inner_steps:
        changes["inner_steps"] = int(inner_steps)
    if query_statistics is not None and query_statistics != meta.query_statistics:
        changes["query_statistics"] = query_statistics
    check_adaptation_settings(changes.get("inner_steps", meta.inner_steps),
                              changes.get("query_statistics", meta.query_statistics))
    for name, value in changes.items():
        setattr(meta, name, value)
    return changes


def evaluate_run(
    run_dir,
    episodes: int = 600,
    baselines: bool = False,
    baseline_protocols=DEFAULT_PROTOCOLS,
    baseline_plus: bool = False,
    dataset: str | None = None,
    data_dir=None,
    split: str = "test",
    seed: int = DEFAULT_TEST_SEED,
    which: str = "best",
    pretrain=None,
    finetune_val_episodes: int = 100,
    progress=None,
    log=None,
    on_batch=None,
    inner_steps: int | None = None,
    query_statistics: str | None = None,
    query: int | None = None,
) -> EvaluationReport:
    """Evaluate the meta-learner of `run_dir` on `episodes` episodes, with `baselines` beside it the baselines of
    `baseline_protocols` ("authors", "ours"; keras_metalstm.baselines) and with `baseline_plus` Baseline++;
    `inner_steps` and `query_statistics` change the meta-learner at test time (`change_at_test_time`). `query`
    images per class are classified in every episode (default: the run's); the predictions do not depend on it
    (test-mode batch norm normalises with the support set's statistics), so a data set whose classes have few
    images can be scored with a smaller one.

    `progress(n)` is called after every n episodes, `log(message)` for stage messages, `on_batch(method, batch)`
    with every batch each method scores (a hook to check that all methods see the same episodes).
    """
    import keras_metalstm as km
    from keras_metalstm.baseline_cache import prepare_baselines
    from keras_metalstm.data import DataError
    from keras_metalstm.runs import checkpoint_kind, load_meta_learner, load_splits

    episodes = check_episode_count(episodes)
    log = log or (lambda message: None)
    t0 = time.time()
    read = checkpoint_kind(run_dir, which)
    config, meta = load_meta_learner(run_dir, which=which)
    changes = change_at_test_time(meta, inner_steps, query_statistics)
    if query is not None and int(query) != config.query:
        if int(query) < 1:
            raise DataError(f"--query must be at least 1, got {query}")
        changes["query"] = int(query)
    # The run's own splits, read once: its test classes unless another data set is named, and the baselines'
    # training classes. A folder is listed and its decoded images read each time they are loaded.
    check_split(split, dataset)
    run_splits = None
    if dataset is None or baselines:
        run_splits = load_splits(config, report=log if dataset is None else None, run_dir=run_dir)
    data = evaluation_dataset(config, dataset, data_dir, split, run_dir=run_dir, report=log, run_splits=run_splits)
    trainer = km.MetaTrainer(meta)
    details = {"checkpoint": read, "test_classes": data.num_classes, "data": data.name, "episodes": int(episodes)}
    if changes:
        details["test_time"] = changes
    compared = None
    if baselines:
        compared, info = prepare_baselines(
            Path(run_dir),
            config,
            run_splits,
            meta.learner,
            pretrain=pretrain,
            val_episodes=finetune_val_episodes,
            protocols=tuple(baseline_protocols),
            baseline_plus=baseline_plus,
            log=log,
        )
        protocols = list(dict.fromkeys(method.protocol for method in compared.methods.values()))
        details["baselines"] = {"protocols": protocols, **info}
    batch = eval_batch_size(episodes)
    queries = changes.get("query", config.query)
    stream = evaluation_episodes(data, config.replace(query=queries), episodes, seed, batch)
    accuracies = {m: [] for m in ("meta_lstm", *(compared.methods if compared else ()))}
    for episodes_batch in stream:
        if on_batch is not None:
            on_batch("meta_lstm", episodes_batch)
        accuracies["meta_lstm"].append(trainer.evaluate_step(episodes_batch)["accuracy"].numpy())
        if compared is not None:
            if on_batch is not None:
                on_batch("baselines", episodes_batch)
            for method, values in compared.episode_accuracies(episodes_batch).items():
                accuracies[method].append(values)
        if progress is not None:
            progress(batch)
    accuracies = {m: np.concatenate(v) for m, v in accuracies.items()}
    return EvaluationReport(
        results={m: summarise(v) for m, v in accuracies.items()},
        n_way=config.n_way,
        k_shot=config.k_shot,
        query=queries,
        inner_steps=meta.inner_steps,
        dataset=dataset or config.dataset,
        split=split,
        seed=seed,
        seconds=time.time() - t0,
        data_dir=_data_source_dir(config, dataset, data_dir),
        details=details,
        accuracies=accuracies,
    )


def evaluate_episodes(trainer, dataset, config, episodes: int, seed: int, progress=None):
    """Per-episode test-mode query accuracies of the meta-learner on `episodes` episodes of `dataset`.

    Under R replicas each evaluates B/R episodes of a batch of B (MetaTrainer.evaluate_step): a count that is not
    a multiple of R is rounded up to one, and the accuracies of the episodes past `episodes` are dropped. Episode i
    is a function of (seed, i), so the first `episodes` are the same as on one device."""
    import tensorflow as tf

    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    drawn = -(-episodes // replicas) * replicas
    batch = replicas * eval_batch_size(drawn // replicas)
    stream = evaluation_episodes(dataset, config, drawn, seed, batch)
    out = []
    for episodes_batch in stream:
        if progress is not None:  # the episodes asked for, not those drawn to fill the replicas
            progress(min(batch, episodes - batch * len(out)))
        out.append(trainer.evaluate_step(episodes_batch)["accuracy"].numpy())
    return np.concatenate(out)[:episodes]

