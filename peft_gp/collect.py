"""Run the model over a finished task's sample with forward hooks and grow the memory from its features."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from . import maths
from .memory import GPMemoryError
from .paradigms import ProjectedGroup, resolve_groups
from .paradigms.base import gp_config_of, unwrap_peft_model
from .state import get_memory
from .task_state import get_task_state


def _to_device(batch, device):
    if isinstance(batch, Mapping):
        return {key: _to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    return batch


def _batch_size(batch) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("A memory batch holds no tensor: batches must be dicts of tensors (as a DataLoader yields).")


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def non_finite_message(name: str) -> str:
    return (
        f"NaN or inf features reached {name!r} while updating the memory: check the inputs and the model's numerics "
        "(a diverged task, fp16 overflow) before storing this task. Nothing was stored."
    )


@torch.no_grad()
def collect_grams(
    model: nn.Module,
    groups: list[ProjectedGroup],
    batches: Iterable[Mapping[str, torch.Tensor]],
    max_samples: int | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Stream ``batches`` through ``model`` (eval mode, no grad) and return each group's float64 Gram matrix.

    Padding tokens are left out wherever a feature tensor is laid out as the batch's ``(batch, sequence)``: those with
    ``attention_mask == 0``; in encoder-decoder models the encoder's layers use ``attention_mask`` and the decoder's
    their own inputs' mask (``decoder_attention_mask``, else the decoder inputs that ``labels`` shift in). Under
    ``torch.distributed`` each process passes its own shard and the Gram matrices are summed over processes
    (all-reduce), so every rank gets the same result. Returns the Gram matrices and the number of examples seen.
    """
    peft_model = unwrap_peft_model(model)
    base_model = peft_model.get_base_model()
    is_encoder_decoder = bool(getattr(getattr(base_model, "config", None), "is_encoder_decoder", 0))
    device = next(p.device for p in peft_model.parameters())
    grams = {group.name: torch.zeros(group.dim, group.dim, dtype=torch.float64, device=device) for group in groups}
    current: dict = {"mask": None, "cache": {}}
    masks: dict = {}  # encoder-decoder models: each stack's padding mask and the encoder's output
    distributed = _world_size() > 1
    non_finite: list[str] = []

    def make_hook(group: ProjectedGroup):
        def hook(module, args, output):
            inputs = args[0] if args else None
            if not isinstance(inputs, torch.Tensor):
                return
            # Sibling layers often read the very same tensor (LoRA on query and value): one Gram serves them all.
            # The cache holds the tensor itself, so its id cannot be reused by another tensor during this forward.
            key = (id(inputs), group.bias is not None)
            cached = current["cache"].get(key)
            gram = cached[1] if cached is not None and cached[0] is inputs else None
            if gram is None:
                gram = gram_of(group, inputs, masked=True)
                if gram is None:
                    return
                current["cache"][key] = (inputs, gram)
            grams[group.name] += gram

        return hook

    def gram_of(group: ProjectedGroup, inputs: torch.Tensor, masked: bool) -> torch.Tensor | None:
        mask = current["mask"]
        if _is_tensor(inputs, masks.get("encoder_output")):  # cross-attention keys/values read the encoder's output
            mask = masks.get("encoder")
        if masked and mask is not None and inputs.dim() >= 3 and tuple(inputs.shape[:2]) == tuple(mask.shape):
            inputs = inputs[mask]
        rows = group.features(inputs.detach())
        if not torch.isfinite(rows).all():
            if not distributed:
                raise GPMemoryError(non_finite_message(group.name))
            non_finite.append(group.name)  # raised on every rank after the all-reduce, not here
            return None
        return maths.feature_gram(rows)

    def make_emit(group: ProjectedGroup):
        def emit(features: torch.Tensor, masked: bool = True) -> None:
            gram = gram_of(group, features, masked)
            if gram is not None:
                grams[group.name] += gram

        return emit

    handles = _side_mask_hooks(base_model, current, masks) if is_encoder_decoder else []
    handles += [
        group.source.attach(make_emit(group))
        if group.source is not None
        else group.feature_module.register_forward_hook(make_hook(group))
        for group in groups
    ]
    was_training = peft_model.training
    peft_model.eval()
    seen = 0
    try:
        for batch in batches:
            if max_samples is not None and seen >= max_samples:
                break
            batch = dict(batch)
            size = _batch_size(batch)
            if max_samples is not None and seen + size > max_samples:
                keep = max_samples - seen
                batch = {k: v[:keep] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in batch.items()}
                size = keep
            batch = _to_device(batch, device)
            mask = batch.get("attention_mask")
            current["mask"] = mask.bool() if isinstance(mask, torch.Tensor) else None
            if is_encoder_decoder:
                masks.update(encoder=current["mask"], decoder=decoder_mask(batch))
            current["cache"], masks["encoder_output"] = {}, None
            model(**batch)
            current["cache"] = {}
            seen += size
    finally:
        for handle in handles:
            handle.remove()
        peft_model.train(was_training)
    if distributed:  # every rank saw its own shard: sum the Gram matrices so that all ranks build the same bases
        import torch.distributed as dist

        flags = torch.tensor([float(seen), float(len(non_finite))], dtype=torch.float64, device=device)
        dist.all_reduce(flags)
        seen = int(flags[0].item())
        if flags[1].item() > 0:
            raise GPMemoryError(non_finite_message(non_finite[0] if non_finite else "an adapted layer (another rank)"))
        for gram in grams.values():
            dist.all_reduce(gram)
    if seen == 0:
        raise GPMemoryError(
            "The memory update got no examples: pass the finished task's (non-empty) training data. "
            "Nothing was stored."
        )
    silent = [name for name, gram in grams.items() if not torch.any(gram != 0)]
    if len(silent) == len(grams):
        raise GPMemoryError(
            "No features reached the adapter during the memory update: is the adapter active "
            "(model.set_adapter(...)) and does the batch go through the adapted layers? Nothing was stored."
        )
    return grams, seen


def decoder_mask(batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """Which decoder input positions of an encoder-decoder batch hold tokens (not padding).

    ``decoder_attention_mask`` when given; else, as the decoder inputs are ``labels`` shifted right (T5, BART, and
    ``DataCollatorForSeq2Seq``'s ``decoder_input_ids``), the start token and every position whose previous label is
    not ``-100``.
    """
    mask = batch.get("decoder_attention_mask")
    if isinstance(mask, torch.Tensor):
        return mask.bool()
    labels = batch.get("labels")
    decoder_inputs = batch.get("decoder_input_ids")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        return None
    if isinstance(decoder_inputs, torch.Tensor) and decoder_inputs.shape != labels.shape:
        return None  # decoder inputs that are not the labels shifted right: no mask known
    shifted = torch.ones_like(labels, dtype=torch.bool)
    shifted[:, 1:] = labels[:, :-1] != -100
    return shifted


def _is_tensor(inputs: torch.Tensor, other) -> bool:
    """``inputs`` is ``other`` or a same-shaped alias of it (an identity dropout or dtype cast passes it through)."""
    if not isinstance(other, torch.Tensor):
        return False
    return inputs is other or (inputs.shape == other.shape and inputs.data_ptr() == other.data_ptr())


def _side_mask_hooks(base_model: nn.Module, current: dict, masks: dict) -> list:
    """Hooks that switch the padding mask to the encoder's or the decoder's as each stack runs, and keep the
    encoder's output: the decoder's cross-attention keys and values read it, so they take the encoder's mask."""
    handles = []
    for side, getter in (("encoder", "get_encoder"), ("decoder", "get_decoder")):
        stack = getattr(base_model, getter, lambda: None)()
        if isinstance(stack, nn.Module):

            def set_mask(module, args, side=side):
                current["mask"] = masks.get(side)

            handles.append(stack.register_forward_pre_hook(set_mask))
            if side == "encoder":

                def keep_output(module, args, output):
                    hidden = output[0] if isinstance(output, tuple) else getattr(output, "last_hidden_state", None)
                    masks["encoder_output"] = hidden

                handles.append(stack.register_forward_hook(keep_output))
    return handles


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
    memory = get_memory(peft_model, adapter_name)
    groups = resolve_groups(peft_model, adapter_name)
    max_samples = config.gp_memory_samples if max_samples is None else max_samples
    grams, _ = collect_grams(model, groups, batches, max_samples=max_samples)
    threshold = maths.threshold_for_task(config.gp_threshold, config.gp_threshold_increment, memory.tasks_seen)
    full_before = set(memory.full_groups())
    moved, totals = _idle_input_sides(groups, grams, memory, threshold)
    report = memory.update(grams, threshold, total_energies=totals)
    with torch.no_grad():
        for group, weight in moved:
            group.weight.copy_(weight.to(group.weight.dtype))
    record_task(peft_model, adapter_name, memory.tasks_seen - 1, task_name, classes)
    newly_full = [name for name in memory.full_groups() if name not in full_before]
    if newly_full:
        warnings.warn(
            f"The memory now fills the whole feature space of {len(newly_full)} projected group(s), e.g. "
            f"{newly_full[:3]}: these parameters can no longer learn. Lower gp_threshold, or widen the space: the "
            "LoRA rank (lora_B's features live in r dimensions), the adapter's bottleneck_size (W_up's live in "
            "bottleneck_size + 1) or the number of virtual tokens (a value prefix's live in num_virtual_tokens).",
            stacklevel=stacklevel,
        )
    return report


def _idle_input_sides(groups, grams, memory, threshold) -> tuple[list, dict[str, float]]:
    """Input sides whose output side is still zero (a reference memory before any training: ``B = 0``).

    There ``B A x = 0`` whatever ``A`` is, so the stored features are kept safe more cheaply than by freezing ``B``
    against ``A x``: ``A`` moves out of the stored space (``A ← A (I − M Mᵀ)``, the model's outputs unchanged) and
    stays out (its updates are projected), so ``A x ≈ 0`` on the stored features and ``B`` remains free to learn.
    ``B``'s Gram matrix becomes ``A' C Aᵀ'`` (``C``: ``A``'s input Gram), measured against its energy before the move.
    Returns the moved weights (written once the memory update succeeded) and the reference energies.
    """
    moved, totals = [], {}
    for group in groups:
        side = group.output_side
        if side is None or side.bias is not None or group.index is not None or group.transpose:
            continue
        if torch.any(side.weight != 0):
            continue
        basis, _ = maths.grow_basis(grams[group.name], memory.bases[group.name], threshold)
        weight = group.weight.detach().to(torch.float64)
        basis = basis.to(weight.device)
        weight = weight - (weight @ basis) @ basis.T
        totals[side.name] = torch.trace(grams[side.name]).item()
        grams[side.name] = weight @ grams[group.name].to(weight.device) @ weight.T
        moved.append((group, weight))
    return moved, totals


def record_task(model: nn.Module, adapter_name: str, task_id: int, task_name: str | None, classes) -> None:
    """Record task ``task_id`` in the task record, filling in tasks stored before the record existed."""
    state = get_task_state(model, adapter_name)
    for missing in range(state.tasks_seen, task_id):
        state.record(missing)
    state.record(task_id, task_name, classes)


def summarize_report(report: dict[str, dict[str, float]]) -> dict[str, float]:
    """Scalar summary of a growth report (for logs): mean/max capacity used and mean captured energy."""
    shares = [entry["basis_size"] / entry["dim"] for entry in report.values()]
    captured = [entry["captured_after"] for entry in report.values()]
    return {
        "gp_capacity_mean": sum(shares) / len(shares),
        "gp_capacity_max": max(shares),
        "gp_captured_energy_mean": sum(captured) / len(captured) if captured else math.nan,
    }
