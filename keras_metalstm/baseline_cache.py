"""A run's baselines, computed once: the pre-trained classifier and every baseline's validation choice, cached in
RUN_DIR/baselines/ (pretrained.keras, baselines.json) and shared by evaluations and by meta-training runs whose
theta_0 starts from that classifier."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from keras_metalstm.baselines import DEFAULT_PROTOCOLS, Baselines, build_baselines, episodes_of
from keras_metalstm.config import ConfigError
from keras_metalstm.paths import replaced_in_place
from keras_metalstm.pretraining import PretrainConfig, pretrain_classifier
from keras_metalstm.validation_grid import choose_on_validation, setting_label


def baseline_cache_paths(run_dir):
    """(pretrained.keras, baselines.json) in RUN_DIR/baselines/: the pre-trained classifier and its settings."""
    cache = Path(run_dir) / "baselines"
    return cache / "pretrained.keras", cache / "baselines.json"


def theta0_from_cached_classifier(config) -> bool:
    """Whether a run of `config` starts theta_0 from the classifier cached in RUN_DIR/baselines/ (not from a
    fresh learner, a --pretrained-model file or the weights of a `.keras` learner)."""
    from keras_metalstm.learner_spec import learner_kind

    return config.theta0_init == "pretrained" and not config.pretrained_model and learner_kind(config.learner) != "file"


def cached_pretrained_classifier(
    run_dir, config, splits, learner, pretrain: PretrainConfig | None = None, log=print, should_stop=None
):
    """The run's learner architecture (a model of it: `learner`) pre-trained on the run's meta-train classes,
    trained once and cached in RUN_DIR/baselines/ (pretrained.keras, and its settings in baselines.json).

    Shared by the baselines and by meta-training runs whose theta_0 starts from it, so both use one network:
    `pretrain` defaults to the run's own (config.pretrain_epochs), and another is refused for a run whose theta_0
    started from the cached network. Returns (model, info) where info is the content of baselines.json; a
    pre-training stopped by `should_stop()` raises StopRequested and caches nothing.
    """
    import keras

    pretrain = pretrain or PretrainConfig(epochs=config.pretrain_epochs, seed=config.seed)
    model_path, info_path = baseline_cache_paths(run_dir)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if info.get("pretrain") == asdict(pretrain) and model_path.is_file():
        return keras.models.load_model(str(model_path)), info
    if model_path.is_file() and theta0_from_cached_classifier(config):
        cached = info.get("pretrain", {})
        raise ConfigError(
            f"{model_path} is the classifier the run's theta_0 started from (pre-trained for "
            f"{cached.get('epochs', '?')} epochs), which its baselines share; pre-training another "
            f"({pretrain.epochs} epochs) would replace it: leave out --pretrain-epochs, or evaluate a copy of the run"
        )
    t0 = time.time()
    log(
        f"pre-training the {learner.name} classifier on {splits.train.num_classes} meta-train classes "
        f"({splits.train.num_images} images, {pretrain.epochs} epochs) ..."
    )
    model, train_accuracy = pretrain_classifier(
        splits.train,
        learner,
        pretrain,
        on_epoch=lambda epoch, accuracy: log(
            f"  epoch {epoch}/{pretrain.epochs}: training accuracy {100 * accuracy:.1f}% "
            f"({time.time() - t0:.0f}s)"
        ),
        should_stop=should_stop,
    )
    with replaced_in_place(model_path) as tmp:
        model.save(str(tmp))
    # Validation choices made for another pre-trained network are dropped with it.
    info = {
        "pretrain": asdict(pretrain),
        "pretrain_train_accuracy": train_accuracy,
        "pretrain_seconds": round(time.time() - t0, 1),
    }
    _write_json(info_path, info)
    return model, info


def choice_cache_key(method, config, val_episodes) -> str:
    """The key of a baseline's validation choice in baselines.json: the protocol and the baseline's key first, so
    protocols never share an entry, then everything the choice depends on besides the pre-trained network."""
    return (
        f"{method.protocol}/{method.key}_{config.n_way}way_{config.k_shot}shot_q{config.query}_val{val_episodes}"
        f"_seed{config.seed}"
    )


def prepare_baselines(
    run_dir,
    config,
    splits,
    learner,
    pretrain: PretrainConfig | None = None,
    val_episodes=100,
    protocols=DEFAULT_PROTOCOLS,
    baseline_plus=False,
    progress=None,
    log=print,
) -> tuple[Baselines, dict]:
    """The baselines of `protocols` (and Baseline++) for a training run whose learner is (a model of the
    architecture of) `learner`: the pre-trained classifier (`cached_pretrained_classifier`) and every validation
    choice are computed once and cached in RUN_DIR/baselines/. Returns (baselines, details for the report)."""
    from keras_metalstm.data import episode_dataset
    from keras_metalstm.pretraining import check_output_layer
    from keras_metalstm.statistics import eval_batch_size

    check_output_layer(learner)  # before minutes of pre-training, not after
    model, info = cached_pretrained_classifier(run_dir, config, splits, learner, pretrain, log)
    info_path = baseline_cache_paths(run_dir)[1]
    baselines = build_baselines(model, config.n_way, protocols, baseline_plus, seed=config.seed)
    choosing = {m.key: m for m in baselines.methods.values() if m.grid}
    keys = {name: choice_cache_key(m, config, val_episodes) for name, m in choosing.items()}
    missing = [name for name in choosing if keys[name] not in info]
    if missing:
        log(f"choosing the settings of {', '.join(missing)} on {val_episodes} validation episodes ...")
        for name in missing:
            started = time.time()
            # The same seeded validation episodes for every baseline, drawn anew rather than held in memory.
            batches = episode_dataset(
                splits.val,
                config.n_way,
                config.k_shot,
                config.query,
                batch_size=eval_batch_size(val_episodes),
                seed=config.seed + 2,
                num_episodes=val_episodes,
            )
            episodes = (episode for batch in batches for episode in episodes_of(batch))
            choice = choose_on_validation(episodes, choosing[name].grid, choosing[name].grid_accuracies, progress)
            info[keys[name]] = asdict(choice)
            # Saved at once: a choice can take many minutes, and an interrupted evaluation keeps what it finished.
            _write_json(info_path, info)
            log(
                f"  {name}: {setting_label(choice.settings)} of {len(choosing[name].grid)} settings, validation "
                f"accuracy {100 * choice.val_accuracy:.1f}% ({time.time() - started:.0f}s)"
            )
    for name, method in choosing.items():
        method.settings = info[keys[name]]["settings"]
    details = {"pretrain_train_accuracy": info.get("pretrain_train_accuracy"), **info["pretrain"]}
    details.update({name: info[keys[name]] for name in choosing})
    return baselines, details


def _write_json(path, data):
    from keras_metalstm.config import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
