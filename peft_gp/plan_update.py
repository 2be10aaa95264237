"""The memory update's passes and peak memory for ``peft-gp plan``, split as the update splits them
(``wiring.passes``).

Per pass: while the sample streams, each distinct input holds its float64 Gram sum and the batch's Gram being added
(``2 · 8 d²``); then each Gram is decomposed in turn beside the pass's sums (``core.maths.grow_basis``: about
``5 d²`` float64 for the widest, measured on CPU) and the pass's new float32 bases are made. The peak of a pass is the
larger of the two phases; the update's, the largest over passes. With several passes the new bases go to the CPU
after each pass, so only one pass's are counted; in one pass, all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .wiring.passes import GB, input_bytes, pack, unit_costs, units

EIGH_WORKSPACE = 5  # d² float64 of one grow_basis: residual, eigenvectors, LAPACK, copies (measured on CPU)
BASIS_BYTES = 4  # float32 bases


@dataclass
class UpdateCost:
    """A memory update's passes, the Gram bytes of all and of the largest pass, and its peak memory
    (every basis full, and at the plan's fill)."""

    passes: int
    gram_bytes: int
    pass_gram_bytes: int
    peak_bytes_full: int
    peak_bytes: int


def held_bytes(dim: int) -> int:
    """Bytes of one distinct input's Gram sum, kept until its pass decomposes it."""
    return input_bytes(dim) // 2


def update_cost(groups, owners: dict[str, str], widths: tuple[dict, dict], budget_gb: float | None) -> UpdateCost:
    """The ``UpdateCost`` of storing one task: ``owners`` maps each group to the group whose Gram and basis it shares,
    ``widths`` the basis widths ``(every basis full, at the fill)``."""
    dims = {group.name: group.dim for group in groups}
    classes: dict[str, list[str]] = {}
    for group in groups:
        classes.setdefault(owners[group.name], []).append(group.name)
    classes_list = list(classes.values())
    joined = units(groups, classes_list)
    budget = None if budget_gb is None else budget_gb * GB
    passes = pack(joined, unit_costs(joined, classes_list, dims), budget)
    peaks_full, peaks, sums_of = [], [], []
    for members in passes:
        held = [name for name in members if owners[name] == name]
        sums = sum(held_bytes(dims[name]) for name in held)
        work = max(EIGH_WORKSPACE * dims[name] ** 2 * 8 for name in held)
        for ks, peaks_of in zip(widths, (peaks_full, peaks)):
            bases = sum(dims[name] * ks[name] * BASIS_BYTES for name in held)
            peaks_of.append(max(2 * sums, sums + work + bases))
        sums_of.append(sums)
    return UpdateCost(passes=len(passes), gram_bytes=sum(sums_of), pass_gram_bytes=max(sums_of),
                      peak_bytes_full=max(peaks_full), peak_bytes=max(peaks))  # fmt: skip
