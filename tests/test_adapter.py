"""The bottleneck adapter as a PEFT tuner: placement, identity start, features of its bases, errors, plain-PEFT load.

The gradient-projection invariants of the adapter run in the shared matrix (test_matrix.py, paradigms ``adapter``
and ``adapter-seq``) and in test_trainer.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model

import peft_gp
from peft_gp import GPAdapterConfig
from peft_gp.core import maths
from peft_gp.wiring.bottleneck import BottleneckLayer
from peft_gp.wiring.grams import collect_grams
from peft_gp.wiring.state import resolve_groups

from .testing import CASES, tiny_bert, train_steps

ADAPTER_CASES = [case for case in CASES if case.name in ("bert", "vit", "gpt2", "llama", "t5")]

# what "each layer's feed-forward block" resolves to without target_modules
DEFAULT_TARGETS = {
    ("bert", "parallel"): "bert.encoder.layer.{}.output",
    ("bert", "sequential"): "bert.encoder.layer.{}.output.dense",
    ("vit", "parallel"): "vit.layers.{}.mlp",
    ("gpt2", "parallel"): "transformer.h.{}.mlp",
    ("llama", "parallel"): "model.layers.{}.mlp",
    ("llama", "sequential"): "model.layers.{}.mlp",
}


def adapter_model(case, **settings):
    shared = {key: case.lora[key] for key in ("task_type", "modules_to_save") if key in case.lora}
    return get_peft_model(case.build(), GPAdapterConfig(**{"bottleneck_size": 8, **shared, **settings}))


@pytest.mark.parametrize("model_name, style", list(DEFAULT_TARGETS), ids=[f"{m}-{s}" for m, s in DEFAULT_TARGETS])
def test_default_targets_are_each_layers_feed_forward_block(model_name, style):
    case = next(case for case in CASES if case.name == model_name)
    model = adapter_model(case, adapter_style=style)
    expected = {DEFAULT_TARGETS[model_name, style].format(layer) for layer in range(2)}
    assert set(model.base_model.targeted_module_names) == expected
    assert all(isinstance(module, BottleneckLayer) for name, module in model.named_modules() if name in expected)


def test_target_modules_override_the_default():
    case = next(case for case in CASES if case.name == "bert")
    model = adapter_model(case, target_modules=["intermediate.dense"], layers_to_transform=[1])
    assert model.base_model.targeted_module_names == ["bert.encoder.layer.1.intermediate.dense"]
    layer = model.get_submodule("base_model.model.bert.encoder.layer.1.intermediate.dense")
    # parallel beside a Linear: reads its input (64 wide), writes its output (64 wide in the tiny BERT)
    assert (layer.in_features, layer.out_features) == (layer.base_layer.in_features, layer.base_layer.out_features)


@pytest.mark.parametrize("style", ["parallel", "sequential"])
@pytest.mark.parametrize("case", ADAPTER_CASES, ids=[case.name for case in ADAPTER_CASES])
def test_zero_up_projection_starts_as_the_base_model_and_unload_restores_it(case, style):
    batch = case.make_batch(0)
    reference = case.output(case.build(), batch)
    model = adapter_model(case, adapter_style=style)
    torch.testing.assert_close(case.output(model, batch), reference, rtol=0, atol=0)
    # trained, it differs; with the adapter disabled or unloaded it is the base model again
    train_steps(model, batch, 3)
    assert not torch.allclose(case.output(model, batch), reference)
    with model.disable_adapter():
        torch.testing.assert_close(case.output(model, batch), reference, rtol=0, atol=0)
    unloaded = model.unload()
    assert not any(isinstance(module, BottleneckLayer) for module in unloaded.modules())


def test_bert_parallel_adapter_reads_the_ffn_input_and_adds_before_the_layer_norm():
    """BertOutput(h, x) = LN(dense(h) + x): the adapter reads x and adds s·A(x), so LN sees dense(h) + x + s·A(x)."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_bert(), GPAdapterConfig(task_type="SEQ_CLS", init_weights=False, scaling=0.5))
    layer = model.get_submodule("base_model.model.bert.encoder.layer.0.output")
    hidden, residual = torch.randn(2, 3, 64), torch.randn(2, 3, 32 * 2)
    down, up = layer.gp_adapter_down["default"], layer.gp_adapter_up["default"]
    expected_delta = 0.5 * up(torch.relu(down(residual)))
    base = layer.base_layer
    expected = base.LayerNorm(base.dense(hidden) + residual + expected_delta)
    torch.testing.assert_close(layer(hidden, residual), expected)
    torch.testing.assert_close(layer(hidden, input_tensor=residual), expected)


def test_bases_are_built_on_the_adapter_inputs_and_bottleneck_activations():
    """W_down's Gram is [x; 1]ᵀ[x; 1] of the FFN inputs; W_up's is that of act(W_down x + b)."""
    case = next(case for case in CASES if case.name == "bert")
    model = adapter_model(case, init_weights=False, activation="gelu")
    batch = case.make_batch(0)
    residuals = []
    block = model.get_submodule("base_model.model.bert.encoder.layer.1.output")
    handle = block.register_forward_pre_hook(lambda module, args: residuals.append(args[1].detach()))
    case.output(model, batch)
    handle.remove()
    groups = {group.name: group for group in resolve_groups(model)}
    grams, _ = collect_grams(model, list(groups.values()), [batch])
    down = block.gp_adapter_down["default"]
    x = residuals[0].reshape(-1, residuals[0].shape[-1])
    ones = torch.ones(x.shape[0], 1)
    with torch.no_grad():
        hidden = torch.nn.functional.gelu(down(x))
    name = "bert.encoder.layer.1.output"
    torch.testing.assert_close(grams[f"{name}.gp_adapter_down"], maths.feature_gram(torch.cat([x, ones], 1)))
    torch.testing.assert_close(grams[f"{name}.gp_adapter_up"], maths.feature_gram(torch.cat([hidden, ones], 1)))
    assert groups[f"{name}.gp_adapter_down"].dim == 64 + 1 and groups[f"{name}.gp_adapter_up"].dim == 8 + 1


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"adapter_style": "serial"}, "adapter_style"),
        ({"bottleneck_size": 0}, "bottleneck_size"),
        ({"activation": "swishy"}, "Unknown activation"),
        ({"adapter_dropout": 1.0}, "adapter_dropout"),
        ({"gp_threshold": 1.5}, "gp_threshold"),
    ],
)
def test_bad_settings_fail_clearly(settings, message):
    with pytest.raises((ValueError, TypeError), match=message):
        GPAdapterConfig(**settings)


def test_model_without_default_target_asks_for_target_modules():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with pytest.raises(ValueError, match="no default target for model_type 'custom'.*target_modules"):
        get_peft_model(model, GPAdapterConfig())


def test_merging_is_refused_with_a_clear_error():
    model = adapter_model(next(case for case in CASES if case.name == "llama"))
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_and_unload()


def test_saved_config_has_a_stable_type_and_loads_with_peft_once_imported(tmp_path):
    case = next(case for case in CASES if case.name == "vit")
    model = adapter_model(case, init_weights=False)
    peft_gp.save_pretrained(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "GP_ADAPTER" and saved["bottleneck_size"] == 8
    batch = case.make_batch(0)
    loaded = PeftModel.from_pretrained(case.build(), str(tmp_path))
    assert isinstance(loaded.peft_config["default"], GPAdapterConfig)
    torch.testing.assert_close(case.output(loaded, batch), case.output(model, batch), rtol=0, atol=0)


def test_adapters_saved_by_0_1_0_still_load(tmp_path):
    """peft_gp 0.1.0 stored a sentence as the adapter's peft_type: plain PEFT (after import) and peft_gp load it."""
    case = next(case for case in CASES if case.name == "vit")
    model = adapter_model(case, init_weights=False)
    peft_gp.update_memory(model, [case.make_batch(0)])
    peft_gp.save_pretrained(model, tmp_path)
    config_path = tmp_path / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    saved["peft_type"] = "GP_ADAPTER (requires peft_gp: pip install peft_gp, then import peft_gp)"
    config_path.write_text(json.dumps(saved))
    batch = case.make_batch(0)
    for loaded in (
        PeftModel.from_pretrained(case.build(), str(tmp_path)),
        peft_gp.from_pretrained(case.build(), str(tmp_path)),
    ):
        assert loaded.peft_config["default"].peft_type == "GP_ADAPTER"
        torch.testing.assert_close(case.output(loaded, batch), case.output(model, batch), rtol=0, atol=0)
    assert peft_gp.get_memory(loaded).tasks_seen == 1


def test_loading_without_peft_gp_names_the_missing_type(tmp_path):
    case = next(case for case in CASES if case.name == "gpt2")
    peft_gp.save_pretrained(adapter_model(case), tmp_path)
    script = textwrap.dedent(
        f"""
        import sys
        from peft import PeftModel
        from transformers import GPT2Config, GPT2LMHeadModel
        model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=64, n_positions=32))
        try:
            PeftModel.from_pretrained(model, {str(tmp_path)!r})
        except Exception as error:
            print(type(error).__name__, error)
        assert "peft_gp" not in sys.modules
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "KeyError 'GP_ADAPTER'" in result.stdout, result.stdout
