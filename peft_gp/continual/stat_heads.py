"""Statistics heads in a run: class statistics after each task, heads built from them, and their accuracies read
from the same forward passes as the trained head's.

The GP run takes its statistics in the memory update (``gp_class_statistics=True``: features that GP keeps fixed);
the plain run and the frozen encoder take them here, over the same memory sample of each task, when the task ends
(the plain run's go stale as its features drift: that is the comparison). Evaluation computes the pooled head input
once per batch and scores it with every head; a statistics head's logits cover the classes it has statistics for.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..core.peft_utils import unwrap_peft_model
from ..wiring.class_stats import ClassStatistics, StatisticsObserver, head_module
from ..wiring.groups import PooledHeadFeatures
from ..wiring.memory_data import longest_first, memory_sample
from ..wiring.stat_heads import head_from_statistics
from .evaluation import INPUT_KEYS, collate_batch
from .heads import masked_predictions

TRAINED = "trained"
Head = tuple[list[int], torch.Tensor, torch.Tensor]  # (labels, weight, bias)


@torch.no_grad()
def take_statistics(model: nn.Module, dataset, samples: int, seed: int, batch_size: int) -> ClassStatistics:
    """The class statistics of the head's input over the memory sample of ``dataset`` (``samples`` examples drawn
    with ``seed``, as GP's memory update draws them)."""
    stats = ClassStatistics(dim=head_module(model).in_features)
    handle = StatisticsObserver(model, stats).attach()
    model.eval()
    device = next(model.parameters()).device
    loader = DataLoader(memory_sample(dataset, samples, seed), batch_size=batch_size, collate_fn=collate_batch)
    try:
        for batch in loader:
            model(**{k: v.to(device) for k, v in batch.items() if k in (*INPUT_KEYS, "labels")})
    finally:
        handle.remove()
    return stats


def build_heads(stats: ClassStatistics | None, kinds: Sequence[str], head: nn.Linear, seed: int) -> dict[str, Head]:
    """``kind -> (labels, weight, bias)`` for each statistics head in ``kinds`` (``trained`` is the model's own)."""
    heads = {}
    for kind in kinds:
        if kind != TRAINED and stats is not None and stats.labels:
            weight, bias = head_from_statistics(stats, kind, head, seed=seed)
            heads[kind] = (list(stats.labels), weight.float(), bias.float())
    return heads


@torch.no_grad()
def evaluate_heads(
    model: nn.Module, dataset, views: Sequence[Sequence[int]], heads: dict[str, Head], batch_size: int,
    trained: bool = True,
) -> dict[str, list[float]]:  # fmt: skip
    """Accuracy per head and per view (a restriction of the prediction to some label ids), one forward pass per
    batch: ``trained`` reads the model's logits, each statistics head scores the pooled head input."""
    model.eval()
    device = next(model.parameters()).device
    features: list[torch.Tensor] = []
    handle = _pooled_features(model, features) if heads else None
    names = ([TRAINED] if trained else []) + list(heads)
    correct = {name: [0] * len(views) for name in names}
    total = 0
    try:
        for batch in DataLoader(longest_first(dataset), batch_size=batch_size, collate_fn=collate_batch):
            features.clear()
            logits = {TRAINED: model(**{k: v.to(device) for k, v in batch.items() if k in INPUT_KEYS}).logits}
            for name, (labels, weight, bias) in heads.items():
                scores = features[-1].float() @ weight.to(device).T + bias.to(device)
                full = scores.new_full((scores.shape[0], logits[TRAINED].shape[-1]), float("-inf"))
                full[:, torch.as_tensor(labels, device=device)] = scores
                logits[name] = full
            for name in names:
                for i, allowed in enumerate(views):
                    predicted = masked_predictions(logits[name], allowed).cpu()
                    correct[name][i] += (predicted == batch["labels"]).sum().item()
            total += batch["labels"].shape[0]
    finally:
        if handle is not None:
            handle.remove()
    return {name: [c / total for c in counts] for name, counts in correct.items()}


def _pooled_features(model: nn.Module, features: list):
    """Hook the head's pooled input into ``features`` (one tensor per forward); returns the handle."""
    peft_model = unwrap_peft_model(model)
    pooled = PooledHeadFeatures(peft_model.get_base_model(), head_module(peft_model))
    return pooled.attach(lambda rows, masked=True: features.append(rows))
