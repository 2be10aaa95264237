"""Class statistics of the classification head's input, taken when each task ends: what a replay-free head needs.

Under gradient projection the features of old inputs stay (almost) fixed, so statistics taken when a task ends stay
valid for good. Per class: the number of examples and the sum of their head-input features; over all examples: the
sum of ``x xᵀ``. From these, in float64: each class's mean and one shared within-class covariance
``(Σ xxᵀ − Σ_c n_c μ_c μ_cᵀ) / (N − C)``. They are sums, so a class seen again in a later task (domain-incremental)
merges exactly. Saved as ``gp_class_stats.safetensors`` beside the memory.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch
from peft.utils.other import ModulesToSaveWrapper
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from ..core.files import atomic_write_bytes, parse_json
from ..core.peft_utils import unwrap_peft_model
from .groups import Handles, PooledHeadFeatures
from .memory_file import GPMemoryError

GP_CLASS_STATS_NAME = "gp_class_stats.safetensors"
HEAD_NAMES = ("classifier", "score")
Label = int | str


@dataclass
class ClassStatistics:
    """Sufficient statistics of the head's input per class (see the module's docstring)."""

    dim: int
    labels: list[Label] = field(default_factory=list)
    counts: torch.Tensor | None = None  # (C,) float64
    sums: torch.Tensor | None = None  # (C, d) float64
    second: torch.Tensor | None = None  # (d, d) float64: Σ x xᵀ over every example
    tasks_seen: int = 0
    # the head's (weight, bias) as trained while a statistics head replaces it (stat_heads), saved with the rest
    trained_head: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def __post_init__(self) -> None:
        classes = len(self.labels)
        self.counts = torch.zeros(classes, dtype=torch.float64) if self.counts is None else self.counts
        self.sums = torch.zeros(classes, self.dim, dtype=torch.float64) if self.sums is None else self.sums
        self.second = torch.zeros(self.dim, self.dim, dtype=torch.float64) if self.second is None else self.second

    def _row(self, label: Label) -> int:
        if label not in self.labels:
            self.labels.append(label)
            self.counts = torch.cat([self.counts, self.counts.new_zeros(1)])
            self.sums = torch.cat([self.sums, self.sums.new_zeros(1, self.dim)])
        return self.labels.index(label)

    def add(self, features: torch.Tensor, labels: list[Label]) -> None:
        """Add one batch: ``features`` ``(n, d)``, one label per row."""
        rows = features.detach().to("cpu", torch.float64)
        if rows.shape != (len(labels), self.dim):
            raise ValueError(f"Class statistics need ({len(labels)}, {self.dim}) features, got {tuple(rows.shape)}.")
        if not torch.isfinite(rows).all():
            raise GPMemoryError("NaN or inf features reached the classification head: no class statistics taken.")
        for label in dict.fromkeys(labels):
            index = self._row(label)
            chosen = torch.tensor([value == label for value in labels])
            self.counts[index] += chosen.sum()
            self.sums[index] += rows[chosen].sum(0)
        self.second += rows.T @ rows

    def merge(self, other: ClassStatistics) -> None:
        """Add another task's statistics (same feature dimension); classes seen again are merged exactly."""
        if other.dim != self.dim:
            raise ValueError(f"Cannot merge class statistics of dimension {other.dim} into {self.dim}.")
        for label, count, total in zip(other.labels, other.counts, other.sums):
            index = self._row(label)
            self.counts[index] += count
            self.sums[index] += total
        self.second += other.second

    @property
    def means(self) -> torch.Tensor:
        return self.sums / self.counts.clamp_min(1.0)[:, None]

    def covariance(self) -> torch.Tensor:
        """The shared within-class covariance (float64)."""
        total, classes = float(self.counts.sum()), len(self.labels)
        scatter = self.second - (self.counts[:, None, None] * self.means[:, :, None] * self.means[:, None, :]).sum(0)
        return (scatter + scatter.T) / 2 / max(total - classes, 1.0)

    # ---- the file ---------------------------------------------------------------------------------------------

    def save(self, path: str) -> None:
        tensors = {"counts": self.counts, "sums": self.sums, "second": self.second}
        if self.trained_head is not None:
            weight, bias = self.trained_head
            tensors |= {"trained_head.weight": weight} | ({} if bias is None else {"trained_head.bias": bias})
        metadata = {"gp_format_version": "1", "gp_labels": json.dumps(self.labels), "gp_dim": str(self.dim),
                    "gp_tasks_seen": str(self.tasks_seen)}  # fmt: skip
        atomic_write_bytes(path, save_safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata))

    @classmethod
    def load(cls, path: str) -> ClassStatistics:
        """Read ``gp_class_stats.safetensors``, every field checked."""
        fix = "Restore it from the same save as its adapter and memory."
        try:
            with open(path, "rb") as handle:
                data = handle.read()
            header = parse_json(data[8 : 8 + int.from_bytes(data[:8], "little")], f"The header of {path}", fix, 4)
            metadata = header["__metadata__"]
            labels = parse_json(metadata["gp_labels"], f"The labels of {path}", fix, 2)
            dim, tasks = int(metadata["gp_dim"]), int(metadata["gp_tasks_seen"])
            tensors = load_safetensors_bytes(data)
        except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
            raise GPMemoryError(f"{path} is not a readable class-statistics file ({error}). {fix}") from None
        stats = cls(dim, list(labels), tensors.get("counts"), tensors.get("sums"), tensors.get("second"), tasks)
        _check(stats, path, fix)
        if "trained_head.weight" in tensors:
            stats.trained_head = (tensors["trained_head.weight"], tensors.get("trained_head.bias"))
        return stats


def _check(stats: ClassStatistics, path: str, fix: str) -> None:
    classes, dim = len(stats.labels), stats.dim
    shapes = {"counts": (classes,), "sums": (classes, dim), "second": (dim, dim)}
    for name, shape in shapes.items():
        tensor = getattr(stats, name)
        if tensor is None or tuple(tensor.shape) != shape or tensor.dtype != torch.float64:
            raise GPMemoryError(f"{path}: {name} must be float64 of shape {shape}. {fix}")
        if not torch.isfinite(tensor).all():
            raise GPMemoryError(f"{path}: {name} holds NaN or inf. {fix}")
    if any(isinstance(label, bool) or not isinstance(label, (int, str)) for label in stats.labels):
        raise GPMemoryError(f"{path}: class labels must be ints or strings. {fix}")
    if (stats.counts < 0).any() or stats.tasks_seen < 0 or not math.isfinite(float(stats.counts.sum())):
        raise GPMemoryError(f"{path}: negative counts or task count. {fix}")


def head_module(model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """The classification head the model uses: the trainable ``modules_to_save`` copy, else the base model's."""
    peft_model = unwrap_peft_model(model)
    adapter_name = adapter_name or peft_model.active_adapter
    base = peft_model.get_base_model()
    for name in HEAD_NAMES:
        module = getattr(base, name, None)
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            module = module.modules_to_save[adapter_name]
        if isinstance(module, nn.Linear):
            return module
    raise ValueError(
        f"{type(base).__name__} has no linear classification head ({' or '.join(HEAD_NAMES)}): class statistics "
        "need one (sequence or image classification models)."
    )


class StatisticsObserver:
    """During a forward pass over a task's data: the head's input rows (pooled as the model pools) and their labels,
    added to ``stats``. ``attach()`` returns a handle with ``remove()``, like the memory's feature sources."""

    def __init__(self, model: nn.Module, stats: ClassStatistics, adapter_name: str | None = None) -> None:
        self.peft_model = unwrap_peft_model(model)
        self.head = head_module(self.peft_model, adapter_name)
        self.stats = stats
        self._labels: list | None = None

    def attach(self):
        base = self.peft_model.get_base_model()

        def labels_hook(module, args, kwargs):
            labels = kwargs.get("labels")
            self._labels = labels.tolist() if isinstance(labels, torch.Tensor) and labels.dim() == 1 else None

        def emit(features: torch.Tensor, masked: bool = True) -> None:
            if self._labels is not None:
                self.stats.add(features, self._labels)

        handles = [base.register_forward_pre_hook(labels_hook, with_kwargs=True)]
        handles.append(PooledHeadFeatures(base, self.head).attach(emit))
        return Handles(handles)
