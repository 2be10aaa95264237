"""The generative path: causal LMs and seq2seq through GPTrainer, and GPCallback in Trainer, Seq2SeqTrainer and TRL's
SFTTrainer, with precomputed list ``labels``; old outputs kept at ``gp_threshold=1.0``; the unprotected-training
warning; one ``output_dir`` for a whole sequence; a reference memory ("task 0")."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader
from transformers import (
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    Trainer,
    default_data_collator,
)

import peft_gp
from peft_gp import GPCallback, GPCheckpointError, GPLoraConfig, GPTrainer, UnprotectedTrainingWarning
from peft_gp.wiring.grams import collect_grams
from peft_gp.wiring.state import resolve_groups

from .testing import (
    MODELS,
    args_for,
    assert_kept_and_learned,
    causal_gp_model,
    lm_task,
    loss_on,
    outputs,
    relative_change,
    seq2seq_task,
    task_data,
    tiny_llama,
    tiny_tokenizer,
    token_ids,
)


@pytest.mark.parametrize("name", list(MODELS))
def test_gp_trainer_on_generative_models_keeps_old_outputs(tmp_path, name):
    model = causal_gp_model(name)
    GPTrainer(model=model, args=args_for(tmp_path), train_dataset=task_data(name, 0)).train()
    assert peft_gp.get_task_state(model).task_classes == [None]  # token labels are not classes
    before, new_loss = outputs(model, task_data(name, 0)), loss_on(model, task_data(name, 1))
    GPTrainer(model=model, args=args_for(tmp_path), train_dataset=task_data(name, 1)).train()
    assert peft_gp.get_memory(model).tasks_seen == 2
    assert_kept_and_learned(model, task_data(name, 0), before, task_data(name, 1), new_loss)


def test_plain_trainer_with_callback_keeps_old_outputs_and_without_it_drifts(tmp_path):
    runs = {}
    for protected in (True, False):
        model = causal_gp_model("llama")
        Trainer(model=model, args=args_for(tmp_path), train_dataset=lm_task(0), callbacks=[GPCallback()]).train()
        before, new_loss = outputs(model, lm_task(0)), loss_on(model, lm_task(1))
        callbacks = [GPCallback()] if protected else []
        trainer = Trainer(model=model, args=args_for(tmp_path), train_dataset=lm_task(1), callbacks=callbacks)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train()
        unprotected = [w for w in caught if issubclass(w.category, UnprotectedTrainingWarning)]
        runs[protected] = (relative_change(before, outputs(model, lm_task(0))), len(unprotected), trainer)
    change, warned, trainer = runs[True]
    assert change <= 1e-4 and warned == 0
    assert loss_on(model, lm_task(1)) < new_loss - 0.05
    assert "gp_grad_removed" in trainer.state.log_history[0]
    change, warned, _ = runs[False]
    assert change > 5e-2 and warned == 1  # unprotected: it drifts, and says so once


def test_seq2seq_trainer_with_callback_keeps_old_outputs(tmp_path):
    model = causal_gp_model("t5")
    args = args_for(tmp_path, cls=Seq2SeqTrainingArguments)
    Seq2SeqTrainer(model=model, args=args, train_dataset=seq2seq_task(0), callbacks=[GPCallback()]).train()
    before, new_loss = outputs(model, seq2seq_task(0)), loss_on(model, seq2seq_task(1))
    Seq2SeqTrainer(model=model, args=args, train_dataset=seq2seq_task(1), callbacks=[GPCallback()]).train()
    assert_kept_and_learned(model, seq2seq_task(0), before, seq2seq_task(1), new_loss)


def _sft_args(out, **overrides):
    from trl import SFTConfig

    return args_for(out, cls=SFTConfig, bf16=False, max_length=16, **overrides)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_sft_trainer_with_gp_peft_config_and_callback(tmp_path, name):
    trl = pytest.importorskip("trl")
    build, lora = MODELS[name]
    config = GPLoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, gp_threshold=1.0, **lora)
    tokenizer = tiny_tokenizer()
    first = trl.SFTTrainer(
        model=build(),
        args=_sft_args(tmp_path),  # TRL's default gradient checkpointing on
        train_dataset=lm_task(0),
        processing_class=tokenizer,
        peft_config=config,
        callbacks=[GPCallback(task_name="first")],
    )
    first.train()
    model = first.model
    assert peft_gp.get_task_state(model).task_names == ["first"]
    before, new_loss = outputs(model, lm_task(0)), loss_on(model, lm_task(1))
    callbacks = [GPCallback(task_name="second")]
    second = trl.SFTTrainer(
        model=model,
        args=_sft_args(tmp_path),
        train_dataset=lm_task(1),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnprotectedTrainingWarning)
        second.train()
    assert_kept_and_learned(model, lm_task(0), before, lm_task(1), new_loss)
    assert peft_gp.get_task_state(model).task_names == ["first", "second"]

    # the same model trained further by an SFTTrainer without the callback: it warns, once
    third = trl.SFTTrainer(model=model, args=_sft_args(tmp_path), train_dataset=lm_task(1), processing_class=tokenizer)
    with pytest.warns(UnprotectedTrainingWarning, match="GPCallback"):
        third.train()


def test_seq2seq_memory_leaves_out_padding_of_both_sides():
    """Encoder padding, decoder padding (labels -100) and the cross-attention inputs (the encoder's output, here as
    long as the decoder's inputs) give the same Gram matrices as the same examples without padding."""
    model = causal_gp_model("t5")
    groups = resolve_groups(model)
    ids, target = token_ids(1, 1, 3)[0], token_ids(1, 1, 3, seed=1)[0]
    padded = {
        "input_ids": torch.tensor([ids + [0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0]]),
        "labels": torch.tensor([target[:2] + [-100, -100]]),
    }
    unpadded = {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.tensor([[1, 1, 1]]),
        "labels": torch.tensor([target[:2] + [5]]),  # decoder inputs: start, target[0], target[1], as above
    }
    grams, _ = collect_grams(model, groups, [padded])
    reference, _ = collect_grams(model, groups, [unpadded])
    cross = [name for name in grams if "EncDecAttention.v.lora_A" in name]
    assert cross
    for name, gram in grams.items():
        torch.testing.assert_close(gram, reference[name], rtol=1e-5, atol=1e-6 * reference[name].abs().max().item())


def _task_checkpoint_args(out, **overrides):
    return args_for(out, save_strategy="steps", save_steps=2, num_train_epochs=3, **overrides)


def test_one_output_dir_for_a_sequence_keeps_tasks_apart(tmp_path):
    model = causal_gp_model("llama")
    GPTrainer(model=model, args=_task_checkpoint_args(tmp_path), train_dataset=lm_task(0)).train()
    GPTrainer(model=model, args=_task_checkpoint_args(tmp_path), train_dataset=lm_task(1)).train()
    for task_id in (0, 1):  # 6 steps each: checkpoints 2, 4, 6 of each task, in its own folder
        folder = tmp_path / f"task-{task_id + 1:02d}"
        assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
        record = peft_gp.wiring.checkpoints.read_record(str(folder / "checkpoint-4"))
        assert record["task_id"] == task_id and record["global_step"] == 4
        # mid-task checkpoints hold the memory of the tasks before; the final one also the task itself
        assert peft_gp.wiring.checkpoints.checkpoint_memory_tasks(str(folder / "checkpoint-4")) == task_id
        assert peft_gp.wiring.checkpoints.checkpoint_memory_tasks(str(folder / "checkpoint-6")) == task_id + 1
    assert not list(tmp_path.glob("checkpoint-*"))

    # the model stores 2 tasks, so it trains task 3: checkpoints of task 1 or 2 are refused before any loading
    third = GPTrainer(model=model, args=_task_checkpoint_args(tmp_path), train_dataset=lm_task(1))
    with pytest.raises(GPCheckpointError, match=r"belongs to task 2 .*training task 3"):
        third.train(resume_from_checkpoint=str(tmp_path / "task-02" / "checkpoint-4"))
    with pytest.raises(GPCheckpointError, match="No complete checkpoint of task 3"):
        third.train(resume_from_checkpoint=True)


def test_resuming_a_finished_task_from_its_final_checkpoint_stores_it_once(tmp_path):
    model = causal_gp_model("llama")
    GPTrainer(model=model, args=_task_checkpoint_args(tmp_path), train_dataset=lm_task(0), gp_task_name="a").train()
    fresh = causal_gp_model("llama")  # a new process: resume=True picks task 1's final checkpoint, storing it
    trainer = GPTrainer(model=fresh, args=_task_checkpoint_args(tmp_path), train_dataset=lm_task(0))
    trainer.train(resume_from_checkpoint=True)
    assert peft_gp.get_memory(fresh).tasks_seen == 1
    assert peft_gp.get_task_state(fresh).task_names == ["a"]
    for name, basis in peft_gp.get_memory(model).bases.items():
        assert torch.equal(peft_gp.get_memory(fresh).bases[name], basis)


def test_plain_trainer_resumes_with_last_checkpoint_and_its_memory(tmp_path):
    model, args = causal_gp_model("llama"), _task_checkpoint_args(tmp_path)
    Trainer(model=model, args=args, train_dataset=lm_task(0), callbacks=[GPCallback()]).train()
    stopped = _task_checkpoint_args(tmp_path, max_steps=4)  # task 2 cut off after its checkpoint-4
    Trainer(model=model, args=stopped, train_dataset=lm_task(1), callbacks=[GPCallback(update_memory=False)]).train()

    fresh = causal_gp_model("llama")  # a new process: the memory of task 1, then task 2 resumed
    peft_gp.load_memory(fresh, str(tmp_path / "task-01" / "checkpoint-6"))
    checkpoint = peft_gp.last_checkpoint(str(tmp_path), fresh)
    assert checkpoint.endswith("task-02/checkpoint-4")
    trainer = Trainer(model=fresh, args=args, train_dataset=lm_task(1), callbacks=[GPCallback()])
    trainer.train(resume_from_checkpoint=checkpoint)  # the callback finds it: step 4, task 2's weights
    assert trainer.state.global_step == 6 and peft_gp.get_memory(fresh).tasks_seen == 2


@pytest.mark.parametrize("gp", [{}, {"gp_sketch_above": 8}], ids=["gram", "sketch"])
def test_reference_memory_protects_the_base_model_from_the_first_task(tmp_path, gp):
    """Also with the inputs sketched (gp_sketch_above): lora_B used to get a basis there, frozen at zero."""
    model = causal_gp_model("llama", **gp)
    reference = lm_task(0)  # stands for general text the base model should keep handling
    before, new_loss = outputs(model, reference), loss_on(model, lm_task(1))
    loader = DataLoader(reference, batch_size=2, collate_fn=default_data_collator)
    peft_gp.update_memory(model, loader, task_name="reference")
    assert peft_gp.get_task_state(model).task_names == ["reference"]
    assert relative_change(before, outputs(model, reference)) <= 1e-6  # lora_A left the stored space; B is 0
    capacity = peft_gp.get_memory(model).capacity()
    assert all(capacity[name] == 0 for name in capacity if name.endswith("lora_B"))  # B stays free to learn
    GPTrainer(model=model, args=args_for(tmp_path), train_dataset=lm_task(1), gp_task_name="first").train()
    assert peft_gp.get_task_state(model).task_names == ["reference", "first"]
    assert_kept_and_learned(model, reference, before, lm_task(1), new_loss)

    plain = get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", r=8, target_modules=["q_proj", "v_proj"]))
    plain_before = outputs(plain, reference)
    Trainer(model=plain, args=args_for(tmp_path), train_dataset=lm_task(1)).train()
    assert relative_change(plain_before, outputs(plain, reference)) > 5e-2
