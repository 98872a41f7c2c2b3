"""The 95% interval formula, the percent summary and the Table 1 layout."""

import json
import math

import numpy as np
import pytest

from keras_metalstm.evaluation import (
    EvaluationReport,
    format_table,
    report_file_name,
    summarise,
)
from keras_metalstm.report_comparison import compare_reports
from keras_metalstm.statistics import eval_batch_size, mean_ci95


def test_ci95_matches_a_direct_numpy_computation():
    rng = np.random.default_rng(0)
    accuracies = rng.integers(0, 76, size=600) / 75.0  # 5-way, 15 queries: multiples of 1/75
    mean, ci95 = mean_ci95(accuracies)
    direct_std = math.sqrt(sum((a - accuracies.mean()) ** 2 for a in accuracies) / len(accuracies))
    assert mean == pytest.approx(sum(accuracies) / 600, abs=1e-12)
    assert ci95 == pytest.approx(1.96 * direct_std / math.sqrt(600), rel=1e-12)
    # population std (ddof=0), not the sample std
    assert ci95 != pytest.approx(1.96 * np.std(accuracies, ddof=1) / math.sqrt(600), rel=1e-6)


def test_ci95_hand_example():
    mean, ci95 = mean_ci95([0.0, 1.0, 0.0, 1.0])  # std 0.5
    assert (mean, ci95) == (0.5, pytest.approx(1.96 * 0.5 / 2))
    with pytest.raises(ValueError):
        mean_ci95([])


def test_summary_is_in_percent():
    assert summarise([0.5, 1.0]) == {"mean": 75.0, "ci95": pytest.approx(100 * 1.96 * 0.25 / math.sqrt(2)),
                                     "episodes": 2}


def test_table_is_shaped_like_table_1():
    one = {"meta_lstm": {"mean": 60.6, "ci95": 0.71, "episodes": 600},
           "finetune": {"mean": 49.79, "ci95": 0.79, "episodes": 600},
           "nearest_neighbour": {"mean": 51.04, "ci95": 0.65, "episodes": 600}}
    table = format_table({"5-way 1-shot": one, "5-way 5-shot": {"meta_lstm": one["meta_lstm"]}})
    lines = table.splitlines()
    assert "5-way 1-shot" in lines[0] and "5-way 5-shot" in lines[0]
    # the paper's row order: fine-tune, nearest neighbour, meta-learner; a baseline's label names its protocol
    assert [line.split("|")[1].strip() for line in lines[2:]] == [
        "Baseline fine-tune (ours)", "Baseline nearest neighbour (ours)", "Meta-Learner LSTM"]
    assert "49.79 +- 0.79%" in lines[2] and "60.60 +- 0.71%" in lines[4]
    assert lines[2].split("|")[3].strip() == "-"  # missing cell


def test_eval_batch_size_divides():
    assert eval_batch_size(600) == 5 and eval_batch_size(7) == 1 and eval_batch_size(4) == 4


def test_paired_differences_are_episode_by_episode_and_narrower_than_the_unpaired_intervals():
    rng = np.random.default_rng(1)
    difficulty = rng.uniform(0.6, 1.0, size=600)  # shared by all methods on an episode
    accuracies = {
        "meta_lstm": np.clip(difficulty + 0.02 + rng.normal(0, 0.01, 600), 0, 1),
        "finetune": np.clip(difficulty + rng.normal(0, 0.01, 600), 0, 1),
    }
    report = EvaluationReport({m: summarise(v) for m, v in accuracies.items()}, 5, 1, 12, "x", "test", 0, 1.0,
                              accuracies=accuracies)
    difference = report.paired_differences["finetune"]
    direct = accuracies["meta_lstm"] - accuracies["finetune"]
    assert difference["mean"] == pytest.approx(100 * direct.mean())
    assert difference["ci95"] == pytest.approx(100 * 1.96 * direct.std() / math.sqrt(600))
    assert difference["ci95"] < report.results["finetune"]["ci95"] / 5
    assert set(report.paired_differences) == {"finetune"}  # only the baselines that were scored
    assert report.differences_text() == (
        f"Meta-Learner LSTM - Baseline fine-tune (ours): {difference['mean']:+.2f} +- {difference['ci95']:.2f} points "
        "(paired over the same 600 episodes)"
    )
    alone = EvaluationReport({}, 5, 1, 12, "x", "test", 0, 1.0, accuracies={"meta_lstm": accuracies["meta_lstm"]})
    assert alone.paired_differences == {} and alone.differences_text() == ""


def test_rows_name_each_baselines_protocol_and_its_paired_difference():
    import json

    accuracies = {"meta_lstm": np.array([1.0, 0.5]), "finetune_authors": np.array([0.5, 0.5]),
                  "baseline_plus": np.array([1.0, 0.0])}
    report = EvaluationReport({m: summarise(v) for m, v in accuracies.items()}, 5, 1, 12, "x", "test", 0, 1.0,
                              accuracies=accuracies)
    rows = report.rows()
    assert rows["meta_lstm"] == summarise(accuracies["meta_lstm"])  # the meta-learner's row as before
    assert rows["finetune_authors"]["protocol"] == "authors" and rows["baseline_plus"]["protocol"] == "chen2019"
    assert rows["finetune_authors"]["paired_difference"] == report.paired_differences["finetune_authors"]
    assert rows["baseline_plus"]["paired_difference"]["mean"] == pytest.approx(25.0)
    assert json.loads(report.to_json()) == rows
    labels = [line.split("|")[1].strip() for line in report.table().splitlines()[2:]]
    assert labels == ["Baseline fine-tune (authors)", "Baseline++ (chen2019)", "Meta-Learner LSTM"]


def saved_report(accuracies, seed=1000, query=15, **details):
    report = EvaluationReport({m: summarise(v) for m, v in accuracies.items()}, 5, 1, 12, "fontglot", "test",
                              seed, 1.0, query=query, details=details, accuracies=accuracies)
    return json.loads(json.dumps(report.to_dict()))  # as read back from the file


def test_two_saved_reports_compare_episode_by_episode():
    rng = np.random.default_rng(3)
    as_trained = rng.integers(0, 76, 600) / 75
    ablation = np.clip(as_trained - rng.integers(0, 3, 600) / 75, 0, 1)
    first = saved_report({"meta_lstm": as_trained, "finetune": rng.random(600)})
    second = saved_report({"meta_lstm": ablation}, test_time={"inner_steps": 6})
    difference = compare_reports(first, second)
    delta = 100 * (as_trained - ablation)
    assert difference["episodes"] == 600
    assert difference["mean"] == pytest.approx(delta.mean(), abs=1e-4)
    assert difference["ci95"] == pytest.approx(1.96 * delta.std() / math.sqrt(600), abs=1e-4)
    # far narrower than the unpaired intervals: the episodes' shared difficulty cancels
    assert difference["ci95"] < 0.5 * first["results"]["meta_lstm"]["ci95"]
    other = compare_reports(first, second, method="finetune", second_method="meta_lstm")
    assert other["mean"] == pytest.approx(100 * np.mean(first["episode_accuracies"]["finetune"]) - 100 * ablation.mean(),
                                          abs=1e-4)


def test_reports_on_different_episodes_or_without_them_are_refused_with_the_fix():
    accuracies = {"meta_lstm": np.full(600, 0.5)}
    with pytest.raises(ValueError, match=r"did not score the same episodes \(seed 1000 vs 7\).*--seed"):
        compare_reports(saved_report(accuracies), saved_report(accuracies, seed=7))
    with pytest.raises(ValueError, match=r"did not score the same episodes \(query 15 vs 5\).*--query"):
        compare_reports(saved_report(accuracies, query=15), saved_report(accuracies, query=5))
    with pytest.raises(ValueError, match="the second file is not an evaluation report: `metalstm evaluate RUN`"):
        compare_reports(saved_report(accuracies), {"status": "finished", "episode": 8})  # a run's state.json
    unrecorded = saved_report(accuracies)
    del unrecorded["query"]
    with pytest.raises(ValueError, match="second report does not record its episodes' query.*evaluate its run again"):
        compare_reports(saved_report(accuracies), unrecorded)
    old = saved_report(accuracies)
    del old["episode_accuracies"]
    with pytest.raises(ValueError, match="first report has no per-episode accuracies.*evaluate its run again"):
        compare_reports(old, saved_report(accuracies))
    with pytest.raises(ValueError, match="second report has no 'finetune'"):
        compare_reports(saved_report(accuracies), saved_report(accuracies), second_method="finetune")


def test_reports_of_another_checkpoint_or_seed_get_their_own_file():
    """Evaluating the latest checkpoint, or other episodes, must not overwrite the best checkpoint's report."""

    def name(seed=1000, checkpoint="best", **test_time):
        details = {"checkpoint": checkpoint, **({"test_time": test_time} if test_time else {})}
        return report_file_name(EvaluationReport({}, 5, 1, 12, "fontglot", "test", seed, 1.0, query=15,
                                                 details=details, accuracies={"meta_lstm": np.ones(600)}))

    assert name() == "fontglot-test-5way1shot-600ep.json"  # the default report keeps its name
    assert name(checkpoint="latest") == "fontglot-test-5way1shot-600ep-latest.json"
    assert name(seed=7) == "fontglot-test-5way1shot-600ep-seed7.json"
    assert name(seed=7, checkpoint="latest", inner_steps=24) == "fontglot-test-5way1shot-600ep-T24-latest-seed7.json"
