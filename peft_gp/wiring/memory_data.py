"""Which examples of a finished task feed its memory, in which order, and what a task's classes are.

Pure dataset helpers (no model, no Trainer): a seeded sample of ``gp_memory_samples`` examples, sorted longest first
so that a collator padding to the batch's longest example pads little (padding never enters the memory, so the order
changes only the cost), and split over processes without padding or duplicates.
"""

from __future__ import annotations

import datasets
import torch
from torch.utils.data import Dataset, Subset

CLASS_COLUMNS = ("labels", "label")


def task_classes(dataset) -> list | None:
    """The class ids of a classification task's ``datasets.Dataset`` (a scalar ``labels``/``label`` column).

    ``None`` where labels are not class ids: token labels of language modelling or seq2seq (list columns), multi-label
    rows, floats (regression), or a dataset that is not a ``datasets.Dataset``.
    """
    if not isinstance(dataset, datasets.Dataset):
        return None
    column = next((name for name in CLASS_COLUMNS if name in dataset.column_names), None)
    if column is None:
        return None
    feature = dataset.features[column]
    if not isinstance(feature, (datasets.ClassLabel, datasets.Value)):
        return None  # a list/sequence column: token labels, not classes
    if isinstance(feature, datasets.Value) and not (feature.dtype.startswith("int") or feature.dtype == "string"):
        return None
    return dataset.unique(column)


def example_lengths(dataset) -> list[int] | None:
    """Token counts of a ``datasets.Dataset``'s examples (``attention_mask`` sums, else ``input_ids`` lengths)."""
    if not isinstance(dataset, datasets.Dataset):
        return None
    columns = dataset.column_names
    if "attention_mask" in columns:
        return [int(sum(mask)) for mask in dataset["attention_mask"]]
    if "input_ids" in columns:
        return [len(ids) for ids in dataset["input_ids"]]
    return None


def longest_first(dataset):
    """``dataset`` sorted by ``example_lengths``, longest first (unchanged where lengths are unknown)."""
    lengths = example_lengths(dataset)
    if lengths is None:
        return dataset
    return dataset.select(sorted(range(len(lengths)), key=lambda i: -lengths[i]))


def _subset(dataset, indices: list[int]):
    return dataset.select(indices) if hasattr(dataset, "select") else Subset(dataset, indices)


def memory_sample(dataset: Dataset, samples: int, seed: int, rank: int = 0, world_size: int = 1):
    """The examples of ``dataset`` that feed the memory on process ``rank``.

    ``samples`` examples drawn with ``seed`` (all of them if the dataset is smaller), longest first; each process then
    takes every ``world_size``-th one, so the Gram matrices summed over processes equal one process's over the sample.
    """
    size = len(dataset)
    if samples < size:
        generator = torch.Generator().manual_seed(seed)
        dataset = _subset(dataset, sorted(torch.randperm(size, generator=generator)[:samples].tolist()))
    dataset = longest_first(dataset)
    if world_size > 1:
        dataset = _subset(dataset, list(range(rank, len(dataset), world_size)))
    return dataset
