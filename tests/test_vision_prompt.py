"""Prompt tuning on a ViT (issue 21, item 2): the prompt after the class token, GP against the old class and patch
tokens and the old prompt rows, saved and loaded, trained by GPTrainer; clear refusals."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

import peft_gp
from peft_gp import GPProjector, GPPromptTuningConfig

from .testing import TinyConvNet, tiny_vit, train_steps

TOKENS = 4


def vit_prompt_model(**gp):
    config = GPPromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=TOKENS, **{"gp_threshold": 1.0, **gp})
    return peft_gp.get_peft_model(tiny_vit(), config)


def images(task_id: int, size: int) -> dict:
    generator = torch.Generator().manual_seed(500 + task_id)
    return {"pixel_values": torch.randn(size, 3, 8, 8, generator=generator), "labels": torch.arange(size) % 4}


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits.detach().clone()


def embedded(model, batch) -> torch.Tensor:
    """The class and patch tokens (position embeddings added) the prompt sits beside, one row each."""
    with torch.no_grad():
        rows = model.get_base_model().vit.embeddings(batch["pixel_values"])
    return rows.reshape(-1, rows.shape[-1])


def test_the_prompt_follows_the_class_token_in_the_first_layer():
    model = vit_prompt_model()
    batch = images(0, 2)
    seen = {}
    layer = model.get_base_model().vit.layers[0]
    handle = layer.register_forward_pre_hook(lambda module, args: seen.setdefault("input", args[0].detach()))
    try:
        logits(model, batch)
    finally:
        handle.remove()
    tokens = model.get_base_model().vit.embeddings(batch["pixel_values"]).detach()
    prompt = model.prompt_encoder["default"].embedding.weight.detach()
    first = seen["input"]
    assert first.shape[1] == tokens.shape[1] + TOKENS
    torch.testing.assert_close(first[:, :1], tokens[:, :1])
    torch.testing.assert_close(first[:, 1 : 1 + TOKENS], prompt.expand(2, -1, -1))
    torch.testing.assert_close(first[:, 1 + TOKENS :], tokens[:, 1:])


def test_vit_prompt_keeps_old_tokens_and_prompt_rows_and_learns():
    """The paper's prompt condition, exact at gp_threshold=1: x Δpᵀ = 0 for the old class and patch tokens and
    p_old Δpᵀ = 0. The outputs themselves drift (LayerNorm and W_Q W_Kᵀ sit between p and the scores): less than
    without GP, measured here."""
    drifts = {}
    for projected in (True, False):
        model = vit_prompt_model()
        prompt = model.prompt_encoder["default"].embedding.weight
        old, new = images(0, 1), images(1, 4)
        train_steps(model, old, 5, lr=3e-2)
        peft_gp.update_memory(model, [old])
        tokens, prompt_before, before = embedded(model, old), prompt.detach().clone(), logits(model, old)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2, weight_decay=0.1)
        if projected:
            GPProjector(model).attach(optimizer)
        losses = train_steps(model, new, 15, optimizer=optimizer)
        change = prompt.detach() - prompt_before
        assert change.abs().max().item() > 1e-2, "the prompt did not train: the test proves nothing"
        assert losses[-1] < losses[0], losses
        if projected:
            scale = tokens.norm(dim=1).max() * change.norm(dim=1).max()
            assert (tokens @ change.T).abs().max().item() <= 1e-5 * scale
            assert (prompt_before @ change.T).abs().max().item() <= 1e-5 * prompt_before.norm() * change.norm()
        drifts[projected] = (logits(model, old) - before).abs().max().item()
    print(f"ViT prompt: old-output drift {drifts[True]:.2e} with GP, {drifts[False]:.2e} without")
    assert drifts[True] < drifts[False]


def test_vit_prompt_round_trip_and_from_pretrained_is_trainable(tmp_path):
    model = vit_prompt_model()
    old = images(0, 1)
    train_steps(model, old, 3)
    peft_gp.update_memory(model, [old])
    peft_gp.save_pretrained(model, tmp_path)
    loaded = peft_gp.from_pretrained(tiny_vit(), str(tmp_path), is_trainable=True)
    assert isinstance(loaded.peft_config["default"], GPPromptTuningConfig)
    torch.testing.assert_close(logits(loaded, old), logits(model, old), rtol=0, atol=0)
    saved, restored = peft_gp.get_memory(model), peft_gp.get_memory(loaded)
    assert all(torch.equal(saved.bases[n], restored.bases[n]) for n in saved.bases)
    prompt = loaded.prompt_encoder["default"].embedding.weight
    start = prompt.detach().clone()
    optimizer = torch.optim.AdamW([p for p in loaded.parameters() if p.requires_grad], lr=3e-2)
    GPProjector(loaded).attach(optimizer)
    train_steps(loaded, images(1, 4), 5, optimizer=optimizer)
    change = prompt.detach() - start
    basis = restored.bases["prompt_encoder.embedding"]
    assert change.abs().max().item() > 1e-3
    assert (change @ basis).abs().max().item() <= 1e-5 * change.abs().max().item()


def test_gp_trainer_runs_two_tasks_of_vit_prompt_tuning(tmp_path):
    from transformers import TrainingArguments

    model = vit_prompt_model()
    args = TrainingArguments(str(tmp_path), max_steps=4, learning_rate=3e-2, per_device_train_batch_size=2,
                             save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)  # fmt: skip
    for task_id in (0, 1):
        data = Dataset.from_dict({k: v.tolist() for k, v in images(task_id, 2).items()})
        trainer = peft_gp.GPTrainer(model=model, args=args, train_dataset=data)
        trainer.train()
    assert trainer.gp_memory.tasks_seen == 2
    assert trainer.gp_memory.bases["prompt_encoder.embedding"].shape[1] > TOKENS  # tokens and prompt rows


def test_vit_prompt_refusals_name_the_fix():
    with pytest.raises(ValueError, match="prompt_tuning_init='RANDOM'"):
        peft_gp.get_peft_model(
            tiny_vit(),
            GPPromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=TOKENS, prompt_tuning_init="TEXT",
                                 prompt_tuning_init_text="a photo", tokenizer_name_or_path="bert-base-uncased"),
        )  # fmt: skip
    convnet = TinyConvNet(dims=2)
    convnet.config = tiny_vit().config  # a config without a vocabulary, and no patch embeddings
    with pytest.raises(NotImplementedError, match="patch embeddings"):
        peft_gp.get_peft_model(convnet, GPPromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=TOKENS))
