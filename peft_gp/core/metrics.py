"""Metrics of a continual-learning run, as pure functions of the accuracy matrix. The conventions, pinned here:

* ``R[t][k]`` is the accuracy on task ``k``'s test set after training task ``t`` (rows are time, 0-based); entries
  with ``k > t`` (tasks not seen yet) are ignored and may be ``None`` or NaN.
* average accuracy: mean over ``k`` of ``R[T-1][k]``, the final model on every task.
* average incremental accuracy: mean over ``t`` of the average accuracy after task ``t`` (Rebuffi et al. 2017).
* forgetting of task ``k < T-1``: ``max over t < T-1 of R[t][k]`` minus ``R[T-1][k]`` (Chaudhry et al. 2018);
  **positive when accuracy dropped**. The reported value is the mean over ``k < T-1``.
* backward transfer (BWT): mean over ``k < T-1`` of ``R[T-1][k] - R[k][k]`` (Lopez-Paz & Ranzato 2017);
  **negative when accuracy dropped**.

With a single task, forgetting and BWT are 0 (nothing to forget).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Matrix = Sequence[Sequence[float | None]]


def _checked(matrix: Matrix) -> list[list[float]]:
    rows = [list(row) for row in matrix]
    if not rows:
        raise ValueError("The accuracy matrix is empty: it needs one row per trained task.")
    tasks = len(rows)
    for t, row in enumerate(rows):
        if len(row) < t + 1:
            raise ValueError(f"Row {t} of the accuracy matrix has {len(row)} entries; it needs at least {t + 1}.")
        for k in range(t + 1):
            value = row[k]
            if value is None or (isinstance(value, float) and math.isnan(value)):
                raise ValueError(f"R[{t}][{k}] is missing: every task seen so far must be evaluated after each task.")
    return [[float(row[k]) for k in range(t + 1)] for t, row in enumerate(rows[:tasks])]


def average_accuracy(matrix: Matrix) -> float:
    """Mean accuracy of the final model over all tasks."""
    rows = _checked(matrix)
    return sum(rows[-1]) / len(rows[-1])


def average_incremental_accuracy(matrix: Matrix) -> float:
    """Mean over time of the average accuracy on the tasks seen so far."""
    rows = _checked(matrix)
    return sum(sum(row) / len(row) for row in rows) / len(rows)


def forgetting(matrix: Matrix) -> float:
    """Mean drop from each old task's best accuracy to its final accuracy (positive = forgotten)."""
    rows = _checked(matrix)
    last = len(rows) - 1
    if last == 0:
        return 0.0
    drops = [max(rows[t][k] for t in range(k, last)) - rows[last][k] for k in range(last)]
    return sum(drops) / len(drops)


def backward_transfer(matrix: Matrix) -> float:
    """Mean change of each old task's accuracy from just after learning it to the end (negative = forgotten)."""
    rows = _checked(matrix)
    last = len(rows) - 1
    if last == 0:
        return 0.0
    return sum(rows[last][k] - rows[k][k] for k in range(last)) / last


def accuracy_matrix_summary(matrix: Matrix) -> dict[str, float]:
    """All four metrics in one dict."""
    return {
        "average_accuracy": average_accuracy(matrix),
        "average_incremental_accuracy": average_incremental_accuracy(matrix),
        "forgetting": forgetting(matrix),
        "backward_transfer": backward_transfer(matrix),
    }
