"""``GPMemory``: the orthonormal bases of all finished tasks, one per projected group, and their file."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import save as save_safetensors_bytes

from ..core import maths
from ..core.files import atomic_write_bytes
from ..core.sketch import FrequentDirections, grow
from .memory_file import FORMAT_VERSION, IMPORTANCE_SUFFIX, GPMemoryError, read_memory_file

GP_MEMORY_NAME = "gp_memory.safetensors"


def compact_form(basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For a ``(d, k)`` basis with ``k > d − k``: ``(basis', complement)``, the ``(d, d − k)`` float32 complement the
    file stores and the basis rebuilt from it (the span of ``basis`` up to float32 rounding), which the memory then
    uses, so that a loaded memory equals the saved one bit for bit. A full basis (``k = d``) becomes the identity and
    an empty complement: a flag, not a matrix. ``None`` when the basis is the smaller of the two."""
    if 2 * basis.shape[1] <= basis.shape[0]:
        return None
    stored = maths.complement(basis).to(torch.float32)
    return maths.complement(stored).to(torch.float32), stored


@dataclass
class GrownBases:
    """The new bases of some groups (``GPMemory.grow``) with their importances, complements and growth report."""

    bases: dict[str, torch.Tensor] = field(default_factory=dict)
    importances: dict[str, torch.Tensor] = field(default_factory=dict)
    complements: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    report: dict[str, dict[str, float]] = field(default_factory=dict)

    def fields(self) -> tuple[dict, dict, dict, dict]:
        return self.bases, self.importances, self.complements, self.report


@dataclass
class GPMemory:
    """Bases of the feature spaces of finished tasks, keyed by projected-group name.

    Each basis is a ``(d, k)`` float32 matrix with orthonormal columns (``k = 0`` before the first task ends). Groups
    that read the same inputs (``q/k/v``) hold the same tensor, stored once in the file (``layout``).
    ``thresholds`` holds the energy threshold each stored task used, so ``len(thresholds)`` is the number of tasks
    stored; ``version`` changes with every update so that projectors know when to refresh their device copies.
    ``importances`` (only with ``gp_importance_scale``): per basis, the ``(k,)`` SGP importance of each direction.
    ``complements``: for a basis that fills more than half its space, ``(basis, complement)`` with the ``(d, d − k)``
    complement the file stores instead, the basis being rebuilt from it (``maths.complement``, so bit for bit).
    """

    dims: dict[str, int]
    bases: dict[str, torch.Tensor] = field(default_factory=dict)
    thresholds: list[float] = field(default_factory=list)
    info: dict[str, str] = field(default_factory=dict)
    version: int = 0
    importances: dict[str, torch.Tensor] = field(default_factory=dict)
    complements: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, dim in self.dims.items():
            self.bases.setdefault(name, torch.zeros(dim, 0))

    @property
    def tasks_seen(self) -> int:
        return len(self.thresholds)

    @property
    def is_empty(self) -> bool:
        return all(basis.shape[1] == 0 for basis in self.bases.values())

    def update(
        self,
        grams: dict[str, torch.Tensor],
        threshold: float,
        total_energies: dict[str, float] | None = None,
        exact_grams: dict[str, torch.Tensor] | None = None,
        importance_scale: float | None = None,
    ) -> dict[str, dict[str, float]]:
        """Grow every basis with one finished task's Gram matrices; returns the per-group growth report.

        ``total_energies`` overrides, per group, the energy its captured share is measured against (see
        ``maths.grow_basis``). ``exact_grams`` are features of another kind for some groups (a prompt's own rows,
        beside the token embeddings): their whole span is added after the threshold's share of ``grams``, never
        weighed against them (their scales may differ by orders of magnitude); their directions get importance 1.
        ``importance_scale`` (SGP's α) also updates each direction's importance (``maths.direction_importance``);
        ``None`` drops the importances: hard projection. ``grow`` and ``commit`` do the same in parts (one per pass).
        """
        return self.commit([self.grow(grams, threshold, total_energies, exact_grams, importance_scale)], threshold)

    def grow(
        self, grams: dict, threshold: float | dict[str, float], total_energies: dict[str, float] | None = None,
        exact_grams: dict[str, torch.Tensor] | None = None, importance_scale: float | None = None,
        max_ranks: dict[str, int | None] | None = None, device: torch.device | str | None = None,
        eigen_tolerance: float = maths.RELATIVE_EIGEN_TOLERANCE,
    ) -> GrownBases:  # fmt: skip
        """The new bases of the groups in ``grams`` (``update``'s arguments), not yet in the memory (``commit``). A
        value of ``grams`` may be a Frequent Directions sketch of the residual features (``gp_sketch_above``).

        ``threshold``: one for all groups, or one per group (``gp_threshold_pattern``; a class of groups sharing a
        basis takes its highest). ``max_ranks``: per group, the most columns its basis keeps (``gp_max_basis_rank``;
        a class of groups sharing a basis takes its smallest). ``device``: where the new bases are kept (default: the
        Gram's). ``eigen_tolerance``: ``maths.grow_basis``'s floor (``maths.EIGEN_TOLERANCES`` of ``gp_gram_dtype``; a
        sketch keeps the default: it is made in float64)."""
        grown_bases = GrownBases()
        for names in self._update_classes(grams, total_energies, exact_grams):
            name, gram = names[0], grams[names[0]]
            if tuple(gram.shape) != (self.dims[name], self.dims[name]):
                raise GPMemoryError(f"Gram matrix of {name!r} is {tuple(gram.shape)}, expected d = {self.dims[name]}.")
            caps = [cap for cap in ((max_ranks or {}).get(member) for member in names) if cap is not None]
            cap = min(caps) if caps else None
            tau = max(threshold[member] for member in names) if isinstance(threshold, dict) else threshold
            exact = (exact_grams or {}).get(name)
            grown, importance, stats = self._grow_one(gram, name, tau, total_energies, exact, importance_scale,
                                                      cap, eigen_tolerance)  # fmt: skip
            grown = grown.to(torch.float32).to(gram.device if device is None else device).contiguous()
            compact = compact_form(grown) if importance_scale is None else None  # importances need the directions
            grown = grown if compact is None else compact[0]
            for member in names:  # groups that read the same inputs share one basis (and its importances)
                grown_bases.bases[member] = grown
                if importance is not None:
                    grown_bases.importances[member] = importance
                if compact is not None:
                    grown_bases.complements[member] = compact
                grown_bases.report[member] = {**stats, "basis_size": grown.shape[1], "dim": self.dims[name]}
        return grown_bases

    def _grow_one(self, gram, name, threshold, total_energies, exact, importance_scale, cap, tolerance):
        """One class's new basis (float64), its importances (``None`` without SGP) and its growth report."""
        old = self.bases[name].to(gram.device)
        total = (total_energies or {}).get(name)
        grown, stats = grow(gram, old, threshold, total_energy=total, max_rank=cap, eigen_tolerance=tolerance)
        if isinstance(gram, FrequentDirections):  # gp_sketch_above: no importances, no exact features (checked)
            return grown, None, stats
        importance = None
        if importance_scale is not None:
            previous = self.importances.get(name, torch.ones(old.shape[1]))
            importance = maths.direction_importance(gram, grown, previous, importance_scale)
        if exact is not None:
            grown, _ = maths.grow_basis(exact, grown, 1.0, max_rank=cap, eigen_tolerance=tolerance)
        if importance is not None:  # directions of the exact features: importance 1
            ones = importance.new_ones(grown.shape[1] - importance.shape[0])
            importance = torch.cat([importance, ones]).to(torch.float32).cpu()
        return grown, importance, stats

    def commit(self, parts: list[GrownBases], threshold: float) -> dict[str, dict[str, float]]:
        """Store one task from the new bases of all its groups (``grow``, one part per pass): all or nothing."""
        grown = GrownBases()
        for part in parts:
            for mine, theirs in zip(grown.fields(), part.fields()):
                mine.update(theirs)
        missing = sorted(set(self.dims) - set(grown.bases))
        if missing:
            raise GPMemoryError(f"No features were collected for {missing[:4]}: the memory update would be partial.")
        self.bases.update(grown.bases)
        self.importances, self.complements = grown.importances, grown.complements
        self.thresholds.append(threshold)
        self.version += 1
        return grown.report

    def shared_classes(self, grams: dict) -> dict[str, list[str]]:
        """Per group of ``grams``, the groups that grow as one with it in ``grow`` (same Gram, equal bases so far)."""
        return {name: members for members in self._update_classes(grams, None, None) for name in members}

    def _update_classes(self, grams, total_energies, exact_grams) -> list[list[str]]:
        """The groups that grow as one: the same Gram tensor (they read the same inputs, ``grams.collect_grams``),
        equal bases and importances so far, the same reference energy, and no exact features of their own."""
        classes: dict[tuple, list[list[str]]] = {}
        for name, gram in grams.items():
            exact = name if exact_grams and name in exact_grams else None
            candidates = classes.setdefault((id(gram), (total_energies or {}).get(name), exact), [])
            for members in candidates:
                if self._same_basis(members[0], name):
                    members.append(name)
                    break
            else:
                candidates.append([name])
        return [members for candidates in classes.values() for members in candidates]

    def _same_basis(self, name: str, other: str) -> bool:
        def equal(first, second) -> bool:
            if first is None or second is None:
                return first is second
            return first is second or (first.shape == second.shape and torch.equal(first, second))

        bases = self.bases
        return equal(bases[name], bases[other]) and equal(self.importances.get(name), self.importances.get(other))

    def capacity(self) -> dict[str, float]:
        """Share of each group's feature space already protected (1.0: that group can no longer learn)."""
        return {name: self.bases[name].shape[1] / dim for name, dim in self.dims.items()}

    def full_groups(self) -> list[str]:
        """Groups whose basis fills their whole space: their parameters are frozen from now on."""
        return [name for name, share in self.capacity().items() if share >= 1.0]

    # ---- persistence -------------------------------------------------------------------------------------------

    def layout(self) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
        """What the memory file holds: each distinct basis once (with its importances), under the first name (sorted)
        of the groups that share it; ``{group: stored name}`` for the other groups (``update`` gives the groups that
        read the same inputs one tensor); and the stored names that hold a basis's complement instead (``compact``)."""
        tensors, shared, stored, complements = {}, {}, {}, []
        for name in sorted(self.bases):
            basis, importance = self.bases[name], self.importances.get(name)
            key = (id(basis), None if importance is None else id(importance))
            if key in stored:
                shared[name] = stored[key]
                continue
            stored[key] = name
            compact = self.complements.get(name)
            if compact is not None and compact[0] is basis and importance is None:
                tensors[name] = compact[1]
                complements.append(name)
            else:
                tensors[name] = basis
            if importance is not None:
                tensors[name + IMPORTANCE_SUFFIX] = importance
        return tensors, shared, complements

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors of the memory file (``layout``), on the CPU in float32."""
        tensors, _, _ = self.layout()
        return {name: tensor.detach().to("cpu", torch.float32).contiguous() for name, tensor in tensors.items()}

    def metadata(self, adapter_sha256: str | None = None) -> dict[str, str]:
        info = {key: value for key, value in self.info.items() if key != "adapter_sha256"}
        _, shared, complements = self.layout()
        return {
            "format": "pt",
            "gp_format_version": str(FORMAT_VERSION),
            "gp_tasks_seen": str(self.tasks_seen),
            "gp_thresholds": json.dumps(self.thresholds),
            "gp_dims": json.dumps(self.dims, sort_keys=True),
            "gp_shared": json.dumps(shared, sort_keys=True),
            "gp_complements": json.dumps(complements),
            **{f"gp_{key}": value for key, value in info.items()},
            **({"gp_adapter_sha256": adapter_sha256} if adapter_sha256 else {}),
        }

    def save(self, path: str, adapter_sha256: str | None = None) -> None:
        """Write ``gp_memory.safetensors`` atomically (temporary file, then rename), with the SHA-256 of the adapter
        weights saved beside it when given."""
        data = save_safetensors_bytes(self.state_dict(), metadata=self.metadata(adapter_sha256))
        atomic_write_bytes(path, data)

    @classmethod
    def load(cls, path: str) -> GPMemory:
        """Read a memory file, every field checked (``memory_file``); shapes against a model: ``check_fits``."""
        if not os.path.isfile(path):
            raise GPMemoryError(f"No memory file at {path}.")
        dims, bases, thresholds, info, importances, complements = read_memory_file(path)  # shared: one tensor
        return cls(dims=dims, bases=bases, thresholds=thresholds, info=info, importances=importances,
                   complements=complements)  # fmt: skip

    def check_fits(self, expected_dims: dict[str, int], source: str = "the memory") -> None:
        """Raise a ``GPMemoryError`` naming every layer whose basis does not fit ``expected_dims``."""
        missing = sorted(set(expected_dims) - set(self.dims))
        unexpected = sorted(set(self.dims) - set(expected_dims))
        wrong = sorted(n for n in set(self.dims) & set(expected_dims) if self.dims[n] != expected_dims[n])
        if missing or unexpected or wrong:
            details = []
            if missing:
                details.append(f"layers the model has but the memory lacks: {missing[:4]}")
            if unexpected:
                details.append(f"layers in the memory the model lacks: {unexpected[:4]}")
            if wrong:
                details.append(
                    "dimension mismatches: "
                    + ", ".join(f"{n} (memory {self.dims[n]}, model {expected_dims[n]})" for n in wrong[:4])
                )
            raise GPMemoryError(
                f"{source} does not fit this model/adapter ({'; '.join(details)}). It belongs to another adapter or "
                "base model: load it with the base model and adapter config it was trained with."
            )
