"""The projection in a plain ``accelerate`` loop: hooks go on the optimizer inside ``AcceleratedOptimizer``."""

import torch
from accelerate import Accelerator
from peft import get_peft_model

import peft_gp
from peft_gp import GPLoraConfig, GPProjector

from .testing import tiny_bert


def batches(task_id: int, count: int = 4):
    generator = torch.Generator().manual_seed(task_id)
    low, high = (4, 10) if task_id == 0 else (20, 60)
    for _ in range(count):
        ids = torch.randint(low, high, (2, 5), generator=generator)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1]) + 2 * task_id}


def test_accelerate_loop_with_accumulation_and_clipping_keeps_old_outputs():
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    config = GPLoraConfig(
        task_type="SEQ_CLS",
        r=16,
        lora_dropout=0.0,
        target_modules=["query", "value"],
        gp_threshold=1.0,
        gp_projection="update",
    )
    model = get_peft_model(tiny_bert(), config)
    old = list(batches(0))

    def train(task_batches, epochs):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
        prepared_model, prepared_optimizer = accelerator.prepare(model, optimizer)
        projector = GPProjector(prepared_model).attach(prepared_optimizer)
        prepared_model.train()
        for _ in range(epochs):
            for batch in task_batches:
                with accelerator.accumulate(prepared_model):
                    accelerator.backward(prepared_model(**batch).loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(prepared_model.parameters(), 0.5)
                    prepared_optimizer.step()
                    prepared_optimizer.zero_grad()
        projector.detach()

    train(old, 5)
    peft_gp.update_memory(model, old)
    model.eval()
    with torch.no_grad():
        before = torch.cat([model(**b).logits for b in old])
    train(list(batches(1)), 5)
    model.eval()
    with torch.no_grad():
        after = torch.cat([model(**b).logits for b in old])
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()
    assert peft_gp.get_memory(model).tasks_seen == 1
