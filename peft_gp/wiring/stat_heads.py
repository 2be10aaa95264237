"""Heads from the class statistics stored with an adapter: build one, or write it into the model's head.

``statistics_head(model, kind)`` returns the labels and the ``(weight, bias)`` of an ``"ncm"``, ``"lda"`` or
``"aligned"`` head (``core.class_heads``) over every class stored so far; ``apply_statistics_head`` writes it into
the rows of those classes in the model's classification head (integer labels are the head's output rows), so that
the model's own forward, ``from_pretrained`` included, predicts with it. It keeps the head as trained beside it, and
``restore_trained_head`` puts that back before the next task trains: a statistics head is for predicting, and an LDA
head's logits are far larger than a trained head's (the next task's loss started in the hundreds). The head as
trained is saved with the class statistics, so a model loaded from a save trains on from it as well.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.class_heads import aligned_head, lda_head, ncm_head
from ..core.peft_utils import unwrap_peft_model
from .class_stats import ClassStatistics, head_module
from .state import get_state

HEAD_KINDS = ("ncm", "lda", "aligned")


def head_from_statistics(
    stats: ClassStatistics, kind: str, head: nn.Linear, shrinkage: float = 0.1, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight, bias)`` of the head ``kind`` over ``stats.labels`` (``aligned`` starts from ``head``'s rows)."""
    if kind not in HEAD_KINDS:
        raise ValueError(f"A statistics head is one of {HEAD_KINDS}, got {kind!r}.")
    if kind == "ncm":
        return ncm_head(stats.means)
    if kind == "lda":
        return lda_head(stats.means, stats.covariance(), shrinkage)
    rows = head_rows(stats.labels, head)
    start = head.weight.detach()[rows]
    bias = head.bias.detach()[rows] if head.bias is not None else torch.zeros(len(rows))
    return aligned_head(stats.means, stats.covariance(), start, bias, shrinkage=shrinkage, seed=seed)


def statistics_head(
    model: nn.Module, kind: str = "lda", adapter_name: str | None = None, shrinkage: float = 0.1, seed: int = 0
) -> tuple[list, torch.Tensor, torch.Tensor]:
    """``(labels, weight, bias)`` of the head ``kind`` built from the adapter's class statistics."""
    stats = get_state(model, adapter_name).class_stats
    if stats is None or not stats.labels:
        raise ValueError(
            "This adapter has no class statistics: build its GP config with gp_class_statistics=True, so that each "
            "finished task's memory update also takes them (or load a save that has gp_class_stats.safetensors)."
        )
    weight, bias = head_from_statistics(stats, kind, head_module(model, adapter_name), shrinkage, seed)
    return list(stats.labels), weight, bias


def head_rows(labels: list, head: nn.Linear) -> list[int]:
    """The head rows of ``labels`` (integer labels are the head's output rows)."""
    if any(isinstance(label, bool) or not isinstance(label, int) for label in labels):
        raise ValueError(f"Writing a statistics head needs integer labels (the head's rows), got {labels[:5]}.")
    if max(labels) >= head.out_features or min(labels) < 0:
        raise ValueError(f"Labels {labels} do not fit the head's {head.out_features} outputs.")
    return list(labels)


@torch.no_grad()
def apply_statistics_head(
    model: nn.Module, kind: str = "lda", adapter_name: str | None = None, shrinkage: float = 0.1, seed: int = 0
) -> list:
    """Write the statistics head into the rows of the stored classes of the model's classification head; returns
    the labels written. The head must have a bias (or ``kind="ncm"``, whose bias is zero): checked before anything
    is written."""
    peft_model = unwrap_peft_model(model)
    labels, weight, bias = statistics_head(peft_model, kind, adapter_name, shrinkage, seed)
    head = head_module(peft_model, adapter_name)
    rows = head_rows(labels, head)
    if head.bias is None and bool((bias != 0).any()):
        raise ValueError(f"The {kind} head needs a bias and the model's head has none: use kind='ncm'.")
    stats = get_state(peft_model, adapter_name).class_stats
    if stats.trained_head is None:  # a second call keeps the head as trained, not the first statistics head
        bias_now = None if head.bias is None else head.bias.detach().cpu().clone()
        stats.trained_head = (head.weight.detach().cpu().clone(), bias_now)
    head.weight[rows] = weight.to(head.weight.dtype)
    if head.bias is not None:
        head.bias[rows] = bias.to(head.bias.dtype)
    return labels


@torch.no_grad()
def restore_trained_head(model: nn.Module, adapter_name: str | None = None) -> bool:
    """Put back the head as trained where ``apply_statistics_head`` replaced it; returns whether it did. The head as
    trained is saved with the class statistics (``gp_class_stats.safetensors``), so this works after
    ``peft_gp.from_pretrained`` too."""
    peft_model = unwrap_peft_model(model)
    stats = get_state(peft_model, adapter_name).class_stats
    if stats is None or stats.trained_head is None:
        return False
    head = head_module(peft_model, adapter_name)
    weight, bias = stats.trained_head
    head.weight.copy_(weight.to(head.weight.device, head.weight.dtype))
    if bias is not None:
        head.bias.copy_(bias.to(head.bias.device, head.bias.dtype))
    stats.trained_head = None
    return True
