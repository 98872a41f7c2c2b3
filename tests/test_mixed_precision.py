"""A learner under a mixed-precision policy (Keras' `mixed_bfloat16`, what TPU users set; `mixed_float16`): it
computes in the low precision, while theta, the coordinate LSTM and the cell update stay in float32, `adapt` works,
and the exported model computes in float32 with parity."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import as_tensors, random_episodes

import keras_metalstm as km
from keras_metalstm import export

IMAGE_SHAPE = (16, 16, 1)
CLASSES = ["a", "b", "c", "d", "e"]


@pytest.fixture(params=["mixed_bfloat16", "mixed_float16"])
def policy(request):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(request.param)
    yield request.param
    keras.config.set_dtype_policy(previous)


def meta_learner(inner_steps=3):
    keras.utils.set_random_seed(0)
    learner = km.learners.conv4(input_shape=IMAGE_SHAPE, num_classes=5, filters=4)
    return km.MetaLearner(learner, inner_steps=inner_steps)


def test_theta_and_the_meta_learners_layers_stay_float32_while_the_learner_computes_low(policy):
    meta = meta_learner()
    low = keras.dtype_policies.get(policy).compute_dtype
    assert {layer.compute_dtype for layer in meta.learner.layers if layer.weights} == {low}
    assert meta.compute_dtype == meta.coordinate_lstm.compute_dtype == meta.cell.compute_dtype == "float32"
    episodes = as_tensors(random_episodes(batch=2, image_shape=IMAGE_SHAPE))
    theta, _ = tf.function(meta.inner_loop)(episodes["support_images"], episodes["support_labels"])
    assert theta.dtype == tf.float32  # was bfloat16 after one step: updates of 1e-3 of a weight rounded away
    plain = tf.function(meta.meta_gradients)(episodes)
    # Under XLA (what a TPU compiles) the two episodes are differentiated one at a time and their results summed.
    xla = meta._compiled(meta.meta_gradients, jit_compile=True)(episodes)
    for loss, _, gradients in (plain, xla):
        assert loss.dtype == tf.float32 and all(np.all(np.isfinite(g.numpy())) for g in gradients)


def test_adapt_under_a_mixed_policy_gives_the_test_mode_query_logits(policy):
    meta = meta_learner()
    km.MetaTrainer(meta).train_step(as_tensors(random_episodes(image_shape=IMAGE_SHAPE)))
    episode = as_tensors(random_episodes(image_shape=IMAGE_SHAPE, seed=4))
    adapted = meta.adapt(episode["support_images"][0], episode["support_labels"][0])  # failed: loop var dtype
    logits = tf.cast(adapted(episode["query_images"][0]), tf.float32).numpy()
    # With stock ops, as adapt runs: the fused kernels' other float32 rounding would flip theta's bfloat16
    # roundings in the learner and grow over the steps (0.14 of logits of ~1 here).
    expected = tf.function(lambda episode: meta(episode, mode="test"))(episode).numpy()[0]
    tolerance = 0.03 * np.abs(expected).max()  # a few bfloat16 roundings: the two graphs' kernels differ
    np.testing.assert_allclose(logits, expected, atol=tolerance)
    unadapted = meta._learner_function.materialise(meta.theta0, meta._learner_function.initial_state())
    assert np.abs(tf.cast(unadapted(episode["query_images"][0]), tf.float32).numpy() - expected).max() > 5 * tolerance


def test_the_exported_model_computes_in_float32_with_parity(policy, tmp_path):
    meta = meta_learner()
    episode = as_tensors(random_episodes(image_shape=IMAGE_SHAPE, seed=5))
    adapted = export.adapt(meta, episode["support_images"][0], episode["support_labels"][0], CLASSES)
    assert {layer.compute_dtype for layer in adapted.learner.layers} == {"float32"}
    in_low_precision = meta.adapt(episode["support_images"][0], episode["support_labels"][0])
    for ours, theirs in zip(adapted.learner.weights, in_low_precision.weights, strict=True):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())  # the same weights, only the arithmetic differs
    result = export.export_adapted(adapted, tmp_path / "task", format="both")  # ONNX Runtime has no bf16 Conv
    assert result.parity.ok, result.parity.summary()


def test_the_adapt_in_serving_export_computes_in_float32(policy, tmp_path):
    from conftest import graph_def_nodes
    from tensorflow.core.protobuf import saved_model_pb2

    meta = meta_learner()
    result = export.export_meta(meta, tmp_path / "meta")
    saved = saved_model_pb2.SavedModel.FromString((result.path / "saved_model.pb").read_bytes())
    low = tf.as_dtype(keras.dtype_policies.get(policy).compute_dtype).as_datatype_enum
    convolutions = [
        node for graph in saved.meta_graphs for node in graph_def_nodes(graph.graph_def) if node.op == "Conv2D"
    ]
    assert convolutions and all(node.attr["T"].type != low for node in convolutions)
    episode = random_episodes(image_shape=IMAGE_SHAPE, seed=6)
    loaded = tf.saved_model.load(str(result.path)).signatures["adapt_and_predict"]
    logits = loaded(support_images=tf.constant(episode["support_images"][0]),
                    support_labels=tf.constant(episode["support_labels"][0]),
                    query_images=tf.constant(episode["query_images"][0]))["logits"].numpy()
    # It adapts as the float32 copy of the meta-learner does: the low-precision one's own inner loop rounds
    # theta's updates differently (0.14 of logits of ~2 here), and no server runs it.
    from keras_metalstm.export.adapted import meta_in_variable_precision

    expected = meta_in_variable_precision(meta).adapt(episode["support_images"][0], episode["support_labels"][0])
    np.testing.assert_allclose(logits, expected(episode["query_images"][0]).numpy(), atol=1e-4)


def test_the_float32_copy_of_a_learner_keeps_an_adapted_normalization_layers_statistics(policy):
    """The copy gets its weights by set_weights, after which Keras' Normalization layer kept the mean and variance
    of its fresh weights (0 and 1) until told to recompute them."""
    from keras_metalstm.export.adapted import in_variable_precision

    rng = np.random.default_rng(0)
    normalization = keras.layers.Normalization()
    normalization.adapt(0.5 + 0.1 * rng.random((32, *IMAGE_SHAPE), dtype=np.float32))
    images = keras.Input(IMAGE_SHAPE)
    learner = keras.Model(images, keras.layers.Dense(5)(keras.layers.Flatten()(normalization(images))))
    copy = in_variable_precision(learner, IMAGE_SHAPE)
    assert copy is not learner and copy.compute_dtype == "float32"
    batch = rng.random((3, *IMAGE_SHAPE), dtype=np.float32)
    expected = np.asarray(learner(batch), np.float32)
    np.testing.assert_allclose(np.asarray(copy(batch)), expected, atol=0.05 * np.abs(expected).max())


def test_build_learner_makes_every_layer_with_the_asked_policy_and_restores_the_global_one(tmp_path):
    from keras_metalstm.learner_spec import LearnerError, build_learner

    learner = build_learner("conv4", IMAGE_SHAPE, 5, filters=4, dtype_policy="mixed_bfloat16")
    assert {layer.dtype_policy.name for layer in learner._flatten_layers(include_self=False)} == {"mixed_bfloat16"}
    assert keras.config.dtype_policy().name == "float32"  # the meta-learner made next stays float32
    saved = tmp_path / "float32_learner.keras"
    build_learner("conv4", IMAGE_SHAPE, 5, filters=4).save(saved)
    with pytest.raises(LearnerError, match=r"mixed_bfloat16 .*keep their own: .*\(float32\).*leave --dtype-policy"):
        build_learner(str(saved), IMAGE_SHAPE, 5, dtype_policy="mixed_bfloat16")
    assert keras.config.dtype_policy().name == "float32"


def test_a_run_trained_with_dtype_policy_keeps_it_through_resume_adapt_and_export(data_dir, tmp_path):
    """`metalstm train --dtype-policy mixed_bfloat16` (a TPU user's run): the run's learner computes in
    bfloat16 (stored in learner.json, so evaluate/adapt/export rebuild it so), theta stays float32, resume
    refuses another policy, and the adapted export is float32 with parity."""
    from cli_helpers import run_cli, train_args

    from keras_metalstm.runs import load_run_config

    run_dir = tmp_path / "run"
    result = run_cli(train_args(data_dir, run_dir, "--episodes", "4", "--dtype-policy", "mixed_bfloat16"))
    assert result.exit_code == 0, result.output
    assert load_run_config(run_dir).dtype_policy == "mixed_bfloat16"
    meta = export.load_meta_learner(run_dir)
    assert {layer.compute_dtype for layer in meta.learner.layers if layer.weights} == {"bfloat16"}
    assert meta.theta0.dtype == "float32"
    refused = run_cli([*train_args(data_dir, run_dir, "--episodes", "8", "--resume"), "--dtype-policy", "float32"])
    assert refused.exit_code != 0 and "dtype_policy: run has 'mixed_bfloat16', requested 'float32'" in refused.output
    support = np.random.default_rng(0).random((2, 28, 28, 1), dtype=np.float32)
    adapted = export.adapt(meta, support, np.arange(2), ["a", "b"])
    assert {layer.compute_dtype for layer in adapted.learner.layers if layer.weights} == {"float32"}
    result = export.export_adapted(adapted, tmp_path / "exported", format="savedmodel")
    assert result.parity.ok, result.parity.summary()
