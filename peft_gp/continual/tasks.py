"""Task streams: a list of ``Task`` built from ``datasets`` objects, with the model's tokenizer or image processor.

* ``splits.class_incremental_split(dataset, n_tasks, seed, label_column)``: the classes of one labelled dataset, in
  a seeded order, split into tasks.
* ``dataset_sequence([...], scenario)``: one task per dataset. ``"task"``/``"class"``: each dataset's classes get
  their own label ids (offset after the earlier tasks'); ``"domain"``: all datasets share one label set.
* ``encoding.encode_tasks(tasks, processor)``: tokenizes text (or runs the image processor) on every split.

All checks (unknown class names, empty tasks, overlapping or missing labels) run here, before any training.
"""

from __future__ import annotations

import difflib
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from datasets import ClassLabel, Dataset, DatasetDict

from .run_checks import RunConfigError


@dataclass
class Task:
    """One task of a stream: its training and test sets and the global label ids of its classes.

    ``train`` and ``test`` hold the label column (renumbered to global ids) and the input columns; ``classes`` are
    the global ids this task introduces (class- and task-incremental) or uses (domain-incremental).
    """

    name: str
    train: Dataset
    test: Dataset
    classes: list[int]
    class_names: list[str]
    task_id: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "name": self.name,
            "classes": self.classes,
            "class_names": self.class_names,
            "train_examples": len(self.train),
            "test_examples": len(self.test),
            **self.info,
        }


def num_labels(tasks: Sequence[Task]) -> int:
    """Outputs the shared head needs: one per global label id."""
    return 1 + max(c for task in tasks for c in task.classes)


# ---- helpers ------------------------------------------------------------------------------------------------------


def check_label_column(dataset: Dataset, label_column: str, where: str) -> None:
    if label_column not in dataset.column_names:
        close = difflib.get_close_matches(label_column, dataset.column_names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RunConfigError(
            f"{where} has no label column {label_column!r} (columns: {dataset.column_names}).{hint} "
            "Set label_column to the column holding the class labels."
        )


def class_names_of(dataset: Dataset, label_column: str) -> list[str] | None:
    feature = dataset.features.get(label_column)
    return list(feature.names) if isinstance(feature, ClassLabel) else None


def as_splits(dataset: Dataset | DatasetDict, label_column: str, seed: int, test_size: float) -> DatasetDict:
    """``train``/``test`` splits; a dataset without a ``test`` split is split per class (seeded)."""
    if isinstance(dataset, DatasetDict):
        if "train" not in dataset:
            raise RunConfigError(f"The dataset has no 'train' split (splits: {list(dataset)}).")
        if "test" in dataset:
            return DatasetDict(train=dataset["train"], test=dataset["test"])
        dataset = dataset["train"]
    check_label_column(dataset, label_column, "The dataset")
    labels = dataset[label_column]
    rng = random.Random(seed)
    by_class: dict[Any, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    train, test = [], []
    for label in sorted(by_class, key=str):
        indices = by_class[label]
        rng.shuffle(indices)
        cut = int(round((1 - test_size) * len(indices)))
        train += indices[:cut]
        test += indices[cut:]
    return DatasetDict(train=dataset.select(sorted(train)), test=dataset.select(sorted(test)))


def sorted_labels(values: set) -> list:
    """Numeric order for numeric labels (so that id ``i`` is label ``i``), text order otherwise."""
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return sorted(values)
    return sorted(values, key=str)


def limit_per_class(dataset: Dataset, limit: int | None, label_column: str) -> Dataset:
    """The first ``limit`` examples of each class, in dataset order (built-in sources are already shuffled)."""
    if limit is None:
        return dataset
    seen: Counter = Counter()
    keep = []
    for index, label in enumerate(dataset[label_column]):
        if seen[label] < limit:
            seen[label] += 1
            keep.append(index)
    return dataset.select(keep)


def select_classes(dataset: Dataset, label_column: str, mapping: dict[int, int]) -> Dataset:
    """Rows whose label is a key of ``mapping``, relabelled to ``mapping[label]`` (a plain int column)."""
    labels = dataset[label_column]
    keep = [i for i, label in enumerate(labels) if label in mapping]
    subset = dataset.select(keep)
    new_labels = [mapping[labels[i]] for i in keep]
    return subset.remove_columns(label_column).add_column(label_column, new_labels)


# ---- sequences of datasets --------------------------------------------------------------------------------------


def _label_ids(splits: DatasetDict, label_column: str, name: str) -> tuple[list[str], dict]:
    """A dataset's class names and its label -> local id map (test labels checked against the train split's)."""
    class_names = class_names_of(splits["train"], label_column)
    values = sorted_labels(set(splits["train"][label_column]))
    if class_names is None:
        class_names = [str(v) for v in values]
        index_of = {v: i for i, v in enumerate(values)}
    else:
        index_of = {i: i for i in range(len(class_names))}
    stray = sorted(set(splits["test"][label_column]) - set(index_of), key=str)
    if stray:
        raise RunConfigError(f"Dataset {name!r}: test labels {stray} do not occur in its train split.")
    return class_names, index_of


def dataset_sequence(
    datasets: Sequence[Dataset | DatasetDict],
    names: Sequence[str] | None = None,
    scenario: str = "task",
    label_column: str = "label",
    *,
    seed: int = 0,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    test_size: float = 0.2,
) -> list[Task]:
    """One task per dataset, in the given order.

    ``scenario="task"`` or ``"class"``: each dataset's classes get new global ids after the earlier tasks' (the head
    grows a block per task; with ``"task"`` the task id picks the block at test time). ``"domain"``: every dataset
    must have the same classes, which keep their ids (one head, no task id needed).
    """
    if scenario not in ("task", "class", "domain"):
        raise RunConfigError(f"scenario must be 'task', 'class' or 'domain', got {scenario!r}.")
    if not datasets:
        raise RunConfigError("dataset_sequence needs at least one dataset.")
    names = list(names) if names is not None else [f"task{i}" for i in range(len(datasets))]
    if len(names) != len(datasets):
        raise RunConfigError(f"{len(names)} names for {len(datasets)} datasets.")
    tasks: list[Task] = []
    offset = 0
    reference: list[str] | None = None
    for task_id, (dataset, name) in enumerate(zip(datasets, names)):
        splits = as_splits(dataset, label_column, seed, test_size)
        for split in ("train", "test"):
            check_label_column(splits[split], label_column, f"Dataset {name!r} ({split} split)")
            if len(splits[split]) == 0:
                raise RunConfigError(f"Dataset {name!r} has no examples in its {split} split.")
        class_names, index_of = _label_ids(splits, label_column, name)
        if scenario == "domain":
            if reference is None:
                reference = class_names
            elif class_names != reference:
                raise RunConfigError(
                    f"Domain-incremental tasks must share one label set: dataset {name!r} has {class_names}, the "
                    f"first has {reference}. Map the labels to a common set first, or use scenario 'task'."
                )
            shift = 0
        else:
            shift = offset
        mapping = {value: index_of[value] + shift for value in index_of}
        train = limit_per_class(select_classes(splits["train"], label_column, mapping), train_per_class, label_column)
        test = limit_per_class(select_classes(splits["test"], label_column, mapping), test_per_class, label_column)
        ids = sorted(set(mapping.values()))
        tasks.append(Task(name, train, test, ids, class_names, task_id=task_id))
        offset += len(class_names)
    return tasks
