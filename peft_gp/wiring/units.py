"""What one projection step acts on: a group, or a run of equal column blocks of one parameter (a prefix's heads)
projected together with one batched matmul."""

from __future__ import annotations

import torch
from torch import nn

from .groups import ProjectedGroup
from .slices import slice_groups


class Unit:
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
        self.weights: torch.Tensor | None = None  # the basis with importance-scaled columns (SGP), else the basis
        if len(groups) > 1:
            self.start, self.width = first.index[1].start, first.index[1].stop - first.index[1].start
            self.transpose = first.transpose

    def blocks(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Views of the unit's block of each tensor (writing to them writes to the tensors), feature axis last."""
        if len(self.groups) == 1:
            return [self.groups[0].view(tensors[0]), *map(self.groups[0].bias_view, tensors[1:])]
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

    def load_basis(self, memory, scaled: bool = False, copies: dict | None = None) -> None:
        """The unit's basis ``M`` from ``memory``, and ``weights``: ``M`` with each column scaled by its importance
        (``scaled``, SGP: a projection ``G − G M Λ Mᵀ``; directions without one count 1), else ``M`` itself.
        ``copies``: the device copies made so far, so that groups sharing a basis (``q/k/v``) share one copy."""
        dtype = self.parameters[0].dtype
        compute_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        device = self.parameters[0].device
        copies = {} if copies is None else copies
        bases = []
        for group in self.groups:
            basis = memory.bases[group.name]
            key = (id(basis), device, compute_dtype)
            if key not in copies:
                copies[key] = (basis, basis.to(device, compute_dtype))  # the source held: its id stays its own
            bases.append(copies[key][1])
        if scaled:
            weights = [basis * memory.importances[group.name].to(basis) if group.name in memory.importances else basis
                       for basis, group in zip(bases, self.groups)]  # fmt: skip
        else:
            weights = bases
        width = max(basis.shape[1] for basis in bases)
        if width == 0:
            self.basis = self.weights = None
        elif len(bases) == 1:
            self.basis, self.weights = bases[0], weights[0]
        else:
            self.basis, self.weights = (
                torch.stack([nn.functional.pad(basis, (0, width - basis.shape[1])) for basis in tensors])
                for tensors in (bases, weights)
            )


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


def make_units(groups: list[ProjectedGroup], task_id: int | None = None) -> list[Unit]:
    """Group consecutive column blocks of one parameter (equal width, same orientation) into batched units; a sliced
    group (``gp_task_slices``) becomes one unit per block while task ``task_id`` trains (``slices.slice_groups``)."""
    units: list[list[ProjectedGroup]] = []
    for group in groups:
        if group.slices is not None:
            units += [[part] for part in slice_groups(group, task_id)]
            continue
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
    return [Unit(run) for run in units]
