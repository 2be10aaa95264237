"""The Frequent Directions sketch for wide inputs (``gp_sketch_above``, issue 23): its error bound on random data,
exact capture of low-rank features (the bases of the Gram path), old outputs kept at τ = 1, passes and rank caps,
the merge over two processes, and the settings' checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peft_gp
from peft_gp import GPLoraConfig
from peft_gp.core import maths
from peft_gp.core.sketch import FrequentDirections, grow_from_sketch
from peft_gp.plan import plan_peft_model
from peft_gp.wiring.grams import collect_grams
from peft_gp.wiring.passes import memory_passes
from peft_gp.wiring.sketches import is_sketch, sketch_specs
from peft_gp.wiring.state import get_state

from .testing import SKETCH_ROWS, TINY, batches, lm_outputs_around_task2, lora_llama, repeated, run_two_ranks

SCRIPT = Path(__file__).parent / "scripts" / "sketch_ddp.py"


def sketch_of(features: torch.Tensor, rows: int, basis: torch.Tensor | None = None, chunk: int = 37):
    basis = torch.zeros(features.shape[1], 0, dtype=torch.float64) if basis is None else basis
    sketch = FrequentDirections(features.shape[1], rows, basis)
    for part in features.split(chunk):
        sketch.add_(FrequentDirections.of_rows(part, rows, basis))
    return sketch


def decaying(rows: int, dim: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -2, dim, dtype=torch.float64)
    return torch.randn(rows, dim, dtype=torch.float64, generator=generator) * scales


def test_the_error_bound_holds_for_every_k():
    features, ell = decaying(300, 40), 8
    sketch = sketch_of(features, ell)
    rows = sketch.sketch_rows()
    gap = torch.linalg.eigvalsh(features.T @ features - rows.T @ rows)  # ‖Ax‖² − ‖Bx‖² over unit x: its range
    tails = torch.linalg.svdvals(features).square().flip(0).cumsum(0).flip(0)  # ‖A − A_k‖_F² for k = 0, 1, ...
    shrunk = sketch.energies[2].item()
    assert shrunk > 0 and rows.shape[0] <= 2 * ell  # it did shrink, and holds at most 2ℓ rows
    assert gap.min().item() >= -1e-9 * tails[0].item()
    assert gap.max().item() <= shrunk * (1 + 1e-9)
    for k in range(ell):
        assert shrunk <= tails[k].item() / (ell - k) * (1 + 1e-9), k
    energy, residual, _ = sketch.energies.tolist()
    assert energy == pytest.approx(tails[0].item()) and residual == pytest.approx(energy)  # exact, no basis


def test_sketches_merge_with_the_same_bound():
    first, second = decaying(150, 30, seed=1), decaying(120, 30, seed=2)
    merged = sketch_of(first, 6).add_(sketch_of(second, 6))
    stacked = torch.cat([first, second])
    rows = merged.sketch_rows()
    gap = torch.linalg.eigvalsh(stacked.T @ stacked - rows.T @ rows)
    tail = torch.linalg.svdvals(stacked).square()[2:].sum().item()
    assert -1e-9 <= gap.min().item() and gap.max().item() <= tail / (6 - 2)


@pytest.mark.parametrize("threshold", [1.0, 0.9])
def test_low_rank_features_give_the_gram_paths_basis(threshold):
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(300, 5, dtype=torch.float64, generator=generator) @ torch.randn(
        5, 40, dtype=torch.float64, generator=generator
    )
    old = torch.linalg.qr(torch.randn(40, 3, dtype=torch.float64, generator=generator))[0]
    sketch = sketch_of(features, 6, old)  # rank 5 ≤ ℓ − 1; 300 rows: many shrinks
    grown, report = grow_from_sketch(sketch, old, threshold, max_rank=7)
    reference, expected = maths.grow_basis(features.T @ features, old, threshold, max_rank=7)
    assert report["added"] == expected["added"] > 0 and report["sketch_error"] < 1e-12
    assert report["captured_before"] == pytest.approx(expected["captured_before"], abs=1e-12)
    assert (grown @ grown.T - reference @ reference.T).abs().max().item() <= 1e-6
    assert torch.equal(grown[:, :3], old)  # old columns first, unchanged


@pytest.mark.parametrize("threshold", [1.0, 0.9])
def test_a_sketched_memory_equals_the_gram_memory_on_low_rank_features(threshold):
    plain = lora_llama(gp_threshold=threshold)
    sketched = lora_llama(gp_threshold=threshold, gp_sketch_above=16, gp_sketch_rows=SKETCH_ROWS)
    for task_id in range(2):
        expected = peft_gp.update_memory(plain, repeated(task_id))
        report = peft_gp.update_memory(sketched, repeated(task_id))
        wide = [name for name, entry in report.items() if entry["dim"] > 16]
        assert wide and all("sketch_error" in report[name] for name in wide)  # the inputs of width 24 and 40
        assert all(report[name]["basis_size"] == expected[name]["basis_size"] for name in report)
    first, second = peft_gp.get_memory(plain), peft_gp.get_memory(sketched)
    for name, basis in first.bases.items():
        other = second.bases[name]
        assert (basis @ basis.T - other @ other.T).abs().max().item() <= 1e-6, name
    shared = len({id(basis) for basis in second.bases.values()})
    assert shared == len({id(basis) for basis in first.bases.values()}) < len(second.bases)  # q/k/v share one sketch


@pytest.mark.parametrize("budget", [8.0, TINY])
def test_old_outputs_stay_with_a_sketched_memory(budget):
    """τ = 1, update mode: every input wider than 16 sketched with ℓ = 13 (rank ≤ 12: exact), in one pass or in
    many; training task 2 with AdamW and weight decay leaves task 1's outputs as they were, and task 2 learns."""
    model = lora_llama(gp_threshold=1.0, gp_sketch_above=16, gp_sketch_rows=SKETCH_ROWS, gp_update_budget_gb=budget)
    groups = get_state(model).groups
    sketched = {group.name: SKETCH_ROWS for group in groups if group.dim > 16}
    passes = memory_passes(model, groups, repeated(0), budget, None, sketched)[0]
    assert (len(passes) > 4) == (budget == TINY)
    report = peft_gp.update_memory(model, iter(repeated(0)))
    assert max(entry["basis_size"] for entry in report.values()) < 24  # not full: the test means something
    old = repeated(0)[0]
    before, after, losses = lm_outputs_around_task2(model, old, batches(1)[0])
    assert losses[-1] < losses[0]
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()


def test_a_rank_cap_bounds_sketched_bases():
    model = lora_llama(gp_threshold=1.0, gp_sketch_above=16, gp_sketch_rows=SKETCH_ROWS, gp_max_basis_rank=3)
    report = peft_gp.update_memory(model, repeated(0))
    assert max(entry["basis_size"] for entry in report.values()) == 3
    assert all(basis.shape[1] <= 3 for basis in peft_gp.get_memory(model).bases.values())


def test_a_sketch_costs_its_buffer_in_the_pass_budget():
    model = lora_llama(gp_sketch_above=16, gp_sketch_rows=SKETCH_ROWS)
    groups = get_state(model).groups
    budget = 2 * 8 * (2 * SKETCH_ROWS * 40) * 1.01 / 1e9  # two down_proj sketches (d = 40), not two 40² Grams
    wide = {group.name: SKETCH_ROWS for group in groups if group.dim > 16}
    alone = memory_passes(model, [g for g in groups if "down_proj.lora_A" in g.name], repeated(0), budget, None, wide)
    assert len(alone[0]) == 1
    as_grams = memory_passes(model, [g for g in groups if "down_proj.lora_A" in g.name], repeated(0), budget, None)
    assert len(as_grams[0]) == 2


def test_the_plan_costs_the_sketches_the_update_holds():
    model = lora_llama(gp_sketch_above=16, gp_sketch_rows=SKETCH_ROWS)
    state = get_state(model)
    specs = sketch_specs(state.groups, state.memory.bases, 16, SKETCH_ROWS, "cpu")
    grams, _ = collect_grams(model, state.groups, repeated(0), sketches=specs)
    held = {id(value): value for value in grams.values()}.values()
    measured = sum(v.sketch_rows().new_empty(2 * v.rows, v.dim).nbytes if is_sketch(v) else v.nbytes for v in held)
    assert sum(is_sketch(value) for value in held) == 8  # 2 layers × (q/k/v, o, gate/up, down)
    assert plan_peft_model(model).update_gram_bytes == measured


def test_two_processes_merge_their_sketches(tmp_path):
    run_two_ranks(SCRIPT, tmp_path)
    ranks = [load_file(tmp_path / f"rank{rank}.safetensors") for rank in (0, 1)]
    assert set(ranks[0]) == set(ranks[1])
    assert all(torch.equal(ranks[0][key], ranks[1][key]) for key in ranks[0])  # bit-identical on both ranks
    reference = lora_llama(gp_threshold=1.0)  # one process, Gram path, both ranks' data
    data = [batch for rank in (0, 1) for batch in repeated(rank, rows=1)]
    peft_gp.update_memory(reference, data)
    for name, basis in peft_gp.get_memory(reference).bases.items():
        other = ranks[0][name]
        assert basis.shape == other.shape, name
        assert (basis @ basis.T - other @ other.T).abs().max().item() <= 1e-6, name


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"gp_sketch_above": 0}, "gp_sketch_above"),
        ({"gp_sketch_above": 1.5}, "gp_sketch_above"),
        ({"gp_sketch_rows": 0}, "gp_sketch_rows"),
        ({"gp_sketch_rows": 1}, "at least 2"),  # it would keep no row: nothing protected
        ({"gp_sketch_above": 8, "gp_importance_scale": 10.0}, "gp_importance_scale"),
    ],
)
def test_bad_sketch_settings_are_refused(settings, match):
    with pytest.raises((ValueError, TypeError), match=match):
        GPLoraConfig(r=4, target_modules=["q_proj"], **settings)
