"""One basis per distinct input (issue 23): layers that read the same activation (q/k/v, gate/up, BERT's query/value)
share one Gram matrix and one basis, found from the forward hooks; the bases are bit-identical to the ones each group
would have grown alone; the file stores each once; version-2 files (one basis per group) still load and project the
same; per-task slices and SGP importances keep working with shared bases."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import peft_gp
from peft_gp import GPLoraConfig, GPMemory, GPMemoryError, GPProjector
from peft_gp.wiring.grams import collect_grams
from peft_gp.wiring.shared_grams import SharedGrams
from peft_gp.wiring.state import get_state, set_memory

from .testing import batches, lora_llama, save_legacy_memory, tiny_bert, train_steps

LAYER = "model.layers.{}.{}.lora_A"
ATTENTION, MLP = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")


def held(memory: GPMemory) -> int:
    return len({id(basis) for basis in memory.bases.values()})


def test_layers_reading_one_input_share_a_basis_bit_identical_to_separate_ones(tmp_path):
    model = lora_llama()
    groups = get_state(model).groups
    memory = peft_gp.get_memory(model)
    alone = GPMemory(dims=dict(memory.dims))  # the same updates, one Gram tensor per group: nothing shared
    for task_id in range(2):
        grams, _ = collect_grams(model, groups, batches(task_id))
        alone.update({name: gram.clone() for name, gram in grams.items()}, 0.9)
        memory.update(grams, 0.9)
        memory.thresholds.pop()  # (update_memory's bookkeeping is not under test here)
        memory.thresholds.append(0.9)
    for layer in range(2):
        for siblings in (ATTENTION, MLP):
            names = [LAYER.format(layer, module) for module in siblings]
            assert len({id(memory.bases[name]) for name in names}) == 1, names
    assert held(alone) == len(alone.bases) and held(memory) == len(memory.bases) - 2 * 3
    assert all(torch.equal(memory.bases[name], alone.bases[name]) for name in memory.bases)
    assert 0 < min(basis.shape[1] for basis in memory.bases.values())

    memory.save(str(tmp_path / "shared.safetensors"))
    alone.save(str(tmp_path / "alone.safetensors"))
    assert len(load_file(str(tmp_path / "shared.safetensors"))) == held(memory)
    assert os.path.getsize(tmp_path / "shared.safetensors") < os.path.getsize(tmp_path / "alone.safetensors")
    loaded = GPMemory.load(str(tmp_path / "shared.safetensors"))
    assert held(loaded) == held(memory) and all(torch.equal(loaded.bases[n], b) for n, b in memory.bases.items())


def test_a_bf16_model_shares_by_content_and_partial_targets_share_among_themselves():
    """PEFT casts a bf16 layer input to the float32 adapter once per layer: the copies are matched by content. With
    LoRA on q and v only, q and v share."""
    model = lora_llama(torch.bfloat16, target_modules=["q_proj", "v_proj"])
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    grams, _ = collect_grams(model, get_state(model).groups, batches(0))
    for layer in range(2):
        query, value = (grams[LAYER.format(layer, f"self_attn.{name}_proj")] for name in "qv")
        assert query is value
    assert len({id(gram) for gram in grams.values()}) == 2 + 4  # one per layer's input, and the four lora_B's

    bert = peft_gp.get_peft_model(tiny_bert(), GPLoraConfig(r=4, target_modules=["query", "value"]))
    grams, _ = collect_grams(bert, get_state(bert).groups, [{"input_ids": torch.tensor([[1, 2, 3]])}])
    query, value = (grams[f"bert.encoder.layer.0.attention.self.{name}.lora_A"] for name in ("query", "value"))
    assert query is value


def test_a_class_splits_when_its_members_get_different_inputs():
    grams = [torch.eye(2, dtype=torch.float64) * (i + 1) for i in range(3)]
    shared = SharedGrams(["a", "b", "c"])
    shared.add_batch({"a": [0], "b": [0], "c": [1]}, grams)
    assert shared.by_name()["a"] is shared.by_name()["b"]
    shared.add_batch({"a": [2], "b": [0], "c": [1]}, grams)  # a and b part: each keeps the sum so far, copied
    sums = shared.by_name()
    assert sums["a"] is not sums["b"]
    torch.testing.assert_close(sums["a"], grams[0] + grams[2])
    torch.testing.assert_close(sums["b"], grams[0] + grams[0])
    torch.testing.assert_close(sums["c"], grams[1] * 2)


@pytest.mark.parametrize("scale", [None, 5.0])
def test_a_version_2_file_loads_projects_the_same_and_shares_from_the_next_task(tmp_path, scale):
    model = lora_llama(gp_importance_scale=scale)
    peft_gp.update_memory(model, batches(0))
    memory = peft_gp.get_memory(model)
    path = tmp_path / peft_gp.GP_MEMORY_NAME
    save_legacy_memory(memory, path, version=2)
    legacy = GPMemory.load(str(path))
    assert held(legacy) == len(legacy.bases) and set(legacy.importances) == set(memory.importances)
    assert all(torch.equal(legacy.bases[name], basis) for name, basis in memory.bases.items())

    projected = []
    for source in (memory, legacy):
        fresh = lora_llama(gp_importance_scale=scale)
        set_memory(fresh, source)
        optimizer = torch.optim.SGD([p for p in fresh.parameters() if p.requires_grad], lr=0.0)
        GPProjector(fresh).attach(optimizer)
        fresh(**batches(1)[0], labels=batches(1)[0]["input_ids"]).loss.backward()
        optimizer.step()  # lr 0: the step only projects the gradients
        projected.append([p.grad.clone() for p in fresh.parameters() if p.requires_grad])
        if source is legacy:
            peft_gp.update_memory(fresh, batches(1))
            assert held(peft_gp.get_memory(fresh)) == held(memory)  # equal bases of one input: shared again
    assert all(torch.equal(a, b) for a, b in zip(*projected))


def rewrite(path, **metadata):
    with safe_open(str(path), "pt") as handle:
        old = handle.metadata()
    save_file(load_file(str(path)), str(path), metadata={**old, **metadata})


@pytest.mark.parametrize(
    "shared, message",
    [
        ({"nowhere": "model.layers.0.self_attn.q_proj.lora_A"}, "not a stored basis"),
        ({"model.layers.0.self_attn.k_proj.lora_A": "model.layers.0.self_attn.q_proj.lora_B"}, "not a stored basis"),
        ({}, "do not match the recorded layers"),
        ([1], "must map layer names"),
    ],
)
def test_a_damaged_sharing_map_is_refused(tmp_path, shared, message):
    model = lora_llama()
    peft_gp.update_memory(model, batches(0))
    path = tmp_path / peft_gp.GP_MEMORY_NAME
    peft_gp.get_memory(model).save(str(path))
    rewrite(path, gp_shared=json.dumps(shared))
    with pytest.raises(GPMemoryError, match=message):
        GPMemory.load(str(path))


def test_slices_work_on_shared_bases():
    """Per-task slices move each shared input side off its one basis; the old outputs stay (τ = 1, update mode)."""
    model = lora_llama(r=4, init_lora_weights=True, gp_threshold=1.0, gp_task_slices=2,
                       target_modules=["q_proj", "k_proj", "v_proj"])  # fmt: skip
    old_ids = torch.tensor([[1, 2, 3, 1, 2, 3]] * 4)  # few distinct tokens: low-rank features, a basis far from full
    old = {"input_ids": old_ids, "attention_mask": torch.ones_like(old_ids)}
    first = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    projector = GPProjector(model).attach(first)  # task 1 trains slice 0 alone
    train_steps(model, {**old, "labels": old_ids}, 5, optimizer=first)
    projector.detach()
    peft_gp.update_memory(model, [old])
    memory = peft_gp.get_memory(model)
    assert held(memory) < len(memory.bases)
    assert 0 < memory.bases[LAYER.format(0, "self_attn.q_proj")].shape[1] < 24
    model.eval()
    with torch.no_grad():
        before = model(**old).logits
    new = batches(1, count=1)[0]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    projector.attach(optimizer)
    losses = train_steps(model, {**new, "labels": new["input_ids"]}, 10, optimizer=optimizer)
    model.eval()
    with torch.no_grad():
        after = model(**old).logits
    assert losses[-1] < losses[0]
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()
