"""Continual-learning runs: metrics over the accuracy matrix (task streams, heads and the runner come next)."""

from pathlib import Path

from .metrics import (
    accuracy_matrix_summary,
    average_accuracy,
    average_incremental_accuracy,
    backward_transfer,
    forgetting,
)

EVALUATE_METRIC_PATH = str(Path(__file__).parent / "evaluate_metric" / "continual_learning.py")
"""Local path of the ``evaluate`` metric: ``evaluate.load(EVALUATE_METRIC_PATH)``."""

__all__ = [
    "EVALUATE_METRIC_PATH",
    "accuracy_matrix_summary",
    "average_accuracy",
    "average_incremental_accuracy",
    "backward_transfer",
    "forgetting",
]
