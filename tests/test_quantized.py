"""GP-LoRA on a bitsandbytes-quantized base (QLoRA): PEFT's ``Linear4bit`` / ``Linear8bitLt`` LoRA layers are projected
like any linear layer (features: the LoRA layer's inputs), and the old task's outputs stay after a second task.

bitsandbytes is not a dependency of peft_gp: the tests skip, saying why, where it is not installed or cannot run its
kernels on this machine (its CPU backend runs both 4-bit and 8-bit layers from bitsandbytes 0.45 on)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from peft import prepare_model_for_kbit_training
from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig, default_data_collator

import peft_gp
from peft_gp import GPLoraConfig, GPProjector
from peft_gp.wiring.state import get_state

from .testing import logits_on, task_dataset, tiny_bert


def _bitsandbytes_problem() -> str | None:
    """Why bitsandbytes cannot be tested here (``None``: it can): not installed, or its kernels fail on this device."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install bitsandbytes; it is not a dependency of peft_gp)"
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(64, 8, compute_dtype=torch.float32)
        layer.load_state_dict(torch.nn.Linear(64, 8).state_dict())
        layer.to("cpu")(torch.randn(2, 64))  # .to() quantizes the weight
        layer8 = bnb.nn.Linear8bitLt(64, 8, has_fp16_weights=False)
        layer8.load_state_dict(torch.nn.Linear(64, 8).state_dict())
        layer8.to("cpu")(torch.randn(2, 64))
    except Exception as error:  # noqa: BLE001 - any failure of the kernels means: not testable here
        return f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot run its 4-bit/8-bit layers here: {error!r}"
    return None


PROBLEM = _bitsandbytes_problem()
pytestmark = pytest.mark.skipif(PROBLEM is not None, reason=str(PROBLEM))

QUANTIZATIONS = {
    "4bit": dict(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_type="nf4"),
    "8bit": dict(load_in_8bit=True),
}


def quantized_gp_model(tmp_path, bits: str):
    tiny_bert().save_pretrained(tmp_path / "base")
    quantization = BitsAndBytesConfig(**QUANTIZATIONS[bits], llm_int8_skip_modules=["classifier"])
    base = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "base", quantization_config=quantization, device_map="cpu"
    )
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    config = GPLoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"],
                          gp_threshold=1.0, gp_projection="update")  # fmt: skip
    return peft_gp.get_peft_model(base, config)


def train(model, dataset, epochs: int = 3) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    projector = GPProjector(model).attach(optimizer)
    model.train()
    for _ in range(epochs):
        for start in range(0, len(dataset), 4):
            batch = default_data_collator([dataset[i] for i in range(start, min(start + 4, len(dataset)))])
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    projector.detach()


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_gp_lora_on_a_quantized_base_keeps_old_outputs(tmp_path, bits):
    from peft.tuners.lora.bnb import Linear4bit, Linear8bitLt  # defined only where bitsandbytes imports

    model = quantized_gp_model(tmp_path, bits)
    layer_type = Linear4bit if bits == "4bit" else Linear8bitLt
    quantized = {name for name, module in model.named_modules() if isinstance(module, layer_type)}
    assert len(quantized) == 4, quantized  # query and value of both layers
    groups = {group.name for group in get_state(model).groups}
    for name in quantized:
        key = name.removeprefix("base_model.model.")
        assert {f"{key}.lora_A", f"{key}.lora_B"} <= groups, (key, sorted(groups))

    old_task, new_task = task_dataset(0, 8), task_dataset(1, 16)
    train(model, old_task)
    peft_gp.update_memory(model, [default_data_collator([old_task[i] for i in range(len(old_task))])])
    bases = {name: basis.shape[1] for name, basis in peft_gp.get_memory(model).bases.items()}
    assert all(bases[f"{name.removeprefix('base_model.model.')}.lora_A"] > 0 for name in quantized), bases
    before = logits_on(model, old_task)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train(model, new_task)
    after = logits_on(model, old_task)
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, weights[n])]
    assert any("lora_A" in name for name in moved)  # the second task trained the adapter
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()
