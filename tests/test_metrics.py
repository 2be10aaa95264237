"""The metrics' conventions, pinned by hand-computed examples."""

import math

import pytest

from peft_gp.core import metrics

# rows = after training task t; columns = task k
R = [
    [0.90, None, None],
    [0.70, 0.80, None],
    [0.60, 0.85, 0.50],
]


def test_average_accuracy_is_the_last_row_mean():
    assert metrics.average_accuracy(R) == pytest.approx((0.60 + 0.85 + 0.50) / 3)


def test_average_incremental_accuracy():
    expected = (0.90 + (0.70 + 0.80) / 2 + (0.60 + 0.85 + 0.50) / 3) / 3
    assert metrics.average_incremental_accuracy(R) == pytest.approx(expected)


def test_forgetting_is_positive_when_accuracy_drops():
    # task 0: best before the end 0.90, final 0.60 -> 0.30; task 1: best 0.80, final 0.85 -> -0.05
    assert metrics.forgetting(R) == pytest.approx((0.30 - 0.05) / 2)


def test_backward_transfer_is_negative_when_accuracy_drops():
    # task 0: 0.60 - 0.90 = -0.30; task 1: 0.85 - 0.80 = +0.05
    assert metrics.backward_transfer(R) == pytest.approx((-0.30 + 0.05) / 2)


def test_no_forgetting_and_single_task():
    assert metrics.forgetting([[1.0, None], [1.0, 1.0]]) == 0.0
    assert metrics.backward_transfer([[0.5]]) == 0.0 and metrics.forgetting([[0.5]]) == 0.0
    summary = metrics.accuracy_matrix_summary([[0.5]])
    assert summary["average_accuracy"] == 0.5 and summary["average_incremental_accuracy"] == 0.5


@pytest.mark.parametrize("matrix", [[], [[0.5], [0.4]], [[0.5], [math.nan, 0.3]]], ids=["empty", "short", "nan"])
def test_bad_matrices_are_refused(matrix):
    with pytest.raises(ValueError, match="accuracy matrix|R\\["):
        metrics.accuracy_matrix_summary(matrix)


def test_evaluate_metric_loads_from_a_local_path_and_matches():
    import evaluate

    from peft_gp.continual import EVALUATE_METRIC_PATH

    metric = evaluate.load(EVALUATE_METRIC_PATH)
    # R = [[1.0], [0.5, 1.0]] from per-example correctness: 2 examples per (trained, evaluated) cell
    cells = {(0, 0): [1, 1], (1, 0): [1, 0], (1, 1): [1, 1]}
    predictions, references, trained, evaluated = [], [], [], []
    for (t, k), correct in cells.items():
        for flag in correct:
            predictions.append(3 if flag else 4)
            references.append(3)
            trained.append(t)
            evaluated.append(k)
    result = metric.compute(
        predictions=predictions, references=references, trained_task=trained, evaluated_task=evaluated
    )
    assert result["accuracy_matrix"] == [[1.0], [0.5, 1.0]]
    assert result["average_accuracy"] == pytest.approx(0.75)
    assert result["backward_transfer"] == pytest.approx(-0.5)
    assert result["forgetting"] == pytest.approx(0.5)
