"""``peft-gp plan``: its numbers against the files and allocations peft_gp really makes on tiny models built from the
same ``config.json`` (memory file at full and at a measured fill, adapter file, Gram matrices, projection FLOPs),
the Llama-3-8B shape, the CLI, and clear errors."""

from __future__ import annotations

import json
import os
import re
import time
import warnings

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BartConfig,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    T5Config,
    ViTConfig,
)

import peft_gp
from peft_gp.cli import main
from peft_gp.continual.config import RunConfigError
from peft_gp.continual.paradigms import make_peft_config
from peft_gp.plan import PlanError, plan, plan_peft_model, safetensors_bytes
from peft_gp.plan_sources import infer_task_type
from peft_gp.wiring.grams import collect_grams
from peft_gp.wiring.passes import memory_passes
from peft_gp.wiring.state import get_state

TOLERANCE = 0.10  # the bound; the sizes below agree to the byte
LLAMA = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, architectures=["LlamaForCausalLM"])  # fmt: skip
BERT = dict(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, num_labels=3, architectures=["BertForSequenceClassification"])  # fmt: skip
# name -> (config class, model class, PEFT config options)
MODELS = {
    "llama": (LlamaConfig, AutoModelForCausalLM, {"r": 4, "target_modules": "all-linear"}),
    "bert": (BertConfig, AutoModelForSequenceClassification, {"r": 4, "target_modules": ["query", "value"]}),
}
LLAMA_3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                  architectures=["LlamaForCausalLM"], torch_dtype="bfloat16")  # fmt: skip


def write_config(folder, name: str) -> str:
    config_class, _, _ = MODELS[name] if name in MODELS else (LlamaConfig, None, None)
    config_class(**(LLAMA if name == "llama" else BERT if name == "bert" else LLAMA_3_8B)).save_pretrained(folder)
    return str(folder)


def batches(vocab: int, count: int = 4, size: int = 8, length: int = 16, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (count * size, length), generator=generator)
    return [{"input_ids": ids[i : i + size], "attention_mask": torch.ones_like(ids[i : i + size])}
            for i in range(0, len(ids), size)]  # fmt: skip


def measured(tmp_path, name: str, threshold: float, paradigm: str = "lora", options: dict | None = None, **gp):
    """A real model from ``name``'s config.json with one task stored; its saved file sizes."""
    folder = write_config(tmp_path / "config", name)
    config_class, model_class, lora = MODELS[name]
    options = dict(lora, init_lora_weights=False) if options is None else options  # B != 0: both factors fill
    task_type = "CAUSAL_LM" if name == "llama" else "SEQ_CLS"
    torch.manual_seed(0)
    model = model_class.from_config(config_class.from_pretrained(folder))
    for module in model.modules():  # LayerNorm outputs have zero mean: a bias lets them span all d dimensions
        if isinstance(module, torch.nn.LayerNorm):
            torch.nn.init.normal_(module.bias)
    model = peft_gp.get_peft_model(model, make_peft_config(paradigm, options, {"gp_threshold": threshold, **gp},
                                                           task_type))  # fmt: skip
    peft_gp.update_memory(model, batches(model.config.vocab_size, count=8), max_samples=None)  # 64 > d + 1
    peft_gp.save_pretrained(model, str(tmp_path / "saved"))
    files = {key: os.path.getsize(tmp_path / "saved" / f"{key}.safetensors") for key in ("gp_memory", "adapter_model")}
    return folder, model, files


def distinct(tensors: dict) -> list[torch.Tensor]:
    """The tensors of ``tensors``, each once (groups that read the same input hold one)."""
    return list({id(tensor): tensor for tensor in tensors.values()}.values())


def close(planned: int, real: int) -> bool:
    return abs(planned - real) <= TOLERANCE * real


@pytest.mark.parametrize("name", list(MODELS))
def test_full_fill_memory_and_adapter_files_match_the_plan(tmp_path, name):
    folder, model, files = measured(tmp_path, name, threshold=1.0)
    memory = peft_gp.get_memory(model)
    assert all(memory.bases[g].shape[1] == d for g, d in memory.dims.items())  # really full
    _, _, lora = MODELS[name]
    planned = plan(folder, "lora", fill=1.0, gp={"gp_threshold": 1.0}, **lora)
    assert close(planned.memory_file_bytes_full, files["gp_memory"]), (planned.memory_file_bytes_full, files)
    assert close(planned.memory_file_bytes, files["gp_memory"])  # fill 1.0: every basis full
    assert close(planned.adapter_file_bytes, files["adapter_model"]), (planned.adapter_file_bytes, files)
    assert planned.adapter_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    if name == "bert":  # the classifier head is projected too (its bias on a constant-1 feature: d + 1)
        assert any(layer.name.endswith("classifier") and layer.dims == [49] for layer in planned.layers)


@pytest.mark.parametrize("name", list(MODELS))
def test_measured_fill_memory_file_grams_and_flops_match_the_plan(tmp_path, name):
    folder, model, files = measured(tmp_path, name, threshold=0.9)
    memory = peft_gp.get_memory(model)
    fills = {g: memory.bases[g].shape[1] / d for g, d in memory.dims.items()}
    assert 0 < min(fills.values()) < 1  # a partial fill, not the worst case
    _, _, lora = MODELS[name]
    per_group = plan(folder, "lora", fill=fills, gp={"gp_threshold": 0.9}, **lora)
    assert close(per_group.memory_file_bytes, files["gp_memory"]), (per_group.memory_file_bytes, files)
    held = distinct(memory.bases)  # groups that read the same input share one basis
    assert len(held) < len(memory.bases) if name == "llama" else len(held) <= len(memory.bases)
    data = sum(basis.numel() * 4 for basis in held)  # the bases on the device
    stored = sum(tensor.numel() * 4 for tensor in load_file(tmp_path / "saved" / "gp_memory.safetensors").values())
    assert stored < data  # a basis filling more than half its space is stored as its complement
    assert sum(layer.memory_bytes for layer in per_group.layers) == stored and per_group.device_basis_bytes == data
    # one share for every basis (the measured share of the full bases' data): an assumption, no longer within 10% of
    # the file when fills differ (the smaller of basis and complement is stored), but the same as that share per group
    share = data / sum(basis.shape[0] ** 2 * 4 for basis in held)
    uniform = plan(folder, "lora", fill=share, gp={"gp_threshold": 0.9}, **lora)
    same = plan(folder, "lora", fill=dict.fromkeys(fills, share), gp={"gp_threshold": 0.9}, **lora)
    assert uniform.memory_file_bytes == same.memory_file_bytes and close(uniform.device_basis_bytes, data)
    assert files["gp_memory"] <= per_group.memory_file_bytes_worst

    grams, _ = collect_grams(model, get_state(model).groups, batches(model.config.vocab_size))
    assert per_group.update_gram_bytes == sum(g.numel() * g.element_size() for g in distinct(grams))
    assert per_group.update_peak_bytes > per_group.update_gram_bytes

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    assert peft_gp.GPProjector(model).attach(optimizer).active
    batch = batches(model.config.vocab_size, count=1)[0]
    labels = batch["input_ids"] if name == "llama" else torch.zeros(len(batch["input_ids"]), dtype=torch.long)
    model(**batch, labels=labels).loss.backward()
    with FlopCounterMode(display=False) as counter:
        optimizer.step()  # AdamW's own work is elementwise: only the projection's matrix products are counted
    assert counter.get_total_flops() == per_group.projection_flops


def test_other_paradigms_are_planned_from_what_they_store(tmp_path):
    """The bottleneck adapter: its memory file at the measured fill, the adapter file and the Gram matrices."""
    folder, model, files = measured(tmp_path, "bert", 0.9, paradigm="adapter", options={"bottleneck_size": 8})
    memory = peft_gp.get_memory(model)
    fills = {g: memory.bases[g].shape[1] / d for g, d in memory.dims.items()}
    planned = plan(folder, "adapter", fill=fills, gp={"gp_threshold": 0.9}, bottleneck_size=8)
    assert close(planned.memory_file_bytes, files["gp_memory"]) and close(planned.adapter_file_bytes,
                                                                          files["adapter_model"])  # fmt: skip
    assert planned.paradigm == "adapter"
    assert planned.update_gram_bytes == sum(basis.shape[0] ** 2 * 8 for basis in distinct(memory.bases))


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("paradigm", ["prefix", "prompt"])
def test_prompt_learning_is_planned_from_what_peft_saves(tmp_path, name, paradigm):
    """Prefix and prompt tuning: PEFT saves the prompt encoder's output, which it copies to the CPU, which the meta
    device cannot (the plan crashed); the plan sizes it from shapes. Adapter and memory files equal to the byte."""
    folder, model, files = measured(tmp_path, name, 0.9, paradigm=paradigm, options={"num_virtual_tokens": 4})
    memory = peft_gp.get_memory(model)
    fills = {g: memory.bases[g].shape[1] / d for g, d in memory.dims.items()}
    planned = plan(folder, paradigm, fill=fills, gp={"gp_threshold": 0.9}, num_virtual_tokens=4)
    saved = load_file(tmp_path / "saved" / "adapter_model.safetensors")
    assert planned.paradigm == paradigm and planned.adapter_file_bytes == files["adapter_model"]
    assert planned.adapter_params == sum(tensor.numel() for tensor in saved.values())
    assert planned.memory_file_bytes == files["gp_memory"]
    width = 2 * 2 * (16 if name == "llama" else 48) if paradigm == "prefix" else (32 if name == "llama" else 48)
    assert saved["prompt_embeddings"].shape == (4, width)  # prefix: keys and values of both layers (Llama: 2 kv heads)


def test_importances_are_planned_beside_their_bases(tmp_path):
    folder, model, files = measured(tmp_path, "llama", 0.9, gp_importance_scale=5.0)
    memory = peft_gp.get_memory(model)
    assert memory.importances
    fills = {g: memory.bases[g].shape[1] / d for g, d in memory.dims.items()}
    gp = {"gp_threshold": 0.9, "gp_importance_scale": 5.0}
    planned = plan(folder, "lora", fill=fills, gp=gp, **MODELS["llama"][2])
    assert planned.memory_file_bytes == files["gp_memory"]


def test_llama_3_8b_shape(tmp_path):
    """The issue's worked example: LoRA r = 16 on all seven linear layers of 32 layers (d 4096, FFN 14336); q/k/v share
    one basis, gate/up another."""
    folder = write_config(tmp_path, "llama-3-8b")
    started = time.perf_counter()
    planned = plan(folder, "lora", fill=0.5, r=16, target_modules="all-linear")
    assert time.perf_counter() - started < 20
    assert planned.adapter_params == 32 * 16 * (6 * 4096 + 14336 + 3 * 4096 + 2 * 1024 + 2 * 14336) == 41_943_040
    full = 32 * (3 * 4096**2 + 14336**2 + 7 * 16**2) * 4  # float32 lora_A and lora_B bases, all full
    assert planned.device_basis_bytes_full == full and planned.update_gram_bytes == 2 * full  # float64 Grams
    assert planned.memory_file_bytes_full < 1e6  # every basis full: flags (empty complements), not matrices
    worst = 32 * (3 * 4096 * 2048 + 14336 * 7168 + 7 * 16 * 8) * 4  # half full: basis and complement alike
    assert planned.memory_file_bytes_worst == pytest.approx(worst, rel=1e-4) and worst < 17e9  # the bound
    assert planned.memory_file_bytes == pytest.approx(worst, rel=1e-4)  # fill 0.5 is the worst case
    down = [layer for layer in planned.layers if layer.name.endswith("down_proj")]
    assert len(down) == 32 and down[0].memory_bytes_worst == (14336 * 7168 + 16 * 8) * 4
    keys = [layer for layer in planned.layers if layer.name.endswith("k_proj")]
    assert keys[0].shared == {"model.layers.0.self_attn.k_proj.lora_A": "model.layers.0.self_attn.q_proj.lora_A"}
    # the default gp_update_budget_gb (8 GB of Grams at once): passes over the sample, the update's peak within 16 GB
    assert planned.update_passes > 1 and planned.update_pass_gram_bytes <= 4e9
    assert planned.update_peak_bytes_full <= 16e9 and planned.update_peak_bytes <= planned.update_peak_bytes_full
    one_pass = plan(folder, "lora", fill=0.5, r=16, target_modules="all-linear", gp={"gp_update_budget_gb": None})
    assert one_pass.update_passes == 1 and one_pass.update_peak_bytes_full > 2 * full  # every Gram held at once
    capped = plan(folder, "lora", fill=0.5, r=16, target_modules="all-linear", gp={"gp_max_basis_rank": 512})
    at_cap = 32 * (3 * 4096 * 512 + 14336 * 512 + 7 * 16 * 8) * 4  # every lora_A basis at the cap: stored as is
    assert capped.memory_file_bytes_worst == pytest.approx(at_cap, rel=1e-4) and at_cap < 4e9
    assert capped.memory_file_bytes_full == pytest.approx(at_cap, rel=1e-4)  # never fuller than the cap
    # down_proj's 14336-wide input sketched (ℓ = 512), capped at 512, 2 GB passes: peak and file within 4 GB
    gp = {"gp_sketch_above": 4096, "gp_max_basis_rank": 512, "gp_update_budget_gb": 2}
    sketched = plan(folder, "lora", fill=0.5, r=16, target_modules="all-linear", gp=gp)
    down = [layer for layer in sketched.layers if layer.name.endswith("down_proj")]
    assert down[0].gram_bytes == 2 * 512 * 14336 * 8 + 16 * 16 * 8  # the sketch's buffer; lora_B's 16² Gram
    assert sketched.update_peak_bytes_full <= 4e9 and sketched.memory_file_bytes_worst <= 4e9
    assert sketched.update_passes == 16 and sketched.memory_file_bytes_worst == capped.memory_file_bytes_worst


def test_the_plan_splits_passes_as_the_update_does(tmp_path):
    """A tiny model fits the default budget: one pass. Under a tiny budget the plan's passes are the update's."""
    folder, model, _ = measured(tmp_path, "llama", threshold=0.9)
    lora = MODELS["llama"][2]
    assert plan(folder, "lora", fill=1.0, **lora).update_passes == 1
    budget = 2 * 8 * 32**2 * 3 / 1e9  # three 32-wide inputs per pass
    planned = plan(folder, "lora", fill=1.0, gp={"gp_update_budget_gb": budget}, **lora)
    groups = get_state(model).groups
    passes, _ = memory_passes(model, groups, batches(model.config.vocab_size), budget, None)
    assert planned.update_passes == len(passes) > 1
    assert planned.update_pass_gram_bytes <= budget * 1e9 / 2 < planned.update_gram_bytes


def test_cli_prints_the_table_and_json(tmp_path, capsys):
    folder = write_config(tmp_path, "llama")
    assert main(["plan", folder, "--r", "4", "--target-modules", "all-linear", "--fill", "0.25"]) == 0
    text = capsys.readouterr().out
    assert "| model.layers.*.mlp.down_proj | 2 | 48, 4 |" in text and "gp_memory.safetensors" in text
    assert main(["plan", folder, "--r", "4", "--target-modules", "q_proj,v_proj", "--json", "--per-layer"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["fill"] == 0.5 and record["peft_config"]["target_modules"] == ["q_proj", "v_proj"]
    assert [layer["name"] for layer in record["layers"]][:2] == ["model.layers.0.self_attn.q_proj",
                                                                 "model.layers.0.self_attn.v_proj"]  # fmt: skip
    bert = write_config(tmp_path / "bert", "bert")
    assert main(["plan", bert, "--paradigm", "adapter", "--option", "bottleneck_size=4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["peft_config"]["bottleneck_size"] == 4


GPT2 = dict(vocab_size=128, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)


@pytest.mark.parametrize(
    "config, task_type",
    [
        (GPT2Config(**GPT2, architectures=["GPT2LMHeadModel"]), "CAUSAL_LM"),
        (LlamaConfig(**LLAMA), "CAUSAL_LM"),
        (BertConfig(architectures=["BertLMHeadModel"]), "CAUSAL_LM"),
        (T5Config(architectures=["T5ForConditionalGeneration"]), "SEQ_2_SEQ_LM"),
        (T5Config(architectures=["T5WithLMHeadModel"]), "SEQ_2_SEQ_LM"),  # an older name, by its ending
        (BartConfig(architectures=["BartForConditionalGeneration"]), "SEQ_2_SEQ_LM"),
        (AutoConfig.for_model("marian", architectures=["MarianMTModel"]), "SEQ_2_SEQ_LM"),
        (BertConfig(**BERT), "SEQ_CLS"),
        (BertConfig(architectures=["BertForTokenClassification"]), "TOKEN_CLS"),
        (ViTConfig(architectures=["ViTForImageClassification"]), "SEQ_CLS"),  # as runs give ViT: SEQ_CLS
        (LlamaConfig(architectures=["MyLlamaForCausalLM"]), "CAUSAL_LM"),  # remote code, by its ending
        (BertConfig(), None),
    ],
)
def test_task_type_is_told_from_the_architectures(config, task_type):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a recognised head, or no architectures at all: no warning
        assert infer_task_type(config) == task_type


def test_an_unknown_architecture_is_planned_bare_with_a_warning(tmp_path, capsys):
    BertConfig(**{**BERT, "architectures": ["BertForMaskedLM"]}).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="Pass --task-type"):
        assert plan(str(tmp_path), r=4).task_type is None
    for paradigm in ("prefix", "prompt"):
        with pytest.raises(PlanError, match=f"--paradigm {paradigm} needs a task type.*pass --task-type CAUSAL_LM"):
            with pytest.warns(UserWarning, match="Pass --task-type"):
                plan(str(tmp_path), paradigm, num_virtual_tokens=4)
    assert plan(str(tmp_path), "prefix", task_type="SEQ_CLS", num_virtual_tokens=4).task_type == "SEQ_CLS"


@pytest.mark.parametrize("paradigm", ["lora", "prefix"])
def test_gpt2_is_a_causal_lm_and_its_adapter_is_what_peft_saves(tmp_path, capsys, paradigm):
    """GPT-2's head is ``GPT2LMHeadModel`` (the plan said "bare model"); planned with its head, the adapter file
    is the size of the one PEFT saves for a real GPT-2 of the same config."""
    GPT2Config(**GPT2, architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path / "config")
    options = {"num_virtual_tokens": 4} if paradigm == "prefix" else {"r": 4, "target_modules": ["c_attn"]}
    planned = plan(str(tmp_path / "config"), paradigm, **options)
    assert planned.task_type == "CAUSAL_LM"
    real = AutoModelForCausalLM.from_config(GPT2Config.from_pretrained(tmp_path / "config"))
    peft_gp.save_pretrained(peft_gp.get_peft_model(real, make_peft_config(paradigm, options, {}, "CAUSAL_LM")),
                            str(tmp_path / "saved"))  # fmt: skip
    assert planned.adapter_file_bytes == os.path.getsize(tmp_path / "saved" / "adapter_model.safetensors")
    lora = ["--r", "4", "--target-modules", "c_attn"]
    flags = ["--option", "num_virtual_tokens=4"] if paradigm == "prefix" else lora
    assert main(["plan", str(tmp_path / "config"), "--paradigm", paradigm, *flags]) == 0
    assert "(gpt2, CAUSAL_LM)" in capsys.readouterr().out


def test_image_classifiers_are_built_as_runs_build_them(tmp_path):
    """``SEQ_CLS`` on a ViT: the image-classification model (with its head), as runs load it."""
    vit = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32)
    ViTConfig(**vit, patch_size=8, num_labels=3, architectures=["ViTForImageClassification"]).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="could not run a forward pass"):  # no token ids: every group on its own
        planned = plan(str(tmp_path), r=4, target_modules=["q_proj", "v_proj"])
    assert planned.task_type == "SEQ_CLS" and any(layer.name.endswith("classifier") for layer in planned.layers)
    with pytest.raises(PlanError, match="no TOKEN_CLS model for model_type 'vit'.*--task-type"):
        plan(str(tmp_path), task_type="TOKEN_CLS", r=4)


def test_gp_options_join_the_gp_settings_as_in_a_run(tmp_path):
    """``--option gp_task_slices=2`` widens LoRA's rank as a run's ``gp_task_slices`` does (it was passed to the
    config unwidened)."""
    folder = write_config(tmp_path, "llama")
    planned = plan(folder, r=4, lora_alpha=8, gp_task_slices=2)
    run = make_peft_config("lora", {"r": 4, "lora_alpha": 8}, {"gp_task_slices": 2}, "CAUSAL_LM")
    assert planned.peft_config["r"] == run.r == 8 and planned.peft_config["lora_alpha"] == run.lora_alpha == 16


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--fill", "abc"], "--fill must be a number in \\[0, 1\\]"),
        (["--fill", "1.5"], "fill must be a number in \\[0, 1\\].*1.5"),
        (["--paradigm", "lorra"], "Unknown paradigm 'lorra'"),
        (["--option", "bottleneck_size"], "--option takes KEY=VALUE"),
        (["--task-type", "VISION"], "task_type must be one of"),
        (["--fil", "0.5"], "Did you mean --fill"),
        (["--option", "foo=1"], "'lora' config has no argument 'foo', given as foo \\(--option foo=…\\).*GPLoraConf"),
        (["--paradigm", "adapter", "--r", "4"], "no argument 'r', given as r \\(--r\\).*GPAdapterConfig's fields"),
        (["--gp-threshold", "2"], "refused gp_threshold=2.0 \\(--gp-threshold\\): gp_threshold must be in"),
        (["--gp-projection", "bad"], "refused gp_projection='bad' \\(--gp-projection\\)"),
        (["--option", "gp_max_basis_rank=-1"], "refused gp_max_basis_rank=-1 \\(--option gp_max_basis_rank=…\\)"),
        (["--r", "0"], "refused r=0 \\(--r\\)"),
        (["--option", "lora_alpha=abc"], "settings \\(lora_alpha='abc'.*--option KEY=VALUE"),
        (["--paradigm", "prefix", "--task-type", "none"], "--paradigm prefix needs a task type.*--task-type"),
        (["--paradigm", "prompt"], "--paradigm prompt needs .* --option num_virtual_tokens=N"),
    ],
)
def test_cli_bad_input_is_named(tmp_path, capsys, argv, message):
    folder = write_config(tmp_path, "llama")
    with pytest.raises(SystemExit):
        main(["plan", folder, *argv])
    error = capsys.readouterr().err
    assert re.search(message, error), error
    assert "paradigm_kwargs" not in error and "the run" not in error and "Traceback" not in error  # run vocabulary


def test_the_run_keeps_its_own_words():
    with pytest.raises(RunConfigError, match="paradigm_kwargs do not fit the 'lora' config"):
        make_peft_config("lora", {"foo": 1}, {}, None)
    with pytest.raises(RunConfigError, match="The 'lora' config refused the run's settings"):
        make_peft_config("lora", {}, {"gp_threshold": 2.0}, None)


def test_unsupported_paradigms_are_refused_in_words(tmp_path):
    T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, vocab_size=128,
             architectures=["T5ForConditionalGeneration"]).save_pretrained(tmp_path)  # fmt: skip
    with pytest.raises(PlanError, match="--paradigm prompt cannot be planned on this t5 model: .*encoder-decoder"):
        plan(str(tmp_path), "prompt", num_virtual_tokens=4)


def test_bad_sources_say_what_to_pass(tmp_path, monkeypatch):
    with pytest.raises(PlanError, match="has no config.json"):
        plan(str(tmp_path))
    with pytest.raises(PlanError, match="No such file or folder"):
        plan(str(tmp_path / "missing" / "config.json"))
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    with pytest.raises(PlanError, match="no 'model_type'"):
        plan(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(PlanError, match="Cannot read"):
        plan(str(tmp_path / "config.json"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no request leaves the machine
    with pytest.raises(PlanError, match="hf download org/some-model config.json"):
        plan("org/some-model")
    with pytest.raises(PlanError, match="fill gives no share"):
        plan_peft_model(peft_gp.get_peft_model(AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA)),
                                               peft_gp.GPLoraConfig(r=2)), fill={"x": 0.5})  # fmt: skip


def test_safetensors_size_is_exact():
    from safetensors.torch import save

    tensors = {"b": torch.zeros(3, 5), "a": torch.zeros(7, 0), "c": torch.zeros(2, dtype=torch.bfloat16)}
    metadata = {"format": "pt", "gp_dims": json.dumps({"a": 7, "b": 3})}
    shapes = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
    assert safetensors_bytes(shapes, metadata) == len(save(tensors, metadata=metadata))


def test_a_bare_model_is_planned_as_one_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # BertModel says what it is: no "cannot tell a task type" warning
        assert infer_task_type(BertConfig(architectures=["BertModel"])) is None
    with pytest.warns(UserWarning, match="--task-type"):
        assert infer_task_type(BertConfig(architectures=["BertForMaskedLM"])) is None
