"""The smaller of basis and complement (issue 23): a basis filling more than half its space is stored as its
orthonormal complement (a full one as an empty complement: a flag), rebuilt bit for bit on load; the projection keeps
old outputs as before; format-3 files (bases only) still load; damaged complement metadata is refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import peft_gp
from peft_gp import GPMemory, GPMemoryError
from peft_gp.core import maths
from peft_gp.wiring.memory import compact_form

from .testing import batches, llama, lora_llama


def test_the_complement_spans_the_rest_of_the_space_and_is_reproducible():
    generator = torch.Generator().manual_seed(0)
    for dim, width in ((6, 0), (6, 2), (6, 5), (6, 6)):
        basis = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))[0][:, :width]
        rest = maths.complement(basis)
        assert rest.shape == (dim, dim - width) and rest.dtype == torch.float64
        assert maths.orthonormality_error(rest) < 1e-12
        assert (basis.T @ rest).abs().max().item() < 1e-12 if width and width < dim else True
        assert torch.equal(rest, maths.complement(basis.clone()))
        projector = basis @ basis.T + rest @ rest.T
        torch.testing.assert_close(projector, torch.eye(dim, dtype=torch.float64))


def test_compact_form_is_a_fixed_point_a_flag_when_full_and_none_below_half():
    generator = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(10, 7, generator=generator))[0]
    assert compact_form(basis[:, :5]) is None  # 5 of 10: the basis is not larger than its complement
    rebuilt, stored = compact_form(basis)
    assert stored.shape == (10, 3) and rebuilt.shape == (10, 7)
    torch.testing.assert_close(rebuilt @ rebuilt.T, basis @ basis.T, atol=1e-6, rtol=0)  # the same span
    assert torch.equal(maths.complement(stored).float(), rebuilt)  # what a load rebuilds
    identity, flag = compact_form(torch.eye(10))
    assert flag.shape == (10, 0) and torch.equal(identity, torch.eye(10))


def partial_batch() -> dict:
    """16 tokens: with d = 24 the attention's and gate/up's bases fill more than half their space, not all of it."""
    ids = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def full_memory(tmp_path, data: list | None = None):
    model = lora_llama(gp_threshold=1.0)
    peft_gp.update_memory(model, data or batches(0, count=4))  # 96 tokens, d = 24 or 40: lora_A bases fill
    path = tmp_path / peft_gp.GP_MEMORY_NAME
    peft_gp.get_memory(model).save(str(path))
    return model, path


def test_large_bases_are_stored_as_complements_and_load_bit_identically(tmp_path):
    model, path = full_memory(tmp_path)
    memory = peft_gp.get_memory(model)
    stored = load_file(str(path))
    with safe_open(str(path), "pt") as handle:
        complements = json.loads(handle.metadata()["gp_complements"])
    assert complements and all(memory.dims[name] - memory.bases[name].shape[1] == stored[name].shape[1]
                               for name in complements)  # fmt: skip
    assert all(2 * tensor.shape[1] <= tensor.shape[0] for tensor in stored.values())  # always the smaller one
    full = [name for name in complements if stored[name].shape[1] == 0]
    assert full and all(torch.equal(memory.bases[name], torch.eye(memory.dims[name])) for name in full)
    stored_bytes = sum(tensor.numel() * 4 for tensor in stored.values())
    held = {id(basis): basis for basis in memory.bases.values()}.values()
    assert stored_bytes < sum(basis.numel() * 4 for basis in held) / 2

    loaded = GPMemory.load(str(path))
    assert all(torch.equal(loaded.bases[name], basis) for name, basis in memory.bases.items())
    loaded.save(str(tmp_path / "again.safetensors"))  # stable: the same complements written again
    again = load_file(str(tmp_path / "again.safetensors"))
    assert set(again) == set(stored) and all(torch.equal(again[name], tensor) for name, tensor in stored.items())


def test_a_format_3_file_without_complements_still_loads(tmp_path):
    model, path = full_memory(tmp_path)
    memory = peft_gp.get_memory(model)
    tensors, shared, _ = memory.layout()
    tensors = {name: memory.bases[name].contiguous() for name in tensors}  # the bases themselves, as format 3 had
    with safe_open(str(path), "pt") as handle:
        metadata = {key: value for key, value in handle.metadata().items() if key != "gp_complements"}
    save_file(tensors, str(path), metadata={**metadata, "gp_format_version": "3", "gp_shared": json.dumps(shared)})
    loaded = GPMemory.load(str(path))
    assert loaded.complements == {} and all(torch.equal(loaded.bases[n], b) for n, b in memory.bases.items())


def rewrite(path, tensors=None, **metadata):
    with safe_open(str(path), "pt") as handle:
        old = handle.metadata()
    save_file(tensors or load_file(str(path)), str(path), metadata={**old, **metadata})


def test_damaged_complements_are_refused(tmp_path):
    model, path = full_memory(tmp_path, [partial_batch()])
    with safe_open(str(path), "pt") as handle:
        complements = json.loads(handle.metadata()["gp_complements"])
    original = path.read_bytes()
    cases = [
        ({"gp_complements": json.dumps(["nowhere"])}, None, "not a stored basis"),
        ({"gp_complements": json.dumps(complements * 2)}, None, "not a stored basis"),
        ({"gp_complements": "{}"}, None, "must list layer names"),
        ({"gp_tasks_seen": "0", "gp_thresholds": "[]"}, None, "records no stored task"),
    ]
    tensors = load_file(str(path))
    partial = next(name for name in complements if tensors[name].shape[1])
    cases.append(({}, {**tensors, partial: tensors[partial] * 2}, "not orthonormal"))
    for metadata, new_tensors, message in cases:
        path.write_bytes(original)
        rewrite(path, new_tensors, **metadata)
        with pytest.raises(GPMemoryError, match=message):
            GPMemory.load(str(path))


def test_old_outputs_stay_with_bases_rebuilt_from_complements(tmp_path):
    """τ = 1, update mode: a second task leaves the first task's outputs as before, and still learns, with the memory
    loaded from a file whose bases filling more than half their space are complements (16 tokens, d = 24)."""
    old = partial_batch()
    model, _ = full_memory(tmp_path, [old])
    memory = peft_gp.get_memory(model)
    assert any(12 < basis.shape[1] < 24 for basis in memory.bases.values())  # more than half, not full
    model.eval()
    with torch.no_grad():
        before = model(**old).logits
    peft_gp.save_pretrained(model, str(tmp_path / "saved"))
    with safe_open(str(tmp_path / "saved" / peft_gp.GP_MEMORY_NAME), "pt") as handle:
        complements = json.loads(handle.metadata()["gp_complements"])
    assert any(0 < load_file(str(tmp_path / "saved" / peft_gp.GP_MEMORY_NAME))[name].shape[1] for name in complements)
    loaded = peft_gp.from_pretrained(llama(), str(tmp_path / "saved"), is_trainable=True)
    optimizer = torch.optim.AdamW([p for p in loaded.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    peft_gp.GPProjector(loaded).attach(optimizer)
    new = batches(1)[0]
    loaded.train()
    losses = []
    for _ in range(10):
        loss = loaded(**new, labels=new["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    loaded.eval()
    with torch.no_grad():
        after = loaded(**old).logits
    assert losses[-1] < losses[0]
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()
