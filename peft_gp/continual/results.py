"""What a run returns: each method's accuracy matrix, metrics and per-task records, and the run as a whole."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..core.metrics import accuracy_matrix_summary
from .config import RunConfig


@dataclass
class MethodResult:
    """One method's run over the stream: the accuracy matrix (fractions), its metrics, per-task records.

    ``task_il_matrix`` is the same evaluation with the task id given (the argmax over each task's own classes), from
    the same forward passes; in the task-incremental scenario it equals ``accuracy_matrix``.

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

    @property
    def task_il_metrics(self) -> dict[str, float] | None:
        """The metrics of ``task_il_matrix`` (``None`` when it was not recorded)."""
        return accuracy_matrix_summary(self.task_il_matrix) if self.task_il_matrix else None

    def to_dict(self) -> dict[str, Any]:
        record = {
            "method": self.method,
            "label": self.label,
            "accuracy_matrix": self.accuracy_matrix,
            "metrics": self.metrics,
            "tasks": self.tasks,
            "seconds": self.seconds,
        }
        if self.task_il_matrix is not None:
            record["task_il_matrix"] = self.task_il_matrix
            record["task_il_metrics"] = self.task_il_metrics
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
