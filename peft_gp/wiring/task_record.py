"""What a continual-learning run has seen so far: task names, each task's classes and the accuracy matrix.

Kept per adapter beside its memory (in its ``GPState``) and saved as ``gp_tasks.json`` next to
``gp_memory.safetensors``, so that a checkpoint pushed after task 3 tells whoever resumes it which tasks and classes
came before. ``task_id`` is 0-based everywhere in code; names shown to people (branches, model cards) are 1-based.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from ..core.files import atomic_write_bytes, newer_format_message

GP_TASKS_NAME = "gp_tasks.json"
TASKS_FORMAT_VERSION = 1

Label = int | str


class GPTaskStateError(ValueError):
    """A ``gp_tasks.json`` or task record that cannot be used."""


def default_task_name(task_id: int) -> str:
    """``task-01`` for ``task_id=0``: the name of the Hub branch of that task too."""
    return f"task-{task_id + 1:02d}"


@dataclass
class GPTaskState:
    """The finished tasks of one adapter, in training order.

    Attributes:
        task_names: one name per finished task.
        task_classes: per task, the labels its training data used (``None`` when unknown, e.g. language modelling).
        accuracy_matrix: ``R[t][k]``, accuracy on task ``k`` after training task ``t`` (see
            ``peft_gp.core.metrics``), or ``None`` when not evaluated.
    """

    task_names: list[str] = field(default_factory=list)
    task_classes: list[list[Label] | None] = field(default_factory=list)
    accuracy_matrix: list[list[float | None]] | None = None

    @property
    def tasks_seen(self) -> int:
        return len(self.task_names)

    @property
    def classes_seen(self) -> list[Label]:
        """Every label of every finished task, sorted (ints before strings)."""
        labels = {label for classes in self.task_classes if classes for label in classes}
        return sorted(labels, key=lambda label: (isinstance(label, str), label))

    def record(self, task_id: int, task_name: str | None = None, classes: list[Label] | None = None) -> None:
        """Store (or overwrite) task ``task_id``; tasks must be recorded in order, without gaps."""
        if not isinstance(task_id, int) or task_id < 0 or task_id > self.tasks_seen:
            raise GPTaskStateError(
                f"task_id={task_id!r} cannot be recorded: {self.tasks_seen} task(s) are recorded, so the next one is "
                f"task_id={self.tasks_seen} (0-based). Record tasks in training order."
            )
        name = task_name or default_task_name(task_id)
        labels = None if classes is None else _labels(classes)
        if task_id == self.tasks_seen:
            self.task_names.append(name)
            self.task_classes.append(labels)
        else:
            self.task_names[task_id] = task_name or self.task_names[task_id]
            self.task_classes[task_id] = labels if classes is not None else self.task_classes[task_id]

    def record_through(self, task_id: int, task_name: str | None = None, classes: list[Label] | None = None) -> None:
        """Record task ``task_id``, first filling in (with default names) tasks stored before the record existed."""
        for missing in range(self.tasks_seen, task_id):
            self.record(missing)
        self.record(task_id, task_name, classes)

    # ---- persistence -------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "gp_format_version": TASKS_FORMAT_VERSION,
            "task_names": list(self.task_names),
            "task_classes": [None if c is None else list(c) for c in self.task_classes],
            "classes_seen": self.classes_seen,
            "accuracy_matrix": normalize_matrix(self.accuracy_matrix),
        }

    @classmethod
    def from_dict(cls, raw: Any, source: str = "task state") -> GPTaskState:
        try:
            version = int(raw["gp_format_version"])
            names = [str(name) for name in raw["task_names"]]
            task_classes = [None if c is None else _labels(c) for c in raw["task_classes"]]
            matrix = raw.get("accuracy_matrix")
        except (KeyError, TypeError, ValueError) as error:
            raise GPTaskStateError(f"{source} is not a valid {GP_TASKS_NAME} ({error!r}).") from error
        newer = newer_format_message(source, GP_TASKS_NAME, version, TASKS_FORMAT_VERSION)
        if newer:
            raise GPTaskStateError(newer)
        if len(task_classes) != len(names):
            raise GPTaskStateError(f"{source}: {len(names)} task names but {len(task_classes)} class lists.")
        return cls(names, task_classes, normalize_matrix(matrix))

    def save(self, path: str) -> None:
        atomic_write_bytes(path, (json.dumps(self.to_dict(), indent=2) + "\n").encode())

    @classmethod
    def load(cls, path: str) -> GPTaskState:
        try:
            with open(path) as handle:
                raw = json.load(handle)
        except (OSError, json.JSONDecodeError) as error:
            raise GPTaskStateError(f"Cannot read {path}: {error}") from error
        return cls.from_dict(raw, source=path)


def _labels(classes) -> list[Label]:
    labels = []
    for label in classes:
        if hasattr(label, "item"):  # numpy / torch scalars
            label = label.item()
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise GPTaskStateError(f"Class labels must be ints or strings, got {label!r} ({type(label).__name__}).")
        labels.append(label)
    return sorted(set(labels), key=lambda label: (isinstance(label, str), label))


def normalize_matrix(matrix) -> list[list[float | None]] | None:
    """An accuracy matrix as plain lists of floats, with ``None`` for missing (or NaN) entries."""
    if matrix is None:
        return None
    rows = []
    for row in matrix:
        values = []
        for value in row:
            if value is None or (isinstance(value, float) and math.isnan(value)):
                values.append(None)
            else:
                values.append(float(value))
        rows.append(values)
    return rows
