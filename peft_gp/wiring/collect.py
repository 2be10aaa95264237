"""Store a finished task: run the model over its sample (``grams.collect_grams``) and grow the memory."""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..core import maths
from ..core.peft_utils import unwrap_peft_model
from ..core.sketch import grow
from .class_stats import ClassStatistics, StatisticsObserver, head_module
from .config import gp_config_of
from .gp_settings import group_thresholds, kept_whole, rank_caps
from .grams import NO_FEATURES_MESSAGE, collect_grams
from .guard import GPCapacityWarning
from .memory_file import GPMemoryError
from .passes import memory_passes
from .sharding import full, write
from .sketches import has_features, is_sketch, sketch_rows, sketch_specs
from .slices import prepare_slices
from .state import get_state


def update_memory(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    adapter_name: str | None = None,
    max_samples: int | None = None,
    stacklevel: int = 2,
    task_name: str | None = None,
    classes: list | None = None,
) -> dict[str, dict[str, float]]:
    """Store a finished task in the memory: the plain-PyTorch counterpart of ``GPCallback``'s update.

    Storing the very same features as the last stored task again changes nothing (no phantom task is recorded).
    The task is also recorded in the task record (``peft_gp.get_task_state``, saved as ``gp_tasks.json``) under
    ``task_name`` (default ``task-XX``). Called before the first task on a reference corpus (``task_name="reference"``,
    "task 0"), it protects the pretrained model's behaviour on that corpus from the first task on.

    Args:
        model: the PEFT model built from a GP config.
        batches: the finished task's data as model-ready dicts of tensors (a ``DataLoader`` over its train set).
        adapter_name: the adapter whose memory grows (default: the active one).
        max_samples: how many examples to use (default: the config's ``gp_memory_samples``).
        stacklevel: for the warning about layers that became full (callers wrapping this function add theirs).
        task_name: the stored task's name in the task record.
        classes: the task's class labels, where labels are class ids (``None`` for generative tasks).

    Returns:
        Per projected group: ``basis_size``, ``dim``, ``added`` and captured energy before/after.
    """
    peft_model = unwrap_peft_model(model)
    adapter_name = adapter_name or peft_model.active_adapter
    config = gp_config_of(peft_model, adapter_name)
    state = get_state(peft_model, adapter_name)
    memory, groups = state.memory, state.groups
    max_samples = config.gp_memory_samples if max_samples is None else max_samples
    observer = _statistics_observer(peft_model, adapter_name, config)
    threshold = maths.threshold_for_task(config.gp_threshold, config.gp_threshold_increment, memory.tasks_seen)
    sketched = sketch_rows(groups, config.gp_sketch_above, config.gp_sketch_rows)
    passes, batches = memory_passes(model, groups, batches, config.gp_update_budget_gb, max_samples, sketched)
    thresholds = group_thresholds(list(memory.dims), config, memory.tasks_seen)  # gp_threshold_pattern per layer
    parts, fingerprint, moved = _grow_passes(model, passes, batches, max_samples, observer, state, config, thresholds)
    if observer is not None and not observer.stats.labels:
        raise GPMemoryError(
            "gp_class_statistics is on, but no example of the task had a class label (a 1-d 'labels' tensor in the "
            "batch), so no class statistics could be taken. Nothing was stored."
        )
    if memory.tasks_seen and memory.info.get("last_task_fingerprint") == fingerprint:
        return _unchanged_report(memory, parts)  # the last task again: idempotent, no phantom task recorded
    full_before = set(memory.full_groups())
    report = memory.commit(parts, threshold)
    _move_input_sides(moved, groups, memory)
    memory.info["last_task_fingerprint"] = fingerprint
    if observer is not None:
        _merge_statistics(state, observer.stats, memory.tasks_seen)
    state.tasks.record_through(memory.tasks_seen - 1, task_name, classes)
    asked = full_before | kept_whole(list(memory.dims), config)  # a group pinned at threshold 1 is full on purpose
    _warn_if_full([name for name in memory.full_groups() if name not in asked], stacklevel + 1)
    return report


def _grow_passes(model, passes, batches, max_samples, observer, state, config, thresholds) -> tuple[list, str, list]:
    """Stream the sample once per pass (``passes.memory_passes``) and grow that pass's bases, its Grams freed before
    the next; returns the grown parts (``GPMemory.grow``), the task's fingerprint and the idle input sides moved.
    With several passes the new bases are kept on the CPU, so that the device holds one pass's at a time."""
    memory, parts, digests, moved, reached = state.memory, [], {}, [], False
    caps = rank_caps(list(memory.dims), config.gp_max_basis_rank)
    dtype, tolerance = maths.GRAM_DTYPES[config.gp_gram_dtype], maths.EIGEN_TOLERANCES[config.gp_gram_dtype]
    device = "cpu" if len(passes) > 1 else None
    on = next(p.device for p in unwrap_peft_model(model).parameters())  # where the collector puts its sums
    for number, groups in enumerate(passes):
        exact: dict[str, torch.Tensor] = {}
        observers = [observer] if observer is not None and number == 0 else []
        sketches = sketch_specs(groups, memory.bases, config.gp_sketch_above, config.gp_sketch_rows, on)
        grams, _ = collect_grams(model, groups, batches, max_samples=max_samples, exact_grams=exact,
                                 observers=observers, require_features=False, sketches=sketches,
                                 gram_dtype=dtype)  # fmt: skip
        reached = reached or any(has_features(gram) for gram in grams.values())
        digests.update(_fingerprint_parts({**grams, **{f"{name}#exact": gram for name, gram in exact.items()}}))
        pass_moved, totals = _idle_input_sides(groups, grams, memory, thresholds, caps, tolerance)
        moved += pass_moved
        scale = config.gp_importance_scale
        parts.append(memory.grow(grams, thresholds, totals, exact, scale, caps, device, tolerance))
        del grams, exact  # this pass's Grams go before the next pass's come
    if not reached:
        raise GPMemoryError(NO_FEATURES_MESSAGE)
    return parts, _digest(digests), moved


@torch.no_grad()
def _move_input_sides(moved: list, groups, memory) -> None:
    """Write the idle input sides moved off the stored space (``_idle_input_sides``); with ``gp_task_slices``, move
    the next task's slice off it (``slices.prepare_slices``)."""
    for group, weight in moved:
        write(group.weight, weight)  # a sharded weight (FSDP2) takes its rows
    prepare_slices(groups, memory)


def _warn_if_full(newly_full: list[str], stacklevel: int) -> None:
    if newly_full:
        warnings.warn(
            f"The memory now fills the whole feature space of {len(newly_full)} projected group(s), e.g. "
            f"{newly_full[:3]}: these parameters can no longer learn. Lower gp_threshold, or widen the space: the "
            "LoRA rank (lora_B's features live in r dimensions), the adapter's bottleneck_size (W_up's live in "
            "bottleneck_size + 1) or the number of virtual tokens (a value prefix's live in num_virtual_tokens).",
            GPCapacityWarning,
            stacklevel=stacklevel,
        )


def _statistics_observer(model, adapter_name: str, config) -> StatisticsObserver | None:
    """With ``gp_class_statistics``: an observer taking the head input's class statistics in the same pass."""
    if not config.gp_class_statistics:
        return None
    dim = head_module(model, adapter_name).in_features
    return StatisticsObserver(model, ClassStatistics(dim=dim), adapter_name)


def _merge_statistics(state, stats: ClassStatistics, tasks_seen: int) -> None:
    if state.class_stats is None:
        state.class_stats = stats
    else:
        state.class_stats.merge(stats)
    state.class_stats.tasks_seen = tasks_seen


def _unchanged_report(memory, parts: list) -> dict[str, dict[str, float]]:
    """The report of a task stored again: nothing added, the share its features already had in the memory."""
    report = {}
    for part in parts:
        for name, entry in part.report.items():
            captured = entry["captured_before"]
            report[name] = {"captured_before": captured, "captured_after": captured, "added": 0,
                            "basis_size": memory.bases[name].shape[1], "dim": memory.dims[name]}  # fmt: skip
    return report


def _fingerprint_parts(grams: dict[str, torch.Tensor]) -> dict[str, bytes]:
    """Per Gram, what the task's fingerprint reads of it: its diagonal and column sums (of a sketch: its features'
    exact sums and sums of squares)."""
    parts = {}
    for name, gram in grams.items():
        if is_sketch(gram):
            parts[name] = gram.fingerprint()
            continue
        gram = gram.detach().to("cpu", torch.float64)
        parts[name] = gram.diagonal().numpy().tobytes() + gram.sum(0).numpy().tobytes()
    return parts


def _digest(parts: dict[str, bytes]) -> str:
    """A digest of a task's Gram matrices (``_fingerprint_parts``, by name): equal only for the very same features."""
    digest = hashlib.sha256()
    for name in sorted(parts):
        digest.update(name.encode())
        digest.update(parts[name])
    return digest.hexdigest()


def _idle_input_sides(groups, grams, memory, thresholds, caps, tolerance) -> tuple[list, dict[str, float]]:
    """Input sides whose output side is still zero (a reference memory before any training: ``B = 0``).

    There ``B A x = 0`` whatever ``A`` is, so the stored features are kept safe more cheaply than by freezing ``B``
    against ``A x``: ``A`` moves out of the stored space (``A ← A (I − M Mᵀ)``, the model's outputs unchanged) and
    stays out (its updates are projected), so ``A x ≈ 0`` on the stored features and ``B`` remains free to learn.
    ``B``'s Gram matrix becomes ``A' C Aᵀ'`` (``C``: ``A``'s input Gram), measured against its energy before the move.
    Returns the moved weights (written once the memory update succeeded) and the reference energies.
    """
    moved, totals, grown, classes = [], {}, {}, None
    for group in groups:
        side = group.output_side
        if side is None or side.bias is not None or group.index is not None or group.transpose:
            continue
        if torch.any(full(side.weight) != 0) or is_sketch(grams[side.name]):
            continue
        classes = classes or memory.shared_classes(grams)  # as GPMemory.grow grows them (highest tau, smallest cap)
        members = classes[group.name]
        key = tuple(members)  # a class of groups sharing a Gram and basis: grown once
        if key not in grown:
            cap = min((caps[m] for m in members if caps.get(m) is not None), default=None)
            tau = max(thresholds[m] for m in members)
            grown[key] = grow(grams[group.name], memory.bases[group.name], tau, max_rank=cap,
                              eigen_tolerance=tolerance)[0]  # fmt: skip
        basis = grown[key]
        weight = full(group.weight).detach().to(torch.float64)
        basis = basis.to(weight.device)
        weight = weight - (weight @ basis) @ basis.T
        totals[side.name] = torch.trace(grams[side.name]).item()
        grams[side.name] = _carried_gram(weight, grams[group.name])
        moved.append((group, weight))
    return moved, totals


def _carried_gram(weight: torch.Tensor, gram) -> torch.Tensor:
    """The Gram of ``weight x`` over the input side's features: ``W C Wᵀ``; from a sketch ``B`` of the features
    outside the old basis, ``(W Bᵀ)(W Bᵀ)ᵀ`` (``W`` is zero on the old basis, so only the residual counts)."""
    if is_sketch(gram):
        carried = weight @ gram.sketch_rows().to(weight.device).T
        return carried @ carried.T
    return weight @ gram.to(weight.device) @ weight.T


def summarize_report(report: dict[str, dict[str, float]]) -> dict[str, float]:
    """Scalar summary of a growth report (for logs): mean/max capacity used and mean captured energy."""
    shares = [entry["basis_size"] / entry["dim"] for entry in report.values()]
    captured = [entry["captured_after"] for entry in report.values()]
    return {
        "gp_capacity_mean": sum(shares) / len(shares),
        "gp_capacity_max": max(shares),
        "gp_captured_energy_mean": sum(captured) / len(captured) if captured else math.nan,
    }
