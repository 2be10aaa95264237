"""Pure tensor maths of the gradient projection memory (GPM, Saha et al. 2021; PEGP, Qiao et al. 2024).

Tensors in, tensors out: no PEFT, no config, no modules. Conventions:

* a *feature matrix* has one feature per row and the feature axis last (``(..., d)``);
* a *basis* ``M`` is a ``(d, k)`` matrix with orthonormal columns (``k`` may be 0);
* a *gradient* or *update* ``G`` has the input-feature axis last (``(..., d)``), so that
  ``G M = 0`` means "this change does not alter the layer's output on the features spanned by M".
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

# Eigenvalues of a Gram matrix below this share of its trace are numerical zeros: they never enter a basis,
# whatever the energy threshold (a threshold of 1.0 means "the whole numerical span of the features").
RELATIVE_EIGEN_TOLERANCE = 1e-10
# The floor when each batch's Gram product is rounded to float32 (``gp_gram_dtype="float32"``, sums in float64): a
# rounding error E of the products (|E_ij| ≲ u·(|X|ᵀ|X|)_ij per batch, u = float32 eps) gives directions outside the
# features' span eigenvalues up to about ‖E‖₂ instead of 0, and summed batches add up to ≲ u·tr(C). Measured on CPU
# (d = 32–768, 1k–16k rows a batch, ranks d/8 to d−1, means up to 100× the spread): at most 0.15·u·tr(C). The floor,
# 16·u·tr(C) ≈ 1.9e-6·tr(C), is 100× that; directions weaker than it are below what float32 products resolve anyway.
FLOAT32_EIGEN_TOLERANCE = 16 * torch.finfo(torch.float32).eps
GRAM_DTYPES = {"float64": torch.float64, "float32": torch.float32}
EIGEN_TOLERANCES = {"float64": RELATIVE_EIGEN_TOLERANCE, "float32": FLOAT32_EIGEN_TOLERANCE}


def feature_gram(features: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Return ``Xᵀ X`` for the rows ``X`` of ``features`` (shape ``(..., d)``), computed in ``dtype`` (float64, or
    float32 for speed on GPUs, at full float32 precision: no TF32).

    The Gram matrix is what the memory stores per task instead of the ``N × d`` features: its eigenvalues are the
    squared singular values of ``X``, it costs O(d²) whatever N is, and Gram matrices of batches (or processes) add up.
    """
    rows = features.reshape(-1, features.shape[-1]).to(dtype)
    if dtype == torch.float64 or rows.device.type != "cuda":
        return rows.T @ rows
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # TF32 would round to 10 bits: far above the eigenvalue floor
    try:
        return rows.T @ rows
    finally:
        torch.set_float32_matmul_precision(precision)


def threshold_for_task(threshold: float, increment: float, task_id: int) -> float:
    """Energy threshold used when storing task ``task_id`` (0-based): ``min(1, threshold + increment * task_id)``.

    GPM uses ``threshold=0.97, increment=0.003``: later tasks keep a slightly larger share of their features' energy.
    """
    return min(1.0, threshold + increment * task_id)


@contextmanager
def one_thread(device: torch.device):
    """Run a decomposition on one CPU thread. For d in the hundreds an eigendecomposition takes ~0.02 s either way,
    but with several OpenMP threads on a loaded machine the spinning workers stretched it to seconds (measured: 5 s for
    d = 384); and one thread gives the same bits whatever the process's thread setting (``complement``)."""
    threads = torch.get_num_threads()
    single = device.type == "cpu" and threads > 1
    if single:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if single:
            torch.set_num_threads(threads)


def _sorted_eigh(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs by decreasing eigenvalue (on one CPU thread, ``one_thread``)."""
    with one_thread(gram.device):
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    eigenvalues = eigenvalues.flip(0).clamp_min(0.0)
    return eigenvalues, eigenvectors.flip(1)


def _checked(gram: torch.Tensor, basis: torch.Tensor | None, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``gram`` and ``basis`` in float64, after checking the threshold and their shapes."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}.")
    gram = gram.to(torch.float64)
    dim = gram.shape[0]
    if gram.shape != (dim, dim):
        raise ValueError(f"gram must be a square matrix, got shape {tuple(gram.shape)}.")
    basis = gram.new_zeros((dim, 0)) if basis is None else basis.to(torch.float64)
    if basis.shape[0] != dim:
        raise ValueError(f"basis has {basis.shape[0]} rows but the Gram matrix is {dim} × {dim}.")
    return gram, basis


def _residual(gram: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``(I − MMᵀ) C (I − MMᵀ)``: the part of the Gram matrix outside the old basis (symmetrised)."""
    if basis.shape[1] == 0:
        return gram
    projector = torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device) - basis @ basis.T
    residual = projector @ gram @ projector
    return (residual + residual.T) / 2


def orthonormal_against(directions: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``directions`` re-orthogonalised against ``basis`` (twice is enough, Kahan/Parlett) and orthonormalised."""
    for _ in range(2):
        directions = directions - basis @ (basis.T @ directions)
    return torch.linalg.qr(directions)[0]


def grow_basis(
    gram: torch.Tensor,
    basis: torch.Tensor | None,
    threshold: float,
    total_energy: float | None = None,
    max_rank: int | None = None,
    eigen_tolerance: float = RELATIVE_EIGEN_TOLERANCE,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Extend ``basis`` so that it captures at least ``threshold`` of the energy of the features behind ``gram``.

    Args:
        gram: ``(d, d)`` Gram matrix ``Xᵀ X`` of the finished task's features (any float dtype; used in float64).
        basis: ``(d, k)`` orthonormal basis of earlier tasks, or ``None``/``k = 0`` for the first task.
        threshold: energy threshold τ in (0, 1].
        total_energy: the energy the shares are measured against (default ``tr(gram)``). A larger one lets features
            that lost most of their energy (an input side moved out of the stored space) count as mostly captured.
        max_rank: the most columns the basis may hold (``None``: ``d``): the old columns stay, and the new directions
            are added by decreasing energy until the threshold or the cap is reached (protection is then partial).
        eigen_tolerance: the floor below which eigenvalues, relative to the energy, are numerical zeros
            (``EIGEN_TOLERANCES``: ``FLOAT32_EIGEN_TOLERANCE`` for Grams of float32 products).

    Returns:
        The new ``(d, k')`` basis (float64, ``k' ≥ k``; the old columns come first, unchanged) and a report with
        ``captured_before`` (share of the task's energy the old basis already held), ``captured_after`` and ``added``.

    The criterion is GPM's: with ``C`` the Gram matrix and ``Ĉ = (I − MMᵀ) C (I − MMᵀ)`` its residual outside the old
    basis, the captured share is ``1 − tr(Ĉ)/tr(C)``; leading eigenvectors of ``Ĉ`` are added until the captured
    share reaches τ. Eigenvalues below ``eigen_tolerance · tr(C)`` are never added.
    """
    gram, basis = _checked(gram, basis, threshold)
    dim = gram.shape[0]
    total = torch.trace(gram).item() if total_energy is None else max(float(total_energy), torch.trace(gram).item())
    if not torch.isfinite(gram).all() or total != total:
        raise ValueError("The Gram matrix holds NaN or inf: the features fed to the memory are not finite.")
    if total <= 0.0:  # all-zero features constrain nothing
        return basis, {"captured_before": 1.0, "captured_after": 1.0, "added": 0}

    residual = _residual(gram, basis)
    captured_before = 1.0 - torch.trace(residual).item() / total
    room = dim if max_rank is None else min(dim, max_rank)
    if captured_before >= threshold or basis.shape[1] >= room:
        return basis, {"captured_before": captured_before, "captured_after": captured_before, "added": 0}
    eigenvalues, eigenvectors = _sorted_eigh(residual)
    return add_directions(basis, eigenvalues, eigenvectors, captured_before, total, threshold, room, eigen_tolerance)


def add_directions(
    basis: torch.Tensor,
    eigenvalues: torch.Tensor,
    eigenvectors: torch.Tensor,
    captured_before: float,
    total: float,
    threshold: float,
    room: int,
    eigen_tolerance: float = RELATIVE_EIGEN_TOLERANCE,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GPM's rule: the residual's leading eigenvectors (``eigenvalues`` decreasing, ``eigenvectors`` ``(d, m)``) are
    added to ``basis`` until ``captured_before`` plus their energies over ``total`` reaches ``threshold``, at most
    ``room`` columns in all, never an eigenvalue below ``eigen_tolerance · total``; orthonormalised against
    ``basis``. Returns the grown basis and ``grow_basis``'s report."""
    significant = int((eigenvalues > eigen_tolerance * total).sum().item())
    captured = captured_before + torch.cumsum(eigenvalues, 0) / total
    # smallest k with captured share >= threshold (tiny slack for the rounding of cumsum)
    reached = (captured >= threshold - 1e-12).nonzero()
    needed = int(reached[0].item()) + 1 if len(reached) else eigenvalues.shape[0]
    added = min(needed, significant, room - basis.shape[1])
    if added <= 0:
        return basis, {"captured_before": captured_before, "captured_after": captured_before, "added": 0}
    new_directions = orthonormal_against(eigenvectors[:, :added], basis)
    grown = torch.cat([basis, new_directions], dim=1)
    captured_after = captured[added - 1].item()
    return grown, {"captured_before": captured_before, "captured_after": min(captured_after, 1.0), "added": added}


def captured_energy(gram: torch.Tensor, basis: torch.Tensor) -> float:
    """Share of the energy of the features behind ``gram`` that lies in the span of ``basis``: ``tr(Mᵀ C M)/tr(C)``."""
    gram = gram.to(torch.float64)
    total = torch.trace(gram).item()
    if total <= 0.0:
        return 1.0
    basis = basis.to(torch.float64)
    return torch.trace(basis.T @ gram @ basis).item() / total


def project_out(tensor: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Return ``G (I − M Mᵀ)``: ``tensor`` (input-feature axis last) without its component in the span of ``basis``."""
    if basis.shape[-1] == 0:
        return tensor
    return tensor - (tensor @ basis) @ basis.T


def complement(basis: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the orthogonal complement of ``span(basis)``: ``(d, d − k)`` for a ``(d, k)`` basis with
    orthonormal columns, in float64 on the CPU (the last columns of a complete Householder QR of ``basis``; the
    identity for ``k = 0``). One thread, so the same input gives the same bits in any process: a basis rebuilt from
    its stored complement (``wiring.memory``) equals the one that was stored, bit for bit."""
    matrix = basis.detach().to("cpu", torch.float64)
    dim, width = matrix.shape
    if width == 0:
        return torch.eye(dim, dtype=torch.float64)
    with one_thread(matrix.device):
        full = torch.linalg.qr(matrix, mode="complete").Q
    return full[:, width:].contiguous()


def orthonormality_error(basis: torch.Tensor) -> float:
    """``max |MᵀM − I|``: 0 for a perfectly orthonormal basis."""
    basis = basis.to(torch.float64)
    eye = torch.eye(basis.shape[1], dtype=torch.float64, device=basis.device)
    return (basis.T @ basis - eye).abs().max().item() if basis.shape[1] else 0.0


def direction_importance(
    gram: torch.Tensor, basis: torch.Tensor, previous: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """SGP's importance ``λ_i ∈ [0, 1]`` of each basis direction after a task (Saha & Roy, AAAI 2023, eq. 2 and 4).

    With ``σ_i = √(m_iᵀ C m_i)`` the task's singular value along ``m_i`` (for a direction the task added, an
    eigenvalue's root; for an old one, the task's energy along it), ``λ_i = (α + 1) σ_i / (α σ_i + max_j σ_j)``:
    1 for the strongest direction, growing with ``σ_i``, and → 1 for every ``σ_i > 0`` as ``α = scale`` grows. The
    first ``len(previous)`` directions (those stored before) add their earlier importance, clipped to 1.

    Args:
        gram: ``(d, d)`` Gram matrix of the task's features.
        basis: ``(d, k)`` orthonormal basis after the task was stored (old columns first).
        previous: ``(k_old,)`` importances of the old columns (``None``: none).
        scale: ``α > 0``.
    """
    basis = basis.to(torch.float64)
    sigma = torch.einsum("dk,de,ek->k", basis, gram.to(torch.float64), basis).clamp_min(0.0).sqrt()
    top = sigma.max() if sigma.numel() else sigma.new_zeros(())
    importance = (scale + 1.0) * sigma / (scale * sigma + top) if top > 0 else torch.zeros_like(sigma)
    if previous is not None and previous.numel():
        old = previous.shape[0]
        importance[:old] = (importance[:old] + previous.to(importance)).clamp(0.0, 1.0)
    return importance


def project_out_scaled(tensor: torch.Tensor, basis: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """Return ``G (I − M Λ Mᵀ)``, ``Λ = diag(importance)``: each stored direction's component scaled by ``1 − λ_i``
    (SGP). ``importance`` all ones is ``project_out``."""
    if basis.shape[-1] == 0:
        return tensor
    return tensor - (tensor @ basis) @ (basis * importance).T
