"""Scaled projection (SGP, ``gp_importance_scale``): importances by hand, the scaled projector, λ = 1 equal to the
hard projection, the stability–plasticity trade-off on a tiny BERT, and the importances' round trip."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import peft_gp
from peft_gp import GPLoraConfig, GPMemoryError, GPProjector
from peft_gp.core import maths
from peft_gp.wiring.memory_file import FORMAT_VERSION, IMPORTANCE_SUFFIX

from .testing import CASES, save_legacy_memory, train_steps

CASE = next(case for case in CASES if case.name == "bert")


def test_importances_by_hand():
    basis = torch.eye(3, dtype=torch.float64)[:, :2]  # e1 stored before, e2 added by this task
    gram = torch.diag(torch.tensor([0.25, 4.0, 0.0], dtype=torch.float64))  # σ = (0.5, 2) along them
    # α = 1: λ = 2σ / (σ + 2) = (0.4, 1); e1 adds its earlier 0.3
    importance = maths.direction_importance(gram, basis, torch.tensor([0.3]), scale=1.0)
    torch.testing.assert_close(importance, torch.tensor([0.7, 1.0], dtype=torch.float64))
    # α = 3, first task: λ = 4σ / (3σ + 2) = (0.571..., 1); clipped at 1 with a large earlier importance
    first = maths.direction_importance(gram, basis, None, scale=3.0)
    torch.testing.assert_close(first, torch.tensor([2.0 / 3.5, 1.0], dtype=torch.float64))
    assert maths.direction_importance(gram, basis, torch.tensor([0.9]), scale=1.0)[0] == 1.0
    # a huge α: every direction with energy counts fully, the hard projection
    torch.testing.assert_close(maths.direction_importance(gram, basis, None, 1e9), torch.ones(2, dtype=torch.float64))


def test_scaled_projection_keeps_one_minus_importance_of_each_direction():
    generator = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(6, 3, generator=generator))[0]
    grad = torch.randn(4, 6, generator=generator)
    importance = torch.tensor([1.0, 0.5, 0.0])
    projected = maths.project_out_scaled(grad, basis, importance)
    torch.testing.assert_close(projected @ basis, (grad @ basis) * (1 - importance))
    torch.testing.assert_close(maths.project_out_scaled(grad, basis, torch.ones(3)), maths.project_out(grad, basis))


def model_with_task(scale, threshold: float = 1.0, mode: str = "update"):
    config = GPLoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, **CASE.lora, gp_threshold=threshold,
                          gp_projection=mode, gp_importance_scale=scale)  # fmt: skip
    model = peft_gp.get_peft_model(CASE.build(), config)
    old_batch = CASE.make_batch(0)
    train_steps(model, old_batch, 10)
    peft_gp.update_memory(model, [old_batch])
    return model, old_batch


def second_task(model, old_batch) -> tuple[float, float]:
    """Task 2 (15 AdamW steps, weight decay): the relative change of task 1's outputs and task 2's last loss."""
    before = CASE.output(model, old_batch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    projector = GPProjector(model).attach(optimizer)
    losses = train_steps(model, CASE.make_batch(1), 15, optimizer=optimizer)
    projector.detach()
    after = CASE.output(model, old_batch)
    return (after - before).abs().max().item() / before.abs().max().item(), losses[-1]


def test_memory_keeps_an_importance_per_direction():
    model, _ = model_with_task(10.0)
    memory = peft_gp.get_memory(model)
    assert set(memory.importances) == set(memory.bases)
    for name, basis in memory.bases.items():
        importance = memory.importances[name]
        assert importance.shape == (basis.shape[1],) and importance.dtype == torch.float32
        if basis.shape[1]:
            assert 0 <= importance.min() and importance.max() == pytest.approx(1.0)  # the strongest direction: 1
    assert not peft_gp.get_memory(model_with_task(None)[0]).importances  # hard projection: none kept


@pytest.mark.filterwarnings("ignore::peft_gp.UnprotectedTrainingWarning")  # gradients taken by hand
def test_gradient_mode_scales_each_stored_direction_by_one_minus_its_importance():
    model, old_batch = model_with_task(1.0, mode="gradient")
    memory = peft_gp.get_memory(model)
    model.train()
    model(**CASE.make_batch(1)).loss.backward()
    name = "bert.encoder.layer.0.attention.self.query.lora_A"
    weight = model.get_submodule("base_model.model." + name.replace("lora_A", "lora_A.default")).weight
    basis, importance = memory.bases[name], memory.importances[name]
    before = weight.grad.clone() @ basis
    GPProjector(model).project_gradients()
    torch.testing.assert_close(weight.grad @ basis, before * (1 - importance), rtol=1e-4, atol=1e-6)
    assert importance.min() < 0.5  # weak directions stay partly open


def test_importances_all_one_are_the_hard_projection_bit_for_bit():
    hard, old_batch = model_with_task(None)
    scaled, _ = model_with_task(10.0)
    memory = peft_gp.get_memory(scaled)
    memory.importances = {name: torch.ones_like(value) for name, value in memory.importances.items()}
    memory.version += 1
    second_task(hard, old_batch)
    second_task(scaled, old_batch)
    scaled_params = dict(scaled.named_parameters())
    for name, param in hard.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, scaled_params[name]), name


def test_a_smaller_scale_trades_old_outputs_for_new_learning():
    """Threshold 1.0, "update": hard projection keeps task 1 exactly; SGP with α = 10 and α = 1 lets it drift by
    more as α falls (measured 1e-7, 0.019, 0.049; 1.28 without projection) while task 2's loss ends lower (0.550,
    0.541, 0.526; 0.747 without projection, whose head moves too)."""
    drifts, losses = {}, {}
    for scale in (None, 10.0, 1.0):
        drifts[scale], losses[scale] = second_task(*model_with_task(scale))
    assert drifts[None] <= 1e-4 < drifts[10.0] < drifts[1.0] < 0.2, drifts
    assert losses[1.0] < losses[10.0] < losses[None], losses


def test_importances_round_trip_and_damaged_ones_are_refused(tmp_path):
    model, _ = model_with_task(10.0)
    peft_gp.save_pretrained(model, tmp_path)
    memory = peft_gp.get_memory(model)
    loaded = peft_gp.from_pretrained(CASE.build(), str(tmp_path), is_trainable=True)
    restored = peft_gp.get_memory(loaded)
    assert set(restored.importances) == set(memory.importances)
    assert all(torch.equal(restored.importances[name], value) for name, value in memory.importances.items())

    path = tmp_path / peft_gp.GP_MEMORY_NAME
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["gp_format_version"] == str(FORMAT_VERSION)
    key = next(key for key, value in tensors.items() if key.endswith(IMPORTANCE_SUFFIX) and value.numel())
    for damage, message in ((lambda t: t * 3, r"not all in \[0, 1\]"), (lambda t: t[:-1], "do not fit a basis")):
        save_file({**tensors, key: damage(tensors[key]).contiguous()}, str(path), metadata=metadata)
        with pytest.raises(GPMemoryError, match=message):
            peft_gp.GPMemory.load(str(path))


@pytest.mark.parametrize("scale", [0, -1.0, math.nan, math.inf, True, "10"])
def test_bad_scales_are_refused(scale):
    with pytest.raises((TypeError, ValueError), match="gp_importance_scale"):
        GPLoraConfig(r=8, gp_importance_scale=scale)


def test_a_version_1_memory_file_without_importances_still_loads(tmp_path):
    model, _ = model_with_task(None)
    path = tmp_path / peft_gp.GP_MEMORY_NAME
    save_legacy_memory(peft_gp.get_memory(model), path, version=1)
    loaded = peft_gp.GPMemory.load(str(path))
    assert loaded.importances == {} and set(loaded.bases) == set(peft_gp.get_memory(model).bases)
