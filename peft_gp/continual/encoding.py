"""Encode a task stream for a model: a tokenizer (text) or image processor (images) on every split."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from datasets import Dataset

from .run_checks import RunConfigError
from .tasks import Task


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
