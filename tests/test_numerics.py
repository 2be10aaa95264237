"""Numerical edge cases of the memory, property-tested: rank deficiency, one sample, duplicates, extreme scales,
16-bit activations, a basis that fills its space."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import get_peft_model

import peft_gp
from peft_gp import GPLoraConfig, GPProjector
from peft_gp.core import maths

from .testing import tiny_bert, train_steps


def features(rows: int, dim: int, rank: int, seed: int) -> torch.Tensor:
    """A float32 ``rows × dim`` matrix of rank ``min(rows, dim, rank)`` with singular values in [0.1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    rank = min(rows, dim, rank)
    left, _ = torch.linalg.qr(torch.randn(rows, rank, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(dim, rank, generator=generator, dtype=torch.float64))
    singular = 0.1 + 0.9 * torch.rand(rank, generator=generator, dtype=torch.float64)
    return ((left * singular) @ right.T).float()


def same_span(first: torch.Tensor, second: torch.Tensor, atol: float = 1e-6) -> bool:
    first, second = first.double(), second.double()
    return first.shape == second.shape and torch.allclose(first @ first.T, second @ second.T, atol=atol)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), dim=st.integers(2, 24), rank=st.integers(1, 24), seed=st.integers(0, 10_000))
def test_full_energy_basis_has_the_rank_of_the_features(rows, dim, rank, seed):
    data = features(rows, dim, rank, seed)
    basis, _ = maths.grow_basis(maths.feature_gram(data), None, 1.0)
    assert basis.shape[1] == min(rows, dim, rank)
    assert maths.orthonormality_error(basis) < 1e-10


@settings(max_examples=25, deadline=None)
@given(dim=st.integers(2, 32), seed=st.integers(0, 10_000), copies=st.integers(2, 5))
def test_single_and_duplicated_samples(dim, seed, copies):
    one = features(1, dim, 1, seed)
    basis, _ = maths.grow_basis(maths.feature_gram(one), None, 0.97)
    assert basis.shape == (dim, 1)
    repeated, _ = maths.grow_basis(maths.feature_gram(one.repeat(copies, 1)), None, 0.97)
    assert same_span(basis, repeated)


@settings(max_examples=25, deadline=None)
@given(exponent=st.sampled_from([-18, -9, -3, 3, 9, 18]), seed=st.integers(0, 10_000), threshold=st.floats(0.5, 1.0))
def test_energy_criterion_is_scale_invariant(exponent, seed, threshold):
    data = features(30, 16, 16, seed) * torch.linspace(0.2, 2.0, 16)
    reference, _ = maths.grow_basis(maths.feature_gram(data), None, threshold)
    scaled, _ = maths.grow_basis(maths.feature_gram(data * 10.0**exponent), None, threshold)
    assert scaled.shape == reference.shape
    assert same_span(reference, scaled, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_activations_accumulate_in_float64(dtype):
    data = features(64, 16, 6, 0).to(dtype)
    gram = maths.feature_gram(data)
    assert gram.dtype == torch.float64
    torch.testing.assert_close(gram, maths.feature_gram(data.float()), rtol=0, atol=0)
    # 16-bit rounding makes rank-6 features numerically full-rank: at threshold 1.0 the noise directions would be
    # kept too, but they hold a negligible share of the energy, so any threshold below ~0.9999 ignores them
    noisy, _ = maths.grow_basis(gram, None, 1.0)
    basis, _ = maths.grow_basis(gram, None, 0.999)
    assert basis.shape[1] == 6 < noisy.shape[1]


def test_a_group_pinned_whole_by_the_threshold_pattern_fills_without_a_capacity_warning():
    """``gp_threshold_pattern={"lora_B": 1.0}`` asks for lora_B's whole space: full is the request, not a problem."""
    config = GPLoraConfig(task_type="SEQ_CLS", r=4, lora_dropout=0.0, target_modules=["query"],
                          gp_threshold_pattern={"lora_B": 1.0})  # fmt: skip
    model = get_peft_model(tiny_bert(), config)
    ids = torch.randint(4, 60, (8, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.arange(8) % 4}
    train_steps(model, batch, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peft_gp.update_memory(model, [batch])
    full = peft_gp.get_memory(model).full_groups()
    assert full and all("lora_B" in name for name in full)  # it did fill: the warning was left out, not avoided


def test_a_full_basis_warns_names_the_layer_and_training_goes_on():
    config = GPLoraConfig(task_type="SEQ_CLS", r=4, lora_dropout=0.0, target_modules=["query"], gp_threshold=1.0)
    model = get_peft_model(tiny_bert(), config)
    ids = torch.randint(4, 60, (8, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.arange(8) % 4}
    train_steps(model, batch, 2)  # a trained lora_B (while it is zero, lora_A moves out of the space instead)
    with pytest.warns(peft_gp.GPCapacityWarning, match=r"fills the whole feature space.*lora_B"):
        peft_gp.update_memory(model, [batch])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # already-full groups are not reported again
        peft_gp.update_memory(model, [batch])
    memory = peft_gp.get_memory(model)
    full = memory.full_groups()
    assert full and all(memory.capacity()[name] == 1.0 for name in full)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_B" in name}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    GPProjector(model).attach(optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # training itself raises nothing
        losses = train_steps(model, batch, 3, optimizer=optimizer)
    assert all(torch.isfinite(torch.tensor(losses)))
    for name, param in model.named_parameters():
        if name in frozen:  # a full layer can no longer move
            assert (param - frozen[name]).abs().max() < 1e-6
