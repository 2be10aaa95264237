"""Continual-learning runs: metrics over the accuracy matrix (task streams, heads and the runner come next)."""

from .metrics import (
    accuracy_matrix_summary,
    average_accuracy,
    average_incremental_accuracy,
    backward_transfer,
    forgetting,
)

__all__ = [
    "accuracy_matrix_summary",
    "average_accuracy",
    "average_incremental_accuracy",
    "backward_transfer",
    "forgetting",
]
