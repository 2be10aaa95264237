"""The memory update's passes and peak memory for ``peft-gp plan``, split as the update splits them
(``wiring.passes``).

Per pass: while the sample streams, each distinct input holds its float64 Gram sum and the batch's Gram being added
(``2 · 8 d²``); then each Gram is decomposed in turn beside the pass's sums (``core.maths.grow_basis``: about
``5 d²`` float64 for the widest, measured on CPU) and the pass's new float32 bases are made. The peak of a pass is the
larger of the two phases; the update's, the largest over passes. With several passes the new bases go to the CPU
after each pass, so only one pass's are counted; in one pass, all of them. The batch's Gram is counted at 8 bytes
also under ``gp_gram_dtype="float32"`` (a float32 product, 4): conservative by ``4 d²`` per input while streaming.

An input sketched under ``gp_sketch_above`` (``wiring.sketches``) holds its ``2ℓ × d`` float64 buffer instead of the
Gram (no batch Gram beside it: a batch's rows are inserted as they come) and, while it shrinks or is decomposed, an SVD
of that buffer (about ``3 · 2ℓ d`` float64 beside it: factors, LAPACK workspace and the shrunk rows, measured on CPU
for ``2ℓ = 1024, d = 14336``), one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

from .wiring.passes import GB, input_bytes, pack, unit_costs, units
from .wiring.sketches import sketch_bytes, sketch_rows

EIGH_WORKSPACE = 5  # d² float64 of one grow_basis: residual, eigenvectors, LAPACK, copies (measured on CPU)
SVD_WORKSPACE = 3  # sketch buffers beside one sketch's SVD (2.4–2.6 measured on CPU, plus the shrunk rows)
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


def held_bytes(dim: int, rows: int | None = None) -> int:
    """Bytes of one distinct input's Gram sum (or, sketched with ``rows`` = ℓ, its sketch), kept until its pass
    decomposes it."""
    return input_bytes(dim) // 2 if rows is None else sketch_bytes(dim, rows)


def _work_bytes(dim: int, rows: int | None) -> int:
    """Bytes of one input's decomposition beside the sums: its Gram's eigendecomposition, or its sketch's SVD."""
    return EIGH_WORKSPACE * dim * dim * 8 if rows is None else SVD_WORKSPACE * sketch_bytes(dim, rows)


def update_cost(groups, owners: dict[str, str], widths: tuple[dict, dict], config) -> UpdateCost:
    """The ``UpdateCost`` of storing one task under ``config``'s ``gp_update_budget_gb`` and ``gp_sketch_above``:
    ``owners`` maps each group to the group whose Gram and basis it shares, ``widths`` the basis widths ``(every
    basis full, at the fill)``."""
    budget_gb = config.gp_update_budget_gb
    sketched = sketch_rows(groups, config.gp_sketch_above, config.gp_sketch_rows)
    dims = {group.name: group.dim for group in groups}
    classes: dict[str, list[str]] = {}
    for group in groups:
        classes.setdefault(owners[group.name], []).append(group.name)
    classes_list = list(classes.values())
    joined = units(groups, classes_list)
    budget = None if budget_gb is None else budget_gb * GB
    passes = pack(joined, unit_costs(joined, classes_list, dims, sketched), budget)
    peaks_full, peaks, sums_of = [], [], []
    for members in passes:
        held = [name for name in members if owners[name] == name]
        sums = sum(held_bytes(dims[name], sketched.get(name)) for name in held)
        work = max(_work_bytes(dims[name], sketched.get(name)) for name in held)
        shrink = max([_work_bytes(dims[name], sketched[name]) for name in held if name in sketched], default=0)
        streaming = sum(unit_costs([held], [[name] for name in held], dims, sketched)) + shrink
        for ks, peaks_of in zip(widths, (peaks_full, peaks)):
            bases = sum(dims[name] * ks[name] * BASIS_BYTES for name in held)
            peaks_of.append(max(streaming, sums + work + bases))
        sums_of.append(sums)
    return UpdateCost(passes=len(passes), gram_bytes=sum(sums_of), pass_gram_bytes=max(sums_of),
                      peak_bytes_full=max(peaks_full), peak_bytes=max(peaks))  # fmt: skip
