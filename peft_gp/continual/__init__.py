"""Continual-learning runs: task streams, heads, the task loop, metrics over the accuracy matrix, reports and plots.

    from peft_gp.continual import RunConfig, run_sequence

    result = run_sequence(RunConfig(epochs=2, compare_baseline=True))  # MiniLM + BBC News, offline
    result.accuracy_matrix, result.metrics, result.paths
"""

from pathlib import Path

from ..core.metrics import (
    accuracy_matrix_summary,
    average_accuracy,
    average_incremental_accuracy,
    backward_transfer,
    forgetting,
)
from ..core.plots import plot_accuracy_matrix, plot_task_accuracy
from .config import RunConfig, RunConfigError
from .encoding import encode_tasks
from .evaluation import evaluate_task
from .heads import MaskedCrossEntropy, masked_predictions, prediction_classes, training_classes
from .paradigms import PARADIGMS, make_peft_config
from .results import MethodResult, RunResult
from .runner import run_sequence
from .sources import load_source, register_dataset, register_model
from .splits import class_incremental_split
from .stream import train_stream
from .tasks import Task, dataset_sequence, num_labels

EVALUATE_METRIC_PATH = str(Path(__file__).parent / "evaluate_metric" / "continual_learning.py")
"""Local path of the ``evaluate`` metric: ``evaluate.load(EVALUATE_METRIC_PATH)``."""

__all__ = [
    "EVALUATE_METRIC_PATH",
    "PARADIGMS",
    "MaskedCrossEntropy",
    "MethodResult",
    "RunConfig",
    "RunConfigError",
    "RunResult",
    "Task",
    "accuracy_matrix_summary",
    "average_accuracy",
    "average_incremental_accuracy",
    "backward_transfer",
    "class_incremental_split",
    "dataset_sequence",
    "encode_tasks",
    "evaluate_task",
    "forgetting",
    "load_source",
    "make_peft_config",
    "masked_predictions",
    "num_labels",
    "plot_accuracy_matrix",
    "plot_task_accuracy",
    "prediction_classes",
    "register_dataset",
    "register_model",
    "run_sequence",
    "train_stream",
    "training_classes",
]
