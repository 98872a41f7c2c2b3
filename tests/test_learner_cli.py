"""`metalstm train --learner SPEC`: the user's own Keras model through train, evaluate, adapt, export and predict.

The factories live in a module the tests write into a temporary directory, as a user's model file would be; the
run directory must then be usable where that module cannot be imported.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from cli_helpers import TINY_FLAGS, assert_clean_failure, invoke, make_image_folder
from click.testing import CliRunner
from keras_metalstm.cli.main import main

import keras_metalstm as km
from keras_metalstm.runs import checkpoint_object, load_meta_learner, load_run_config, save_best_model

FACTORIES = '''
import keras
import numpy as np
import tensorflow as tf


def groupnorm(input_shape, num_classes):
    images = keras.Input(shape=input_shape)
    features = images
    for width in (4, 4):
        features = keras.layers.Conv2D(width, 3, padding="same")(features)
        features = keras.layers.GroupNormalization(groups=2)(features)
        features = keras.layers.ReLU()(features)
        features = keras.layers.MaxPooling2D(2)(features)
    features = keras.layers.Flatten()(features)
    return keras.Model(images, keras.layers.Dense(num_classes)(features), name="gn_net")


def layernorm_dropout(input_shape, num_classes):
    images = keras.Input(shape=input_shape)
    features = keras.layers.Conv2D(4, 3, strides=2)(images)
    features = keras.layers.LayerNormalization()(features)
    features = keras.layers.Dropout(0.2)(keras.layers.ReLU()(features))
    features = keras.layers.GlobalAveragePooling2D()(features)
    return keras.Model(images, keras.layers.Dense(num_classes)(features))


def skip(input_shape, num_classes):
    images = keras.Input(shape=input_shape)
    stem = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(images)
    branch = keras.layers.Conv2D(4, 3, padding="same")(stem)
    features = keras.layers.ReLU()(keras.layers.Add()([stem, branch]))
    features = keras.layers.GlobalAveragePooling2D()(keras.layers.MaxPooling2D(2)(features))
    return keras.Model(images, keras.layers.Dense(num_classes)(features))


def wrong_output(input_shape, num_classes):
    images = keras.Input(shape=input_shape)
    return keras.Model(images, keras.layers.Dense(num_classes + 3)(keras.layers.Flatten()(images)))


def wrong_input(input_shape, num_classes):
    images = keras.Input(shape=(32, 32, 3))
    return keras.Model(images, keras.layers.Dense(num_classes)(keras.layers.Flatten()(images)))


def softmax(input_shape, num_classes):
    images = keras.Input(shape=input_shape)
    flat = keras.layers.Flatten()(images)
    return keras.Model(images, keras.layers.Dense(num_classes, activation="softmax")(flat))


def integer_input(input_shape, num_classes):
    images = keras.Input(shape=input_shape, dtype="uint8")
    scaled = keras.layers.Rescaling(1 / 255)(images)
    return keras.Model(images, keras.layers.Dense(num_classes)(keras.layers.Flatten()(scaled)))


def frozen_with_set_weights(input_shape, num_classes):
    images = keras.Input(shape=input_shape)
    frozen_conv = keras.layers.Conv2D(2, 3, trainable=False)
    features = frozen_conv(images)
    frozen_conv.set_weights([np.full(weight.shape, 0.1, "float32") for weight in frozen_conv.get_weights()])
    return keras.Model(images, keras.layers.Dense(num_classes)(keras.layers.Flatten()(features)))


def head_without_bias(input_shape, num_classes):
    images = keras.Input(shape=input_shape)
    return keras.Model(images, keras.layers.Dense(num_classes, use_bias=False, name="head")(
        keras.layers.Flatten()(images)))


def frozen(input_shape, num_classes):
    images = keras.Input(shape=input_shape)
    head = keras.layers.Dense(num_classes, trainable=False)
    return keras.Model(images, head(keras.layers.Flatten()(images)))


class Counting(keras.layers.Layer):
    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones")
        self.calls = tf.Variable(0.0, trainable=False)

    def call(self, inputs):
        self.calls.assign_add(1.0)
        return inputs * self.scale


def raw_variable(input_shape, num_classes):
    images = keras.Input(shape=input_shape)
    return keras.Model(images, keras.layers.Dense(num_classes)(Counting()(keras.layers.Flatten()(images))))


def lambda_layer(input_shape, num_classes):
    images = keras.Input(shape=input_shape)
    doubled = keras.layers.Lambda(lambda x: 2.0 * x)(keras.layers.Flatten()(images))
    return keras.Model(images, keras.layers.Dense(num_classes)(doubled))


@keras.saving.register_keras_serializable(package="user_models")
class SmallNet(keras.Model):
    """A subclassed model: no declared input or output shape, its class registered here only."""

    def __init__(self, num_classes, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.conv = keras.layers.Conv2D(4, 3, strides=2)
        self.norm = keras.layers.BatchNormalization()
        self.head = keras.layers.Dense(num_classes)

    def call(self, images, training=False):
        features = keras.ops.relu(self.norm(self.conv(images), training=training))
        return self.head(keras.ops.mean(features, axis=(1, 2)))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


def subclassed(input_shape, num_classes):
    return SmallNet(num_classes)


@keras.saving.register_keras_serializable(package="user_models")
class WidthNet(keras.Model):
    """Its get_config leaves out `width`, or with `forget_classes` every argument of its own."""

    def __init__(self, num_classes, width=4, forget_classes=False, **kwargs):
        super().__init__(**kwargs)
        self.num_classes, self.forget_classes = num_classes, forget_classes
        self.conv = keras.layers.Conv2D(width, 3, strides=2)
        self.head = keras.layers.Dense(num_classes)

    def call(self, images):
        return self.head(keras.ops.mean(self.conv(images), axis=(1, 2)))

    def get_config(self):
        config = super().get_config()
        return config if self.forget_classes else {**config, "num_classes": self.num_classes}


def forgets_width(input_shape, num_classes):
    return WidthNet(num_classes, width=3)


def forgets_classes(input_shape, num_classes):
    return WidthNet(num_classes, forget_classes=True)


class Unregistered(keras.Model):
    def __init__(self, num_classes, **kwargs):
        super().__init__(**kwargs)
        self.head = keras.layers.Dense(num_classes)

    def call(self, images):
        return self.head(keras.ops.mean(images, axis=(1, 2)))


def no_config(input_shape, num_classes):
    return Unregistered(num_classes)


def raises(input_shape, num_classes):
    raise RuntimeError("my model is not finished")


def not_a_model(input_shape, num_classes):
    return "conv4"
'''


def run_cli(args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def train_args(data_dir, run_dir, *extra):
    return ["train", "--dataset", "folder", "--data-dir", data_dir, "--run-dir", run_dir, *TINY_FLAGS,
            "--no-deterministic", "--episodes", "4", "--checkpoint-every", "2", "--validate-every", "2", *extra]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data") / "folder")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """`user_models.py` in a fresh working directory, importable from there only (as for a user's shell)."""
    (tmp_path / "user_models.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "user_models", raising=False)
    yield tmp_path
    sys.modules.pop("user_models", None)
    if str(tmp_path) in sys.path:
        sys.path.remove(str(tmp_path))


def test_own_model_through_train_evaluate_adapt_export_predict(user_module, data_dir):
    run_dir = user_module / "run"
    trained = run_cli(train_args(data_dir, run_dir, "--learner", "user_models:groupnorm"))
    assert trained.exit_code == 0, trained.output
    assert load_run_config(run_dir).learner == "user_models:groupnorm"
    stored = json.loads((run_dir / "learner.json").read_text())
    assert stored["config"]["name"] == "gn_net"
    _, meta = load_meta_learner(run_dir)
    assert any(isinstance(layer, keras.layers.GroupNormalization) for layer in meta.learner.layers)

    evaluated = run_cli(["evaluate", run_dir, "--episodes", "2", "--baselines", "--pretrain-epochs", "1",
                         "--finetune-val-episodes", "2", "--no-progress"])
    assert evaluated.exit_code == 0, evaluated.output
    assert "pre-training the gn_net classifier" in evaluated.output  # the run's architecture, not conv4
    pretrained = keras.models.load_model(run_dir / "baselines" / "pretrained.keras")
    assert any(isinstance(layer, keras.layers.GroupNormalization) for layer in pretrained.layers)
    assert pretrained.output_shape[-1] == 8  # one output per meta-train class of the folder data set

    support = user_module / "support"
    for name in ("class_00", "class_01"):
        (support / name).mkdir(parents=True)
        for image in sorted((data_dir / name).glob("*.png"))[:2]:
            (support / name / image.name).write_bytes(image.read_bytes())
    adapted = run_cli(["adapt", run_dir, "--support", support, "--out", user_module / "task.keras"])
    assert adapted.exit_code == 0, adapted.output
    exported = run_cli(["export", user_module / "task.keras", "--format", "both", "--out", user_module / "models"])
    assert exported.exit_code == 0, exported.output
    images = sorted(str(p) for p in (data_dir / "class_01").glob("*.png"))
    outputs = {}
    for model in (user_module / "models" / "1", user_module / "models" / "1" / "model.onnx"):
        predicted = run_cli(["predict", model, *images, "--json"])
        assert predicted.exit_code == 0, predicted.output
        outputs[model.name] = json.loads(predicted.stdout)
    savedmodel, onnx = outputs["1"], outputs["model.onnx"]
    assert [r["class_name"] for r in savedmodel] == [r["class_name"] for r in onnx]
    np.testing.assert_allclose([r["logits"] for r in savedmodel], [r["logits"] for r in onnx], atol=1e-4)

    # A fresh process in another directory, where user_models cannot be imported, evaluates and exports the run.
    elsewhere = user_module.parent / "elsewhere"
    elsewhere.mkdir()
    script = textwrap.dedent(f"""
        import importlib.util, sys
        from click.testing import CliRunner
        from keras_metalstm.cli.main import main
        assert importlib.util.find_spec("user_models") is None
        for args in (["evaluate", {str(run_dir)!r}, "--episodes", "2", "--no-progress"],
                     ["export", {str(run_dir)!r}, "--out", "meta_export"]):
            result = CliRunner().invoke(main, args, catch_exceptions=False)
            assert result.exit_code == 0, result.output
            print(result.output)
        assert "user_models" not in sys.modules
    """)
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    process = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=environment,
                             capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stdout + process.stderr
    assert "evaluated" in process.stdout and (elsewhere / "meta_export" / "1" / "saved_model.pb").is_file()


def test_best_keras_keeps_a_frozen_layers_weights_which_no_checkpoint_holds(tmp_path):
    """best.keras is the meta-learner rebuilt from its config and given the best checkpoint. A frozen layer's
    weights are in no checkpoint (a run makes them again from its architecture and seed): they must be the
    run's, not whatever the random state makes of them when training ends."""
    keras.utils.set_random_seed(0)
    images = keras.Input(shape=(8, 8, 1))
    stem = keras.layers.Conv2D(3, 3, trainable=False)
    learner = keras.Model(images, keras.layers.Dense(2)(keras.layers.Flatten()(stem(images))))
    meta = km.MetaLearner(learner, inner_steps=1, hidden_units=4)
    best_checkpoint = checkpoint_object(meta).write(str(tmp_path / "best" / "ckpt"))
    best_theta0 = meta.theta0.numpy()
    meta.theta0.assign_add(np.ones(meta.theta0.shape, "float32"))  # training went on after its best validation
    keras.utils.set_random_seed(1)  # and drew random numbers
    save_best_model(tmp_path, meta, validated=True, best_checkpoint=best_checkpoint)
    best = keras.models.load_model(tmp_path / "best.keras")
    np.testing.assert_array_equal(best.theta0.numpy(), best_theta0)
    np.testing.assert_array_equal(best.learner.get_layer(stem.name).kernel.numpy(), stem.kernel.numpy())


@pytest.mark.parametrize("factory,message", [
    ("head_without_bias", "this learner ends in Dense 'head' without a bias"),
    ("subclassed", "this learner is a subclassed SmallNet, whose output layer cannot be found and replaced"),
])
def test_baselines_refuse_a_learner_they_cannot_fine_tune_before_pre_training_it(user_module, data_dir, factory,
                                                                                  message):
    run_dir = user_module / "run"
    assert run_cli(train_args(data_dir, run_dir, "--learner", f"user_models:{factory}")).exit_code == 0
    result = CliRunner().invoke(main, ["evaluate", str(run_dir), "--episodes", "2", "--baselines", "--no-progress"])
    assert result.exit_code == 1 and message in result.output, result.output
    assert "pre-training" not in result.output and not (run_dir / "baselines" / "pretrained.keras").exists()


@pytest.mark.parametrize("factory", ["layernorm_dropout", "skip"])
def test_other_learner_shapes_train_and_adapt(user_module, data_dir, factory):
    run_dir = user_module / "run"
    trained = run_cli(train_args(data_dir, run_dir, "--learner", f"user_models:{factory}"))
    assert trained.exit_code == 0, trained.output
    _, meta = load_meta_learner(run_dir)
    episode = km.data.episode_dataset(km.data.load_image_folder(data_dir), 2, 1, 2, batch_size=1, seed=3,
                                      num_episodes=1)
    batch = next(iter(episode))
    adapted = meta.adapt(batch["support_images"][0], batch["support_labels"][0])
    np.testing.assert_allclose(adapted(batch["query_images"][0]).numpy(),
                               meta(batch, mode="test").numpy()[0], rtol=1e-5, atol=1e-5)


def test_a_pretrained_theta0_for_a_learner_whose_classes_cannot_change_is_refused_before_writing(
        user_module, data_dir):
    run_dir = user_module / "run"
    result = invoke(train_args(data_dir, run_dir, "--learner", "user_models:subclassed", "--theta0-init", "pretrained",
                               "--pretrain-epochs", "1"))
    assert_clean_failure(result, "cannot change the learner's number of classes: only a functional or Sequential model")
    assert not run_dir.exists()


def test_a_subclassed_model_of_the_users_module_is_adapted_and_exported_in_a_new_process(user_module, data_dir):
    """A new process (as every `metalstm` command is) must import the module that registers the class before
    the run's learner can be rebuilt, and find a subclassed model's image shape and classes without its
    `input_shape` / `output_shape`."""
    run_dir = user_module / "run"
    trained = run_cli(train_args(data_dir, run_dir, "--learner", "user_models:subclassed"))
    assert trained.exit_code == 0, trained.output
    support = user_module / "support"
    for name in ("class_00", "class_01"):
        (support / name).mkdir(parents=True)
        for image in sorted((data_dir / name).glob("*.png"))[:2]:
            (support / name / image.name).write_bytes(image.read_bytes())
    image = sorted((data_dir / "class_01").glob("*.png"))[0]
    script = textwrap.dedent(f"""
        import sys
        from click.testing import CliRunner
        from keras_metalstm.cli.main import main
        assert "user_models" not in sys.modules
        for args in (["adapt", "run", "--support", "support", "--out", "task.keras"],
                     ["export", "task.keras", "--format", "both", "--out", "models"],
                     ["predict", "models/1/model.onnx", {str(image)!r}],
                     ["export", "run", "--out", "meta_export"]):
            result = CliRunner().invoke(main, args, catch_exceptions=False)
            assert result.exit_code == 0, result.output
            print(result.output)
        assert "user_models" in sys.modules
    """)
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    process = subprocess.run([sys.executable, "-c", script], cwd=user_module, env=environment,
                             capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stdout + process.stderr
    assert "parity OK" in process.stdout, process.stdout
    assert "adapt-in-serving SavedModel of the 2-way meta-learner" in process.stdout, process.stdout
    assert (user_module / "models" / "1" / "saved_model.pb").is_file()


BAD_LEARNERS = {
    "user_models:wrong_output": "needs one tensor of 2 logits per image",
    "user_models:wrong_input": "takes images of shape (32, 32, 3) but the episodes have (28, 28, 1)",
    "user_models:softmax": "returns probabilities",
    "user_models:frozen": "no trainable weights",
    "user_models:integer_input": "the learner's input is uint8 but the meta-learner feeds it float32 images",
    "user_models:frozen_with_set_weights": "non-trainable weights in conv2d are not made by its layers",
    "user_models:raw_variable": "holds a tf.Variable ('calls')",
    "user_models:lambda_layer": "Lambda layers cannot be loaded safely",
    "user_models:forgets_width": "is not the one given (width_net/conv2d/kernel (3, 3, 1, 3) against (3, 3, 1, 4))",
    "user_models:forgets_classes": "(WidthNet.__init__() missing 1 required positional argument: 'num_classes')",
    "user_models:no_config": "the learner (Unregistered) cannot be written as a Keras config",
    "user_models:raises": "my model is not finished",
    "user_models:not_a_model": "must be a keras.Model, got str",
    "user_models:missing": "has no function 'missing'",
    "no_such_module:build": "cannot import 'no_such_module'",
    "missing.keras": "does not exist",
    "not a spec": "unknown learner 'not a spec'",
}


@pytest.mark.parametrize("spec", list(BAD_LEARNERS))
def test_each_unfit_learner_gets_its_own_clear_message_and_nothing_is_written(user_module, data_dir, spec):
    run_dir = user_module / "run"
    result = CliRunner().invoke(main, [str(a) for a in train_args(data_dir, run_dir, "--learner", spec)])
    assert result.exit_code == 1, result.output
    assert BAD_LEARNERS[spec] in result.output
    assert isinstance(result.exception, SystemExit), result.exception  # a clean exit, not an uncaught error
    assert "Traceback" not in result.output
    assert not run_dir.exists()


def test_a_saved_learner_gives_its_architecture_and_with_pretrained_its_weights(tmp_path, data_dir):
    keras.utils.set_random_seed(5)
    images = keras.Input((28, 28, 1))
    features = keras.layers.Conv2D(3, 3, strides=2, name="conv")(images)
    features = keras.layers.LayerNormalization(name="norm")(features)
    features = keras.layers.Flatten(name="flat")(keras.layers.ReLU()(features))
    saved = keras.Model(images, keras.layers.Dense(9, name="head")(features), name="saved_net")
    path = tmp_path / "saved_net.keras"
    saved.save(path)
    pieces = [v.numpy().ravel() for v in saved.trainable_variables]

    def theta0_pieces(run_dir):
        _, meta = load_meta_learner(run_dir, "latest")
        assert meta.learner.name == "saved_net" and meta.learner.output_shape[-1] == 2  # resized to 2-way
        sizes = [int(np.prod(v.shape)) for v in meta.learner.trainable_variables]
        return np.split(meta.theta0.numpy(), np.cumsum(sizes)[:-1])

    frozen = ["--learning-rate", "1e-9"]  # Adam moves theta_0 by ~1e-9: it stays where it started
    pretrained = run_cli(train_args(data_dir, tmp_path / "pretrained", "--learner", path, "--theta0-init",
                                    "pretrained", *frozen))
    assert pretrained.exit_code == 0, pretrained.output
    assert not (tmp_path / "pretrained" / "baselines").exists()  # the file's weights, nothing pre-trained
    started = theta0_pieces(tmp_path / "pretrained")
    for mine, theirs in zip(started[:-2], pieces[:-2], strict=True):
        np.testing.assert_allclose(mine, theirs, atol=1e-6)
    for head in started[-2:]:  # the 9-way head became a zero 2-way head (moved by ~1e-9 since)
        np.testing.assert_allclose(head, 0.0, atol=1e-6)

    scratch = run_cli(train_args(data_dir, tmp_path / "scratch", "--learner", path, *frozen))
    assert scratch.exit_code == 0, scratch.output
    fresh = theta0_pieces(tmp_path / "scratch")
    assert not np.allclose(fresh[0], pieces[0], atol=1e-3)  # re-initialised
    assert load_run_config(tmp_path / "scratch").learner == str(path)


def test_a_saved_learner_with_a_frozen_layer_is_refused_for_what_it_is(tmp_path, data_dir):
    images = keras.Input(shape=(28, 28, 1))
    stem = keras.layers.Conv2D(2, 3, trainable=False, name="frozen_stem")
    model = keras.Model(images, keras.layers.Dense(2)(keras.layers.Flatten()(stem(images))))
    stem.set_weights([np.full(weight.shape, 0.5, "float32") for weight in stem.get_weights()])  # not an init's
    model.save(tmp_path / "learner.keras")
    result = CliRunner().invoke(main, train_args(data_dir, tmp_path / "run", "--learner", tmp_path / "learner.keras"))
    assert result.exit_code == 1
    assert "the learner file's non-trainable weights in frozen_stem (a frozen layer's) are its own" in result.output


def test_resume_refuses_another_learner_naming_both(user_module, data_dir):
    run_dir = user_module / "run"
    assert run_cli(train_args(data_dir, run_dir, "--learner", "user_models:skip")).exit_code == 0
    result = CliRunner().invoke(main, [str(a) for a in train_args(data_dir, run_dir, "--resume", "--episodes", "6",
                                                                  "--learner", "conv4")])
    assert result.exit_code == 1
    assert "learner: run has 'user_models:skip', requested 'conv4'" in result.output
    resumed = run_cli(train_args(data_dir, run_dir, "--resume", "--episodes", "6"))
    assert resumed.exit_code == 0, resumed.output
    assert "finished: 6 episodes" in resumed.output


def test_learner_from_the_environment(user_module, data_dir, monkeypatch):
    monkeypatch.setenv("METALSTM_LEARNER", "user_models:skip")
    run_dir = user_module / "run"
    assert run_cli(train_args(data_dir, run_dir)).exit_code == 0
    assert load_run_config(run_dir).learner == "user_models:skip"
