"""Sharded parameters (FSDP2's ``fully_shard``): what the projection can do with them, and what it refuses.

``fully_shard`` turns every parameter into a ``DTensor`` split along dim 0 (``Shard(0)``): each rank holds a block of
whole rows, and the gradients it sees in the optimizer step are the same rows of the averaged gradient. The
projection ``G (I − M Mᵀ)`` acts on the last (feature) axis, one row at a time, so each rank projects its own rows
with the full basis (``local``): no communication beyond what training already does. The memory update needs none
either: activations are whole on every rank, each rank passes its own examples and the Gram matrices are summed over
ranks as under DDP (``grams``).

Groups that are projected along their first axis (``transpose``), that own a block of a parameter's rows (``index``
on dim 0: BD-LoRA, grouped convolutions), that follow a rule (DoRA's magnitude), that train per-task slices, or whose
features are read from another parameter (LoRA on embeddings, ``nn.MultiheadAttention``, ``target_parameters``,
prefix and prompt tuning) are refused on sharded parameters (``check_shardable``): each rank would see rows it cannot
place, or a parameter it does not hold whole. FSDP1 (flattened parameters) and sharding along any other axis are
refused too.
"""

from __future__ import annotations

import torch
from torch import nn

from .features import ConvPatches, NoFeatures, TokenCounts
from .groups import PooledHeadFeatures, ProjectedGroup

try:  # torch built without torch.distributed (some macOS / mobile builds): nothing can be sharded
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
except ImportError:  # pragma: no cover - depends on the torch build
    DTensor = FSDPModule = None

SHARDED_FIX = (
    "Train with DDP instead (torchrun, or accelerate without FSDP): PEFT adapters are small enough to replicate; or "
    "leave this layer out of the adapter."
)
# feature readers that need nothing but the feature module's input (no parameter of the adapter read on the side)
_LOCAL_ROWS = (type(None), ConvPatches, TokenCounts)
_LOCAL_SOURCES = (type(None), NoFeatures, PooledHeadFeatures)


def is_sharded(tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter, gradient or buffer of a ``fully_shard``-ed module)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that ``fully_shard`` (FSDP2) sharded."""
    return [module for module in model.modules() if FSDPModule is not None and isinstance(module, FSDPModule)]


def reshard(model: nn.Module) -> bool:
    """Bring every ``fully_shard``-ed module of ``model`` to its sharded state (a no-op where it already is);
    returns whether there was one. Between a forward and the next backward FSDP2 may keep a module's parameters
    gathered, with plain tensors in the module's attributes in place of the sharded ones the optimizer holds: the
    groups must be resolved on the sharded ones."""
    modules = fsdp_modules(model)
    for module in modules:
        module.reshard()
    return bool(modules)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's block of rows of a sharded tensor (writing to it writes to the tensor); a plain tensor as it is."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (an all-gather for a sharded one); a plain tensor as it is."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


@torch.no_grad()
def write(param: torch.Tensor, value: torch.Tensor) -> None:
    """``param.copy_(value)`` for a whole ``value`` that every rank holds alike: a sharded ``param`` takes its rows."""
    if not is_sharded(param):
        param.copy_(value.to(param.dtype))
        return
    rows = distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements)
    local(param).copy_(rows.to_local())


def _rows_only(tensor) -> bool:
    """Sharded along dim 0 only (FSDP2's default; ``Replicate`` on a second mesh axis, HSDP, is fine)."""
    return all(isinstance(p, Replicate) or (isinstance(p, Shard) and p.dim == 0) for p in tensor.placements)


def _why_not(group: ProjectedGroup) -> str | None:
    """Why ``group`` cannot be projected one rank's rows at a time (``None``: it can)."""
    if any(getattr(param, "_fsdp_flattened", False) for param in group.parameters):
        return "it is a flattened FSDP1 parameter; use FSDP2 (fully_shard, or accelerate's fsdp_version=2)"
    sharded = [param for param in group.parameters if is_sharded(param)]
    if not sharded:
        return None
    if not all(_rows_only(param) for param in sharded):
        return f"it is sharded as {sharded[0].placements}, not along its rows (Shard(0)) only"
    if group.transpose:
        return "it is projected along its first axis, the one FSDP shards"
    if group.index is not None and group.index[0] != slice(None):
        return "it owns a block of the parameter's rows, which FSDP spreads over ranks"
    if group.rule is not None or group.slices is not None:
        return "its update follows a rule (DoRA's magnitude) or per-task slices (gp_task_slices) over whole rows"
    if not isinstance(group.rows, _LOCAL_ROWS) or not isinstance(group.source, _LOCAL_SOURCES):
        return "its features are read from another parameter or inside attention, not from a module's input"
    return None


def check_shardable(groups: list[ProjectedGroup]) -> None:
    """Refuse, naming the group and the reason, groups whose sharded parameters cannot be projected rank by rank."""
    for group in groups:
        why = _why_not(group)
        if why is not None:
            raise NotImplementedError(
                f"{group.name} is sharded (FSDP/DTensor), and peft_gp cannot project it on each rank's rows: {why}. "
                f"{SHARDED_FIX}"
            )
