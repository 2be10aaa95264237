"""Properties of the pure maths: projection, basis growth with an energy threshold, the threshold schedule."""

import pytest
import torch

from peft_gp.core import maths


def low_rank_features(rows: int, dim: int, rank: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, rank, generator=generator) @ torch.randn(rank, dim, generator=generator)


def test_gram_streams_over_batches_in_float64():
    features = low_rank_features(100, 12, 12)
    whole = maths.feature_gram(features)
    streamed = maths.feature_gram(features[:37]) + maths.feature_gram(features[37:])
    assert whole.dtype == torch.float64
    torch.testing.assert_close(whole, streamed)
    torch.testing.assert_close(whole, features.double().T @ features.double())


def test_projection_removes_the_basis_component_and_is_idempotent():
    basis, _ = torch.linalg.qr(torch.randn(16, 5, dtype=torch.float64))
    gradient = torch.randn(7, 16, dtype=torch.float64)
    projected = maths.project_out(gradient, basis)
    assert (projected @ basis).abs().max() < 1e-12
    torch.testing.assert_close(maths.project_out(projected, basis), projected)
    # what is removed lies in the span of the basis
    removed = gradient - projected
    torch.testing.assert_close(removed @ basis @ basis.T, removed)


def test_projection_with_empty_basis_is_identity():
    gradient = torch.randn(3, 8)
    assert maths.project_out(gradient, torch.zeros(8, 0)) is gradient


def test_first_task_basis_is_orthonormal_and_captures_threshold():
    features = low_rank_features(300, 20, 20) * torch.linspace(0.1, 3.0, 20)  # graded energies
    gram = maths.feature_gram(features)
    for threshold in (0.5, 0.9, 0.97, 0.999):
        basis, report = maths.grow_basis(gram, None, threshold)
        assert maths.orthonormality_error(basis) < 1e-10
        assert maths.captured_energy(gram, basis) >= threshold - 1e-9
        # minimal: one column fewer would not reach the threshold
        assert maths.captured_energy(gram, basis[:, :-1]) < threshold
        assert report["added"] == basis.shape[1]
        assert report["captured_after"] == pytest.approx(maths.captured_energy(gram, basis), abs=1e-9)


def test_threshold_one_keeps_exactly_the_numerical_span():
    features = low_rank_features(50, 32, 6)
    basis, _ = maths.grow_basis(maths.feature_gram(features), None, 1.0)
    assert basis.shape == (32, 6)
    residual = features.double() - features.double() @ basis @ basis.T
    assert residual.abs().max() < 1e-6 * features.abs().max()  # float32 features: rounding-level residual


def test_second_call_with_same_features_adds_nothing():
    gram = maths.feature_gram(low_rank_features(200, 24, 10))
    for threshold in (0.9, 1.0):
        basis, _ = maths.grow_basis(gram, None, threshold)
        again, report = maths.grow_basis(gram, basis.float(), threshold)  # stored bases are float32
        assert report["added"] == 0
        assert again.shape == basis.shape


def test_growth_keeps_old_columns_and_adds_only_new_directions():
    first = low_rank_features(100, 30, 5, seed=1)
    second = low_rank_features(100, 30, 5, seed=2)
    basis, _ = maths.grow_basis(maths.feature_gram(first), None, 1.0)
    grown, report = maths.grow_basis(maths.feature_gram(second), basis, 1.0)
    assert report["added"] == 5
    torch.testing.assert_close(grown[:, :5], basis)
    assert maths.orthonormality_error(grown) < 1e-10
    both = torch.cat([first, second]).double()
    assert (both - both @ grown @ grown.T).abs().max() < 1e-6 * both.abs().max()


def test_captured_share_before_growth_counts_old_basis():
    shared = low_rank_features(100, 30, 4, seed=3)
    basis, _ = maths.grow_basis(maths.feature_gram(shared), None, 1.0)
    _, report = maths.grow_basis(maths.feature_gram(shared), basis, 0.97)
    assert report["captured_before"] == pytest.approx(1.0, abs=1e-9)


def test_basis_never_exceeds_dimension():
    gram = maths.feature_gram(torch.randn(500, 8))
    basis, _ = maths.grow_basis(gram, None, 1.0)
    assert basis.shape == (8, 8)
    grown, report = maths.grow_basis(maths.feature_gram(torch.randn(50, 8)), basis, 1.0)
    assert grown.shape == (8, 8) and report["added"] == 0


def test_zero_features_add_nothing_and_nan_is_refused():
    basis, report = maths.grow_basis(torch.zeros(4, 4), None, 0.9)
    assert basis.shape == (4, 0) and report["added"] == 0
    with pytest.raises(ValueError, match="NaN or inf"):
        maths.grow_basis(torch.full((4, 4), float("nan")), None, 0.9)


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.01])
def test_threshold_out_of_range_is_refused(threshold):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        maths.grow_basis(torch.eye(3), None, threshold)


def test_threshold_schedule():
    assert maths.threshold_for_task(0.97, 0.003, 0) == 0.97
    assert maths.threshold_for_task(0.97, 0.003, 2) == pytest.approx(0.976)
    assert maths.threshold_for_task(0.99, 0.01, 5) == 1.0
