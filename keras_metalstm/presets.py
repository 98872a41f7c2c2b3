"""Ready-made meta-learners ("presets"): finished, evaluated training runs shipped as files and loaded by name.

    import keras_metalstm as km
    km.list_presets()                                            # ["fontglot_5way_1shot", ...]
    meta = km.MetaLearner.from_preset("fontglot_5way_1shot")     # offline, from the package's files
    metalstm adapt fontglot_5way_1shot --support my_task/ --out task.keras

A preset is a folder NAME/ holding

    meta_learner.keras   the evaluated checkpoint of the run as one MetaLearner file (loads with safe_mode)
    train_config.yaml    the run's full RunConfig: `metalstm train --config train_config.yaml` trains it again
    evaluation.json      the `metalstm evaluate` report its numbers come from
    preset.json          the machine-readable summary: task, input spec, results, training, provenance, sha256
    MODEL_CARD.md        data and licence, recipe, commands, accuracy with 95% intervals and paired differences

Presets are looked up in the folders listed in KERAS_METALSTM_PRESETS (separated by os.pathsep) first, then in
the package's own keras_metalstm/preset_files/, which `pip install` ships as package data. `save_preset(run_dir,
name)` (or scripts/make_preset.py) packages a run. Presets sit above the meta-learner and the export code: the
meta-learner only reaches this module inside `MetaLearner.from_preset`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

from keras_metalstm.config import CONFIG_FILE_NAME, RunConfig

PRESET_PATH_ENV = "KERAS_METALSTM_PRESETS"
PACKAGE_PRESETS = Path(__file__).parent / "preset_files"
META_LEARNER_FILE = "meta_learner.keras"
TRAIN_CONFIG_FILE = "train_config.yaml"  # not config.yaml: a preset folder is not a run directory
REPORT_FILE = "evaluation.json"
INFO_FILE = "preset.json"
MODEL_CARD_FILE = "MODEL_CARD.md"
PRESET_FILES = (META_LEARNER_FILE, TRAIN_CONFIG_FILE, REPORT_FILE, INFO_FILE, MODEL_CARD_FILE)
# The layout of a preset folder and its preset.json; a reader refuses a newer one rather than misread it.
FORMAT = 1
# A preset name is a folder name and a command-line word that must never read as a path.
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")


class PresetError(ValueError):
    """A preset cannot be found, read or written (unknown name, damaged files, a run that cannot be packaged)."""


# ------------------------------------------------------------------------------------------------ finding
def search_path() -> list[Path]:
    """The folders presets are looked up in, the first match winning: KERAS_METALSTM_PRESETS's, then the
    package's."""
    extra = os.environ.get(PRESET_PATH_ENV, "").split(os.pathsep)
    return [*(Path(folder) for folder in extra if folder), PACKAGE_PRESETS]


def list_presets() -> list[str]:
    """The names of the presets on the search path, sorted."""
    names = set()
    for folder in search_path():
        if folder.is_dir():
            names.update(child.name for child in folder.iterdir() if (child / INFO_FILE).is_file())
    return sorted(names)


def available() -> str:
    """'available presets: a, b' (or where presets would come from), for error messages."""
    names = list_presets()
    if names:
        return f"available presets: {', '.join(names)}"
    return f"no preset is installed (searched {', '.join(str(p) for p in search_path())})"


def preset_dir(name: str) -> Path:
    """The folder of preset `name` on the search path, or `name` itself when it is a preset folder's path (the
    Keras convention); PresetError listing the available presets otherwise."""
    name = str(name)
    if (Path(name) / INFO_FILE).is_file():
        return Path(name)
    if _NAME.fullmatch(name):
        for folder in search_path():
            if (folder / name / INFO_FILE).is_file():
                return folder / name
    raise PresetError(f"unknown preset {name!r}; {available()}")


def read_info(name: str) -> dict:
    """The preset's preset.json."""
    path = preset_dir(name) / INFO_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise PresetError(f"cannot read {path} ({error}): the preset is damaged; package it again") from None


# ------------------------------------------------------------------------------------------------ loading
def load_preset(name: str):
    """The MetaLearner of preset `name` (a name on the search path or a preset folder), read from its own folder
    only: no network, no training run."""
    from keras_metalstm.export.adapted import load_meta_learner

    folder = preset_dir(name)
    info = read_info(folder)
    if info.get("format", FORMAT) > FORMAT:
        raise PresetError(
            f"the preset {folder} has format {info['format']}, newer than this keras-metalstm reads ({FORMAT}): "
            "upgrade keras-metalstm"
        )
    path = folder / META_LEARNER_FILE
    if not path.is_file() or file_sha256(path) != info.get("sha256"):
        raise PresetError(
            f"{path} is missing or differs from the file {folder / INFO_FILE} describes: the preset is damaged; "
            "reinstall keras-metalstm or package the run again"
        )
    return load_meta_learner(path)


def load_path_or_preset(source: str, load_path):
    """(model, provenance) for a command's MODEL argument: `load_path(source)` when `source` is an existing path
    (a path wins over a preset of the same name), else the preset's meta-learner; one PresetError naming both
    possibilities when it is neither."""
    if Path(source).exists():
        return load_path(source), {"run": str(source), **_trained_k_shot(Path(source) / CONFIG_FILE_NAME)}
    if source in list_presets():
        return load_preset(source), {"preset": source, **_trained_k_shot(preset_dir(source) / TRAIN_CONFIG_FILE)}
    raise PresetError(
        f"{source!r} is neither an existing path nor a preset name: pass a training run folder or a .keras "
        f"file, or a preset name; {available()}"
    )


def _trained_k_shot(config_path: Path) -> dict:
    """{"trained_k_shot": K} of a run's or a preset's run config, {} for none (a .keras file): what adapt expects."""
    return {"trained_k_shot": RunConfig.load(config_path).k_shot} if config_path.is_file() else {}


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- packaging
def save_preset(run_dir, name: str, out_dir=None, report=None, force: bool = False) -> Path:
    """Package the evaluated run `run_dir` as preset `name` in `out_dir` (default: the package's preset folder)
    and return the preset's folder.

    The numbers come from `report` (an evaluation report JSON), by default the run's report on its own test
    classes with the most episodes, then the most compared methods; the meta-learner shipped is the checkpoint
    that report evaluated. The folder is written under a temporary name and renamed into place (an existing
    preset is only replaced with `force`), after checking that the written meta-learner loads with the weights
    of the checkpoint.
    """
    from keras_metalstm.export.adapted import load_meta_learner as load_meta_learner_file
    from keras_metalstm.export.files import atomic_path
    from keras_metalstm.runs import crashed, load_meta_learner, load_run_config, read_state

    if not _NAME.fullmatch(str(name)):
        raise PresetError(
            f"preset name {name!r} must be lower-case letters, digits, '_' and '-' (e.g. fontglot_5way_1shot)"
        )
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    state = read_state(run_dir)
    if state.get("status") == "running" and not crashed(state):
        raise PresetError(f"{run_dir} is still training (state.json says running): package it when it has finished")
    report_path = Path(report) if report is not None else choose_report(run_dir, config)
    evaluation = read_report(report_path, config)
    _, meta = load_meta_learner(run_dir, which=evaluation["details"].get("checkpoint", "best"))
    target = Path(out_dir) / name if out_dir is not None else PACKAGE_PRESETS / name
    with atomic_path(target, force=force, directory=True) as tmp:
        meta_file = tmp / META_LEARNER_FILE
        meta.save(str(meta_file))
        _check_same_weights(meta, load_meta_learner_file(meta_file), meta_file)
        config.save(tmp / TRAIN_CONFIG_FILE)
        shutil.copyfile(report_path, tmp / REPORT_FILE)
        info = preset_info(name, run_dir, config, state, evaluation, meta, meta_file)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        (tmp / MODEL_CARD_FILE).write_text(model_card(info, config, evaluation), encoding="utf-8")
    return target


def choose_report(run_dir, config) -> Path:
    """The run's evaluation report to quote: on its own data set's test classes, most episodes first, then the
    most compared methods."""
    from keras_metalstm.evaluation import EVALUATION_DIR

    candidates = []
    for path in sorted((Path(run_dir) / EVALUATION_DIR).glob("*.json")):
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if _quotable(saved, config):
            candidates.append((saved["results"]["meta_lstm"]["episodes"], len(saved["results"]), path))
    if not candidates:
        raise PresetError(
            f"{run_dir} holds no evaluation report on the test classes of {config.dataset}: run `metalstm "
            f"evaluate {run_dir} --episodes 600 --baselines` first (or pass the report to quote)"
        )
    return max(candidates)[2]


_TASK_KEYS = ("dataset", "split", "n_way", "k_shot", "inner_steps")


def _quotable(saved: dict, config) -> bool:
    """True for a saved report of the run's meta-learner, as trained (no test-time ablation), on the test classes
    of its own data set."""
    expected = {**{key: getattr(config, key, None) for key in _TASK_KEYS}, "split": "test"}
    return (
        {key: saved.get(key) for key in _TASK_KEYS} == expected
        and "meta_lstm" in saved.get("results", {})
        and not saved.get("details", {}).get("test_time")
    )


def read_report(path, config) -> dict:
    """A saved evaluation report (keras_metalstm.evaluation.save_report), checked to be of the run's meta-learner
    on its own test classes (what the model card says it is)."""
    path = Path(path)
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise PresetError(f"cannot read the evaluation report {path}: {error}") from None
    if not _quotable(saved, config):
        found = {key: saved.get(key) for key in _TASK_KEYS}
        raise PresetError(
            f"{path} is not a report of this run's meta-learner on its test classes ({found}): pass one that "
            f"`metalstm evaluate RUN_DIR` wrote for this run ({config.dataset} test split, {config.n_way}-way "
            f"{config.k_shot}-shot, T = {config.inner_steps})"
        )
    return saved


def _check_same_weights(meta, loaded, path) -> None:
    import numpy as np

    expected, written = meta.get_weights(), loaded.get_weights()
    if len(written) != len(expected) or not all(np.array_equal(a, b) for a, b in zip(expected, written, strict=True)):
        raise PresetError(f"{path} does not load with the checkpoint's weights; nothing was written")


def preset_info(name, run_dir, config, state, evaluation, meta, meta_file) -> dict:
    """preset.json: what a program needs to use and judge the preset without loading it."""
    import numpy as np

    from keras_metalstm import __version__
    from keras_metalstm.data import CONVERSION_RULE
    from keras_metalstm.export.adapted import INPUT_SCALE

    return {
        "name": name,
        "format": FORMAT,
        "title": f"Meta-Learner LSTM, {config.dataset} {config.n_way}-way {config.k_shot}-shot",
        "n_way": config.n_way,
        "k_shot": config.k_shot,
        "inner_steps": config.inner_steps,
        "image_shape": list(config.image_shape),
        "input_scale": INPUT_SCALE,
        "conversion_rule": CONVERSION_RULE,
        "dataset": config.dataset,
        "learner": config.learner,
        "parameters": {
            "learner": int(meta.num_parameters),
            "meta_learner": int(sum(np.prod(variable.shape) for variable in meta.trainable_weights)),
        },
        "evaluation": {
            "dataset": evaluation["dataset"],
            "split": evaluation["split"],
            "seed": evaluation["seed"],
            "checkpoint": evaluation["details"].get("checkpoint", "best"),
            "test_classes": evaluation["details"].get("test_classes"),
            "results": evaluation["results"],
        },
        "training": {
            key: state.get(key) for key in ("status", "episode", "best_episode", "best_val_accuracy", "seconds")
        },
        "source_run": str(Path(run_dir).resolve()),
        "sha256": file_sha256(meta_file),
        "bytes": meta_file.stat().st_size,
        "keras_metalstm_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# --------------------------------------------------------------------------------------------- model card
# Data sets whose documentation (in keras_metalstm/data) ships with the package: its licence section is quoted.
DATA_DOCUMENTS = {"fontglot": "FONTGLOT.md"}
LICENCE_HEADING = "## Provenance and licence"
# The checkpoint an evaluation report names -> the model card's words.
_CHECKPOINTS = {"best": "best-validation", "latest": "latest"}


def model_card(info: dict, config, evaluation: dict) -> str:
    """MODEL_CARD.md: what the preset is, how to use it, its measured accuracy (each baseline's protocol named),
    its data and licence, the recipe and the commands that made it."""
    name, task = info["name"], f"{config.n_way}-way {config.k_shot}-shot"
    images = "1 labelled image" if config.k_shot == 1 else f"{config.k_shot} labelled images"
    sections = [
        f"# {name}: {info['title']}",
        f"The LSTM meta-learner of Ravi & Larochelle (ICLR 2017), meta-trained on the meta-train classes of "
        f"`{config.dataset}`: given {config.n_way} new classes with {images} each, it "
        f"adapts the `{config.learner}` learner ({info['parameters']['learner']:,} parameters) in "
        f"{config.inner_steps} inner steps. {info['parameters']['meta_learner']:,} meta-parameters (theta_0 "
        f"included), shipped with keras-metalstm {info['keras_metalstm_version']}.",
        _usage(name, config, info),
        _results(config, evaluation),
        _data(config),
        _recipe(config, info),
        _commands(name, config, evaluation),
        _files(info),
        "## Limitations\n\n"
        f"Measured only on the meta-test classes of `{config.dataset}`, {task}. Images of other kinds are "
        f"converted to {_shape(config)} by the rule above, and the accuracy on them is not measured. The "
        f"meta-learner adapts to exactly {config.n_way} classes.",
    ]
    return "\n\n".join(sections) + "\n"


def _shape(config) -> str:
    return "x".join(str(v) for v in config.image_shape)


def _usage(name, config, info) -> str:
    n, k = config.n_way, config.k_shot
    support_shape = ", ".join(str(v) for v in (n * k, *config.image_shape))
    return (
        "## Use\n\n"
        "```python\n"
        "import keras_metalstm as km\n"
        f'meta = km.MetaLearner.from_preset("{name}")\n'
        f"adapted = meta.adapt(support_images, support_labels)  # float32 ({support_shape}) in [0, 1], labels 0..{n - 1}\n"
        "logits = adapted(query_images)\n"
        "```\n\n"
        "```bash\n"
        f"metalstm adapt {name} --support my_task/ --out task.keras   # my_task/<class>/*.png: {n} class folders\n"
        "metalstm export task.keras --format both                   # SavedModel + ONNX, parity checked\n"
        "```\n\n"
        f"Input: {info['input_scale']}. Image files of another size or channel count are converted to "
        f"{_shape(config)} by the package's rule: {info['conversion_rule']}. A support set may hold another number "
        f"of images per class than {k}; the accuracy below is measured with {k}."
    )


def _results(config, evaluation) -> str:
    from keras_metalstm.baselines import BASELINE_PROTOCOLS, PROTOCOL_SUMMARIES
    from keras_metalstm.evaluation import METHOD_NAMES, TABLE_ORDER

    details, results = evaluation["details"], evaluation["results"]
    meta = results["meta_lstm"]
    lines = [
        "## Measured accuracy",
        "",
        f"{meta['episodes']} test episodes (seed {evaluation['seed']}) of the {details.get('test_classes', '?')} "
        f"meta-test classes of `{evaluation['dataset']}` (none seen in training or model selection), "
        f"{config.n_way}-way {config.k_shot}-shot with {config.query} queries per class, the "
        f"{_CHECKPOINTS[details.get('checkpoint', 'best')]} checkpoint, T = {evaluation['inner_steps']}, each method on the same "
        "episodes. Accuracy: mean and 95 % interval 1.96 std / sqrt(E) (population std), in percent. Paired: the "
        "meta-learner's accuracy minus the baseline's, episode by episode, in points (mean and 95 % interval).",
        "",
        "| Model | baseline protocol | accuracy (%) | Meta-LSTM minus it, paired (points) |",
        "|---|---|---|---|",
    ]
    for method in TABLE_ORDER:
        row = results.get(method)
        if row is None or method == "meta_lstm":
            continue
        paired = row.get("paired_difference")
        difference = f"{paired['mean']:+.2f} +- {paired['ci95']:.2f}" if paired else "-"
        lines.append(
            f"| {METHOD_NAMES[method]} | {BASELINE_PROTOCOLS[method]} | {row['mean']:.2f} +- {row['ci95']:.2f} "
            f"| {difference} |"
        )
    lines.append(f"| {METHOD_NAMES['meta_lstm']} | | **{meta['mean']:.2f} +- {meta['ci95']:.2f}** | |")
    baselines = details.get("baselines")
    if not baselines:
        return "\n".join([*lines, "", "No baseline was evaluated with this report."])
    tuning = _tuning_episodes(baselines)
    lines += [
        "",
        f"Baseline protocols. Every baseline but the pixel nearest neighbour starts from the learner architecture "
        f"pre-trained as a classifier on all meta-train classes ({baselines['epochs']} epochs)"
        + (f"; the tuned baselines' settings were chosen on {tuning} validation episodes:" if tuning else ":"),
    ]
    protocols = sorted({BASELINE_PROTOCOLS[m] for m in results if m in BASELINE_PROTOCOLS})
    lines += [f"- `{protocol}`: {PROTOCOL_SUMMARIES[protocol]}." for protocol in protocols]
    return "\n".join(lines)


def _tuning_episodes(baselines: dict):
    """The validation episodes the tuned baselines chose their settings on (`--finetune-val-episodes`), if any."""
    tuned = [entry["val_episodes"] for entry in baselines.values() if isinstance(entry, dict) and "val_episodes" in entry]
    return tuned[0] if tuned else None


def _data(config) -> str:
    text = (
        f"## Data\n\nMeta-trained on the meta-train classes of `{config.dataset}`, the checkpoint chosen on its "
        "meta-validation classes, measured on its meta-test classes (the three class-disjoint)."
    )
    document = DATA_DOCUMENTS.get(config.dataset)
    if document is None:
        return text + f" `{config.dataset}` does not ship with keras-metalstm; its own licence applies."
    source = Path(__file__).parent / "data" / document
    markdown = source.read_text(encoding="utf-8")
    if LICENCE_HEADING not in markdown:
        raise PresetError(f"{source} has no '{LICENCE_HEADING}' section to quote in the model card: restore it")
    licence = markdown.split(LICENCE_HEADING, 1)[1].split("\n## ", 1)[0].strip()
    return f"{text} Provenance and licence (from keras_metalstm/data/{document}):\n\n{licence}"


def _recipe(config, info) -> str:
    training = info["training"]
    best = training.get("best_val_accuracy")
    validation = (
        f"best validation accuracy {100 * best:.2f} % ({config.val_episodes} episodes) at episode "
        f"{training.get('best_episode')}"
        if best is not None
        else "no validation"
    )
    seconds = training.get("seconds")
    spent = f", {seconds / 60:.1f} minutes of training time (all sessions)" if seconds else ""
    theta0 = "a fresh learner" if config.theta0_init == "scratch" else "a classifier pre-trained on the meta-train classes"
    schedule = (
        f"cosine from {config.learning_rate:g} to {config.final_learning_rate or config.learning_rate / 100:g}"
        if config.lr_schedule == "cosine"
        else f"constant {config.learning_rate:g}"
    )
    return (
        "## Recipe\n\n"
        f"{training.get('episode')} training episodes of {config.n_way}-way {config.k_shot}-shot with "
        f"{config.query} queries per class, {config.meta_batch} per meta-update; Adam, step {schedule}, global-norm "
        f"clip {config.clip_norm:g}; {'first' if config.first_order else 'second'}-order meta-gradient; theta_0 from "
        f"{theta0}; "
        f"query batch-norm statistics `{config.query_statistics}`; learned logit scale "
        f"{'on' if config.learn_logit_scale else 'off'}; "
        f"{f'meta-training episodes augmented `{config.augment}`; ' if config.augment else ''}"
        f"seed {config.seed}. Outcome: {validation}{spent} "
        f"(run status `{training.get('status')}`). Every setting, as `{TRAIN_CONFIG_FILE}` holds them:\n\n"
        f"```yaml\n{config.to_yaml()}```"
    )


def _commands(name, config, evaluation) -> str:
    from keras_metalstm.learner_spec import learner_kind

    run = f"runs/{name}"
    note = ""
    if learner_kind(config.learner) != "built-in":
        note = f" The learner `{config.learner}` must be importable there (current directory or PYTHONPATH)."
    return (
        "## Commands\n\n"
        f"`{TRAIN_CONFIG_FILE}` ships beside this card.{note}\n\n"
        "```bash\n"
        f"metalstm train --config {TRAIN_CONFIG_FILE} --run-dir {run}\n"
        f"{evaluate_command(run, evaluation)}\n"
        f"python scripts/make_preset.py {run} {name}   # this preset, from a keras-metalstm checkout\n"
        "```"
    )


def evaluate_command(run: str, evaluation: dict) -> str:
    """The `metalstm evaluate` command line that wrote `evaluation` (a saved report of the run's test classes)."""
    from keras_metalstm.baselines import PROTOCOLS

    details = evaluation["details"]
    words = [
        "metalstm evaluate", run,
        "--episodes", str(evaluation["results"]["meta_lstm"]["episodes"]),
        "--seed", str(evaluation["seed"]),
    ]
    if details.get("checkpoint", "best") != "best":
        words += ["--checkpoint", details["checkpoint"]]
    baselines = details.get("baselines")
    if baselines:
        words.append("--baselines")
        for protocol in baselines["protocols"]:
            words += ["--baseline-protocol", protocol] if protocol in PROTOCOLS else ["--baseline-plus"]
        words += ["--pretrain-epochs", str(baselines["epochs"])]
        if _tuning_episodes(baselines) is not None:
            words += ["--finetune-val-episodes", str(_tuning_episodes(baselines))]
    return " ".join(words)


def _files(info) -> str:
    return (
        "## Files\n\n"
        f"- `{META_LEARNER_FILE}`: the meta-learner ({info['bytes'] / 1024:.0f} KiB, sha256 `{info['sha256']}`), "
        "loadable with `keras.saving.load_model` after `import keras_metalstm`\n"
        f"- `{TRAIN_CONFIG_FILE}`: the run's settings\n"
        f"- `{REPORT_FILE}`: the evaluation report quoted above, as `metalstm evaluate` saved it\n"
        f"- `{INFO_FILE}`: the machine-readable summary (task, input spec, results, training, provenance)\n\n"
        f"Packaged from the run `{info['source_run']}` on {info['created']}."
    )
