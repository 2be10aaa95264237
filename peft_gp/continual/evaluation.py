"""Evaluate a model on a task's test set, with the prediction restricted to a set of classes (one forward pass)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import default_data_collator

from ..wiring.memory_data import longest_first
from .heads import masked_predictions

INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values")


@torch.no_grad()
def evaluate_task(model: nn.Module, dataset, allowed: Sequence[int], batch_size: int = 64) -> float:
    """Accuracy on ``dataset`` with the prediction restricted to the ``allowed`` label ids."""
    return evaluate_views(model, dataset, [allowed], batch_size)[0]


def collate_batch(features: Sequence[dict]) -> dict[str, torch.Tensor]:
    """``default_data_collator`` over the model inputs and ``labels``, with the trailing padding columns that no
    example of the batch uses cut off: a batch of short texts costs its longest text, not ``max_length``. (Only
    right padding is cut, so positions never move.)"""
    keep = (*INPUT_KEYS, "labels")
    batch = default_data_collator([{k: v for k, v in f.items() if k in keep} for f in features])
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] > 0:
        used = mask.bool().any(0).nonzero()
        width = int(used.max()) + 1 if used.numel() else mask.shape[1]
        if width < mask.shape[1]:
            for key in ("input_ids", "attention_mask", "token_type_ids"):
                if key in batch and tuple(batch[key].shape) == tuple(mask.shape):
                    batch[key] = batch[key][:, :width]
    return batch


@torch.no_grad()
def evaluate_views(model: nn.Module, dataset, views: Sequence[Sequence[int]], batch_size: int = 64) -> list[float]:
    """Accuracies on ``dataset`` for several restrictions of the prediction (one forward pass): e.g. the classes seen
    so far (class-incremental) and the task's own classes (task-incremental)."""
    model.eval()
    device = next(model.parameters()).device
    correct = [0] * len(views)
    total = 0
    dataset = longest_first(dataset)  # batches of similar length, cut by collate_batch (same accuracies)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_batch)
    for batch in loader:
        inputs = {k: v.to(device) for k, v in batch.items() if k in INPUT_KEYS}
        logits = model(**inputs).logits
        for i, allowed in enumerate(views):
            correct[i] += (masked_predictions(logits, allowed).cpu() == batch["labels"]).sum().item()
        total += batch["labels"].shape[0]
    return [c / total for c in correct]
