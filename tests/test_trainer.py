"""GPTrainer end to end on a tiny BERT: invariance of old logits, plasticity, logging, checkpoints and resume."""

from __future__ import annotations

import os

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainerCallback, default_data_collator

import peft_gp
from peft_gp import GPTrainer
from peft_gp.wiring.projector import raw_optimizer

from .testing import LENGTH, gp_model, logits_on, mean_loss, task_dataset, tiny_bert, training_args


@pytest.mark.parametrize(
    "paradigm, accumulation, max_grad_norm",
    [("lora", 1, 1.0), ("lora", 2, 0.3), ("adapter", 1, 1.0)],
    ids=["plain", "accum2-clipped", "adapter"],
)
def test_second_task_keeps_old_logits_and_learns(tmp_path, paradigm, accumulation, max_grad_norm):
    old_task, new_task = task_dataset(0, 8), task_dataset(1, 16)
    model = gp_model(paradigm)
    args = training_args(
        tmp_path,
        gradient_accumulation_steps=accumulation,
        max_grad_norm=max_grad_norm,
        num_train_epochs=6 * accumulation,
    )
    GPTrainer(model=model, args=args, train_dataset=old_task).train()
    memory = peft_gp.get_memory(model)
    assert memory.tasks_seen == 1 and not memory.is_empty

    before, loss_before = logits_on(model, old_task), mean_loss(model, new_task)
    trainer = GPTrainer(model=model, args=args, train_dataset=new_task)
    trainer.train()
    after, loss_after = logits_on(model, old_task), mean_loss(model, new_task)

    assert (after - before).abs().max().item() <= 1e-4 * before.abs().max().item()
    assert loss_after < 0.8 * loss_before, (loss_before, loss_after)
    assert peft_gp.get_memory(model).tasks_seen == 2
    logged = [entry for entry in trainer.state.log_history if "gp_grad_removed" in entry]
    assert logged and all(0.0 < entry["gp_grad_removed"] <= 1.0 for entry in logged)
    assert any(key.startswith("gp_basis/") for entry in trainer.state.log_history for key in entry)


def test_plain_peft_trainer_forgets_on_the_same_run(tmp_path):
    old_task, new_task = task_dataset(0, 8), task_dataset(1, 16)
    config = LoraConfig(task_type="SEQ_CLS", r=16, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"])
    model = get_peft_model(tiny_bert(), config)
    args = training_args(tmp_path)
    Trainer(model=model, args=args, train_dataset=old_task).train()
    before = logits_on(model, old_task)
    Trainer(model=model, args=args, train_dataset=new_task).train()
    after = logits_on(model, old_task)
    assert (after - before).abs().max().item() > 5e-2 * before.abs().max().item()


def test_each_train_call_is_one_task_with_fresh_optimizer(tmp_path):
    model = gp_model(gp_threshold=0.97)
    trainer = GPTrainer(
        model=model, args=training_args(tmp_path, num_train_epochs=1), train_dataset=task_dataset(0, 8)
    )
    moments_at_start = []

    class Moments(TrainerCallback):  # runs after GPCallback (GPTrainer puts it first)
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            moments_at_start.append(len(raw_optimizer(optimizer).state))

    trainer.add_callback(Moments())
    trainer.train()
    trainer.train_dataset = task_dataset(1, 8)
    trainer.train()
    assert moments_at_start == [0, 0]  # task 2 starts without task 1's Adam moments
    assert len(raw_optimizer(trainer.optimizer).state) > 0
    assert trainer.gp_memory.tasks_seen == 2
    assert trainer.gp_memory.thresholds == [0.97, 0.97]


def test_update_memory_can_be_deferred_and_uses_gp_memory_samples(tmp_path):
    model = gp_model(gp_memory_samples=3)
    trainer = GPTrainer(
        model=model,
        args=training_args(tmp_path, num_train_epochs=1),
        train_dataset=task_dataset(0, 8),
        gp_update_memory=False,
    )
    trainer.train()
    assert trainer.gp_memory.tasks_seen == 0
    trainer.gp_log_per_layer = False
    report = trainer.update_memory()
    last = trainer.state.log_history[-1]
    assert "gp_capacity_mean" in last and not any(key.startswith("gp_basis/") for key in last)
    assert trainer.gp_memory.tasks_seen == 1
    # 3 examples of at most 6 tokens: at most 18 feature rows for the first layer's lora_A
    first = report["bert.encoder.layer.0.attention.self.query.lora_A"]
    assert 0 < first["basis_size"] <= 18
    assert report["classifier"]["basis_size"] <= 3


def test_memory_batches_go_longest_first_and_give_the_same_grams(tmp_path):
    """Sorting the memory sample by length only cuts padding (which never enters the memory): same Gram matrices."""
    from torch.utils.data import DataLoader

    from peft_gp.wiring.grams import collect_grams
    from peft_gp.wiring.state import resolve_groups

    def cut(rows):  # pads to the batch's longest text only, as a padding collator does
        batch = default_data_collator(rows)
        width = int(batch["attention_mask"].sum(1).max())
        return {key: value[:, :width] if value.dim() == 2 else value for key, value in batch.items()}

    data = task_dataset(0, 10)
    model = gp_model()
    trainer = GPTrainer(model=model, args=training_args(tmp_path, per_device_eval_batch_size=3), data_collator=cut)
    batches = list(trainer.gp_callback._memory_batches(model, trainer.args, data, None)[0])
    widths = [batch["input_ids"].shape[1] for batch in batches]
    assert widths == sorted(widths, reverse=True) and widths[-1] < LENGTH, widths
    in_order = list(DataLoader(data, batch_size=3, collate_fn=cut))
    assert sum(b["input_ids"].numel() for b in batches) < sum(b["input_ids"].numel() for b in in_order)
    groups = resolve_groups(model)
    grams, seen = collect_grams(model, groups, batches)
    reference, reference_seen = collect_grams(model, groups, in_order)
    assert seen == reference_seen == 10
    for name, gram in grams.items():
        # float32 attention over different padding widths rounds differently: equal up to that rounding
        torch.testing.assert_close(gram, reference[name], rtol=1e-5, atol=1e-5 * reference[name].abs().max().item())


@pytest.mark.parametrize("paradigm", ["lora", "adapter"])
def test_checkpoints_hold_memory_and_resume_continues_with_same_bases(tmp_path, paradigm):
    old_task, new_task = task_dataset(0, 8), task_dataset(1, 16)
    model = gp_model(paradigm)
    GPTrainer(model=model, args=training_args(tmp_path / "task1"), train_dataset=old_task).train()
    task1_bases = {name: basis.clone() for name, basis in peft_gp.get_memory(model).bases.items()}
    before = logits_on(model, old_task)
    peft_gp.save_pretrained(model, tmp_path / "after_task1")

    args = training_args(tmp_path / "task2", save_strategy="steps", save_steps=4, max_steps=8, num_train_epochs=1)
    uninterrupted = GPTrainer(model=model, args=args, train_dataset=new_task, gp_update_memory=False)
    uninterrupted.train()
    checkpoint = tmp_path / "task2" / "task-02" / "checkpoint-4"
    assert (checkpoint / "gp_memory.safetensors").is_file() and (checkpoint / "adapter_model.safetensors").is_file()
    final_uninterrupted = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    # a new process: the model after task 1, resumed in the middle of task 2 from the checkpoint
    resumed_model = peft_gp.from_pretrained(tiny_bert(), str(tmp_path / "after_task1"), is_trainable=True)
    resumed = GPTrainer(model=resumed_model, args=args, train_dataset=new_task, gp_update_memory=False)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    memory = peft_gp.get_memory(resumed_model)
    assert memory.tasks_seen == 1
    for name, basis in task1_bases.items():
        assert torch.equal(memory.bases[name], basis)
    after = logits_on(resumed_model, old_task)
    assert (after - before).abs().max().item() <= 1e-4 * before.abs().max().item()
    for name, param in resumed_model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, final_uninterrupted[name], rtol=1e-5, atol=1e-6)


def test_resume_without_memory_file_fails_clearly(tmp_path):
    model = gp_model()
    args = training_args(tmp_path, save_strategy="steps", save_steps=2, max_steps=2, num_train_epochs=1)
    GPTrainer(model=model, args=args, train_dataset=task_dataset(0, 8)).train()
    checkpoint = tmp_path / "task-01" / "checkpoint-2"
    os.remove(checkpoint / "gp_memory.safetensors")
    fresh = GPTrainer(model=gp_model(), args=args, train_dataset=task_dataset(0, 8))
    with pytest.raises(peft_gp.GPMemoryError, match="gp_memory.safetensors"):
        fresh.train(resume_from_checkpoint=str(checkpoint))


def test_trainer_refuses_a_model_without_gp_config(tmp_path):
    model = get_peft_model(tiny_bert(), LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    with pytest.raises(TypeError, match="GPLoraConfig"):
        GPTrainer(model=model, args=training_args(tmp_path), train_dataset=task_dataset(0, 4))


def test_bf16_autocast_keeps_bases_float32_and_grams_float64(tmp_path):
    old_task, new_task = task_dataset(0, 8), task_dataset(1, 16)
    model = gp_model()
    args = training_args(tmp_path, bf16=True)
    GPTrainer(model=model, args=args, train_dataset=old_task).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # features arrive in bfloat16
        batch = default_data_collator([old_task[i] for i in range(len(old_task))])
        grams, _ = peft_gp.wiring.grams.collect_grams(model, peft_gp.wiring.state.resolve_groups(model), [batch])
    assert all(gram.dtype == torch.float64 for gram in grams.values())
    assert all(basis.dtype == torch.float32 for basis in peft_gp.get_memory(model).bases.values())
    before = logits_on(model, old_task)
    GPTrainer(model=model, args=args, train_dataset=new_task).train()
    after = logits_on(model, old_task)
    # accelerate keeps the forward under bf16 autocast (evaluation and memory features included): old logits stay
    # the same up to bfloat16 rounding (8 mantissa bits, 2**-8 = 0.4%), no longer to float32 precision
    assert (after - before).abs().max().item() <= 1.5e-2 * before.abs().max().item()
