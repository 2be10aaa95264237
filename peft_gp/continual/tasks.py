"""Task streams: a list of ``Task`` built from ``datasets`` objects, with the model's tokenizer or image processor.

* ``class_incremental_split(dataset, n_tasks, seed, label_column)``: the classes of one labelled dataset, in a seeded
  order, split into tasks. Labels are renumbered in arrival order, so the classes seen after task ``t`` are always
  ``0 .. n-1`` and one shared head of ``n_classes`` outputs serves the whole stream.
* ``dataset_sequence([...], scenario)``: one task per dataset. ``"task"``/``"class"``: each dataset's classes get
  their own label ids (offset after the earlier tasks'); ``"domain"``: all datasets share one label set.
* ``encode_tasks(tasks, processor)``: tokenizes text (or runs the image processor) on every split.

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

from .config import RunConfigError


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


def _check_label_column(dataset: Dataset, label_column: str, where: str) -> None:
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


def _as_splits(dataset: Dataset | DatasetDict, label_column: str, seed: int, test_size: float) -> DatasetDict:
    """``train``/``test`` splits; a dataset without a ``test`` split is split per class (seeded)."""
    if isinstance(dataset, DatasetDict):
        if "train" not in dataset:
            raise RunConfigError(f"The dataset has no 'train' split (splits: {list(dataset)}).")
        if "test" in dataset:
            return DatasetDict(train=dataset["train"], test=dataset["test"])
        dataset = dataset["train"]
    _check_label_column(dataset, label_column, "The dataset")
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


def _sorted_labels(values: set) -> list:
    """Numeric order for numeric labels (so that id ``i`` is label ``i``), text order otherwise."""
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return sorted(values)
    return sorted(values, key=str)


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


def _select_classes(dataset: Dataset, label_column: str, mapping: dict[int, int]) -> Dataset:
    """Rows whose label is a key of ``mapping``, relabelled to ``mapping[label]`` (a plain int column)."""
    labels = dataset[label_column]
    keep = [i for i, label in enumerate(labels) if label in mapping]
    subset = dataset.select(keep)
    new_labels = [mapping[labels[i]] for i in keep]
    return subset.remove_columns(label_column).add_column(label_column, new_labels)


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


# ---- class-incremental ------------------------------------------------------------------------------------------


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
    splits = _as_splits(dataset, label_column, seed, test_size)
    for split in ("train", "test"):
        _check_label_column(splits[split], label_column, f"The {split} split")
    names = class_names_of(splits["train"], label_column)
    train_labels = splits["train"][label_column]
    if names is None:  # plain int or string labels: the classes are the sorted distinct values
        values = _sorted_labels(set(train_labels) | set(splits["test"][label_column]))
        names = [str(v) for v in values]
        index_of = {v: i for i, v in enumerate(values)}
        splits = DatasetDict(
            {s: d.map(lambda b: {label_column: [index_of[v] for v in b[label_column]]}, batched=True)
             for s, d in splits.items()}
        )  # fmt: skip
        train_labels = splits["train"][label_column]

    groups: list[list[int]] | None = None
    if classes_per_task is not None and any(isinstance(g, (list, tuple)) for g in classes_per_task):
        if not all(isinstance(g, (list, tuple)) for g in classes_per_task):
            raise RunConfigError("classes_per_task must be all sizes or all groups of classes, not a mix.")
        groups = [
            [_resolve_class(c, names, f"classes_per_task[{i}]") for c in group]
            for i, group in enumerate(classes_per_task)
        ]
        flat = [c for g in groups for c in g]
        duplicated = sorted({names[c] for c in flat if flat.count(c) > 1})
        if duplicated:
            raise RunConfigError(f"classes_per_task has overlapping groups: {duplicated} are in more than one task.")
        if any(not g for g in groups):
            raise RunConfigError("classes_per_task has an empty group: every task needs at least one class.")
        order = flat
    else:
        used = list(range(len(names)))
        if classes is not None:
            used = [_resolve_class(c, names, "classes") for c in classes]
        if class_order is not None:
            order = [_resolve_class(c, names, "class_order") for c in class_order]
            if len(set(order)) != len(order):
                raise RunConfigError(f"class_order names a class twice: {list(class_order)}.")
            if sorted(order) != sorted(used):
                missing = [names[c] for c in used if c not in order]
                extra = [names[c] for c in order if c not in used]
                raise RunConfigError(
                    f"class_order must be a permutation of the classes used; missing {missing}, not used {extra}."
                )
        else:
            order = used[:]
            random.Random(seed).shuffle(order)
        sizes = _task_sizes(len(order), n_tasks, classes_per_task)
        groups, start = [], 0
        for size in sizes:
            groups.append(order[start : start + size])
            start += size

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

    mapping = {original: position for position, original in enumerate(order)}
    train = limit_per_class(_select_classes(splits["train"], label_column, mapping), train_per_class, label_column)
    test = limit_per_class(_select_classes(splits["test"], label_column, mapping), test_per_class, label_column)
    train_labels, test_labels = train[label_column], test[label_column]
    tasks, start = [], 0
    for task_id, group in enumerate(groups):
        ids = list(range(start, start + len(group)))
        start += len(group)
        group_names = [names[c] for c in group]
        tasks.append(
            Task(
                name="+".join(group_names),
                train=train.select(_rows_of(train_labels, ids[0], start)),
                test=test.select(_rows_of(test_labels, ids[0], start)),
                classes=ids,
                class_names=group_names,
                task_id=task_id,
            )
        )
    return tasks


# ---- sequences of datasets --------------------------------------------------------------------------------------


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
        splits = _as_splits(dataset, label_column, seed, test_size)
        for split in ("train", "test"):
            _check_label_column(splits[split], label_column, f"Dataset {name!r} ({split} split)")
            if len(splits[split]) == 0:
                raise RunConfigError(f"Dataset {name!r} has no examples in its {split} split.")
        class_names = class_names_of(splits["train"], label_column)
        values = _sorted_labels(set(splits["train"][label_column]))
        if class_names is None:
            class_names = [str(v) for v in values]
            index_of = {v: i for i, v in enumerate(values)}
        else:
            index_of = {i: i for i in range(len(class_names))}
        test_values = set(splits["test"][label_column])
        stray = sorted(test_values - set(index_of), key=str)
        if stray:
            raise RunConfigError(f"Dataset {name!r}: test labels {stray} do not occur in its train split.")
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
        train = limit_per_class(_select_classes(splits["train"], label_column, mapping), train_per_class, label_column)
        test = limit_per_class(_select_classes(splits["test"], label_column, mapping), test_per_class, label_column)
        ids = sorted(set(mapping.values()))
        tasks.append(Task(name, train, test, ids, class_names, task_id=task_id))
        offset += len(class_names)
    return tasks


# ---- preprocessing --------------------------------------------------------------------------------------------


def encode_tasks(
    tasks: Sequence[Task],
    processor: Any,
    *,
    label_column: str = "label",
    text_column: str = "text",
    image_column: str = "image",
    max_length: int = 64,
) -> list[Task]:
    """Apply a tokenizer (text) or image processor (images) to every split; keeps only inputs and ``labels``.

    Datasets that already hold ``input_ids`` or ``pixel_values`` are left as they are (columns besides the inputs
    and the label are dropped). ``processor=None`` with an image column turns the images into ``pixel_values``
    scaled to [0, 1] (channels first, one channel for grey images).
    """
    encoded = []
    for task in tasks:
        splits = {}
        for split_name, data in (("train", task.train), ("test", task.test)):
            if len(data) == 0:
                raise RunConfigError(
                    f"Task {task.task_id} ({task.name}) has no {split_name} examples: give every task examples."
                )
            splits[split_name] = _encode(data, processor, label_column, text_column, image_column, max_length)
        encoded.append(Task(task.name, splits["train"], splits["test"], task.classes, task.class_names,
                            task.task_id, dict(task.info)))  # fmt: skip
    return encoded


def _encode(data: Dataset, processor, label_column, text_column, image_column, max_length) -> Dataset:
    columns = data.column_names
    if label_column != "labels":
        data = data.rename_column(label_column, "labels")
        columns = data.column_names
    if "input_ids" in columns or "pixel_values" in columns:
        keep = {"input_ids", "attention_mask", "token_type_ids", "pixel_values", "labels"}
        return data.remove_columns([c for c in columns if c not in keep])
    drop = [c for c in columns if c != "labels"]
    if text_column in columns:
        if processor is None or not callable(processor):
            raise RunConfigError("Text data needs a tokenizer: the model has none (set 'model' to one that has).")

        def tokenize(batch):
            return processor(batch[text_column], truncation=True, max_length=max_length, padding="max_length")

        return data.map(tokenize, batched=True, remove_columns=drop)
    if image_column in columns:

        def process(batch):
            import numpy as np

            images = [np.asarray(image, dtype=np.float32) for image in batch[image_column]]
            if processor is not None:
                return {"pixel_values": processor(images=[i.astype("uint8") for i in images])["pixel_values"]}
            arrays = [i[None] if i.ndim == 2 else np.moveaxis(i, -1, 0) for i in images]
            return {"pixel_values": [a / 255.0 for a in arrays]}

        return data.map(process, batched=True, remove_columns=drop)
    raise RunConfigError(
        f"Cannot find the inputs: no text column {text_column!r}, image column {image_column!r}, input_ids or "
        f"pixel_values among {columns}. Set text_column or image_column."
    )
