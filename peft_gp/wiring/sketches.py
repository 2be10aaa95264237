"""Which inputs a memory update sketches (``gp_sketch_above``) instead of summing their Gram matrix, and how the
sketches of several processes merge.

An input read through forward hooks (LoRA, the bottleneck adapter) whose feature dimension ``d`` is above
``gp_sketch_above`` streams its residual rows into a Frequent Directions sketch of ``gp_sketch_rows`` rows
(``core.sketch``): ``2ℓ · d`` float64 instead of the ``d × d`` Gram, an SVD of a ``2ℓ × d`` matrix instead of a
``d × d`` eigendecomposition. Features of a source of their own (prefix queries, prompt rows) keep their Gram.
Under ``torch.distributed`` a sketch cannot be all-reduced: every process gathers the others' sketch rows and inserts
them in rank order into its own (FD sketches merge with the same bound), so all processes hold the same sketch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..core.sketch import FrequentDirections

GRAM_BYTES = 8  # float64


@dataclass
class SketchSpec:
    """How one group's input is sketched: ``rows`` (ℓ), the old ``basis`` (float64, on the update's device) its rows
    are made residual against, and ``key``, equal for groups whose old bases are one tensor (or both empty)."""

    rows: int
    basis: torch.Tensor
    key: tuple[int, int]


def sketch_rows(groups, above: int | None, rows: int) -> dict[str, int]:
    """``{group: ℓ}`` for the groups read through forward hooks whose ``d`` is above ``above`` (``None``: none)."""
    if above is None:
        return {}
    return {group.name: rows for group in groups if group.source is None and group.dim > above}


def sketch_specs(groups, bases: dict[str, torch.Tensor], above: int | None, rows: int, device) -> dict:
    """The ``SketchSpec`` of every sketched group (``sketch_rows``), one float64 copy per distinct old basis."""
    copies: dict[tuple[int, int], torch.Tensor] = {}
    specs = {}
    for name, ell in sketch_rows(groups, above, rows).items():
        basis = bases[name]
        key = (basis.shape[0], 0 if basis.shape[1] == 0 else id(basis))
        if key not in copies:
            copies[key] = basis.detach().to(device=device, dtype=torch.float64)
        specs[name] = SketchSpec(ell, copies[key], key)
    return specs


def sketch_bytes(dim: int, rows: int) -> int:
    """Bytes one sketched input holds while the sample streams: its ``2ℓ × d`` float64 buffer."""
    return 2 * rows * dim * GRAM_BYTES


def is_sketch(value) -> bool:
    return isinstance(value, FrequentDirections)


def has_features(value) -> bool:
    """Whether a Gram matrix or a sketch saw any non-zero feature."""
    if is_sketch(value):
        return bool(value.energies[0].item() > 0)
    return bool(torch.any(value != 0))


def merge_across_processes(sketch: FrequentDirections) -> None:
    """Make every process's ``sketch`` the merge of all of theirs: energies summed, the sketch rows of ranks
    ``0, 1, ...`` inserted in that order into an empty buffer (the same computation, hence the same bits, on every
    process)."""
    rows = sketch.sketch_rows()
    buffer = torch.zeros(2 * sketch.rows, sketch.dim, dtype=torch.float64, device=sketch.device)
    buffer[: rows.shape[0]] = rows
    count = torch.tensor([rows.shape[0]], dtype=torch.int64, device=sketch.device)
    world = dist.get_world_size()
    buffers, counts = [torch.empty_like(buffer) for _ in range(world)], [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(buffers, buffer)
    dist.all_gather(counts, count)
    dist.all_reduce(sketch.energies)
    dist.all_reduce(sketch.moments)
    sketch.buffer, sketch.filled = None, 0
    for rank_rows, rank_count in zip(buffers, counts):
        sketch.insert(rank_rows[: int(rank_count.item())])
