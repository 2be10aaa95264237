"""Per-layer thresholds (``gp_threshold_pattern``, issue 20): a group whose name a pattern matches grows its basis at
that pattern's threshold, exactly as a memory built with that ``gp_threshold`` everywhere would; every other group
keeps ``gp_threshold``; bad patterns are refused before any training; the setting round-trips through a save."""

from __future__ import annotations

import pytest
import torch

import peft_gp
from peft_gp import GPLoraConfig
from peft_gp.wiring.gp_settings import group_thresholds

from .testing import batches, lora_llama

LAYER_0 = r"layers\.0\."
QKV = ("q_proj", "k_proj", "v_proj")


def bases_after_two_tasks(**settings) -> dict[str, torch.Tensor]:
    model = lora_llama(**settings)
    for task_id in range(2):
        peft_gp.update_memory(model, batches(task_id))
    return peft_gp.get_memory(model).bases


def test_matched_groups_grow_at_their_pattern_threshold_and_the_rest_at_gp_threshold():
    low, high = bases_after_two_tasks(gp_threshold=0.5), bases_after_two_tasks(gp_threshold=1.0)
    mixed = bases_after_two_tasks(gp_threshold=0.5, gp_threshold_pattern={LAYER_0: 1.0})
    matched = [name for name in mixed if ".layers.0." in name]
    assert matched and len(matched) < len(mixed)
    for name, basis in mixed.items():
        expected = high[name] if name in matched else low[name]
        assert basis.shape == expected.shape and torch.equal(basis, expected), name
    assert sum(high[n].shape[1] for n in matched) > sum(low[n].shape[1] for n in matched)  # the setting mattered


def test_thresholds_per_group_take_the_highest_match_and_the_increment():
    names = ["model.layers.0.mlp.down_proj.lora_A", "model.layers.1.self_attn.q_proj.lora_A"]
    config = GPLoraConfig(r=4, target_modules=["q_proj"], gp_threshold=0.9, gp_threshold_increment=0.01,
                          gp_threshold_pattern={"down_proj": 0.8, LAYER_0: 0.95})  # fmt: skip
    assert group_thresholds(names, config, 0) == {names[0]: 0.95, names[1]: 0.9}
    assert group_thresholds(names, config, 10) == pytest.approx({names[0]: 1.0, names[1]: 1.0})  # capped at 1
    assert group_thresholds(names, GPLoraConfig(r=4, target_modules=["q_proj"]), 0) == dict.fromkeys(names, 0.97)


@pytest.mark.parametrize("pattern", [0.9, {"q": 0.0}, {"q": 1.5}, {"q": "high"}, {3: 0.9}, {"(": 0.9}])
def test_a_bad_pattern_is_refused_with_the_setting_named(pattern):
    with pytest.raises((ValueError, TypeError), match="gp_threshold_pattern"):
        GPLoraConfig(r=4, target_modules=["q_proj"], gp_threshold_pattern=pattern)


def test_a_pattern_matching_no_group_is_refused_when_the_adapter_is_wired():
    with pytest.raises(ValueError, match=r"gp_threshold_pattern's pattern\(s\) \['qurey'\] match no projected group"):
        peft_gp.get_memory(lora_llama(gp_threshold_pattern={"qurey": 0.9}))


def test_the_pattern_round_trips_through_save_and_load(tmp_path):
    model = lora_llama(gp_threshold=0.5, gp_threshold_pattern={LAYER_0: 1.0})
    peft_gp.update_memory(model, batches(0))
    peft_gp.save_pretrained(model, str(tmp_path))
    base = type(model.get_base_model())(model.get_base_model().config)
    loaded = peft_gp.from_pretrained(base, str(tmp_path))
    assert loaded.peft_config["default"].gp_threshold_pattern == {LAYER_0: 1.0}
    before, after = peft_gp.get_memory(model).bases, peft_gp.get_memory(loaded).bases
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


def test_layers_sharing_an_input_move_off_one_basis_at_the_highest_threshold_of_theirs():
    """A reference memory (``lora_B`` still zero: the input sides move off the stored space): ``q/k/v`` read one input
    and share one basis, grown at the highest of their thresholds; every ``lora_A`` is moved off that whole basis."""
    model = lora_llama(init_lora_weights=True, target_modules=list(QKV), gp_threshold=0.5,
                       gp_threshold_pattern={r"v_proj": 0.9})  # fmt: skip
    peft_gp.update_memory(model, batches(0), task_name="reference")
    bases = peft_gp.get_memory(model).bases
    layer, weights = "model.layers.0.self_attn", dict(model.named_parameters())
    shared = {name: bases[next(k for k in bases if k.endswith(f"{layer}.{name}.lora_A"))] for name in QKV}
    assert len({basis.shape[1] for basis in shared.values()}) == 1 and shared["q_proj"].shape[1] > 0
    for name, basis in shared.items():
        weight = next(w for k, w in weights.items() if k.endswith(f"{layer}.{name}.lora_A.default.weight"))
        assert (weight.detach().double() @ basis.double()).norm() < 1e-6 * weight.norm(), name
