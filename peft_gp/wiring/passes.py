"""A memory update in bounded passes: the projected groups split so that each pass's Grams fit a budget.

Every distinct input holds a float64 ``d × d`` Gram sum while the task's sample streams, beside the Gram of the batch
being added (``wiring.grams``): ``2 · 8 d²`` bytes. When the groups' Grams exceed ``gp_update_budget_gb``, the groups
are split into passes; the sample is streamed once per pass with hooks on that pass's groups only. Groups that must
see one another's Grams stay in one pass: those that read the same input (one shared Gram and basis, found as the
update finds them: a probe of the first batch through the same hooks, without Grams) and a layer's input and output
sides (``collect._idle_input_sides``). Models whose Grams fit take one pass, without the probe. The sample must read
the same on every pass: one-shot iterators (generators) and shuffling ``DataLoader``s are read once into a list of
batches (at most ``max_samples`` examples, as they come).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, SequentialSampler

from .batches import capped_batches
from .grams import GramCollector
from .groups import ProjectedGroup
from .sketches import sketch_bytes

GB = 1e9
GRAM_BYTES = 8  # float64


def input_bytes(dim: int) -> int:
    """Bytes one distinct input holds while the sample streams: its Gram sum and one batch's Gram."""
    return 2 * GRAM_BYTES * dim * dim


def units(groups: list[ProjectedGroup], classes: list[list[str]]) -> list[list[str]]:
    """Groups that go into one pass: each class of groups reading one input, joined with the classes of their input
    or output sides; in the model's order."""
    order = {group.name: position for position, group in enumerate(groups)}
    parent = {name: name for name in order}

    def root(name: str) -> str:
        while parent[name] != name:
            name = parent[name]
        return name

    def join(first: str, second: str) -> None:
        low, high = sorted((root(first), root(second)), key=order.__getitem__)
        parent[high] = low

    for members in classes:
        for name in members[1:]:
            join(members[0], name)
    for group in groups:
        if group.output_side is not None and group.output_side.name in order:
            join(group.name, group.output_side.name)
    joined: dict[str, list[str]] = {}
    for group in groups:
        joined.setdefault(root(group.name), []).append(group.name)
    return sorted(joined.values(), key=lambda members: order[members[0]])


def pack(units: list[list[str]], costs: list[int], budget: float | None) -> list[list[str]]:
    """Consecutive units into passes whose costs add up to at most ``budget`` (a unit over it: a pass of its own)."""
    passes: list[list[str]] = []
    held = 0
    for members, cost in zip(units, costs):
        if not passes or (budget is not None and held + cost > budget):
            passes.append([])
            held = 0
        passes[-1].extend(members)
        held += cost
    return passes


def unit_costs(units: list[list[str]], classes: list[list[str]], dims: dict, sketched: dict | None = None) -> list:
    """Each unit's bytes while streaming: one ``input_bytes`` per class of groups reading one input, or for an input
    sketched with ``ℓ = sketched[name]`` rows its ``sketch_bytes``."""
    leader = {name: members[0] for members in classes for name in members}
    sketched = sketched or {}
    costs = []
    for members in units:
        inputs = dict.fromkeys(leader.get(name, name) for name in members)
        costs.append(sum(sketch_bytes(dims[name], sketched[name]) if name in sketched else input_bytes(dims[name])
                         for name in inputs))  # fmt: skip
    return costs


class _Probe(GramCollector):
    """The update's hooks without Grams: which groups read the same inputs (``shared_grams``), at no Gram's cost."""

    def gram_of(self, group, inputs, masked):
        return torch.zeros((), dtype=torch.float64)


def probe_classes(model, groups: list[ProjectedGroup], batch: Mapping) -> list[list[str]]:
    """The classes of groups that read the same inputs in one batch (groups with a source of their own: alone)."""
    hooked = [g for g in groups if g.source is None]
    probe = _Probe(model, hooked)
    if hooked:
        probe.run([batch], None)
    return [members for members, _ in probe.shared.classes] + [[g.name] for g in groups if g.source is not None]


def rereadable(batches: Iterable, max_samples: int | None) -> Iterable:
    """``batches`` if reading it again surely gives the same batches (a list, a tuple, or a ``DataLoader`` reading
    its dataset in order); else its batches read once into a list (at most ``max_samples`` examples, the memory
    sample): one-shot iterators, wrappers of them (a progress bar), loaders that shuffle (through ``sampler`` or
    ``batch_sampler``) or sample in their own way."""
    if isinstance(batches, (list, tuple)) or (isinstance(batches, DataLoader) and _in_order(batches)):
        return batches
    return [batch for batch, _ in capped_batches(batches, max_samples)]


def _in_order(loader: DataLoader) -> bool:
    sampler = getattr(loader.batch_sampler, "sampler", None) if loader.batch_sampler is not None else loader.sampler
    return isinstance(sampler, SequentialSampler) and isinstance(loader.sampler, SequentialSampler)


def memory_passes(
    model, groups: list[ProjectedGroup], batches: Iterable, budget_gb: float | None, max_samples: int | None,
    sketched: dict[str, int] | None = None,
) -> tuple[list[list[ProjectedGroup]], Iterable]:  # fmt: skip
    """The groups of each pass of a memory update under ``budget_gb`` and the batches to stream once per pass;
    ``sketched``: ``{group: ℓ}`` of the inputs sketched (``sketches.sketch_rows``), costed as their sketches."""
    budget = None if budget_gb is None else budget_gb * GB
    dims = {group.name: group.dim for group in groups}
    alone = [[group.name] for group in groups]
    if budget is None or sum(unit_costs(alone, alone, dims, sketched)) <= budget:
        return [groups], batches  # everything fits, even unshared: one pass, no probe
    batches = rereadable(batches, max_samples)
    first = next(iter(batches), None)
    classes = alone if first is None else probe_classes(model, groups, first)
    joined = units(groups, classes)
    names = pack(joined, unit_costs(joined, classes, dims, sketched), budget)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        shared = [names]
        dist.broadcast_object_list(shared, src=0)  # every process streams the same passes
        names = shared[0]
    by_name = {group.name: group for group in groups}
    return [[by_name[name] for name in members] for members in names], batches
