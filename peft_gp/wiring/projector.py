"""Attach gradient/update projection to an optimizer, so every step leaves old tasks' features untouched.

The projection is done in the optimizer's step hooks, on the raw ``torch.optim.Optimizer``:

* pre-step: each protected gradient ``G`` becomes ``G (I − M Mᵀ)``. This runs once per optimizer step, after the
  micro-batches of gradient accumulation have been summed and after gradient clipping (as in the official PEGP
  code; projecting before clipping gives the same direction, only the clip factor differs). In ``"update"`` mode the
  parameters are also snapshotted here.
* post-step (``"update"`` mode): the step ``Δ = θ_new − θ_old`` becomes ``Δ (I − M Mᵀ)``, which removes what Adam's
  per-coordinate scaling, momentum and weight decay put back into the protected space.

The same object serves ``GPTrainer``, a plain PyTorch loop and ``accelerate`` (pass the prepared optimizer; the
hooks go on the optimizer it wraps).
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.peft_utils import unwrap_peft_model
from .config import gp_config_of
from .groups import ProjectedGroup
from .state import get_state


def raw_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` inside accelerate's ``AcceleratedOptimizer`` (or similar wrappers)."""
    for _ in range(4):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer


class _Unit:
    """What one projection step acts on: one group, or a run of groups (e.g. the heads of one prefix) that tile one
    contiguous column block of a parameter with equal widths, projected together with one batched matmul against
    their bases stacked and zero-padded to ``(groups, dim, k_max)`` (zero columns project nothing)."""

    def __init__(self, groups: list[ProjectedGroup]) -> None:
        self.groups = groups
        first = groups[0]
        self.parameters = first.parameters
        self.frozen = first.frozen
        self.has_bias = first.bias is not None
        self.basis: torch.Tensor | None = None
        if len(groups) > 1:
            self.start, self.width = first.index[1].start, first.index[1].stop - first.index[1].start
            self.transpose = first.transpose

    def blocks(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Views of the unit's block of each tensor (writing to them writes to the tensors), feature axis last."""
        if len(self.groups) == 1:
            return [self.groups[0].view(tensors[0]), *tensors[1:]]
        block = tensors[0][:, self.start : self.start + len(self.groups) * self.width]
        block = block.unflatten(1, (len(self.groups), self.width)).transpose(0, 1)  # (groups, rows, width)
        return [block.transpose(1, 2) if self.transpose else block]

    def joined(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        weight = blocks[0].to(self.basis.dtype)
        if not self.has_bias:
            return weight
        return torch.cat([weight, blocks[1].to(self.basis.dtype).unsqueeze(-1)], dim=-1)

    def split(self, joined: torch.Tensor) -> list[torch.Tensor]:
        return [joined] if not self.has_bias else [joined[..., :-1], joined[..., -1]]

    def load_basis(self, memory) -> None:
        dtype = self.parameters[0].dtype
        compute_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        bases = [memory.bases[group.name].to(self.parameters[0].device, compute_dtype) for group in self.groups]
        width = max(basis.shape[1] for basis in bases)
        if width == 0:
            self.basis = None
        elif len(bases) == 1:
            self.basis = bases[0]
        else:
            self.basis = torch.stack([nn.functional.pad(basis, (0, width - basis.shape[1])) for basis in bases])


def _tiles(group: ProjectedGroup) -> bool:
    index = group.index
    return (
        group.bias is None
        and not group.frozen
        and group.weight.dim() == 2
        and isinstance(index, tuple)
        and len(index) == 2
        and index[0] == slice(None)
        and isinstance(index[1], slice)
        and index[1].step in (None, 1)
        and index[1].start is not None
        and index[1].stop is not None
    )


def _units(groups: list[ProjectedGroup]) -> list[_Unit]:
    """Group consecutive column blocks of one parameter (equal width, same orientation) into batched units."""
    units: list[list[ProjectedGroup]] = []
    for group in groups:
        run = units[-1] if units else None
        if (
            run is not None
            and _tiles(group)
            and _tiles(run[-1])
            and group.weight is run[-1].weight
            and group.transpose == run[-1].transpose
            and group.index[1].start == run[-1].index[1].stop
            and group.index[1].stop - group.index[1].start == run[0].index[1].stop - run[0].index[1].start
        ):
            run.append(group)
        else:
            units.append([group])
    return [_Unit(run) for run in units]


class GPProjector:
    """Projects the updates of one adapter's protected parameters against its memory.

    Usage in a plain loop (one optimizer per task, so every task starts with fresh optimizer state)::

        projector = GPProjector(model)
        for task in tasks:
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            projector.attach(optimizer)          # no-op until the memory holds a task
            ...train: loss.backward(); optimizer.step(); optimizer.zero_grad()
            projector.detach()
            peft_gp.update_memory(model, task_dataloader)

    Args:
        model: the PEFT model built from a GP config (possibly wrapped by DDP/accelerate).
        adapter_name: the adapter to protect (default: the active one).
    """

    def __init__(self, model: nn.Module, adapter_name: str | None = None) -> None:
        peft_model = unwrap_peft_model(model)
        self.adapter_name = adapter_name or peft_model.active_adapter
        self.config = gp_config_of(peft_model, self.adapter_name)
        self._state = get_state(peft_model, self.adapter_name)
        self.memory = self._state.memory
        self._model = peft_model
        self.groups: list[ProjectedGroup] = self._state.groups
        self._units: list[_Unit] = _units(self.groups)
        self._memory_state: tuple[int, int] | None = None
        self._handles: list = []
        self._optimizer: torch.optim.Optimizer | None = None
        self._snapshots: list[list[torch.Tensor]] | None = None
        self._stats = None
        self.reset_stats()

    # ---- setup -------------------------------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Whether steps are projected: only once the memory holds at least one task (none during task 1)."""
        self._refresh()
        return self.memory.tasks_seen > 0

    def _refresh(self) -> None:
        # the memory may have been replaced (resume from a checkpoint) or grown (end of a task)
        memory = self._state.memory
        if memory is not self.memory or self._memory_state != (id(memory), memory.version):
            self.memory = memory
            for unit in self._units:
                unit.load_basis(memory)
            self._memory_state = (id(memory), memory.version)

    def _check_not_sharded(self) -> None:
        for group in self.groups:
            for param in group.parameters:
                if type(param).__name__ == "DTensor" or getattr(param, "_fsdp_flattened", False):
                    raise NotImplementedError(
                        f"{group.name} is sharded (FSDP/DTensor): peft_gp does not project sharded parameters yet. "
                        "Train with DDP instead; PEFT adapters are small enough to replicate."
                    )

    def attach(self, optimizer: torch.optim.Optimizer) -> GPProjector:
        """Register the projection hooks on ``optimizer`` (the raw one inside any wrapper). Idempotent."""
        self._check_not_sharded()
        optimizer = raw_optimizer(optimizer)
        if self._optimizer is optimizer:
            return self
        self.detach()
        self._handles = [
            optimizer.register_step_pre_hook(lambda opt, args, kwargs: self._before_step()),
            optimizer.register_step_post_hook(lambda opt, args, kwargs: self._after_step()),
        ]
        self._optimizer = optimizer
        self._state.guard.attached += 1
        return self

    def detach(self) -> None:
        """Remove the hooks from the optimizer they were attached to."""
        if self._optimizer is not None:
            self._state.guard.attached -= 1
        for handle in self._handles:
            handle.remove()
        self._handles, self._optimizer, self._snapshots = [], None, None

    # ---- the projection ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def project_gradients(self) -> None:
        """Project the ``.grad`` of every protected parameter in place (called before each optimizer step)."""
        if self.active:
            self._project_gradients()

    def _project_gradients(self) -> None:
        total = removed = None
        for unit in self._units:
            grads = [p.grad for p in unit.parameters]
            if any(g is None for g in grads):
                continue
            grads = unit.blocks(grads)
            if unit.frozen:
                for grad in grads:
                    grad.zero_()
                continue
            if unit.basis is None:
                continue
            joined = unit.joined(grads)
            inside = (joined @ unit.basis) @ unit.basis.mT
            total = joined.square().sum() if total is None else total + joined.square().sum()
            removed = inside.square().sum() if removed is None else removed + inside.square().sum()
            for grad, new in zip(grads, unit.split(joined - inside)):
                grad.copy_(new)
        if total is not None:  # kept on the device: no sync until the next log
            self._stats["grad_sq"] = self._stats["grad_sq"] + total.float()
            self._stats["removed_sq"] = self._stats["removed_sq"] + removed.float()
            self._stats["steps"] += 1

    @torch.no_grad()
    def _before_step(self) -> None:
        if not self.active:  # one memory check per step; nothing happens during the first task
            return
        self._project_gradients()
        update_mode = self.config.gp_projection == "update"
        self._snapshots = [
            [block.detach().clone() for block in unit.blocks(unit.parameters)]
            if unit.frozen or (update_mode and unit.basis is not None)
            else None
            for unit in self._units
        ]

    @torch.no_grad()
    def _after_step(self) -> None:
        if self._snapshots is None:
            return
        for unit, old in zip(self._units, self._snapshots):
            if old is None:
                continue
            params = unit.blocks([param.detach() for param in unit.parameters])
            if unit.frozen:
                for param, before in zip(params, old):
                    param.copy_(before)
                continue
            joined = unit.joined([param - before for param, before in zip(params, old)])
            deltas = unit.split(joined - (joined @ unit.basis) @ unit.basis.mT)
            for param, before, delta in zip(params, old, deltas):
                param.copy_(before + delta.to(param.dtype))
        self._snapshots = None

    # ---- statistics --------------------------------------------------------------------------------------------

    def reset_stats(self) -> None:
        self._stats = {"grad_sq": 0.0, "removed_sq": 0.0, "steps": 0}

    def pop_stats(self) -> dict[str, float]:
        """Share of the gradient norm² removed by the projection since the last call (for logging)."""
        stats = self._stats
        self.reset_stats()
        if stats["steps"] == 0:
            return {}
        share = (stats["removed_sq"] / stats["grad_sq"].clamp_min(1e-30)).item()
        return {"gp_grad_removed": share}
