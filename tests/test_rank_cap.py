"""The rank cap (``gp_max_basis_rank``, issue 23): each distinct input's basis keeps at most that many columns, the
highest-energy directions, orthonormal; later tasks add nothing past it (protection then partial); the file holds the
capped bases; a dict caps the layers its patterns name."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import peft_gp
from peft_gp import GPLoraConfig
from peft_gp.core import maths
from peft_gp.wiring.gp_settings import rank_caps

from .testing import batches, lora_llama


def gram_of(rank: int, dim: int = 12, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(40, rank, generator=generator, dtype=torch.float64)
    features = features @ torch.randn(rank, dim, generator=generator, dtype=torch.float64)
    return features.T @ features


def test_a_capped_basis_holds_the_top_energy_directions_and_stops_growing():
    gram = gram_of(rank=8)
    basis, report = maths.grow_basis(gram, None, 1.0, max_rank=3)
    assert basis.shape == (12, 3) and report["added"] == 3 and maths.orthonormality_error(basis) < 1e-12
    top = torch.linalg.eigh(gram).eigenvectors[:, -3:]  # the three leading eigenvectors
    assert torch.allclose(basis @ basis.T, top @ top.T, atol=1e-10)
    assert report["captured_after"] == pytest.approx(maths.captured_energy(gram, basis), abs=1e-12)
    assert report["captured_after"] < 1.0  # protection is partial
    again, report = maths.grow_basis(gram_of(rank=8, seed=1), basis, 1.0, max_rank=3)
    assert torch.equal(again, basis) and report["added"] == 0  # a later task: nothing past the cap
    wider, _ = maths.grow_basis(gram_of(rank=8, seed=1), basis, 1.0, max_rank=5)
    assert wider.shape[1] == 5 and torch.equal(wider[:, :3], basis)  # the old columns stay first


def test_the_cap_holds_in_the_memory_and_its_file(tmp_path):
    model = lora_llama(gp_threshold=1.0, gp_max_basis_rank=3)
    for task_id in range(2):
        peft_gp.update_memory(model, batches(task_id))
    memory = peft_gp.get_memory(model)
    assert {basis.shape[1] for basis in memory.bases.values()} == {3}  # 48 tokens would fill far more
    assert all(maths.orthonormality_error(basis) < 1e-5 for basis in memory.bases.values())
    peft_gp.save_pretrained(model, str(tmp_path))
    stored = load_file(str(tmp_path / peft_gp.GP_MEMORY_NAME))
    widths = {name: tensor.shape[1] for name, tensor in stored.items()}  # at most the cap: the basis, or a smaller
    assert widths and all(width == min(3, memory.dims[name] - 3) for name, width in widths.items())  # complement
    loaded = peft_gp.from_pretrained(type(model.get_base_model())(model.get_base_model().config), str(tmp_path))
    assert loaded.peft_config["default"].gp_max_basis_rank == 3


def test_a_dict_caps_the_layers_its_patterns_name():
    names = ["model.layers.0.mlp.down_proj.lora_A", "model.layers.0.self_attn.q_proj.lora_A"]
    assert rank_caps(names, {r"down_proj": 4, r"layers\.0\.": 6}) == {names[0]: 4, names[1]: 6}
    assert rank_caps(names, {"mlp": 2}) == {names[0]: 2, names[1]: None}
    assert rank_caps(names, 5) == dict.fromkeys(names, 5)
    model = lora_llama(gp_threshold=1.0, gp_max_basis_rank={r"mlp\.(gate|up|down)_proj\.lora_A": 2})
    peft_gp.update_memory(model, batches(0))
    memory = peft_gp.get_memory(model)
    capped = [name for name in memory.bases if ".mlp." in name and name.endswith("lora_A")]
    assert capped and all(memory.bases[name].shape[1] == 2 for name in capped)
    assert max(basis.shape[1] for name, basis in memory.bases.items() if name not in capped) > 2
    with pytest.raises(ValueError, match=r"pattern\(s\) \['qurey'\] match no projected group"):
        rank_caps(names, {"qurey": 4, "mlp": 2})
    with pytest.raises(ValueError, match="match no projected group"):  # when the adapter is wired, before training
        peft_gp.get_memory(lora_llama(gp_max_basis_rank={"qurey": 4}))


@pytest.mark.parametrize("cap", [0, -1, 2.5, True, {"q": 0}, {3: 4}, {"(": 4}])
def test_a_bad_cap_is_refused(cap):
    with pytest.raises((ValueError, TypeError), match="gp_max_basis_rank"):
        GPLoraConfig(r=4, target_modules=["q_proj"], gp_max_basis_rank=cap)
