"""``gp_gram_dtype="float32"`` (issue 23): each batch's Gram product in float32, summed in float64, with the eigenvalue
floor raised to float32's rounding (``maths.FLOAT32_EIGEN_TOLERANCE``): the bases match the float64 path's, τ = 1
does not fill the space with rounding noise, old outputs stay, and bad values are refused."""

from __future__ import annotations

import pytest
import torch

import peft_gp
from peft_gp import GPLoraConfig
from peft_gp.core import maths
from peft_gp.wiring.grams import collect_grams
from peft_gp.wiring.state import get_state

from .testing import batches, lm_outputs_around_task2, lora_llama

DIM, RANK = 48, 9


def low_rank_features(rows: int = 600, seed: int = 0) -> torch.Tensor:
    """Float32 features of rank ``RANK`` in ``DIM`` dimensions, energies spread over two decades, off-centre."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(RANK, DIM, generator=generator, dtype=torch.float64)
    scores = torch.randn(rows, RANK, generator=generator, dtype=torch.float64) * torch.logspace(0, -1, RANK)
    return ((scores + 0.5) @ mixing).to(torch.float32)


def summed_gram(features: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The collector's sum: each batch of 50 rows' product in ``dtype``, added to a float64 sum."""
    total = torch.zeros(DIM, DIM, dtype=torch.float64)
    for batch in features.split(50):
        total += maths.feature_gram(batch, dtype)
    return total


def projector(basis: torch.Tensor) -> torch.Tensor:
    return basis @ basis.T


@pytest.mark.parametrize("threshold", [1.0, 0.97])
def test_float32_products_give_the_float64_bases(threshold):
    features = low_rank_features()
    exact = summed_gram(features, torch.float64)
    rounded = summed_gram(features, torch.float32)
    assert rounded.dtype == torch.float64 and not torch.equal(rounded, exact)  # the products were rounded
    reference, _ = maths.grow_basis(exact, None, threshold)
    basis, _ = maths.grow_basis(rounded, None, threshold, eigen_tolerance=maths.FLOAT32_EIGEN_TOLERANCE)
    assert basis.shape == reference.shape
    assert (projector(basis) - projector(reference)).abs().max().item() <= 1e-5
    if threshold == 1.0:
        assert basis.shape[1] == RANK  # the whole span of the features, and no rounding noise
        noisy, _ = maths.grow_basis(rounded, None, threshold)  # float64's floor: noise directions come in
        assert noisy.shape[1] > RANK


def test_a_second_task_inside_the_span_adds_nothing():
    """Rounding noise outside the old basis stays below the floor: features already stored add no direction."""
    first, again = low_rank_features(seed=0), low_rank_features(seed=0)[::2]
    tolerance = maths.FLOAT32_EIGEN_TOLERANCE
    basis, _ = maths.grow_basis(summed_gram(first, torch.float32), None, 1.0, eigen_tolerance=tolerance)
    grown, report = maths.grow_basis(summed_gram(again, torch.float32), basis, 1.0, eigen_tolerance=tolerance)
    assert report["added"] == 0 and torch.equal(grown, basis)


def test_the_collector_sums_float32_products_in_float64():
    model = lora_llama()
    groups = get_state(model).groups
    exact, _ = collect_grams(model, groups, batches(0))
    rounded, _ = collect_grams(model, groups, batches(0), gram_dtype=torch.float32)
    assert rounded.keys() == exact.keys()
    for name, gram in rounded.items():
        assert gram.dtype == torch.float64, name
        torch.testing.assert_close(gram, exact[name], rtol=1e-5, atol=1e-6 * exact[name].abs().max().item())
    shared = {id(gram) for gram in exact.values()}
    assert len({id(gram) for gram in rounded.values()}) == len(shared)  # q/k/v still share one sum


@pytest.mark.parametrize("sketch", [None, 16])
def test_old_outputs_stay_with_float32_products(sketch):
    """τ = 1, update mode, AdamW with weight decay: task 1's outputs (12 tokens, d = 24) stay within 1e-4 and task 2
    learns; the bases are as wide as the float64 path's (sketched inputs, ``gp_sketch_above=16``, stay float64)."""
    settings = {"gp_threshold": 1.0, "gp_projection": "update", "gp_sketch_above": sketch, "gp_sketch_rows": 13}
    model = lora_llama(gp_gram_dtype="float32", **settings)
    reference = lora_llama(**settings)
    old = {"input_ids": batches(0)[0]["input_ids"][:2], "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    peft_gp.update_memory(model, [old])
    peft_gp.update_memory(reference, [old])
    widths = {name: basis.shape[1] for name, basis in peft_gp.get_memory(model).bases.items()}
    assert widths == {name: basis.shape[1] for name, basis in peft_gp.get_memory(reference).bases.items()}
    before, after, losses = lm_outputs_around_task2(model, old, batches(1)[0])
    assert losses[-1] < losses[0]
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()


@pytest.mark.parametrize("value", ["float16", "bfloat16", "double", torch.float32, None])
def test_a_bad_gram_dtype_is_refused(value):
    with pytest.raises(ValueError, match="gp_gram_dtype must be one of"):
        GPLoraConfig(r=4, target_modules=["q_proj"], gp_gram_dtype=value)
