"""What a run returns: each method's accuracy matrix, metrics and per-task records, and the run as a whole."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..core.metrics import accuracy_matrix_summary
from .config import RunConfig

HEAD_LABELS = {"ncm": "NCM", "lda": "LDA", "aligned": "aligned head"}


@dataclass
class MethodResult:
    """One method's run over the stream: the accuracy matrix (fractions), its metrics, per-task records.

    ``task_il_matrix`` is the same evaluation with the task id given (the argmax over each task's own classes), from
    the same forward passes; in the task-incremental scenario it equals ``accuracy_matrix``. ``head_matrices`` holds
    the same two views for each further head of ``RunConfig.heads`` (statistics heads), also from those passes.

    Each task record holds ``train_seconds`` (``train()``, including GP's memory update), ``memory_update_seconds``,
    the training loss, the accuracy row and GP statistics. ``model`` is the trained PEFT model (not serialised).
    """

    method: str
    label: str
    accuracy_matrix: list[list[float | None]]
    metrics: dict[str, float]
    tasks: list[dict[str, Any]]
    seconds: float
    model: nn.Module | None = field(default=None, repr=False, compare=False)
    task_il_matrix: list[list[float | None]] | None = None
    head_matrices: dict[str, dict[str, list]] | None = None  # statistics heads: head -> {"class": R, "task": R}
    head: str = "trained"  # the head of accuracy_matrix (RunConfig.heads[0])

    def head_label(self, head: str | None = None) -> str:
        """The label of the method read with ``head`` (default: its main head)."""
        head = head or self.head
        return self.label if head == "trained" else f"{self.label} + {HEAD_LABELS.get(head, head)}"

    def head_metrics(self) -> dict[str, dict[str, dict[str, float]]]:
        """The metrics of each statistics head's matrices (``head -> view -> metrics``)."""
        return {head: {view: accuracy_matrix_summary(matrix) for view, matrix in views.items()}
                for head, views in (self.head_matrices or {}).items()}  # fmt: skip

    @property
    def task_il_metrics(self) -> dict[str, float] | None:
        """The metrics of ``task_il_matrix`` (``None`` when it was not recorded)."""
        return accuracy_matrix_summary(self.task_il_matrix) if self.task_il_matrix else None

    def to_dict(self) -> dict[str, Any]:
        record = {
            "method": self.method,
            "label": self.label,
            "head": self.head,
            "accuracy_matrix": self.accuracy_matrix,
            "metrics": self.metrics,
            "tasks": self.tasks,
            "seconds": self.seconds,
        }
        if self.task_il_matrix is not None:
            record["task_il_matrix"] = self.task_il_matrix
            record["task_il_metrics"] = self.task_il_metrics
        if self.head_matrices:
            record["head_matrices"] = self.head_matrices
            record["head_metrics"] = self.head_metrics()
        return record


@dataclass
class RunResult:
    """What ``run_sequence`` returns: the config, the stream, each method's results and the files written."""

    config: RunConfig
    stream: list[dict[str, Any]]
    results: dict[str, MethodResult]
    paths: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def main(self) -> MethodResult:
        return next(iter(self.results.values()))

    @property
    def accuracy_matrix(self) -> list[list[float | None]]:
        return self.main.accuracy_matrix

    @property
    def metrics(self) -> dict[str, float]:
        return self.main.metrics

    @property
    def baseline(self) -> MethodResult | None:
        return self.results.get("baseline")

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "stream": self.stream,
            "results": {name: result.to_dict() for name, result in self.results.items()},
            "paths": self.paths,
            **self.info,
        }
