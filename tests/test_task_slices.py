"""Per-task slices (``gp_task_slices``) for LoRA and the bottleneck adapter: old outputs kept exactly, other slices
bit-identical, the new slice off the old inputs and still learning, save/load/resume, the cap, bad settings, and a
plasticity check against plain GP-LoRA where its ``lora_B`` basis fills."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

import peft_gp
from peft_gp import (
    GPAdapterConfig,
    GPCapacityWarning,
    GPLoraConfig,
    GPProjector,
    GPTrainer,
    UnprotectedTrainingWarning,
)
from peft_gp.wiring.slices import ROWS
from peft_gp.wiring.state import get_state

from .testing import CASES, REPO, logits_on, task_dataset, tiny_bert, tiny_gpt2, train_steps, training_args

CASE = {case.name: case for case in CASES}
SLICES, WIDTH = 3, 4  # rank (bottleneck) 12: three tasks of 4 components each


def sliced_config(case, paradigm: str, **gp):
    settings = {"gp_task_slices": SLICES, "gp_threshold": 1.0, **gp}
    if paradigm == "lora":  # lora_alpha / r = 2, as a plain LoRA of rank 4 with lora_alpha 8
        return GPLoraConfig(r=SLICES * WIDTH, lora_alpha=2 * SLICES * WIDTH, lora_dropout=0.0, **case.lora, **settings)
    shared = {key: case.lora[key] for key in ("task_type",) if key in case.lora}
    return GPAdapterConfig(bottleneck_size=SLICES * WIDTH, **shared, **settings)


def batch_of(case, task_id: int) -> dict:
    batch = case.make_batch(task_id)
    if case.lora.get("task_type") == "SEQ_CLS":
        batch["labels"] = batch["labels"] % 4  # the tiny BERT has 4 labels; the third task reuses them
    return batch


def input_sides(model) -> list:
    """The input-side group of every sliced layer (its ``slices.output_side`` is the output side)."""
    return [group for group in get_state(model).groups if group.slices is not None and group.slices.axis == ROWS]


def blocks(model, task_id: int) -> dict[str, torch.Tensor]:
    """Slice ``task_id`` of every sliced tensor (input rows and bias, output columns), copied."""
    found = {}
    for group in input_sides(model):
        block, out = group.slices.block(task_id), group.slices.output_side
        found[f"{group.name}.weight"] = group.weight[block].detach().clone()
        found[f"{out.name}.weight"] = out.weight[:, block].detach().clone()
        if group.bias is not None:
            found[f"{group.name}.bias"] = group.bias[block].detach().clone()
    return found


def shared_biases(model) -> list[torch.Tensor]:
    return [group.slices.output_side.bias.detach().clone() for group in input_sides(model)
            if group.slices.output_side.bias is not None]  # fmt: skip


def off_old_inputs(model) -> float:
    """Largest ``‖[A_t | b_t] M‖ / ‖[A_t | b_t]‖`` over the sliced layers, ``t`` the slice the next task trains."""
    memory, worst = peft_gp.get_memory(model), 0.0
    for group in input_sides(model):
        block, basis = group.slices.block(memory.tasks_seen), memory.bases[group.name]
        joined = group.weight[block].detach()
        if group.bias is not None:
            joined = torch.cat([joined, group.bias[block].detach().unsqueeze(-1)], dim=-1)
        if basis.shape[1]:
            worst = max(worst, ((joined @ basis).norm() / joined.norm()).item())
    return worst


def optimizer_for(model, mode: str) -> torch.optim.Optimizer:
    """AdamW with weight decay for "update" (exact with any optimizer); SGD with momentum for "gradient" (exact where
    the step is linear in the projected gradients; with Adam it leaks as plain GP does, see docs/paradigms.md)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if mode == "update":
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    return torch.optim.SGD(params, lr=5e-2, momentum=0.9)


ROWS_OF_MATRIX = [
    pytest.param(name, paradigm, mode, id=f"{name}-{paradigm}-{mode}")
    for name in ("bert", "llama")
    for paradigm in ("lora", "adapter")
    for mode in ("update", "gradient")
] + [pytest.param("bert-lora-bias", "lora", "update", id="bert-lora-bias-update")]


@pytest.mark.parametrize("name, paradigm, mode", ROWS_OF_MATRIX)
def test_three_tasks_keep_old_outputs_and_every_other_slice(name, paradigm, mode):
    case = CASE[name]
    model = peft_gp.get_peft_model(case.build(), sliced_config(case, paradigm, gp_projection=mode))
    old = []  # (batch, outputs after its task)
    for task_id in range(SLICES):
        batch = batch_of(case, task_id)
        optimizer = optimizer_for(model, mode)
        projector = GPProjector(model).attach(optimizer)
        assert off_old_inputs(model) < 1e-5  # the new slice's input side reads nothing of the old inputs
        before = {s: blocks(model, s) for s in range(SLICES)}
        biases = shared_biases(model)
        losses = train_steps(model, batch, 15, optimizer=optimizer)
        projector.detach()
        assert losses[-1] < losses[0] - 0.05, losses
        for other in range(SLICES):  # earlier and later slices bit-identical, the training one moved
            now = blocks(model, other)
            if other != task_id:
                assert all(torch.equal(now[key], before[other][key]) for key in now), other
        trained = blocks(model, task_id)
        output_keys = [key for key in trained if key.endswith(("lora_B.weight", "gp_adapter_up.weight"))]
        assert max((trained[k] - before[task_id][k]).abs().max().item() for k in output_keys) > 1e-3
        if task_id > 0:
            assert all(torch.equal(a, b) for a, b in zip(shared_biases(model), biases))
        for old_batch, old_outputs in old:
            after = case.output(model, old_batch)
            assert (after - old_outputs).abs().max().item() <= 1e-4 * old_outputs.abs().max().item()
        peft_gp.update_memory(model, [batch])
        assert off_old_inputs(model) < 1e-5 or task_id == SLICES - 1  # prepared when the memory grows
        old.append((batch, case.output(model, batch)))


@pytest.mark.parametrize("paradigm", ["lora", "adapter"])
def test_without_projection_the_same_run_drifts_and_warns_from_the_first_task(paradigm):
    case = CASE["bert"]
    model = peft_gp.get_peft_model(case.build(), sliced_config(case, paradigm))
    old_batch = batch_of(case, 0)
    with pytest.warns(UnprotectedTrainingWarning, match="gp_task_slices"):  # every slice would train
        train_steps(model, old_batch, 10)
    peft_gp.update_memory(model, [old_batch])
    before = case.output(model, old_batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnprotectedTrainingWarning)
        train_steps(model, batch_of(case, 1), 15)
    assert (case.output(model, old_batch) - before).abs().max().item() > 1e-2 * before.abs().max().item()


def test_gradients_outside_the_slice_are_zero_before_clipping():
    """The fixed slices add nothing to the gradient norm that clipping measures (a task trains as a plain adapter of
    its slice's rank would); the shared output bias of a LoRA with lora_bias trains with the first task only."""
    case = CASE["bert-lora-bias"]
    model = peft_gp.get_peft_model(case.build(), sliced_config(case, "lora"))
    for task_id in range(2):
        projector = GPProjector(model).attach(torch.optim.SGD(model.parameters(), lr=0.0))
        model.train()
        model(**batch_of(case, task_id)).loss.backward()
        for group in input_sides(model):
            block, out = group.slices.block(task_id), group.slices.output_side
            a_grad, b_grad = group.weight.grad.clone(), out.weight.grad.clone()
            assert b_grad[:, block].abs().max() > 0
            a_grad[block], b_grad[:, block] = 0, 0
            assert a_grad.abs().max() == 0 and b_grad.abs().max() == 0
            assert (out.bias.grad.abs().max() > 0) == (task_id == 0)
        model.zero_grad()
        projector.detach()
        peft_gp.update_memory(model, [batch_of(case, task_id)])


def trained_bert(tmp_path, tasks: int, **args):
    model = peft_gp.get_peft_model(tiny_bert(num_labels=6), sliced_config(CASE["bert"], "lora"))
    for task_id in range(tasks):
        GPTrainer(model=model, args=training_args(tmp_path / f"t{task_id}", **args),
                  train_dataset=task_dataset(task_id, 8)).train()  # fmt: skip
    return model


def test_save_load_and_plain_peft_then_the_next_task_trains_the_next_slice(tmp_path):
    model = trained_bert(tmp_path, 2, num_train_epochs=3)
    old = [task_dataset(task_id, 8) for task_id in range(2)]
    outputs = [logits_on(model, data) for data in old]
    peft_gp.save_pretrained(model, tmp_path / "saved")

    plain = PeftModel.from_pretrained(tiny_bert(num_labels=6), str(tmp_path / "saved"))  # a rank-12 LoRA to PEFT
    assert plain.peft_config["default"].r == SLICES * WIDTH
    for data, expected in zip(old, outputs):
        torch.testing.assert_close(logits_on(plain, data), expected, rtol=0, atol=1e-6)

    loaded = peft_gp.from_pretrained(tiny_bert(num_labels=6), str(tmp_path / "saved"), is_trainable=True)
    assert loaded.peft_config["default"].gp_task_slices == SLICES and peft_gp.get_memory(loaded).tasks_seen == 2
    earlier = {s: blocks(loaded, s) for s in range(2)}
    GPTrainer(model=loaded, args=training_args(tmp_path / "t2", num_train_epochs=3),
              train_dataset=task_dataset(2, 8)).train()  # fmt: skip
    for s in range(2):
        assert all(torch.equal(blocks(loaded, s)[key], earlier[s][key]) for key in earlier[s])
    assert all(block.abs().max() > 0 for key, block in blocks(loaded, 2).items() if key.endswith("lora_B.weight"))
    for data, expected in zip(old, outputs):
        after = logits_on(loaded, data)
        assert (after - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()


def test_tasks_pushed_to_the_hub_resume_on_the_next_slice(hub, tmp_path):
    model = peft_gp.get_peft_model(tiny_bert(num_labels=6), sliced_config(CASE["bert"], "lora"))
    trainer = GPTrainer(model=model, args=training_args(tmp_path / "run", num_train_epochs=3),
                        train_dataset=task_dataset(0, 8), gp_push_to_hub=REPO)  # fmt: skip
    trainer.train()
    pushed = {s: blocks(model, s) for s in range(SLICES)}
    old_task = task_dataset(0, 8)
    outputs = logits_on(model, old_task)
    loaded = peft_gp.from_pretrained(tiny_bert(num_labels=6), REPO, revision="task-01", is_trainable=True)
    assert loaded.peft_config["default"].gp_task_slices == SLICES and peft_gp.get_memory(loaded).tasks_seen == 1
    assert "| `gp_task_slices` | `3` |" in hub.files(REPO, "task-01")["README.md"].decode()
    GPTrainer(model=loaded, args=training_args(tmp_path / "next", num_train_epochs=3),
              train_dataset=task_dataset(1, 8)).train()  # fmt: skip
    assert all(torch.equal(blocks(loaded, 0)[key], pushed[0][key]) for key in pushed[0])
    # slice 2: lora_B still zero, lora_A moved off the grown memory by task 2's memory update (outputs unchanged)
    assert all(block.abs().max() == 0 for key, block in blocks(loaded, 2).items() if key.endswith("lora_B.weight"))
    assert off_old_inputs(loaded) < 1e-5
    assert any((blocks(loaded, 1)[key] - pushed[1][key]).abs().max() > 1e-3 for key in pushed[1])
    after = logits_on(loaded, old_task)
    assert (after - outputs).abs().max().item() <= 1e-4 * outputs.abs().max().item()


def test_a_final_checkpoint_saved_before_the_memory_update_gets_its_next_slice_prepared(tmp_path):
    """A task's final checkpoint holds the weights from before its memory update and the memory from after it: the
    next slice's input side is moved off the old inputs when training attaches, not only in ``update_memory``."""
    trained_bert(tmp_path, 2, num_train_epochs=1, save_strategy="steps", save_steps=2, max_steps=2)
    checkpoint = tmp_path / "t1" / "task-02" / "checkpoint-2"
    loaded = peft_gp.from_pretrained(tiny_bert(num_labels=6), str(checkpoint), is_trainable=True)
    assert peft_gp.get_memory(loaded).tasks_seen == 2 and off_old_inputs(loaded) > 1e-2
    old = [task_dataset(task_id, 8) for task_id in range(2)]
    outputs = [logits_on(loaded, data) for data in old]
    GPTrainer(model=loaded, args=training_args(tmp_path / "t2", num_train_epochs=3),
              train_dataset=task_dataset(2, 8)).train()  # fmt: skip
    for data, expected in zip(old, outputs):
        after = logits_on(loaded, data)
        assert (after - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()


def test_resume_in_the_middle_of_a_task_continues_on_its_slice(tmp_path):
    model = trained_bert(tmp_path, 1, num_train_epochs=3)
    peft_gp.save_pretrained(model, tmp_path / "after_task1")
    old_task, new_task = task_dataset(0, 8), task_dataset(1, 16)
    before = logits_on(model, old_task)
    args = training_args(tmp_path / "task2", save_strategy="steps", save_steps=4, max_steps=8, num_train_epochs=1)
    GPTrainer(model=model, args=args, train_dataset=new_task, gp_update_memory=False).train()
    uninterrupted = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    resumed = peft_gp.from_pretrained(tiny_bert(num_labels=6), str(tmp_path / "after_task1"), is_trainable=True)
    first_slice = blocks(resumed, 0)
    trainer = GPTrainer(model=resumed, args=args, train_dataset=new_task, gp_update_memory=False)
    trainer.train(resume_from_checkpoint=str(tmp_path / "task2" / "task-02" / "checkpoint-4"))
    assert all(torch.equal(blocks(resumed, 0)[key], first_slice[key]) for key in first_slice)
    assert all(block.abs().max() > 0 for key, block in blocks(resumed, 1).items() if key.endswith("lora_B.weight"))
    assert all(block.abs().max() == 0 for key, block in blocks(resumed, 2).items() if key.endswith("lora_B.weight"))
    after = logits_on(resumed, old_task)
    assert (after - before).abs().max().item() <= 1e-4 * before.abs().max().item()
    for name, param in resumed.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, uninterrupted[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("paradigm", ["lora", "adapter"])
def test_a_task_past_the_last_slice_is_refused(tmp_path, paradigm):
    case = CASE["bert"]
    model = peft_gp.get_peft_model(case.build(), sliced_config(case, paradigm))
    for task_id in range(SLICES):
        peft_gp.update_memory(model, [batch_of(case, task_id)])
    with pytest.raises(ValueError, match=rf"all of its gp_task_slices={SLICES} slices \({SLICES} tasks stored\)"):
        GPProjector(model).attach(torch.optim.SGD(model.parameters(), lr=0.1))
    args = training_args(tmp_path)
    with pytest.raises(ValueError, match="raise gp_task_slices"):
        GPTrainer(model=model, args=args, train_dataset=task_dataset(0, 4)).train()
    assert args.output_dir == str(tmp_path)  # refused before the task's checkpoint folder was set


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: GPLoraConfig(r=10, gp_task_slices=4), r"r=10 is not a multiple of gp_task_slices=4.*r=12"),
        (lambda: GPLoraConfig(r=8, gp_task_slices=0), "positive integer"),
        (lambda: GPLoraConfig(r=8, gp_task_slices=True), "positive integer"),
        (lambda: GPLoraConfig(r=8, gp_task_slices=2, init_lora_weights=False), "init_lora_weights=True"),
        (lambda: GPAdapterConfig(bottleneck_size=6, gp_task_slices=4), "bottleneck_size=6 is not a multiple"),
        (lambda: GPAdapterConfig(bottleneck_size=8, gp_task_slices=2, init_weights=False), "init_weights=True"),
        (lambda: GPAdapterConfig(bottleneck_size=8, gp_task_slices=2, activation="sigmoid"), "act\\(0\\) = 0"),
    ],
)
def test_bad_settings_are_refused_with_the_fix(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_layers_and_ranks_slices_cannot_serve_are_refused():
    embedding = GPLoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["wte"], gp_task_slices=2)
    with pytest.raises(ValueError, match="gp_task_slices on Embedding.*target linear layers only"):
        peft_gp.get_peft_model(tiny_gpt2(), embedding)
    dora = GPLoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"], use_dora=True, gp_task_slices=2)
    with pytest.raises(ValueError, match="gp_task_slices on DoraLinearVariant"):
        peft_gp.get_peft_model(tiny_bert(), dora)
    odd_rank = {"layer.1.attention.self.query": 6}
    pattern = GPLoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"], rank_pattern=odd_rank, gp_task_slices=4)
    with pytest.raises(ValueError, match="rank .* 6, which gp_task_slices=4 does not divide"):
        peft_gp.get_peft_model(tiny_bert(), pattern)


def test_a_memory_stored_without_slices_does_not_load_into_a_sliced_adapter(tmp_path):
    case = CASE["bert"]
    unsliced = sliced_config(case, "lora", gp_task_slices=None)
    model = peft_gp.get_peft_model(case.build(), unsliced)
    peft_gp.update_memory(model, [batch_of(case, 0)])
    peft_gp.save_pretrained(model, tmp_path)
    sliced = peft_gp.get_peft_model(case.build(), sliced_config(case, "lora"))
    with pytest.raises(peft_gp.GPMemoryError, match="gp_task_slices=None, this one has 3"):
        peft_gp.load_memory(sliced, str(tmp_path))


# ---- plasticity: where plain GP-LoRA's lora_B basis fills, a fresh slice still learns new output directions ----


class Regression(nn.Module):
    """One ``nn.Linear`` (16 → 16) fitted by mean squared error."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(16, 16)

    def forward(self, inputs, labels=None):
        outputs = self.linear(inputs)
        loss = None if labels is None else nn.functional.mse_loss(outputs, labels)
        return SequenceClassifierOutput(loss=loss, logits=outputs)


def regression_task(task_id: int, base: nn.Module) -> dict:
    """Inputs on coordinates ``4t .. 4t+3``; targets the base model's outputs plus a change on output coordinates
    ``2t, 2t+1`` only: task 1 needs output directions that task 0 never used."""
    generator = torch.Generator().manual_seed(task_id)
    inputs = torch.zeros(32, 16)
    inputs[:, 4 * task_id : 4 * task_id + 4] = torch.randn(32, 4, generator=generator)
    change = torch.zeros(32, 16)
    change[:, 2 * task_id : 2 * task_id + 2] = inputs[:, 4 * task_id : 4 * task_id + 2] * 3.0
    with torch.no_grad():
        return {"inputs": inputs, "labels": base(inputs) + change}


def second_task_loss(**slicing) -> tuple[float, float, float]:
    """Task 1's loss before and after 60 AdamW steps, and lora_B's capacity used after task 0."""
    base = Regression()
    config = GPLoraConfig(target_modules=["linear"], lora_dropout=0.0, gp_threshold=1.0, **slicing)
    model = peft_gp.get_peft_model(Regression(), config)
    tasks = [regression_task(task_id, base.linear) for task_id in range(2)]
    losses = []
    for batch in tasks:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
        projector = GPProjector(model).attach(optimizer)
        losses = train_steps(model, batch, 60, optimizer=optimizer)
        projector.detach()
        if not peft_gp.get_memory(model).tasks_seen:
            peft_gp.update_memory(model, [batch])
    capacity = peft_gp.get_memory(model).capacity()["linear.lora_B"]
    return losses[0], losses[-1], capacity


def test_a_fresh_slice_learns_where_plain_gp_lora_is_stuck():
    """Plain GP-LoRA of rank 4: after task 0, ``lora_B``'s basis fills (``A x`` spans its 4 dimensions), so ``B`` is
    frozen with its rows off task 0's output coordinates exactly zero, and task 1's output change cannot be reached
    (measured: 1.09 -> 1.06). Two slices of rank 4 (each task the same rank): task 1's ``B`` starts fresh and learns
    it (1.08 -> 0.004). Deterministic, with a wide margin. (A plain rank-8 GP-LoRA learns it too, 1.10 -> 0.003: its
    ``lora_B`` basis holds 4 of 8 dimensions. Slices matter where that basis fills.)"""
    with pytest.warns(GPCapacityWarning, match="lora_B"):
        plain_first, plain_last, plain_capacity = second_task_loss(r=4, lora_alpha=4)
    sliced_first, sliced_last, sliced_capacity = second_task_loss(r=8, lora_alpha=8, gp_task_slices=2)
    assert plain_capacity == 1.0 and sliced_capacity == 0.0
    assert plain_last > 0.8 * plain_first, (plain_first, plain_last)  # stuck: B cannot reach coordinates 2, 3
    assert sliced_last < 0.1 * sliced_first and sliced_last < 0.1 * plain_last, (sliced_last, plain_last)
