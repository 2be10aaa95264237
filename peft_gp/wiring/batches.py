"""The memory update's batches: cutting them at ``max_samples``, moving them to the model, their padding masks."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch


def decoder_mask(batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """Which decoder input positions of an encoder-decoder batch hold tokens (not padding).

    ``decoder_attention_mask`` when given; else, as the decoder inputs are ``labels`` shifted right (T5, BART, and
    ``DataCollatorForSeq2Seq``'s ``decoder_input_ids``), the start token and every position whose previous label is
    not ``-100``.
    """
    mask = batch.get("decoder_attention_mask")
    if isinstance(mask, torch.Tensor):
        return mask.bool()
    labels, decoder_inputs = batch.get("labels"), batch.get("decoder_input_ids")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        return None
    if isinstance(decoder_inputs, torch.Tensor) and decoder_inputs.shape != labels.shape:
        return None  # decoder inputs that are not the labels shifted right: no mask known
    shifted = torch.ones_like(labels, dtype=torch.bool)
    shifted[:, 1:] = labels[:, :-1] != -100
    return shifted


def same_tensor(inputs: torch.Tensor, other) -> bool:
    """``inputs`` is ``other`` or a same-shaped alias of it (an identity dropout or dtype cast passes it through)."""
    if not isinstance(other, torch.Tensor):
        return False
    return inputs is other or (inputs.shape == other.shape and inputs.data_ptr() == other.data_ptr())


def _batch_size(batch: Mapping) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("A memory batch holds no tensor: batches must be dicts of tensors (as a DataLoader yields).")


def _head(value, size: int):
    return value[:size] if isinstance(value, torch.Tensor) and value.dim() > 0 else value


def cut_batch(batch: dict, seen: int, max_samples: int | None) -> tuple[dict, int]:
    """``batch`` cut to the examples left under ``max_samples`` after ``seen``, and its number of examples."""
    size = _batch_size(batch)
    if max_samples is not None and seen + size > max_samples:
        size = max_samples - seen
        batch = {k: _head(v, size) for k, v in batch.items()}
    return batch, size


_NOT_BATCHES = (
    "The memory update takes an iterable of batches, each a dict of tensors (what a DataLoader yields), got a {}. "
    "Pass a DataLoader over the task's data, or [batch] for a single batch."
)


def capped_batches(batches: Iterable[Mapping], max_samples: int | None) -> Iterator[tuple[dict, int]]:
    """``(batch, examples in it)`` for each batch, the last one cut so that at most ``max_samples`` examples come."""
    seen = 0
    if isinstance(batches, (Mapping, torch.Tensor)):
        raise ValueError(_NOT_BATCHES.format(type(batches).__name__))
    for batch in batches:
        if max_samples is not None and seen >= max_samples:
            return
        if not isinstance(batch, Mapping):
            raise ValueError(_NOT_BATCHES.format(f"sequence of {type(batch).__name__}"))
        batch, size = cut_batch(dict(batch), seen, max_samples)
        yield batch, size
        seen += size


def to_device(batch, device):
    if isinstance(batch, Mapping):
        return {key: to_device(value, device) for key, value in batch.items()}
    return batch.to(device) if isinstance(batch, torch.Tensor) else batch
