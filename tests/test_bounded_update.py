"""A memory update in bounded passes (issue 23, item 1): under ``gp_update_budget_gb`` the groups are split into
passes, each streaming the sample with hooks on its groups alone; the bases, their sharing, the report and the task's
fingerprint are bit-identical to one pass; one-shot iterators are read once; old outputs stay at τ = 1 ("update");
models whose Grams fit take one pass without a probe."""

from __future__ import annotations

import pytest
import torch
from tqdm import tqdm

import peft_gp
from peft_gp import GPLoraConfig
from peft_gp.wiring.passes import input_bytes, memory_passes, pack, rereadable
from peft_gp.wiring.state import get_state

from .testing import TINY, batches, llama, lm_outputs_around_task2, lora_llama


def passes_of(model, budget, data=None) -> list:
    return memory_passes(model, get_state(model).groups, data or batches(0), budget, None)[0]


def test_a_multi_pass_update_grows_the_bases_of_one_pass_bit_for_bit():
    one, many = lora_llama(gp_update_budget_gb=None), lora_llama(gp_update_budget_gb=TINY)
    assert len(passes_of(one, None)) == 1 and len(passes_of(many, TINY)) > 4
    for task_id in range(2):
        report = peft_gp.update_memory(one, batches(task_id))
        assert peft_gp.update_memory(many, iter(batches(task_id))) == report  # a one-shot iterator: read once
    first, second = peft_gp.get_memory(one), peft_gp.get_memory(many)
    assert all(torch.equal(first.bases[name], second.bases[name]) for name in first.bases)
    assert len({id(b) for b in first.bases.values()}) == len({id(b) for b in second.bases.values()}) < len(first.bases)
    assert first.info["last_task_fingerprint"] == second.info["last_task_fingerprint"]
    assert 0 < min(basis.shape[1] for basis in second.bases.values())
    assert first.tasks_seen == second.tasks_seen == 2
    again = peft_gp.update_memory(many, batches(1))  # the last task again: nothing added, no phantom task
    assert second.tasks_seen == 2 and all(entry["added"] == 0 for entry in again.values())


def test_passes_keep_shared_inputs_and_both_sides_of_a_layer_together():
    model = lora_llama(gp_update_budget_gb=TINY)
    passes = [[group.name for group in groups] for groups in passes_of(model, TINY)]
    where = {name: number for number, names in enumerate(passes) for name in names}
    for layer in range(2):
        for siblings in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            prefix = f"model.layers.{layer}.{'self_attn' if siblings[0] == 'q_proj' else 'mlp'}"
            names = [f"{prefix}.{module}.lora_{side}" for module in siblings for side in "AB"]
            assert len({where[name] for name in names}) == 1, names
    assert sorted(where) == sorted(group.name for group in get_state(model).groups)  # each group in one pass


def test_a_model_whose_grams_fit_takes_one_pass_without_reading_the_data():
    model = lora_llama()  # the default budget: 8 GB
    data = batches(0)
    groups, kept = memory_passes(model, get_state(model).groups, data, 8.0, None)
    assert len(groups) == 1 and kept is data
    assert pack([["a"], ["b"], ["c"]], [3, 3, 3], 6) == [["a", "b"], ["c"]]
    assert pack([["a"], ["b"]], [9, 1], 6) == [["a"], ["b"]]  # a unit over the budget: a pass of its own
    assert input_bytes(10) == 2 * 8 * 100  # the Gram sum and one batch's Gram, float64


def test_one_shot_batches_are_read_once_within_max_samples():
    data = batches(0, count=3)  # 3 batches of 4
    assert rereadable(data, None) is data
    kept = rereadable(iter(data), 6)
    assert [len(batch["input_ids"]) for batch in kept] == [4, 2]
    loader = torch.utils.data.DataLoader([{"input_ids": torch.arange(3)}] * 5, batch_size=2, shuffle=True)
    assert isinstance(rereadable(loader, None), list)  # a shuffling loader would draw another sample per pass
    rows = [{"input_ids": torch.arange(3)}] * 5
    in_order = torch.utils.data.DataLoader(rows, batch_size=2)
    assert rereadable(in_order, None) is in_order
    sampler = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(rows), batch_size=2, drop_last=False)
    assert isinstance(rereadable(torch.utils.data.DataLoader(rows, batch_sampler=sampler), None), list)
    wrapped = tqdm(batch for batch in data)  # iter() of a progress bar is not the bar, yet it reads a generator
    assert [len(batch["input_ids"]) for batch in rereadable(wrapped, None)] == [4, 4, 4]


def test_old_outputs_stay_after_a_multi_pass_update():
    """τ = 1, update mode: task 1 stored in passes from a generator; training task 2 with AdamW and weight decay
    leaves task 1's outputs (16 tokens, d = 24) as they were, and task 2 still learns."""
    model = peft_gp.get_peft_model(llama(), GPLoraConfig(r=4, target_modules="all-linear", init_lora_weights=False,
                                                         gp_threshold=1.0, gp_update_budget_gb=TINY))  # fmt: skip
    old = {"input_ids": batches(0)[0]["input_ids"][:2, :], "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    peft_gp.update_memory(model, (batch for batch in [old]))
    before, after, losses = lm_outputs_around_task2(model, old, batches(1)[0])
    assert losses[-1] < losses[0]
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()


@pytest.mark.parametrize("budget", [0.0, -1.0, float("inf"), "4"])
def test_a_bad_budget_is_refused(budget):
    with pytest.raises((ValueError, TypeError), match="gp_update_budget_gb"):
        GPLoraConfig(r=4, target_modules=["q_proj"], gp_update_budget_gb=budget)
