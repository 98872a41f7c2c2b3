"""`RunConfig`: every setting of a meta-training run, with YAML/TOML/dict round trips and layered overrides.

Layering (used by the command line): dataclass defaults < config file (``--config run.yaml`` or ``.toml``) <
``METALSTM_*`` environment variables (e.g. ``METALSTM_N_WAY=5``) < command-line flags. `RunConfig` itself only
validates and converts; it never imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from keras_metalstm.augmentation import Augmentation
from keras_metalstm.paths import refuse_url, replaced_in_place

# The batch-norm statistics a meta-learner's query pass can use (MetaLearner's query_statistics).
QUERY_STATISTICS = ("query", "support")
# How a meta-learner evaluates the learner for the episodes of a meta-batch (MetaLearner's episode_batching).
EPISODE_BATCHING = ("auto", "batched", "per_episode")
# Keras dtype policies a run can build its learner with (`dtype_policy`); None keeps the learner's own.
DTYPE_POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")

ENV_PREFIX = "METALSTM_"
CONFIG_FILE_NAME = "config.yaml"
# METALSTM_* variables that are not run settings (read by the commands or the tests; VERBOSE is `metalstm
# --verbose`); any other METALSTM_* name that is not a setting is a misspelling, refused rather than ignored.
OTHER_ENVIRONMENT = ("VERBOSE", "RUN_DIR", "EVAL_EPISODES", "EVAL_BASELINES", "EVAL_SEED", "DOCKER_SMOKE")

# Fields that define the shape of the meta-learner, of its episodes or of its checkpoint, or how the run started: a
# checkpoint is only valid for a run with the same values, so `--resume` refuses to change them.
SHAPE_FIELDS = (
    "dataset",
    "n_way",
    "k_shot",
    "query",
    "inner_steps",
    "hidden_units",
    "learner",
    "filters",
    "dtype_policy",
    "image_shape",
    "first_order",
    "bn_momentum",
    "divide_grad_by_batch",
    "query_statistics",
    "learn_logit_scale",
    "meta_batch",
    "seed",
    "augment",
    "rotations",
    "drop_small_classes",
    "split_file",
    # The optimizer checkpoints its variables by position, and a constant step is one of them, a schedule not.
    "lr_schedule",
    # How theta_0 started: used once, at the start; a resume recording another would misdescribe the run.
    "theta0_init",
    "pretrain_epochs",
    "pretrained_model",
)


class ConfigError(ValueError):
    """An invalid or inconsistent run configuration (bad value, unknown key, unreadable file)."""


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an error's message (at most `limit` characters, a cut one ending in "..."), for one-line
    user messages."""
    lines = str(error).strip().splitlines()
    line = lines[0] if lines else type(error).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


# `--learner`: one of these names, a saved model PATH.keras, or a factory package.module:function
# (keras_metalstm.learner_spec builds, checks and stores the learner).
BUILT_IN_LEARNERS = ("conv4", "resnet12")


def normalise_learner_spec(spec) -> str:
    """The canonical form of a learner setting (a `.keras` path made absolute); ConfigError if it is none of the
    three forms."""
    text = str(spec).strip()
    if text.lower() in BUILT_IN_LEARNERS:
        return text.lower()
    if text.endswith(".keras"):
        return _local_absolute_path(text, "learner")
    module, _, function = text.partition(":")
    if function and _is_dotted_name(module) and function.isidentifier():
        return text
    raise ConfigError(
        f"unknown learner {text!r}: use a built-in ({', '.join(BUILT_IN_LEARNERS)}), a saved model "
        "(PATH.keras) or a factory (package.module:function, called as function(input_shape, num_classes))"
    )


def _local_absolute_path(path, name: str) -> str | None:
    if path is None or not str(path).strip():  # METALSTM_DATA_DIR= (empty) leaves it unset
        return None
    refuse_url(path, name, ConfigError)
    return os.path.abspath(os.path.expanduser(str(path)))


def _is_dotted_name(name: str) -> bool:
    return bool(name) and all(part.isidentifier() for part in name.split("."))


@dataclass
class RunConfig:
    """Settings of one meta-training run (the defaults are the paper's 5-way 1-shot setting on fontglot)."""

    dataset: str = "fontglot"
    data_dir: str | None = None
    # A JSON file {"train": [...], "val": [...], "test": [...]} of class names that splits an omniglot or folder data
    # set (e.g. Vinyals' Omniglot lists) instead of its seeded split.
    split_file: str | None = None
    rotations: bool = False
    # Leave out the classes with fewer than K + Q images (every split), instead of refusing the data set: a folder of
    # the user's own classes often has a few small ones.
    drop_small_classes: bool = False
    image_shape: list[int] | None = None  # filled from the data set at training time
    n_way: int = 5
    k_shot: int = 1
    query: int = 15
    inner_steps: int = 12
    hidden_units: int = 20
    learner: str = "conv4"
    filters: int = 32
    first_order: bool = True
    bn_momentum: float | None = 0.1
    divide_grad_by_batch: bool = False
    # The Keras dtype policy the learner is built with (DTYPE_POLICIES): "mixed_bfloat16" on a TPU computes the
    # learner in bfloat16 while theta and the meta-learner stay float32. None: the learner's own layers' policies.
    dtype_policy: str | None = None
    # Batch-norm statistics of the query pass: "query" (the authors' code) or "support" (MetaLearner docs).
    query_statistics: str = "query"
    # A learned scale of the query logits in the meta-loss (MetaLearner docs).
    learn_logit_scale: bool = False
    # How the learner runs for a meta-batch's episodes (MetaLearner docs): "auto" batches them on a GPU/TPU.
    # The results do not depend on it, so a resumed run may change it.
    episode_batching: str = "auto"
    meta_batch: int = 1
    episodes: int = 5000
    learning_rate: float = 1e-3
    # "constant" (the paper) or "cosine": from learning_rate down to final_learning_rate (default learning_rate
    # / 100) over the run's `episodes`, as a function of the optimizer's update count (so exact on resume).
    lr_schedule: str = "constant"
    final_learning_rate: float | None = None
    clip_norm: float = 0.25
    # theta_0's Adam step relative to the update rule's (0 freezes theta_0; below 1 suits a pre-trained theta_0).
    theta0_lr_scale: float = 1.0
    xla: bool = False
    seed: int = 0
    # Augmentation of the meta-training episodes in the input pipeline (keras_metalstm.augmentation), e.g.
    # "flip,translate=0.1"; None: none (the paper).
    augment: str | None = None
    checkpoint_every: int = 500
    validate_every: int = 500
    val_episodes: int = 100
    log_every: int = 50
    keep_checkpoints: int = 3
    # theta_0 from a freshly initialised learner (the paper) or from a classifier pre-trained on the meta-train
    # classes: `pretrained_model` (a .keras file) or, without it, one pre-trained for `pretrain_epochs` and
    # cached in the run directory, where the baselines of `metalstm evaluate --baselines` reuse it.
    theta0_init: str = "scratch"
    pretrain_epochs: int = 10
    pretrained_model: str | None = None

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------------------------------ checks
    def validate(self) -> RunConfig:
        for name in sorted(_FLOAT_FIELDS | _OPTIONAL_FLOAT_FIELDS):
            value = getattr(self, name)
            if value is not None and not math.isfinite(float(value)):
                raise ConfigError(f"{name} must be a finite number, got {value}")
        if int(self.n_way) < 2:
            raise ConfigError(
                f"n_way must be at least 2, got {self.n_way}: a 1-way episode is always classified right, so its "
                "accuracy says nothing"
            )
        if self.bn_momentum is not None and not 0.0 <= float(self.bn_momentum) <= 1.0:
            raise ConfigError(f"bn_momentum must lie in [0, 1], got {self.bn_momentum}")
        for name in ("k_shot", "query", "inner_steps", "hidden_units", "filters", "meta_batch"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("episodes", "checkpoint_every", "validate_every", "log_every", "keep_checkpoints"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if int(self.val_episodes) < 0:
            raise ConfigError(f"val_episodes must be >= 0, got {self.val_episodes}")
        if not 0 <= int(self.seed) < 2**32:  # keras.utils.set_random_seed seeds NumPy, which takes 32 bits
            raise ConfigError(f"seed must lie in 0..{2**32 - 1}, got {self.seed}")
        if self.episodes % self.meta_batch:
            raise ConfigError(
                f"episodes ({self.episodes}) must be a multiple of meta_batch ({self.meta_batch}): one "
                "meta-update consumes meta_batch episodes"
            )
        for name in ("learning_rate", "clip_norm"):
            if float(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not float(self.theta0_lr_scale) >= 0:
            raise ConfigError(f"theta0_lr_scale must be >= 0, got {self.theta0_lr_scale}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.final_learning_rate is not None:
            if self.lr_schedule != "cosine":
                raise ConfigError(
                    "final_learning_rate is only used with lr_schedule 'cosine': set both or neither (a resumed run "
                    "keeps its schedule)"
                )
            if not 0 <= float(self.final_learning_rate) <= float(self.learning_rate):
                raise ConfigError(
                    f"final_learning_rate must lie in [0, learning_rate = {self.learning_rate}], got "
                    f"{self.final_learning_rate}"
                )
        if self.query_statistics not in QUERY_STATISTICS:
            raise ConfigError(f"query_statistics must be 'query' or 'support', got {self.query_statistics!r}")
        if self.episode_batching not in EPISODE_BATCHING:
            raise ConfigError(f"episode_batching must be one of {EPISODE_BATCHING}, got {self.episode_batching!r}")
        if self.dtype_policy is not None and self.dtype_policy not in DTYPE_POLICIES:
            raise ConfigError(f"dtype_policy must be one of {DTYPE_POLICIES}, got {self.dtype_policy!r}")
        try:
            augmentation = Augmentation.parse(self.augment)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        self.augment = None if augmentation is None else str(augmentation)
        if self.theta0_init not in ("scratch", "pretrained"):
            raise ConfigError(f"theta0_init must be 'scratch' or 'pretrained', got {self.theta0_init!r}")
        if int(self.pretrain_epochs) < 1:
            raise ConfigError(f"pretrain_epochs must be at least 1, got {self.pretrain_epochs}")
        if self.pretrained_model and self.theta0_init != "pretrained":
            raise ConfigError("pretrained_model is only used with theta0_init 'pretrained': set both or neither")
        self.learner = normalise_learner_spec(self.learner)
        # Absolute, so that a resumed run or another command finds them from any working directory.
        self.data_dir = _local_absolute_path(self.data_dir, "data_dir")
        self.split_file = _local_absolute_path(self.split_file, "split_file")
        self.pretrained_model = _local_absolute_path(self.pretrained_model, "pretrained_model")
        return self

    # ------------------------------------------------------------------------------------ conversions
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        return cls(**_coerce_all(values))

    def replace(self, **changes) -> RunConfig:
        return RunConfig.from_dict({**self.to_dict(), **changes})

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | os.PathLike) -> None:
        """Write as YAML atomically (temporary file, then rename)."""
        atomic_write_text(path, self.to_yaml())

    @classmethod
    def load(cls, path: str | os.PathLike) -> RunConfig:
        return cls.from_dict(read_config_file(path))

    def fingerprint(self) -> int:
        """A number (below 2^31) of the settings that change what is computed: every worker of a cluster must have
        the same. The paths of the data and the split file are left out: each host may mount them elsewhere."""
        settings = {k: v for k, v in self.to_dict().items() if k not in ("data_dir", "split_file")}
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).digest()
        return int.from_bytes(digest[:4], "big") >> 1

    def shape_differences(self, other: RunConfig) -> dict[str, tuple[Any, Any]]:
        """{field: (self value, other value)} for the SHAPE_FIELDS that differ."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {k: (mine[k], theirs[k]) for k in SHAPE_FIELDS if mine[k] != theirs[k]}


FIELD_NAMES = tuple(f.name for f in fields(RunConfig))

# Named starting points for a run's settings (a config file, METALSTM_* variables and flags still win).
# "paper": RunConfig's defaults, the paper's recipe (theta_0 from a fresh learner, first-order meta-gradient, the
# query batch's own batch-norm statistics, a constant Adam step of 1e-3).
# "ours": the recipe of the README's results table: theta_0 from the classifier the baselines use (pre-trained on
# the meta-train classes), a learned logit scale in the meta-loss, the support set's batch-norm statistics, the
# exact second-order meta-gradient, and a cosine-decayed Adam step from 1e-4 to 1e-6.
RECIPES = {
    "paper": {},
    "ours": {
        "theta0_init": "pretrained",
        "learn_logit_scale": True,
        "query_statistics": "support",
        "first_order": False,
        "lr_schedule": "cosine",
        "learning_rate": 1e-4,
        "final_learning_rate": 1e-6,
    },
}


def recipe_config(recipe: str = "paper", **settings) -> RunConfig:
    """RunConfig of a named recipe (RECIPES) with `settings` on top."""
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
    return RunConfig.from_dict({**RECIPES[recipe], **settings})


def layered_run_config(layers: list[tuple[str, dict[str, Any]]]) -> RunConfig:
    """The RunConfig of settings given in `layers`, (where, {field: value}) pairs, later layers winning: e.g. a
    recipe's settings, a config file's, then one layer per METALSTM_* variable or command-line flag. A setting
    that the checks refuse (out of range, or at odds with another) is reported naming where its value came from.
    """
    values, sources = {}, {}
    for where, layer in layers:
        values.update(layer)
        sources.update(dict.fromkeys(layer, where))
    try:
        return RunConfig.from_dict(values)
    except ConfigError as error:
        # A field named in the message, not a quoted value ('query' of query_statistics) or part of a longer name.
        found = {name: re.search(rf"(?<![\w']){name}(?![\w'])", str(error)) for name in sources}
        named = sorted((match.start(), name) for name, match in found.items() if match)
        if not named:
            raise
        given = ", ".join(f"{name} from {sources[name]}" for _, name in named)
        raise ConfigError(f"{error} ({given})") from None


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml/.json) or TOML (.toml) file into a dict of RunConfig fields.

    Keys may use dashes or underscores (``n-way`` or ``n_way``); unknown keys are an error.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            values = tomllib.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text) or {}
    except Exception as error:  # noqa: BLE001 - any parser error becomes one clear message
        raise ConfigError(f"cannot parse config file {path}: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, got {type(values).__name__}")
    where = f"config file {path}"
    return {name: _coerced(name, value, where) for name, value in _normalise_keys(values, where).items()}


def env_overrides(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """RunConfig fields given as METALSTM_<FIELD> environment variables (e.g. METALSTM_K_SHOT=5)."""
    environ = os.environ if environ is None else environ
    out = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX) or key[len(ENV_PREFIX) :] in OTHER_ENVIRONMENT:
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if name not in FIELD_NAMES:
            close = difflib.get_close_matches(name, FIELD_NAMES, n=1)
            hint = f" (did you mean {ENV_PREFIX}{close[0].upper()}?)" if close else ""
            raise ConfigError(
                f"environment variable {key} is not a setting{hint}; unset it or use one of "
                f"{', '.join(ENV_PREFIX + n.upper() for n in FIELD_NAMES)}"
            )
        out[name] = _coerced(name, value, f"environment variable {key}")
    return out


def _normalise_keys(values: dict[str, Any], where: str) -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_").lower()
        if name == "run_dir":
            raise ConfigError(
                f"{where}: run_dir is where a run is kept, not one of its settings (its config.yaml is inside it): "
                f"give it as --run-dir or {ENV_PREFIX}RUN_DIR"
            )
        if name not in FIELD_NAMES:
            close = difflib.get_close_matches(name, FIELD_NAMES, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"{where}: unknown setting {key!r}; {hint}known settings: {', '.join(FIELD_NAMES)}")
        out[name] = value
    return out


def _coerce_all(values: dict[str, Any]) -> dict[str, Any]:
    values = _normalise_keys(values, "configuration")
    return {k: _coerce(k, v) for k, v in values.items()}


_BOOL_FIELDS = {f.name for f in fields(RunConfig) if f.type in ("bool",)}
_INT_FIELDS = {f.name for f in fields(RunConfig) if f.type in ("int",)}
_FLOAT_FIELDS = {f.name for f in fields(RunConfig) if f.type in ("float",)}
_OPTIONAL_FLOAT_FIELDS = {f.name for f in fields(RunConfig) if f.type in ("float | None",)}
_TEXT_FIELDS = {f.name for f in fields(RunConfig) if f.type in ("str", "str | None")}


def _coerced(name: str, value: Any, where: str) -> Any:
    """_coerce, its error naming `where` the value came from (a file, a variable)."""
    try:
        return _coerce(name, value)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def _coerce(name: str, value: Any) -> Any:
    """Convert a value (possibly a string from the environment) to the field's type."""
    try:
        if value is None:
            return None
        if name in _BOOL_FIELDS:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in ("1", "true", "yes", "on"):
                    return True
                if lowered in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if not isinstance(value, bool) and value not in (0, 1):  # a number or a list is no yes or no
                raise ValueError(value)
            return bool(value)
        # A yes or no is no number (YAML's `k_shot: true` would train 1-shot).
        if isinstance(value, bool) and name in _INT_FIELDS | _FLOAT_FIELDS | _OPTIONAL_FLOAT_FIELDS:
            raise ValueError(value)
        if name in _INT_FIELDS:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if name in _FLOAT_FIELDS:
            return float(value)
        if name in _OPTIONAL_FLOAT_FIELDS:
            if isinstance(value, str) and value.strip().lower() in ("none", "null", ""):
                return None
            return float(value)
        if name == "image_shape":
            if isinstance(value, str):
                text = value.strip()
                value = json.loads(text) if text.startswith("[") else text.replace("x", ",").split(",")
            wrong = ConfigError(
                f"image_shape must be H,W,C, three whole numbers with C = 1 or 3 (e.g. 84,84,3), got {value!r}"
            )
            try:
                numbers = [float(v) for v in value]
            except (TypeError, ValueError):
                raise wrong from None
            if len(numbers) != 3 or not all(n.is_integer() and n >= 1 for n in numbers) or numbers[2] not in (1, 3):
                raise wrong
            return [int(n) for n in numbers]
        if name in _TEXT_FIELDS and not isinstance(value, (str, Path)):
            raise ConfigError(
                f"setting {name!r} takes text (a name or a path), got {type(value).__name__} {value!r}"
            )
        if name in ("dataset", "theta0_init", "lr_schedule", "query_statistics", "dtype_policy"):
            return str(value).strip().lower()
        return value if not isinstance(value, Path) else str(value)
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(f"invalid value {value!r} for setting {name!r}") from None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temporary file next to `path` and rename it over `path` (never a half-written file)."""
    with replaced_in_place(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
