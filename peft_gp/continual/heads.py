"""Heads for a task stream: one shared classifier whose logits are masked per task, in training and at test time.

The model keeps one classification head with an output per global label id (``num_labels(tasks)``). The scenario
decides which outputs count:

* class-incremental: training masks the classes not seen yet (``"seen"``) or all but the current task's
  (``"current"``, as in the paper's class-incremental runs); the prediction is the argmax over all classes seen so
  far, with no task id.
* task-incremental: training sees the current task's classes; the prediction uses the task id, i.e. the argmax over
  that task's classes only.
* domain-incremental: every task has the same classes; nothing is masked.

Masked logits are set to ``-inf`` before the cross-entropy, so those classes get no gradient from the task's data.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import RunConfig
from .run_checks import HEAD_MASKING, RunConfigError
from .tasks import Task


def training_classes(tasks: Sequence[Task], task_id: int, masking: str) -> list[int] | None:
    """The label ids whose logits the loss sees while training ``tasks[task_id]`` (``None``: all of them)."""
    if masking not in HEAD_MASKING:
        raise ValueError(f"masking must be one of {HEAD_MASKING}, got {masking!r}.")
    if masking == "none":
        return None
    if masking == "current":
        return list(tasks[task_id].classes)
    return sorted({c for task in tasks[: task_id + 1] for c in task.classes})


def prediction_classes(tasks: Sequence[Task], trained_task: int, evaluated_task: int, scenario: str) -> list[int]:
    """The label ids the prediction may pick when evaluating ``evaluated_task`` after training ``trained_task``."""
    if scenario == "task":
        return list(tasks[evaluated_task].classes)
    if scenario == "domain":
        return sorted({c for task in tasks for c in task.classes})
    return sorted({c for task in tasks[: trained_task + 1] for c in task.classes})


class MaskedCrossEntropy:
    """Cross-entropy over the allowed classes only, for ``Trainer(compute_loss_func=...)``.

    Set ``allowed`` (a list of label ids, or ``None`` for all) before each task; logits of the other classes are
    ``-inf``. With ``num_items_in_batch`` (gradient accumulation) the loss is summed and divided by it, as
    ``Trainer`` expects.
    """

    def __init__(self, allowed: Sequence[int] | None = None) -> None:
        self.allowed = None if allowed is None else list(allowed)

    def __call__(self, outputs, labels: torch.Tensor, num_items_in_batch: int | None = None) -> torch.Tensor:
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        logits = logits.float()
        if self.allowed is not None:
            blocked = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device)
            blocked[torch.tensor(self.allowed, device=logits.device)] = False
            logits = logits.masked_fill(blocked, float("-inf"))
        if num_items_in_batch is None:
            return F.cross_entropy(logits, labels)
        return F.cross_entropy(logits, labels, reduction="sum") / num_items_in_batch


def masked_predictions(logits: torch.Tensor, allowed: Sequence[int]) -> torch.Tensor:
    """Argmax over the ``allowed`` label ids only (returned as global label ids)."""
    allowed_ids = torch.as_tensor(list(allowed), device=logits.device)
    return allowed_ids[logits[:, allowed_ids].argmax(-1)]


HEAD_NAMES = ("classifier", "score", "head", "cls")


def classifier_head(model: nn.Module) -> tuple[str, nn.Module]:
    """``(attribute name, module)`` of a classification model's head; a clear error when it has none."""
    for name in HEAD_NAMES:
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            return name, module
    raise RunConfigError(
        f"{type(model).__name__} has no classification head (none of {HEAD_NAMES}): a continual-learning run needs a "
        "sequence- or image-classification model."
    )


def check_head(model: nn.Module, needed: int) -> str:
    """Check that the model's head has at least ``needed`` outputs; returns the head's attribute name."""
    name, head = classifier_head(model)
    out = getattr(head, "out_features", None)
    if out is None:
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
        out = linears[-1].out_features if linears else None
    if out is not None and out < needed:
        raise RunConfigError(
            f"The model's head {name!r} has {out} outputs but the task stream has {needed} classes: load the model "
            f"with num_labels={needed} (the runner does this for you)."
        )
    return name


def default_heads(config: RunConfig, model: nn.Module) -> list[str]:
    """The heads of a run whose ``heads`` is ``None``: ``[lda, trained]`` for class-incremental runs of a model with
    a linear head (an LDA head on class statistics beat the trained head on every class-incremental benchmark here:
    Fortunes-20 52 against 14%, BBC News 90 against 72%), else ``[trained]``."""
    if config.heads is not None:
        return config.heads
    name, head = classifier_head(model)
    linear = isinstance(head, nn.Linear)
    if config.compare_frozen and not linear:
        raise RunConfigError(
            f"compare_frozen needs statistics heads, and this model's head {name!r} ({type(head).__name__}) is not "
            "one linear layer whose rows they could replace: drop compare_frozen, or use a model with a linear head."
        )
    return ["lda", "trained"] if config.scenario == "class" and linear else ["trained"]
