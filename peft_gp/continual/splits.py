"""Class-incremental splits: the classes of one labelled dataset, in a seeded order, as a sequence of tasks.

Labels are renumbered in arrival order, so the classes seen after task ``t`` are always ``0 .. n-1`` and one shared
head of ``n_classes`` outputs serves the whole stream. Unknown class names, empty classes and stray test labels
fail here, before any training.
"""

from __future__ import annotations

import difflib
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

from datasets import Dataset, DatasetDict

from .run_checks import RunConfigError
from .tasks import Task, as_splits, check_label_column, class_names_of, limit_per_class, select_classes, sorted_labels


def _resolve_class(value: Any, names: list[str], what: str) -> int:
    """Index of a class given by name or id, with a suggestion for a misspelt name."""
    if isinstance(value, bool):
        raise RunConfigError(f"{what}: {value!r} is not a class name or id.")
    if isinstance(value, int):
        if not 0 <= value < len(names):
            raise RunConfigError(f"{what}: class id {value} is out of range; the dataset has {len(names)} classes.")
        return value
    if str(value) in names:
        return names.index(str(value))
    close = difflib.get_close_matches(str(value), names, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise RunConfigError(f"{what}: unknown class {value!r}.{hint} The dataset's classes: {names}.")


def _rows_of(labels: list[int], low: int, high: int) -> list[int]:
    """Rows with ``low <= label < high``, grouped by label (stable: dataset order within a class)."""
    return sorted((i for i, label in enumerate(labels) if low <= label < high), key=lambda i: labels[i])


def _task_sizes(n_classes: int, n_tasks: int | None, classes_per_task: Sequence[int] | None) -> list[int]:
    if classes_per_task is not None:
        sizes = list(classes_per_task)
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
            raise RunConfigError(f"classes_per_task must hold positive integers, got {sizes}.")
        if sum(sizes) != n_classes:
            raise RunConfigError(
                f"classes_per_task {sizes} covers {sum(sizes)} classes, but {n_classes} are used: make them sum to "
                f"{n_classes} (or pick classes with 'classes')."
            )
        return sizes
    n_tasks = n_tasks or 1
    if n_tasks > n_classes:
        raise RunConfigError(f"n_tasks={n_tasks} is more than the {n_classes} classes: every task needs a class.")
    base, extra = divmod(n_classes, n_tasks)
    return [base + (1 if i < extra else 0) for i in range(n_tasks)]


def _numbered(splits: DatasetDict, label_column: str) -> tuple[DatasetDict, list[str]]:
    """The splits with integer labels ``0 .. n-1`` and the class names (a ``ClassLabel``'s, else the sorted values)."""
    names = class_names_of(splits["train"], label_column)
    if names is not None:
        return splits, names
    values = sorted_labels(set(splits["train"][label_column]) | set(splits["test"][label_column]))
    index_of = {v: i for i, v in enumerate(values)}
    renumbered = DatasetDict(
        {s: d.map(lambda b: {label_column: [index_of[v] for v in b[label_column]]}, batched=True)
         for s, d in splits.items()}
    )  # fmt: skip
    return renumbered, [str(v) for v in values]


def _explicit_groups(classes_per_task: Sequence[Sequence[Any]], names: list[str]) -> list[list[int]]:
    if not all(isinstance(g, (list, tuple)) for g in classes_per_task):
        raise RunConfigError("classes_per_task must be all sizes or all groups of classes, not a mix.")
    groups = [
        [_resolve_class(c, names, f"classes_per_task[{i}]") for c in group] for i, group in enumerate(classes_per_task)
    ]
    flat = [c for g in groups for c in g]
    duplicated = sorted({names[c] for c in flat if flat.count(c) > 1})
    if duplicated:
        raise RunConfigError(f"classes_per_task has overlapping groups: {duplicated} are in more than one task.")
    if any(not g for g in groups):
        raise RunConfigError("classes_per_task has an empty group: every task needs at least one class.")
    return groups


def _class_order(names: list[str], seed: int, class_order, classes) -> list[int]:
    used = list(range(len(names))) if classes is None else [_resolve_class(c, names, "classes") for c in classes]
    if class_order is None:
        order = used[:]
        random.Random(seed).shuffle(order)
        return order
    order = [_resolve_class(c, names, "class_order") for c in class_order]
    if len(set(order)) != len(order):
        raise RunConfigError(f"class_order names a class twice: {list(class_order)}.")
    if sorted(order) != sorted(used):
        missing = [names[c] for c in used if c not in order]
        extra = [names[c] for c in order if c not in used]
        raise RunConfigError(
            f"class_order must be a permutation of the classes used; missing {missing}, not used {extra}."
        )
    return order


def _check_examples(splits: DatasetDict, label_column: str, order: list[int], names: list[str]) -> None:
    counts = {split: Counter(splits[split][label_column]) for split in ("train", "test")}
    for split in ("train", "test"):
        empty = [names[c] for c in order if counts[split][c] == 0]
        if empty:
            raise RunConfigError(
                f"Classes {empty} have no examples in the {split} split: every class of a task needs training and "
                "test examples. Drop them with 'classes' or pick another split."
            )
    unknown_test = sorted(set(counts["test"]) - set(counts["train"]))
    if unknown_test:
        raise RunConfigError(f"The test split has labels {unknown_test} that the train split lacks.")


def class_incremental_split(
    dataset: Dataset | DatasetDict,
    n_tasks: int | None = None,
    seed: int = 0,
    label_column: str = "label",
    *,
    classes_per_task: Sequence[int] | Sequence[Sequence[Any]] | None = None,
    class_order: Sequence[Any] | None = None,
    classes: Sequence[Any] | None = None,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    test_size: float = 0.2,
) -> list[Task]:
    """Split the classes of a labelled dataset into a sequence of tasks (one shared label space).

    Args:
        dataset: A ``DatasetDict`` with ``train`` (and ideally ``test``) splits, or one ``Dataset`` (then split per
            class with ``test_size``, seeded).
        n_tasks: How many tasks; the classes are spread evenly (the first tasks get the remainder).
        seed: Seeds the class order (``random.Random(seed).shuffle`` of the classes) and any train/test split.
        label_column: The column of class labels (a ``ClassLabel`` gives the class names).
        classes_per_task: Sizes of the tasks in arrival order (``[2, 2, 1]``), or explicit groups of class names or
            ids (``[["sport", "tech"], ["politics"]]``, which also fixes the order); overrides ``n_tasks``.
        class_order: The arrival order of the classes instead of the seeded one.
        classes: Use only these classes.
        train_per_class, test_per_class: Keep at most this many examples per class.
    Returns:
        The tasks; labels renumbered to arrival order (the class of arrival position ``i`` has label ``i``).
    """
    splits = as_splits(dataset, label_column, seed, test_size)
    for split in ("train", "test"):
        check_label_column(splits[split], label_column, f"The {split} split")
    splits, names = _numbered(splits, label_column)
    if classes_per_task is not None and any(isinstance(g, (list, tuple)) for g in classes_per_task):
        groups = _explicit_groups(classes_per_task, names)
        order = [c for g in groups for c in g]
    else:
        order = _class_order(names, seed, class_order, classes)
        groups, start = [], 0
        for size in _task_sizes(len(order), n_tasks, classes_per_task):
            groups.append(order[start : start + size])
            start += size
    _check_examples(splits, label_column, order, names)
    mapping = {original: position for position, original in enumerate(order)}
    train = limit_per_class(select_classes(splits["train"], label_column, mapping), train_per_class, label_column)
    test = limit_per_class(select_classes(splits["test"], label_column, mapping), test_per_class, label_column)
    tasks, start = [], 0
    for task_id, group in enumerate(groups):
        low, start = start, start + len(group)
        group_names = [names[c] for c in group]
        tasks.append(Task("+".join(group_names), train.select(_rows_of(train[label_column], low, start)),
                          test.select(_rows_of(test[label_column], low, start)), list(range(low, start)),
                          group_names, task_id=task_id))  # fmt: skip
    return tasks
