"""Frequent Directions: a streaming sketch of a feature matrix, for inputs too wide for a ``d × d`` Gram matrix.

Liberty, "Simple and deterministic matrix sketching" (KDD 2013); Ghashami, Liberty, Phillips, Woodruff, "Frequent
Directions: simple and deterministic matrix sketching" (SIAM J. Comput. 2016). The rows ``x`` of a feature matrix
``A`` (``N × d``) stream into a float64 buffer of ``2ℓ`` rows; when it is full, its SVD ``U Σ Vᵀ`` is shrunk by the
``ℓ``-th squared singular value ``δ = σ_ℓ²``: ``B ← diag(√max(σ_i² − δ, 0)) Vᵀ``, which leaves at most ``ℓ − 1``
non-zero rows. Memory is ``2ℓ · d`` floats whatever ``N`` is. For every unit vector ``x`` and every ``k < ℓ``:

    0 ≤ ‖A x‖² − ‖B x‖² ≤ Δ ≤ ‖A − A_k‖_F² / (ℓ − k)

(``Δ``: the sum of the shrinks' ``δ``, kept in ``shrunk``; ``A_k``: the best rank-``k`` approximation of ``A``).
So ``Bᵀ B`` never overstates the features' energy along any direction, and when ``rank(A) ≤ ℓ − 1`` every ``δ`` is 0
and ``Bᵀ B = Aᵀ A``: the sketch is exact (up to rounding). Sketches merge: the rows of several sketches inserted into
one give a sketch of the stacked matrices with the same bound (Ghashami et al. 2016, §3).

Here the sketch holds the *residual* rows ``x (I − M Mᵀ)`` outside an old basis ``M`` (as GPM's update works on the
residual Gram), and keeps exactly, beside it, the features' total energy ``‖A‖_F²`` and the residual's
``‖A (I − M Mᵀ)‖_F²`` that the energy threshold needs, and per feature ``Σ x`` and ``Σ x²`` (a fingerprint).
"""

from __future__ import annotations

import torch

from . import maths


class FrequentDirections:
    """A Frequent Directions sketch of the residual rows of one input (``ℓ = rows``, buffer ``2ℓ × d`` float64).

    ``of_rows`` makes one batch's pending rows (no buffer); ``clone`` and ``add_`` insert them into a buffer, so that
    a sum of batches reads like a sum of Gram matrices (``wiring.shared_grams``). ``shape`` and ``device`` are those
    of the Gram matrix it stands for."""

    def __init__(self, dim: int, rows: int, basis: torch.Tensor, device: torch.device | str | None = None) -> None:
        self.dim, self.rows = dim, rows
        self.basis = basis.to(device=device or basis.device, dtype=torch.float64)
        self.device = self.basis.device
        self.buffer: torch.Tensor | None = None  # (2ℓ, d), rows [0, filled) in use
        self.filled = 0
        self.pending: torch.Tensor | None = None  # a batch's residual rows, not in a buffer yet
        self.energies = torch.zeros(3, dtype=torch.float64, device=self.device)  # ‖A‖², ‖A(I − MMᵀ)‖², Δ
        self.moments = torch.zeros(2, dim, dtype=torch.float64, device=self.device)  # Σ x, Σ x²

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    @classmethod
    def of_rows(cls, features: torch.Tensor, rows: int, basis: torch.Tensor) -> FrequentDirections:
        """One batch: the feature rows ``features`` (``(..., d)``), their residual outside ``basis`` pending."""
        features = features.reshape(-1, features.shape[-1]).to(device=basis.device, dtype=torch.float64)
        sketch = cls(features.shape[1], rows, basis)
        residual = maths.project_out(features, sketch.basis)
        sketch.pending = residual
        sketch.energies[0] = features.square().sum()
        sketch.energies[1] = residual.square().sum()
        sketch.moments[0], sketch.moments[1] = features.sum(0), features.square().sum(0)
        return sketch

    def clone(self) -> FrequentDirections:
        """A sketch of the same rows, pending ones inserted."""
        copy = FrequentDirections(self.dim, self.rows, self.basis)
        return copy.add_(self)

    def add_(self, other: FrequentDirections) -> FrequentDirections:
        """Insert ``other``'s rows (residuals outside the same basis) and add its energies; returns ``self``."""
        if other.buffer is not None:
            self.insert(other.buffer[: other.filled])
        if other.pending is not None:
            self.insert(other.pending)
        self.energies += other.energies
        self.moments += other.moments
        return self

    def insert(self, rows: torch.Tensor) -> None:
        """Stream residual ``rows`` into the buffer, shrinking it whenever it fills (energies not touched)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self.insert(pending)
        if self.buffer is None:
            self.buffer = torch.zeros(2 * self.rows, self.dim, dtype=torch.float64, device=self.device)
        start = 0
        while start < rows.shape[0]:
            take = min(self.buffer.shape[0] - self.filled, rows.shape[0] - start)
            self.buffer[self.filled : self.filled + take] = rows[start : start + take]
            self.filled, start = self.filled + take, start + take
            if self.filled == self.buffer.shape[0]:
                self._shrink()

    def _shrink(self) -> None:
        """``B ← diag(√max(σ_i² − σ_ℓ², 0)) Vᵀ``: at most ``ℓ − 1`` rows left, the others free."""
        squares, directions = self._svd(self.buffer)
        delta = squares[self.rows - 1] if squares.shape[0] >= self.rows else squares.new_zeros(())
        kept = min(self.rows - 1, squares.shape[0])
        self.buffer.zero_()
        self.buffer[:kept] = (squares[:kept] - delta).clamp_min(0.0).sqrt()[:, None] * directions[:, :kept].T
        self.filled = kept
        self.energies[2] += delta

    @staticmethod
    def _svd(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared singular values (decreasing) and the ``(d, m)`` right singular vectors of ``rows``."""
        with maths.one_thread(rows.device):
            _, sigma, vh = torch.linalg.svd(rows, full_matrices=False)
        return sigma.square(), vh.T

    def sketch_rows(self) -> torch.Tensor:
        """The sketch ``B``: its rows in use (pending rows inserted)."""
        if self.pending is not None or self.buffer is None:
            self.insert(self.pending if self.pending is not None else self.basis.new_zeros(0, self.dim))
        return self.buffer[: self.filled]

    def spectrum(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``Bᵀ B``'s eigenvalues (decreasing) and eigenvectors ``(d, m)``, ``m ≤ 2ℓ``: from the SVD of ``B``."""
        rows = self.sketch_rows()
        if rows.shape[0] == 0:
            return rows.new_zeros(0), rows.new_zeros(self.dim, 0)
        return self._svd(rows)

    def fingerprint(self) -> bytes:
        """The bytes a task's fingerprint reads of it: the exact ``Σ x`` and ``Σ x²`` per feature."""
        return self.moments.detach().cpu().numpy().tobytes()


def grow_from_sketch(
    sketch: FrequentDirections,
    basis: torch.Tensor | None,
    threshold: float,
    total_energy: float | None = None,
    max_rank: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``maths.grow_basis`` from a sketch of the residual features outside ``basis`` (the basis it was made with).

    The captured share before is exact (``1 − ‖A (I − M Mᵀ)‖²/‖A‖²``, energies kept beside the sketch); the new
    directions are the top right singular vectors of ``B``, added by decreasing ``σ_i(B)²`` under the same threshold
    rule (``maths.add_directions``). As ``‖B x‖² ≤ ‖A x‖²``, the sketch's energies never overstate the features': a
    threshold below 1 may take more directions than the Gram would, never fewer for the energy it counts. The report
    adds ``sketch_error``: ``Δ / ‖A‖²``, the bound on any direction's missed share of the energy.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}.")
    basis = sketch.basis.new_zeros((sketch.dim, 0)) if basis is None else basis.to(sketch.basis)
    if basis.shape != sketch.basis.shape:
        raise ValueError(f"The sketch was made outside a {tuple(sketch.basis.shape)} basis, not {tuple(basis.shape)}.")
    energy, residual, shrunk = sketch.energies.tolist()
    total = energy if total_energy is None else max(float(total_energy), energy)
    if total != total or not torch.isfinite(sketch.moments).all():
        raise ValueError("The sketch holds NaN or inf: the features fed to the memory are not finite.")
    if total <= 0.0:
        return basis, {"captured_before": 1.0, "captured_after": 1.0, "added": 0, "sketch_error": 0.0}
    captured_before = 1.0 - residual / total
    room = sketch.dim if max_rank is None else min(sketch.dim, max_rank)
    if captured_before >= threshold or basis.shape[1] >= room:
        grown, stats = basis, {"captured_before": captured_before, "captured_after": captured_before, "added": 0}
    else:
        eigenvalues, eigenvectors = sketch.spectrum()
        grown, stats = maths.add_directions(basis, eigenvalues, eigenvectors, captured_before, total, threshold, room)
    return grown, {**stats, "sketch_error": shrunk / total}


def grow(
    features: torch.Tensor | FrequentDirections,
    basis: torch.Tensor | None,
    threshold: float,
    total_energy: float | None = None,
    max_rank: int | None = None,
    eigen_tolerance: float = maths.RELATIVE_EIGEN_TOLERANCE,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The grown basis and report from a Gram matrix (``maths.grow_basis``) or a sketch (``grow_from_sketch``, made
    in float64: it keeps the default eigenvalue floor)."""
    if isinstance(features, FrequentDirections):
        return grow_from_sketch(features, basis, threshold, total_energy=total_energy, max_rank=max_rank)
    basis = None if basis is None else basis.to(features.device)
    return maths.grow_basis(features, basis, threshold, total_energy=total_energy, max_rank=max_rank,
                            eigen_tolerance=eigen_tolerance)  # fmt: skip
