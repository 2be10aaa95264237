"""Per-task slices (``gp_task_slices``): each task trains its own block of a LoRA's rank or an adapter's bottleneck.

With ``T`` slices of width ``w`` (rank ``R = T·w``), task ``t`` trains columns ``t·w .. (t+1)·w`` of the output side
(``lora_B``, ``W_up``) and the same rows of the input side (``lora_A``, ``W_down`` with its bias); every other slice is
kept fixed. Before the task, the slice's input side is moved out of the stored space, ``A_t ← A_t (I − M Mᵀ)`` (``M``:
the layer's basis of the old inputs; on ``[x; 1]`` when there is a bias), and its updates are projected the same way,
so ``A_t x = 0`` for every old input: ``B_t A_t x = 0`` whatever ``B_t`` learns, and ``B_t`` trains freely. The old
outputs stay exactly (at ``gp_threshold=1.0``), while ``B_t`` may point anywhere, which plain GP-LoRA does not allow
(its ``lora_B`` moves only inside the column space the first task chose, once its r-dimensional basis fills).

For an adapter the slice adds ``W_up,t act(W_down,t x + b_t)``: the projection makes ``W_down,t x + b_t = 0`` on old
inputs, and ``act(0) = 0`` (checked by the config) makes the whole term vanish. The output side's bias is shared by
every slice: it trains with the first task and is kept fixed after. The slice index is the memory's task count, so
a resumed or loaded adapter trains the right one; past the last slice training is refused (``training_slice``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from .features import NoFeatures
from .groups import ProjectedGroup, TaskSlices

ROWS, COLUMNS = "rows", "columns"
TASK_SLICES_HELP = (
    "Per-task slices: the most tasks, each training its own rank / gp_task_slices (bottleneck_size / gp_task_slices) "
    "components, kept off the old inputs, with the rest fixed (docs/paradigms.md). None: one shared adapter."
)


def check_slice_settings(config, width_name: str, zero_start: bool, activation: str | None = None) -> None:
    """What ``gp_task_slices`` needs of a config: a width it divides, an output side that starts at zero (a slice
    adds nothing until its task trains) and, for an adapter, an activation with ``act(0) = 0``."""
    slices, width = config.gp_task_slices, getattr(config, width_name)
    if slices is None:
        return
    if isinstance(width, int) and width % slices:
        raise ValueError(
            f"{width_name}={width} is not a multiple of gp_task_slices={slices}: each task trains {width_name} / "
            f"gp_task_slices components. Fix: {width_name}={slices * (width // slices + 1)}, say, or another "
            "gp_task_slices."
        )
    if not zero_start:
        option = "init_weights=True" if activation is not None else "init_lora_weights=True (or 'gaussian')"
        raise ValueError(
            "gp_task_slices needs the output side (lora_B, W_up) to start at zero, so that a slice adds nothing to "
            f"the outputs until its task trains; this config's initialisation does not. Fix: {option}."
        )
    if activation is not None and ACT2FN[activation](torch.zeros(1)).abs().item() != 0:
        raise ValueError(
            f"gp_task_slices needs an activation with act(0) = 0 (relu, gelu, silu, tanh, ...): with {activation!r} "
            "a fresh slice adds W_up act(0) ≠ 0 to every old output as soon as W_up trains. Fix: another activation, "
            "or leave gp_task_slices unset."
        )


def sliced_pair(layer: str, input_side: tuple[str, nn.Linear], output_side: tuple[str, nn.Linear], count: int):
    """The two groups of one sliced layer: the input side (rows, against the layer's inputs, with its bias on a
    constant-1 feature) and the output side (columns, no basis: it trains freely within its slice)."""
    (in_name, down), (out_name, up) = input_side, output_side
    rank = down.weight.shape[0]
    if rank % count:
        raise ValueError(
            f"{layer!r} has rank (bottleneck width) {rank}, which gp_task_slices={count} does not divide: each task "
            f"trains rank / gp_task_slices components. Fix: make it a multiple of {count} (e.g. "
            f"{count * (rank // count + 1)}) for every layer (rank_pattern too), or change gp_task_slices."
        )
    width = rank // count
    out_slices = TaskSlices(count, width, COLUMNS)
    out = ProjectedGroup(out_name, up.weight, up.bias, None, source=NoFeatures(), slices=out_slices)
    inp = ProjectedGroup(in_name, down.weight, down.bias, down, slices=TaskSlices(count, width, ROWS, output_side=out))
    return [inp, out]


def slice_groups(group: ProjectedGroup, task_id: int) -> list[ProjectedGroup]:
    """The blocks of a sliced group while task ``task_id`` trains: its own slice (projected against the group's basis
    on the input side, free on the output side) and every other slice kept fixed; the output side's shared bias is
    free in the first task and fixed after. Each block carries the group's name (so it reads the group's basis)."""
    slices = group.slices
    current = slices.block(task_id)
    end = slices.count * slices.width
    blocks = [(slice(0, current.start), True), (current, False), (slice(current.stop, end), True)]
    found = []
    for block, frozen in blocks:
        if block.stop <= block.start:
            continue
        if slices.axis == ROWS:
            bias_index = block if group.bias is not None else None
            part = ProjectedGroup(group.name, group.weight, group.bias, group.feature_module, frozen=frozen,
                                  index=(block,), bias_index=bias_index)  # fmt: skip
        else:
            part = ProjectedGroup(group.name, group.weight, None, None, frozen=frozen, index=(slice(None), block))
        found.append(part)
    if slices.axis == COLUMNS and group.bias is not None:
        found.append(ProjectedGroup(group.name, group.bias, None, None, frozen=task_id > 0))
    return found


def slice_count(groups: list[ProjectedGroup]) -> int | None:
    """``gp_task_slices`` of these groups (``None``: not sliced)."""
    return next((group.slices.count for group in groups if group.slices is not None), None)


def training_slice(groups: list[ProjectedGroup], tasks_seen: int, adapter_name: str) -> int | None:
    """The slice the next task trains: the number of tasks stored (``None`` when the adapter is not sliced). Past the
    last slice: an error naming the option and the fix (no fallback: a used slice's output side is unprotected)."""
    count = slice_count(groups)
    if count is None or tasks_seen < count:
        return None if count is None else tasks_seen
    raise ValueError(
        f"Adapter {adapter_name!r} has used all of its gp_task_slices={count} slices ({tasks_seen} tasks stored): "
        f"task {tasks_seen + 1} has no fresh slice to train, and training a used one would change its task's outputs "
        "(a slice's output side has no basis). Fix: build the adapter with more slices (raise gp_task_slices and r or "
        "bottleneck_size with it, e.g. both doubled), or go on in a new adapter."
    )


@torch.no_grad()
def prepare_slices(groups: list[ProjectedGroup], memory) -> None:
    """Move the input side of the slice the next task trains out of the stored space, ``[A_t | b_t] ← [A_t | b_t]
    (I − M Mᵀ)``. The outputs do not change: the slice's output side is still zero. A slice whose output side has
    already trained (a task resumed in its middle) is left as it is. Idempotent up to rounding."""
    task_id = memory.tasks_seen
    for group in groups:
        slices = group.slices
        if slices is None or slices.axis != ROWS or task_id >= slices.count:
            continue
        block = slices.block(task_id)
        basis = memory.bases[group.name]
        if basis.shape[1] == 0 or torch.any(slices.output_side.weight[:, block] != 0):
            continue
        parts = [group.weight[block]] + ([] if group.bias is None else [group.bias[block].unsqueeze(-1)])
        joined = torch.cat([part.to(torch.float64) for part in parts], dim=-1)
        basis = basis.to(joined.device, torch.float64)
        joined = joined - (joined @ basis) @ basis.T
        group.weight[block] = joined[:, : group.weight.shape[1]].to(group.weight.dtype)
        if group.bias is not None:
            group.bias[block] = joined[:, -1].to(group.bias.dtype)


class SliceMasks:
    """Gradient hooks that zero a sliced adapter's gradients outside the training task's slice as they are computed,
    before clipping: the fixed slices then add nothing to the gradient norm that clipping measures, and a task trains
    as a plain adapter of its slice's width would (the step hooks still restore those slices after weight decay)."""

    def __init__(self, groups: list[ProjectedGroup]) -> None:
        self.groups = [group for group in groups if group.slices is not None]
        self.masks: dict[int, torch.Tensor] = {}
        self.handles: list = []

    def set_task(self, task_id: int) -> None:
        for group in self.groups:
            block = group.slices.block(task_id)
            weight = torch.zeros_like(group.weight)
            if group.slices.axis == ROWS:
                weight[block] = 1
            else:
                weight[:, block] = 1
            self.masks[id(group.weight)] = weight
            if group.bias is not None:
                bias = torch.zeros_like(group.bias)
                if group.slices.axis == ROWS:
                    bias[block] = 1
                else:
                    bias.fill_(float(task_id == 0))
                self.masks[id(group.bias)] = bias

    def attach(self) -> None:
        self.detach()
        for group in self.groups:
            for param in group.parameters:
                key = id(param)
                self.handles.append(param.register_hook(lambda grad, key=key: grad * self.masks[key].to(grad)))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
