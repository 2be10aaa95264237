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

from ..core.files import atomic_write_bytes, newer_format_message, read_json

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
    adapter_sha256: str | None = None  # of the adapter weights saved beside it (checked on load)

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
            **({"adapter_sha256": self.adapter_sha256} if self.adapter_sha256 else {}),
        }

    @classmethod
    def from_dict(cls, raw: Any, source: str = "task state") -> GPTaskState:
        """A task record from its JSON form, every field's type checked (a file that fails names itself)."""
        fix = "Restore it from the same save as its adapter and memory."
        if not isinstance(raw, dict) or not {"gp_format_version", "task_names", "task_classes"} <= set(raw):
            raise GPTaskStateError(
                f"{source} is not a valid {GP_TASKS_NAME}: it lacks gp_format_version, task_names or task_classes. "
                + fix
            )
        version = raw["gp_format_version"]
        if isinstance(version, bool) or not isinstance(version, int):
            raise GPTaskStateError(f"{source}: gp_format_version must be a whole number, got {version!r}. {fix}")
        newer = newer_format_message(source, GP_TASKS_NAME, version, TASKS_FORMAT_VERSION)
        if newer:
            raise GPTaskStateError(newer)
        names, task_classes = raw["task_names"], raw["task_classes"]
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise GPTaskStateError(f"{source}: task_names must be a list of strings, got {names!r}. {fix}")
        if not isinstance(task_classes, list) or not all(c is None or isinstance(c, list) for c in task_classes):
            raise GPTaskStateError(f"{source}: task_classes must hold a list (or null) per task. {fix}")
        if len(task_classes) != len(names):
            raise GPTaskStateError(f"{source}: {len(names)} task names but {len(task_classes)} class lists. {fix}")
        adapter_sha256 = raw.get("adapter_sha256")
        if adapter_sha256 is not None and not (isinstance(adapter_sha256, str) and len(adapter_sha256) == 64):
            raise GPTaskStateError(f"{source}: adapter_sha256 must be a SHA-256 hex digest. {fix}")
        try:
            classes = [None if c is None else _labels(c) for c in task_classes]
            matrix = normalize_matrix(raw.get("accuracy_matrix"))
        except GPTaskStateError as error:
            raise GPTaskStateError(f"{source}: {error} {fix}") from None
        return cls(list(names), classes, matrix, adapter_sha256)

    def save(self, path: str) -> None:
        atomic_write_bytes(path, (json.dumps(self.to_dict(), indent=2) + "\n").encode())

    @classmethod
    def load(cls, path: str) -> GPTaskState:
        try:
            raw = read_json(path, f"Restore {GP_TASKS_NAME} from the same save as its adapter and memory.")
        except ValueError as error:
            raise GPTaskStateError(str(error)) from None
        return cls.from_dict(raw, source=path)


def _labels(classes) -> list[Label]:
    if isinstance(classes, (str, bytes, dict)) or not hasattr(classes, "__iter__"):
        raise GPTaskStateError(f"A task's classes are a list of labels, got {classes!r} ({type(classes).__name__}).")
    labels = []
    for label in classes:
        if hasattr(label, "item"):  # numpy / torch scalars
            label = label.item()
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise GPTaskStateError(f"Class labels must be ints or strings, got {label!r} ({type(label).__name__}).")
        labels.append(label)
    return sorted(set(labels), key=lambda label: (isinstance(label, str), label))


def normalize_matrix(matrix) -> list[list[float | None]] | None:
    """An accuracy matrix as plain lists of floats in [0, 1], ``None`` for missing (or NaN) entries; anything else
    (a value outside [0, 1], an infinity, a string) is a ``GPTaskStateError`` naming it."""
    if matrix is None:
        return None
    if not isinstance(matrix, (list, tuple)) or not all(isinstance(row, (list, tuple)) for row in matrix):
        raise GPTaskStateError(f"An accuracy matrix is a list of rows (lists), got {matrix!r}.")
    rows = []
    for t, row in enumerate(matrix):
        values = []
        for k, value in enumerate(row):
            if hasattr(value, "item"):  # numpy / torch scalars
                value = value.item()
            if value is None or (isinstance(value, float) and math.isnan(value)):
                values.append(None)
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise GPTaskStateError(f"Accuracy R[{t}][{k}] = {value!r} is not a fraction in [0, 1] (or null).")
            else:
                values.append(float(value))
        rows.append(values)
    return rows
