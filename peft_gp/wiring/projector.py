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

import warnings

import torch
from torch import nn

from ..core.peft_utils import unwrap_peft_model
from .config import gp_config_of
from .groups import ProjectedGroup
from .guard import GPCapacityWarning, UnprotectedTrainingWarning
from .sharding import check_shardable, local
from .slices import SliceMasks, prepare_slices, training_slice
from .state import get_state, refresh_groups, uncovered_parameters
from .units import Unit, make_units


def raw_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` inside accelerate's ``AcceleratedOptimizer`` (or similar wrappers); refused when
    what steps is not one (DeepSpeed's ZeRO and fp16/bf16 optimizers step flat copies of the parameters)."""
    for _ in range(4):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    if inner is not None or not isinstance(optimizer, torch.optim.Optimizer):
        raise NotImplementedError(
            f"The optimizer that steps is a {type(inner if inner is not None else optimizer).__name__}, not a "
            "torch.optim.Optimizer over the model's parameters (DeepSpeed's ZeRO and fp16/bf16 optimizers step flat "
            "partitions cut without regard to rows): the projection cannot see whole gradient rows there. Use FSDP2 "
            "(fully_shard) or DDP; DeepSpeed only with ZeRO stage 0 in fp32."
        )
    return optimizer


class GPProjector:
    """Projects the updates of one adapter's protected parameters against its memory.

    Usage in a plain loop (one optimizer per task, so every task starts with fresh optimizer state)::

        projector = GPProjector(model)
        for task in tasks:
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            projector.attach(optimizer)          # no-op until the memory holds a task (with
                                                 # gp_task_slices: only the task's slice trains)
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
        self._units: list[Unit] = []  # built by _refresh, for the slice the memory's task count selects
        self._masks = SliceMasks(self.groups)  # gp_task_slices: gradients outside the training slice zeroed
        self._memory_state: tuple[int, int] | None = None
        self._handles: list = []
        self._optimizer: torch.optim.Optimizer | None = None
        self._snapshots: list[list[torch.Tensor]] | None = None
        self._rules = [(group.rule, None) for group in self.groups if group.rule is not None]  # DoRA's magnitude
        self._stats = self._task_stats = _empty_stats()

    # ---- setup -------------------------------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Whether steps are projected: once the memory holds a task (none during task 1). Decided from the bases
        themselves as well, so that no metadata can switch the protection of stored directions off."""
        self._refresh()
        return self.memory.tasks_seen > 0 or not self.memory.is_empty or bool(self._masks.groups)

    def _refresh(self) -> None:
        # the memory may have been replaced (resume from a checkpoint) or grown (end of a task); with gp_task_slices
        # its task count picks the slice that trains (an error past the last), whose input side leaves the old span
        memory = self._state.memory
        if memory is not self.memory or self._memory_state != (id(memory), memory.version):
            task_id = training_slice(self.groups, memory.tasks_seen, self.adapter_name)
            self.memory = memory
            self._units = make_units(self.groups, task_id)
            scaled, copies = self.config.gp_importance_scale is not None, {}
            for unit in self._units:
                unit.load_basis(memory, scaled, copies)
            if task_id is not None:
                prepare_slices(self.groups, memory)
                self._masks.set_task(task_id)
            self._memory_state = (id(memory), memory.version)

    def _rebind(self) -> None:
        # fully_shard (FSDP2) replaced the model's parameters by sharded ones since: work on the new ones, each rank
        # on its own rows (wiring.sharding), or refuse the groups that cannot be projected that way
        refresh_groups(self._model, self._state)
        if self.groups is not self._state.groups:
            self.groups = self._state.groups
            self._masks = SliceMasks(self.groups)
            self._rules = [(group.rule, None) for group in self.groups if group.rule is not None]
            self._memory_state = None
        check_shardable(self.groups)

    def attach(self, optimizer: torch.optim.Optimizer) -> GPProjector:
        """Register the projection hooks on ``optimizer`` (the raw one inside any wrapper). Idempotent."""
        self._rebind()
        optimizer = raw_optimizer(optimizer)
        if self._optimizer is optimizer:
            return self
        self.detach()
        self._refresh()  # past the last of gp_task_slices: refused here, before the task trains
        self._masks.attach()
        self._handles = [
            optimizer.register_step_pre_hook(lambda opt, args, kwargs: self._before_step()),
            optimizer.register_step_post_hook(lambda opt, args, kwargs: self._after_step()),
        ]
        self._optimizer = optimizer
        self._state.guard.attached += 1
        self._task_stats = _empty_stats()
        uncovered = uncovered_parameters(self._model, self.adapter_name)
        if uncovered:
            warnings.warn(
                f"{len(uncovered)} trainable parameter(s) are not protected by gradient projection and will change "
                f"old-task outputs: {uncovered[:6]}{' ...' if len(uncovered) > 6 else ''}. Freeze them "
                "(requires_grad_(False)), or put the module in modules_to_save (gp_modules_to_save='project').",
                UnprotectedTrainingWarning,
                stacklevel=2,
            )
        return self

    def detach(self) -> None:
        """Remove the hooks from the optimizer they were attached to; warn about the task that ends if its gradients
        were mostly removed (full layers) or not finite."""
        if self._optimizer is not None:
            self._state.guard.attached -= 1
            _warn_about_task(self._task_stats, self.memory)
        for handle in self._handles:
            handle.remove()
        self._masks.detach()
        self._handles, self._optimizer, self._snapshots = [], None, None

    # ---- the projection ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def project_gradients(self) -> None:
        """Project the ``.grad`` of every protected parameter in place (called before each optimizer step)."""
        if self.active:
            self._project_gradients()

    def _project_gradients(self) -> None:
        total = removed = non_finite = None
        for unit in self._units:
            grads = [p.grad for p in unit.parameters]
            if any(g is None for g in grads):
                continue
            grads = unit.blocks([local(grad) for grad in grads])  # sharded (FSDP2): this rank's rows
            if unit.frozen:
                for grad in grads:
                    grad.zero_()
                continue
            if unit.basis is None:
                continue
            joined = unit.joined(grads)
            inside = (joined @ unit.basis) @ unit.weights.mT  # weights: the basis, importance-scaled with SGP
            # a NaN or inf would spread through the projection to every entry of its row: leave such a unit as it is
            finite = torch.isfinite(joined).all()
            square, removed_square = joined.square().sum(), inside.square().sum()
            total = _add(total, torch.where(finite, square, 0.0))
            removed = _add(removed, torch.where(finite, removed_square, 0.0))
            non_finite = _add(non_finite, (~finite).float())
            for grad, new in zip(grads, unit.split(torch.where(finite, joined - inside, joined))):
                grad.copy_(new)
        if total is not None:  # kept on the device: no sync until the next log
            for stats in (self._stats, self._task_stats):
                stats["grad_sq"] = stats["grad_sq"] + total.float()
                stats["removed_sq"] = stats["removed_sq"] + removed.float()
                stats["non_finite"] = stats["non_finite"] + non_finite
                stats["steps"] += 1

    @torch.no_grad()
    def _before_step(self) -> None:
        if not self.active:  # one memory check per step; nothing happens during the first task
            return
        self._project_gradients()
        update_mode = self.config.gp_projection == "update"
        self._snapshots = [
            [block.detach().clone() for block in unit.blocks([local(param) for param in unit.parameters])]
            if unit.frozen or (update_mode and unit.basis is not None)
            else None
            for unit in self._units
        ]
        self._rules = [(rule, rule.before()) for rule, _ in self._rules]

    @torch.no_grad()
    def _after_step(self) -> None:
        if self._snapshots is None:
            return
        for unit, old in zip(self._units, self._snapshots):
            if old is None:
                continue
            params = unit.blocks([local(param.detach()) for param in unit.parameters])
            if unit.frozen:
                for param, before in zip(params, old):
                    param.copy_(before)
                continue
            joined = unit.joined([param - before for param, before in zip(params, old)])
            projected = joined - (joined @ unit.basis) @ unit.weights.mT
            deltas = unit.split(torch.where(torch.isfinite(joined).all(), projected, joined))
            for param, before, delta in zip(params, old, deltas):
                param.copy_(before + delta.to(param.dtype))
        for rule, state in self._rules:  # after the frozen groups were restored
            rule.after(state)
        self._snapshots = None

    # ---- statistics --------------------------------------------------------------------------------------------

    def reset_stats(self) -> None:
        self._stats = _empty_stats()

    def pop_stats(self) -> dict[str, float]:
        """Share of the gradient norm² removed by the projection since the last call (for logging)."""
        stats = self._stats
        self.reset_stats()
        if stats["steps"] == 0:
            return {}
        share = (stats["removed_sq"] / stats["grad_sq"].clamp_min(1e-30)).item()
        return {"gp_grad_removed": share}


def _empty_stats() -> dict:
    return {"grad_sq": 0.0, "removed_sq": 0.0, "non_finite": 0.0, "steps": 0}


def _add(total, value):
    return value if total is None else total + value


FLAT_SHARE = 0.99  # a task whose projection removed this share of its gradient could barely learn


def _warn_about_task(stats: dict, memory) -> None:
    """One warning per task: non-finite gradients left unprojected, or a task whose gradient was almost all
    removed (its layers' spaces are full)."""
    if stats["steps"] == 0:
        return
    non_finite = float(stats["non_finite"])
    if non_finite > 0:
        warnings.warn(
            f"Non-finite gradients (NaN or inf) reached {non_finite:.0f} projected block(s) in this task: they were "
            "left unprojected, so those steps did not protect the old tasks there. Check the loss, the learning "
            "rate and mixed precision (the Trainer's logging_nan_inf_filter hides such losses from the logs).",
            UnprotectedTrainingWarning,
            stacklevel=3,
        )
    share = float(stats["removed_sq"] / max(float(stats["grad_sq"]), 1e-30))
    if share >= FLAT_SHARE:
        full = memory.full_groups()
        where = (
            f"Full layers ({len(full)}): {full[:6]}{' ...' if len(full) > 6 else ''}"
            if full
            else "No layer's space is full: this task's gradients lie in the old tasks' spaces"
        )
        warnings.warn(
            f"Gradient projection removed {100 * share:.1f}% of this task's gradient: it could barely learn. {where}. "
            "Lower gp_threshold, or widen the layers' spaces (LoRA rank, bottleneck size, virtual tokens).",
            GPCapacityWarning,
            stacklevel=3,
        )
