"""Linear heads built from class statistics (per-class means, one shared within-class covariance), no replay.

Each returns ``(weight, bias)`` of a linear head ``logits = x Wᵀ + b`` over the classes of the statistics, so it
can stand in a model's classification head:

* ``ncm_head``: nearest class mean by cosine similarity. ``cos(x, μ_c) = x·μ̂_c / |x|`` and ``|x|`` is the same for
  every class, so the argmax is that of ``x·μ̂_c``: ``W = μ̂`` (unit rows), ``b = 0``.
* ``lda_head``: linear discriminant analysis, ``argmax_c xᵀΣ⁻¹μ_c − ½ μ_cᵀΣ⁻¹μ_c`` with the covariance shrunk
  towards ``(tr Σ / d) I`` (Ledoit-Wolf style, a fixed share), since a few hundred examples per task estimate a
  ``d × d`` covariance poorly.
* ``aligned_head``: a head trained on features sampled from the classes' Gaussians ``N(μ_c, Σ)`` (SLCA's classifier
  alignment), starting from given weights; it sees every class seen so far in equal measure.
"""

from __future__ import annotations

import torch


def ncm_head(means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine nearest-class-mean head: unit-norm class means as weights, no bias."""
    weight = means / means.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return weight, torch.zeros(means.shape[0], dtype=means.dtype, device=means.device)


def shrunk(covariance: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """``(1 − s) Σ + s (tr Σ / d) I``: a covariance that is always well conditioned for ``0 < s ≤ 1``."""
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}.")
    dim = covariance.shape[0]
    scale = torch.trace(covariance) / dim
    eye = torch.eye(dim, dtype=covariance.dtype, device=covariance.device)
    return (1.0 - shrinkage) * covariance + shrinkage * scale.clamp_min(1e-12) * eye


def lda_head(
    means: torch.Tensor, covariance: torch.Tensor, shrinkage: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """LDA with equal priors: ``W = μ Σ⁻¹``, ``b_c = −½ μ_c Σ⁻¹ μ_cᵀ`` (float64 solve)."""
    sigma = shrunk(covariance.to(torch.float64), shrinkage)
    means = means.to(torch.float64)
    weight = torch.linalg.solve(sigma, means.T).T
    bias = -0.5 * (weight * means).sum(dim=1)
    return weight, bias


def aligned_head(
    means: torch.Tensor,
    covariance: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    samples_per_class: int = 256,
    steps: int = 200,
    lr: float = 1e-2,
    shrinkage: float = 0.1,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear head trained with cross-entropy on features drawn from ``N(μ_c, Σ)`` for every class, from the given
    ``weight`` and ``bias`` (the trained head's rows of these classes)."""
    generator = torch.Generator().manual_seed(seed)
    sigma = shrunk(covariance.to(torch.float64), shrinkage)
    factor = torch.linalg.cholesky(sigma)
    classes, dim = means.shape
    noise = torch.randn(classes, samples_per_class, dim, generator=generator, dtype=torch.float64)
    features = (means.to(torch.float64)[:, None, :] + noise @ factor.T).reshape(-1, dim).float()
    targets = torch.arange(classes).repeat_interleave(samples_per_class)
    head = torch.nn.Linear(dim, classes)
    with torch.no_grad():
        head.weight.copy_(weight.float())
        head.bias.copy_(bias.float())
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(head(features), targets).backward()
        optimizer.step()
    return head.weight.detach(), head.bias.detach()
