"""Tiny models built from configs (no downloads) and the shared helpers of the test matrix."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
    ViTConfig,
    ViTForImageClassification,
)

torch.set_num_threads(1)  # tiny models: threads only add overhead

HIDDEN = 64
VOCAB = 64


@dataclass
class Case:
    """One row of the test matrix: a tiny base model, LoRA settings and two tasks' batches."""

    name: str
    build: Callable[[], torch.nn.Module]
    lora: dict
    make_batch: Callable[[int], dict]  # task_id -> batch (task 0 uses few distinct tokens: low-rank features)

    def output(self, model, batch) -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            return model(**batch).logits.detach().clone()


def _tokens(task_id: int, batch: int = 2, length: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 + task_id)
    low, high = (4, 12) if task_id == 0 else (20, VOCAB)
    return torch.randint(low, high, (batch, length), generator=generator)


def _seq_cls_batch(task_id: int) -> dict:
    ids = _tokens(task_id)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1]) + 2 * task_id}


def _causal_batch(task_id: int) -> dict:
    ids = _tokens(task_id)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _seq2seq_batch(task_id: int) -> dict:
    ids = _tokens(task_id)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": _tokens(task_id + 7, length=3)}


def _image_batch(task_id: int) -> dict:
    generator = torch.Generator().manual_seed(200 + task_id)
    return {"pixel_values": torch.randn(1, 3, 8, 8, generator=generator), "labels": torch.tensor([task_id])}


def tiny_bert(num_labels: int = 4) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=2,
        n_head=4,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config)


def tiny_t5() -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=VOCAB,
        d_model=HIDDEN,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return T5ForConditionalGeneration(config)


def tiny_vit(num_labels: int = 4) -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return ViTForImageClassification(config)


CASES = [
    Case("bert", tiny_bert, {"task_type": "SEQ_CLS", "target_modules": ["query", "value"]}, _seq_cls_batch),
    Case(
        "gpt2",
        tiny_gpt2,
        {"task_type": "CAUSAL_LM", "target_modules": ["c_attn"], "fan_in_fan_out": True},
        _causal_batch,
    ),
    Case("llama", tiny_llama, {"task_type": "CAUSAL_LM", "target_modules": ["q_proj", "v_proj"]}, _causal_batch),
    Case("t5", tiny_t5, {"task_type": "SEQ_2_SEQ_LM", "target_modules": ["q", "v"]}, _seq2seq_batch),
    Case("vit", tiny_vit, {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["classifier"]}, _image_batch),
]


@pytest.fixture(params=CASES, ids=[case.name for case in CASES])
def case(request) -> Case:
    return request.param


def train_steps(model, batch, steps: int, optimizer=None, lr: float = 1e-2) -> list[float]:
    """A plain training loop on one batch; returns the losses."""
    optimizer = optimizer or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses
