"""Which projected groups read the same input, found during the memory update's forward passes, and their shared Grams.

Layers that read one activation (``q/k/v`` on the attention's normalised input, ``gate/up`` on the MLP's) have equal
feature rows, hence one Gram matrix and, from equal old bases, one new basis: the memory keeps it once (DESIGN.md §4).
The sharing is found from what the forward hooks see, never from module names: in each forward pass the inputs a
group's hook receives are matched against the inputs already seen in that pass, first by identity (the same tensor
object, as PyTorch passes one activation to every sibling layer), then by content (``torch.equal``: PEFT casts a bf16
base model's activation to a float32 adapter's dtype once per layer, so siblings then get equal copies). Two groups
share a Gram as long as they received the same inputs, in the same order, in every batch so far; once they differ in
a batch the shared sum is split (copied), so sharing is never assumed, only observed, and the sums equal the ones
each group would have built alone, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class ForwardInputs:
    """The distinct inputs of one forward pass, each with its Gram matrix, matched by identity then by content."""

    def __init__(self) -> None:
        self.grams: list[torch.Tensor] = []
        self.first: list[torch.Tensor] = []  # the first tensor of each distinct input, for content matches
        # (id, kind) -> (tensor, index): the tensor is held for the pass, so no other tensor reuses its id meanwhile
        self.seen: dict[tuple, tuple[torch.Tensor, int]] = {}
        self.by_content: dict[tuple, list[int]] = {}

    @staticmethod
    def _probe(inputs: torch.Tensor, kind: tuple) -> tuple | None:
        """A cheap key narrowing the content search (shape, dtype, device, first and last value); ``None`` on meta."""
        if inputs.is_meta or inputs.numel() == 0:
            return None
        ends = torch.stack([inputs[(0,) * inputs.dim()], inputs[(-1,) * inputs.dim()]]).tolist()
        return (tuple(inputs.shape), inputs.dtype, inputs.device, kind, *ends)

    def find(self, inputs: torch.Tensor, kind: tuple) -> int | None:
        """The index of an input seen earlier in this pass that ``inputs`` is or equals (read as ``kind``)."""
        seen = self.seen.get((id(inputs), kind))
        if seen is not None and seen[0] is inputs:
            return seen[1]
        probe = self._probe(inputs, kind)
        for index in self.by_content.get(probe, []) if probe is not None else []:
            if torch.equal(self.first[index], inputs):
                self.seen[(id(inputs), kind)] = (inputs, index)
                return index
        return None

    def add(self, inputs: torch.Tensor, kind: tuple, gram: torch.Tensor) -> int:
        """Record a new distinct input and its Gram matrix; returns its index."""
        index = len(self.grams)
        self.grams.append(gram)
        self.first.append(inputs)
        self.seen[(id(inputs), kind)] = (inputs, index)
        probe = self._probe(inputs, kind)
        if probe is not None:
            self.by_content.setdefault(probe, []).append(index)
        return index


class SharedGrams:
    """Gram sums of the groups read through forward hooks, one per class of groups that read the same inputs.

    ``classes`` is a list of ``(member names, summed Gram or None)``; members of one class hold one tensor.
    """

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        self.classes: list[tuple[list[str], torch.Tensor | None]] = [(list(names), None)] if names else []

    def add_batch(self, uses: dict[str, list[int]], grams: list[torch.Tensor]) -> None:
        """Add one batch: ``uses[name]`` lists the inputs (indices into ``grams``) each group received, in order.
        A class whose members received different inputs splits, each part with a copy of the sum so far."""
        classes = []
        for members, total in self.classes:
            parts: dict[tuple, list[str]] = {}
            for name in members:
                parts.setdefault(tuple(uses.get(name, ())), []).append(name)
            totals = [total] + [None if total is None else total.clone() for _ in range(len(parts) - 1)]
            for (signature, part), part_total in zip(parts.items(), totals):
                for index in signature:
                    part_total = _sum_of(grams[index]) if part_total is None else part_total.add_(grams[index])
                classes.append((part, part_total))
        self.classes = classes

    def agree(self, reduce_min_max: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Under ``torch.distributed``: keep only the sharing every process observed (each process saw its own
        batches), so that the processes hold the same classes, in the same order, before their sums are added up.
        ``reduce_min_max`` returns the element-wise minimum and maximum of a tensor over the processes."""
        order = {name: position for position, name in enumerate(self.names)}
        leaders = torch.empty(len(self.names), dtype=torch.int64)
        for members, _ in self.classes:
            leaders[[order[name] for name in members]] = order[members[0]]
        low, high = reduce_min_max(leaders)
        agreed = {name: int(leaders[order[name]]) if low[order[name]] == high[order[name]] else order[name]
                  for name in self.names}  # fmt: skip
        classes = []
        for members, total in self.classes:
            parts: dict[int, list[str]] = {}
            for name in members:
                parts.setdefault(agreed[name], []).append(name)
            for position, part in enumerate(parts.values()):
                classes.append((part, total if position == 0 or total is None else total.clone()))
        self.classes = classes

    def fill(self, dims: dict[str, int], device, empty: Callable[[str], object] | None = None) -> None:
        """Give the groups that received no input a zero Gram, one per dimension (they may differ in it); ``empty``
        makes it from the name of the first group of that dimension (an empty sketch, ``wiring.sketches``)."""
        classes = []
        for members, total in self.classes:
            if total is not None:
                classes.append((members, total))
                continue
            for dim in dict.fromkeys(dims[name] for name in members):
                same = [name for name in members if dims[name] == dim]
                zeros = torch.zeros(dim, dim, dtype=torch.float64, device=device) if empty is None else empty(same[0])
                classes.append((same, zeros))
        self.classes = classes

    def distinct(self) -> list[torch.Tensor]:
        """The Gram sums, one per class, in the order of their first member (the same on every process)."""
        order = {name: position for position, name in enumerate(self.names)}
        return [total for members, total in sorted(self.classes, key=lambda item: order[item[0][0]])]

    def by_name(self) -> dict[str, torch.Tensor]:
        """Each group's Gram; the groups of one class map to the same tensor."""
        return {name: total for members, total in self.classes for name in members}


def _sum_of(gram):
    """A new sum from a batch's Gram: a float64 copy (a float32 product, ``gp_gram_dtype``, is summed in float64), or
    a sketch's copy."""
    if isinstance(gram, torch.Tensor) and gram.dtype != torch.float64:
        return gram.to(torch.float64)
    return gram.clone()
