"""The speed benchmark compares like with like: its straightforward baseline computes our meta-gradient."""

import importlib.util
import re
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import graph_op_types, needs_kernel_compiler, parallel_iterations_of_loops

import keras_metalstm as km
from keras_metalstm import xla_ops

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name="meta_step"):
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_baseline_step_computes_the_same_meta_gradient_on_a_meta_batch():
    benchmark = load_benchmark()
    setting = dict(benchmark.SETTINGS["28x28x1 1-shot T=12"], inner_steps=3)
    meta, episodes = benchmark.build(setting, meta_batch=2)
    ours_loss, _, ours = tf.function(meta.meta_gradients)(episodes)
    base_loss, base = tf.function(lambda batch: benchmark.baseline_meta_gradients(meta, batch))(episodes)
    # The two episodes' gradients largely cancel in the mean, so round-off is measured against one episode's; the
    # float32 round-off of two summation orders can flip near-ties of the max-pools (a 1e-4 effect). A wrong
    # equation or a dropped episode is an O(1) difference.
    _, _, first_episode = tf.function(meta.meta_gradients)({key: value[:1] for key, value in episodes.items()})
    np.testing.assert_allclose(float(base_loss), float(ours_loss), rtol=1e-5)
    for variable, mine, theirs, scale in zip(meta.trainable_variables, ours, base, first_episode, strict=True):
        assert float(tf.norm(mine)) > 0, variable.path
        assert float(tf.norm(mine - theirs)) <= 1e-3 * float(tf.norm(scale)), variable.path


def test_rounds_are_summarised_by_their_median_per_column():
    benchmark = load_benchmark()

    def one_round(ours_ms, torch_ms, fused=True):
        return {
            "ours": {"ms": ours_ms, "peak_mb": 900.0, "compile_s": 20.0, "parameters": 28485, "fused_kernel": fused},
            "pytorch": {"ms": torch_ms},
        }

    summary = benchmark.median_over_rounds([one_round(150, 400), one_round(190, 470), one_round(140, 380)])
    assert summary["ours"]["ms"] == 150 and summary["pytorch"]["ms"] == 400
    assert summary["ours"]["fused_kernel"] is True
    assert set(summary["pytorch"]) == {"ms"}
    mixed = benchmark.median_over_rounds([one_round(150, 400), one_round(150, 400, fused=False)])
    assert mixed["ours"]["fused_kernel"] is False
    assert benchmark.per_round_summary([one_round(150, 300), one_round(200, 500)]) == (
        "ours per round: 150.0, 200.0 ms; torch/ours per round: 2.00, 2.50"
    )


def test_compile_scaling_runs_every_t_and_b_plain_and_xla_and_times_steady_steps_at_the_first_t_only():
    benchmark = load_benchmark()
    rows = benchmark.compile_scaling_rows([12, 24], [1, 8], [1, 4, 8], steps=3)
    assert [(t, b) for t, b, _, _ in rows] == [(12, 1), (12, 8), (24, 1), (24, 8), (12, 4)]
    assert {(t, b): steps for t, b, steps, _ in rows} == {(12, 1): 3, (12, 8): 3, (24, 1): 0, (24, 8): 0, (12, 4): 3}
    # XLA with the per-episode loop only where the steady time is measured: its cost is the steady time.
    assert {(t, b): variants for t, b, _, variants in rows} == {
        (12, 1): ("plain", "xla", "xla-per-episode"),
        (12, 8): ("plain", "xla", "xla-per-episode"),
        (24, 1): ("plain", "xla"),
        (24, 8): ("plain", "xla"),
        (12, 4): ("plain", "xla", "xla-per-episode"),
    }


def test_the_convolution_floor_counts_an_episodes_passes_layer_by_layer():
    """conv4 at 28x28x1 (inputs 28, 14, 7 and 3 pixels square), 1-shot, T = 12, written out: 12 support passes of 5
    images and one query pass of 75, each a forward convolution and a filter gradient per layer and an input
    gradient for layers 2-4."""
    benchmark = load_benchmark()
    assert benchmark.layer_shapes((84, 84, 3)) == [(84, 84, 3), (42, 42, 32), (21, 21, 32), (10, 10, 32)]
    multiply_adds = [28 * 28 * 9 * 1 * 32, 14 * 14 * 9 * 32 * 32, 7 * 7 * 9 * 32 * 32, 3 * 3 * 9 * 32 * 32]
    per_image = 2 * (2 * multiply_adds[0] + 3 * sum(multiply_adds[1:]))
    setting = benchmark.SETTINGS["28x28x1 1-shot T=12"]
    gflop = (12 * 5 + 75) * per_image / 1e9
    assert benchmark.convolution_gflop(setting) == pytest.approx(gflop, rel=1e-12)
    # At 100 GFLOP/s the convolutions' floor is gflop * 10 ms; a step of twice that is 2.00 floors. With as many
    # GFLOP in the LSTM, the step floor is twice the convolutions': the same step is 1.00 step floor.
    floor = {"convolution_gflop": gflop, "lstm_gflop": gflop, "gflops": 100.0}
    line = benchmark.floor_summary(floor, ours_ms=gflop * 20)
    assert line.endswith("ours / floor 2.00, ours / step floor 1.00"), line
    assert f"rate {gflop * 10:.0f} + {gflop * 10:.0f} ms" in line, line
    benchmark.MATMUL_SIZE = 256  # in GFLOP/s (not FLOP/s or per ms): any CPU lies between these bounds
    assert 0.5 < benchmark.matmul_gflops(repeats=2) < 100_000


def test_the_step_floor_counts_the_coordinate_lstms_products_at_every_inner_step():
    """conv4 at 28x28x1 has 28,485 coordinates; the coordinate LSTM 20 units, 2 own features per coordinate (the
    loss's 2 are shared by an episode) and the cell's readout of h 2 columns. Per coordinate and inner step, written
    out: forward the gates (22 x 80) and the readout (20 x 2); backward the kernel's gradient (22 x 80), h's through
    the gates (20 x 80) and through the readout (20 x 2), and the readout kernel's (20 x 2)."""
    benchmark = load_benchmark()
    multiply_adds = 22 * 80 + 20 * 2 + 22 * 80 + 20 * 80 + 20 * 2 + 20 * 2
    for name, inner_steps in (("28x28x1 5-shot T=8", 8), ("28x28x1 1-shot T=12", 12)):
        gflop = 2 * multiply_adds * 28_485 * inner_steps / 1e9
        assert benchmark.coordinate_lstm_gflop(benchmark.SETTINGS[name]) == pytest.approx(gflop, rel=1e-12)


def test_a_training_step_runs_the_convolutions_the_floor_counts(monkeypatch):
    """The floor's count against the step as it runs (TensorFlow's profiler): per layer a forward convolution and
    a filter gradient in each of T support passes and the query pass, and an input gradient for all but the first
    layer, nothing more."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # step_profile imports meta_step, as when run as a script
    profile = load_benchmark("step_profile")
    benchmark = load_benchmark()
    inner_steps, steps = 3, 2
    meta, episodes = benchmark.build(dict(benchmark.SETTINGS["28x28x1 1-shot T=12"], inner_steps=inner_steps))
    step = km.MetaTrainer(meta).train_step
    counts = {"forward": 0, "filter gradient": 0, "input gradient": 0}
    for op_type, _ in profile.op_events(profile.profiled_events(step, episodes, steps)):
        if "Conv" not in op_type:
            continue
        part = ("filter gradient" if "BackpropFilter" in op_type
                else "input gradient" if "BackpropInput" in op_type else "forward")
        counts[part] += 1
    passes = (inner_steps + 1) * steps
    assert counts == {"forward": 4 * passes, "filter gradient": 4 * passes, "input gradient": 3 * passes}


def test_graph_op_count_includes_loop_bodies_and_not_their_trip_count():
    benchmark = load_benchmark()

    def loop(iterations):
        def body(step, total):
            return step + 1, total + tf.sin(tf.cast(step, tf.float32))

        return tf.function(lambda: tf.while_loop(lambda step, _: step < iterations, body, (0, 0.0))[1])

    counts = [benchmark.graph_op_count(loop(n).get_concrete_function()) for n in (2, 20)]
    top_level = len(loop(2).get_concrete_function().graph.as_graph_def().node)
    assert counts[0] == counts[1] > top_level


def test_the_op_type_profile_names_what_a_step_runs_and_no_wrapper_events(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # step_profile imports meta_step, as when run as a script
    benchmark = load_benchmark("step_profile")
    matrix = tf.random.normal((384, 384))

    @tf.function
    def step(inputs):
        return {"loss": tf.reduce_sum(tf.matmul(inputs, inputs))}

    profile = benchmark.cpu_ms_by_op_type(list(benchmark.profiled_events(step, matrix, steps=3)), steps=3)
    assert any("MatMul" in op_type for op_type in profile), profile
    assert not set(profile) & benchmark.CONTAINER_EVENTS
    assert all(ms >= 0 for ms in profile.values())
    assert list(profile.values()) == sorted(profile.values(), reverse=True)


def test_ops_at_once_measures_how_the_step_s_ops_overlap(monkeypatch):
    """Op events from 0-10 ms (A), 5-20 (B, another thread) and 30-35 (C): 5 ms of two ops, 20 of one (A 5, B 10,
    C 5), 10 of none; the executor's wrapper event around them, a marker without duration and the events of a thread
    that runs no TensorFlow ops do not count."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    benchmark = load_benchmark("step_profile")
    event = benchmark.ProfiledEvent
    events = [
        event("tf_Compute/1", "outer:Process", 0.0, 40.0),
        event("tf_Compute/1", "a:MatMul", 0.0, 10.0),
        event("tf_Compute/2", "b:Conv2D", 5.0, 15.0),
        event("tf_Compute/1", "c:MatMul", 30.0, 5.0),
        event("tf_Compute/2", "ThreadpoolListener::StartRegion", 32.0, 0.0),
        event("python", "d:Mul", 20.0, 10.0),
    ]
    at_once, alone = benchmark.ops_at_once(events, steps=2)  # per step: halved
    assert at_once == pytest.approx({0: 5.0, 1: 10.0, 2: 2.5})
    assert alone == pytest.approx({"Conv2D": 5.0, "MatMul": 5.0})


OLD_XLA_RUNTIME = xla_ops.tensorflow_release() < (2, 18)
NO_INSTRUCTION_EVENTS = "XLA's CPU runtime before TensorFlow 2.18 records no per-instruction events"


@pytest.mark.xfail(OLD_XLA_RUNTIME, reason=NO_INSTRUCTION_EVENTS, strict=True)
def test_the_xla_profile_names_the_compiled_instructions_not_tensorflow_ops(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    benchmark = load_benchmark("step_profile")
    matrix = tf.random.normal((384, 384))

    @tf.function(jit_compile=True)
    def product(inputs):
        return tf.reduce_sum(tf.matmul(inputs, inputs))

    @tf.function
    def step(inputs):  # an XLA cluster inside a TensorFlow function, as in MetaTrainer(jit_compile=True)
        return {"loss": product(inputs) + 1.0}

    profile = benchmark.xla_ms_by_instruction(step, matrix, steps=3)
    assert profile and sum(profile.values()) > 0
    assert not [name for name in profile if ":" in name or re.search(r"\.\d+$", name)], profile
    assert not set(profile) & benchmark.XLA_RUNTIME_EVENTS
    assert list(profile.values()) == sorted(profile.values(), reverse=True)


@needs_kernel_compiler
def test_the_profiles_parts_are_traced_with_the_fused_kernel_as_the_step_ours_is(monkeypatch):
    """The parts' table compares with the step 'ours': a part that ran stock ops instead (as a function traced
    outside the library's steps does) measured the meta-learner layers 1.7x slower at 28x28 1-shot."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    benchmark = load_benchmark("step_profile")
    lstm = km.layers.CoordinateLSTM(units=4, input_dim=4)
    features = tf.random.normal((4, 1, 64))
    state = (tf.random.normal((4, 1, 64)), tf.random.normal((4, 1, 64)))

    def layer_step():
        return lstm(features, state)[0]

    kernel_ops = {"MetaLstmCoordinateStep"}
    assert kernel_ops <= graph_op_types(tf.function(benchmark.with_fused_kernel(layer_step)).get_concrete_function())
    assert not kernel_ops & graph_op_types(tf.function(layer_step).get_concrete_function())


@needs_kernel_compiler
@pytest.mark.parametrize("kernel", ["coordinate-lstm", "norm-relu-pool"])
def test_the_kernel_benchmark_compares_the_kernel_with_stock_ops_on_the_same_step(monkeypatch, kernel):
    """Its 'kernel' functions run the fused ops (forward, and backward when differentiated), its 'stock' ones
    none, and both compute the same outputs and gradients: the ratio compares two ways of one computation."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # it imports meta_step's timing, as when run as a script
    benchmark = load_benchmark("fused_kernel")
    if kernel == "coordinate-lstm":
        steps, op = benchmark.build_steps(coordinates=300, episodes=2), "MetaLstmCoordinateStep"
    else:
        steps, op = benchmark.build_block_steps((3, 10, 6, 16)), "MetaLstmNormReluPool"
    for part, kernel_ops in (("forward", {op}), ("forward+backward", {op, op + "Grad"})):
        assert kernel_ops <= graph_op_types(steps["kernel", part].get_concrete_function())
        assert not kernel_ops & graph_op_types(steps["stock", part].get_concrete_function())
        for fused, stock in zip(steps["kernel", part](), steps["stock", part](), strict=True):
            scale = np.abs(stock.numpy()).max() + 1e-12
            np.testing.assert_allclose(fused.numpy() / scale, stock.numpy() / scale, atol=2e-5)


def test_timings_are_the_median_of_the_calls():
    """Every benchmark times its calls with median_ms: one slow call (a noisy machine) must not move it."""
    durations = iter([0.002, 0.030, 0.003])
    calls = []

    def call():
        calls.append(1)
        time.sleep(next(durations))

    ms = load_benchmark().median_ms(call, 3)
    assert len(calls) == 3
    assert 3.0 <= ms < 20.0  # the middle call's 3 ms (sleep may overrun), not the mean (11.7) or the slow one


def test_the_loop_parallelism_benchmark_times_one_step_of_each_kind(monkeypatch):
    """Its two steps loop over the episodes with TensorFlow's default and with one iteration at a time, and the
    library's own choice is back in place afterwards."""
    import keras_metalstm.loop_parallelism as loop_parallelism_module

    monkeypatch.syspath_prepend(str(BENCHMARKS))  # it imports meta_step's settings, as when run as a script
    benchmark = load_benchmark("loop_parallelism")
    chosen = loop_parallelism_module.learner_parallel_iterations
    short = dict(image_shape=(28, 28, 1), k_shot=1, inner_steps=1)
    monkeypatch.setitem(benchmark.SETTINGS, "28x28x1 1-shot T=12", short)
    steps = benchmark.traced_steps("28x28x1 1-shot T=12", meta_batch=2)
    assert loop_parallelism_module.learner_parallel_iterations is chosen
    for parallel_iterations, loops_one_at_a_time in ((None, 0), (1, 4)):  # 2 loops over episodes, 2 gradients
        trainer, episodes = steps[parallel_iterations]
        loops = parallel_iterations_of_loops(trainer._train_function.get_concrete_function(episodes))
        assert len(loops) == 6 and loops.count(1) == loops_one_at_a_time, loops


def test_the_recompute_benchmark_traces_each_configuration_as_named(monkeypatch):
    """Its steps recompute the coordinate LSTM's backward pass or keep its activations as the configuration says
    (the loop's kept values differ by the LSTM's activations), and the library's own choice is back afterwards."""
    from keras_metalstm.layers import coordinate_lstm

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    benchmark = load_benchmark("recompute")
    chosen = coordinate_lstm.recomputes_backward
    traced = []
    monkeypatch.setattr(benchmark, "median_ms", lambda call, calls: traced.append(coordinate_lstm.recomputes_backward()) or 1.0)
    monkeypatch.setitem(benchmark.SETTINGS, "28x28x1 1-shot T=12", dict(image_shape=(28, 28, 1), k_shot=1, inner_steps=1))
    for name, (_, recompute) in benchmark.CONFIGURATIONS.items():
        result = benchmark.measure("28x28x1 1-shot T=12", name, filters=4, steps=1)
        assert result["parameters"] > 0 and result["peak_mb"] > 0
        assert traced[-1] is recompute, name
    assert coordinate_lstm.recomputes_backward is chosen


def test_the_precision_benchmark_swaps_only_the_layers_it_names_and_compares_float32_with_float64():
    precision = load_benchmark("precision")
    conv4 = precision.learner("conv4")
    swaps = (("average pooling", {"MaxPooling2D"}), ("average pooling + GELU", {"MaxPooling2D", "ReLU"}))
    for variant, replaced in swaps:
        model = precision.learner(variant)
        assert not replaced & {type(layer).__name__ for layer in model.layers}, variant
        assert [weight.shape for weight in model.weights] == [weight.shape for weight in conv4.weights], variant
    smooth_error, smooth_cosine, loss, expected_loss = precision.compare("average pooling + GELU", 1, 2, seed=3)
    assert smooth_error < 1e-3 and smooth_cosine > 0.9999 and loss == pytest.approx(expected_loss, rel=1e-5)
    perturbed_error, _, _, _ = precision.compare(precision.VARIANTS[-1], 1, 2, seed=3)
    assert 0 < perturbed_error < 1e-5


def test_the_xla_convolution_benchmark_times_the_same_values_both_ways_and_counts_one_steps_parts(monkeypatch):
    """Each part (forward, input gradient, filter gradient) gives the same value on TensorFlow's kernels and in
    XLA's CPU forms, so the ratio compares two ways of one computation; a step's total counts T support passes
    and one query pass, with no input gradient for the first layer."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # it imports meta_step's settings and timing
    benchmark = load_benchmark("xla_convolutions")
    rng = np.random.default_rng(0)
    images = tf.constant(rng.standard_normal((2, 6, 5, 3)), tf.float32)
    kernel = tf.constant(rng.standard_normal((3, 3, 3, 4)), tf.float32)
    upstream = tf.constant(rng.standard_normal((2, 6, 5, 4)), tf.float32)
    shapes = {}
    for part in benchmark.PARTS:
        onednn, xla = (benchmark.convolution_part(part, images, kernel, upstream, xla)() for xla in (False, True))
        assert len(onednn) == len(xla) == benchmark.REPEATS, part
        for ours, theirs in zip(onednn, xla, strict=True):
            np.testing.assert_allclose(theirs.numpy(), ours.numpy(), rtol=1e-4, atol=1e-4, err_msg=part)
        assert not np.allclose(onednn[0].numpy(), onednn[1].numpy()), part  # the repeats differ: none is merged
        shapes[part] = onednn[0].shape
    assert shapes == {"forward": (2, 6, 5, 4), "input gradient": (2, 6, 5, 3), "filter gradient": (3, 3, 3, 4)}
    timings = {(batch, layer, part): (1.0, 2.0) for batch in (5, 75) for layer in range(4) for part in benchmark.PARTS}
    # Per pass: 4 forward, 3 input and 4 filter gradients; 12 support passes and one query pass.
    assert benchmark.per_step_totals(timings, inner_steps=12, support_batch=5) == (13 * 11.0, 13 * 22.0)


def test_the_teardown_benchmark_loops_over_the_same_episodes_with_the_tuning_off_and_on():
    from keras_metalstm.data import episode_dataset, load_fontglot

    episodes = load_benchmark("episodes")
    split = load_fontglot()
    batches = episode_dataset(split, 5, 1, 15, batch_size=5, num_episodes=10)
    assert (batches.options().autotune.enabled, episodes.with_autotune(batches).options().autotune.enabled) == (
        False,
        True,
    )
    seen = []
    lines = episodes.teardown_table(split, 10, 2, lambda batch: seen.append(batch["query_labels"].shape))
    assert seen == [(5, 75)] * 8  # 2 batches of 5 episodes, 2 rounds, 2 pipelines
    assert len(lines) == 5 and lines[-1].startswith("wait at the end, mean / longest: the package's")
    assert [line.split("  ")[1].split(" (")[0] for line in lines[:4]] == ["the package's", "autotune on"] * 2
