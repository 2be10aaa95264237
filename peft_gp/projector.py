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

from . import maths
from .paradigms import ProjectedGroup, resolve_groups
from .paradigms.base import gp_config_of, unwrap_peft_model
from .state import get_memory


def raw_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` inside accelerate's ``AcceleratedOptimizer`` (or similar wrappers)."""
    for _ in range(4):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer


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
        self.memory = get_memory(peft_model, self.adapter_name)
        self._model = peft_model
        self.groups: list[ProjectedGroup] = resolve_groups(peft_model, self.adapter_name)
        self._bases: list[torch.Tensor | None] = []
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
        memory = get_memory(self._model, self.adapter_name)
        if memory is not self.memory or self._memory_state != (id(memory), memory.version):
            self.memory = memory
            self._bases = []
            for group in self.groups:
                basis = memory.bases[group.name]
                device, dtype = group.weight.device, group.weight.dtype
                compute_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
                self._bases.append(basis.to(device=device, dtype=compute_dtype) if basis.shape[1] else None)
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
        return self

    def detach(self) -> None:
        """Remove the hooks from the optimizer they were attached to."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._optimizer, self._snapshots = [], None, None

    # ---- the projection ----------------------------------------------------------------------------------------

    @staticmethod
    def _blocks(group: ProjectedGroup, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        # the group's own block of each tensor (a view: writing to it writes to the tensor)
        return [group.view(tensors[0]), *tensors[1:]]

    @staticmethod
    def _joined(group: ProjectedGroup, blocks: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        weight = blocks[0].to(dtype)
        if group.bias is None:
            return weight
        return torch.cat([weight, blocks[1].to(dtype).unsqueeze(-1)], dim=-1)

    @staticmethod
    def _split(group: ProjectedGroup, joined: torch.Tensor) -> list[torch.Tensor]:
        if group.bias is None:
            return [joined]
        return [joined[..., :-1], joined[..., -1]]

    def _project(self, group: ProjectedGroup, basis: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        joined = self._joined(group, tensors, basis.dtype)
        return self._split(group, maths.project_out(joined, basis))

    @torch.no_grad()
    def project_gradients(self) -> None:
        """Project the ``.grad`` of every protected parameter in place (called before each optimizer step)."""
        if self.active:
            self._project_gradients()

    def _project_gradients(self) -> None:
        total = removed = None
        for group, basis in zip(self.groups, self._bases):
            grads = [p.grad for p in group.parameters]
            if any(g is None for g in grads):
                continue
            grads = self._blocks(group, grads)
            if group.frozen:
                for grad in grads:
                    grad.zero_()
                continue
            if basis is None:
                continue
            joined = self._joined(group, grads, basis.dtype)
            inside = (joined @ basis) @ basis.T
            total = joined.square().sum() if total is None else total + joined.square().sum()
            removed = inside.square().sum() if removed is None else removed + inside.square().sum()
            for grad, new in zip(grads, self._split(group, joined - inside)):
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
            [block.detach().clone() for block in self._blocks(group, group.parameters)]
            if group.frozen or update_mode
            else None
            for group in self.groups
        ]

    @torch.no_grad()
    def _after_step(self) -> None:
        if self._snapshots is None:
            return
        for group, basis, old in zip(self.groups, self._bases, self._snapshots):
            params = self._blocks(group, [param.detach() for param in group.parameters])
            if old is None:
                continue
            if group.frozen:
                for param, before in zip(params, old):
                    param.copy_(before)
                continue
            if basis is None:
                continue
            deltas = [param - before for param, before in zip(params, old)]
            for param, before, delta in zip(params, old, self._project(group, basis, deltas)):
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
