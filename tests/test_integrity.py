"""Integrity of saves and loads (issue 19): whole-folder saves, files from different saves refused, metadata that
cannot switch protection off, strict parsing, warnings that fire, non-finite gradients that do not spread."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import peft_gp
from peft_gp import GP_MEMORY_NAME, GPCapacityWarning, GPLoraConfig, GPMemoryError, GPProjector
from peft_gp import UnprotectedTrainingWarning as Unprotected
from peft_gp.wiring.memory import GPMemory
from peft_gp.wiring.task_record import GPTaskState, GPTaskStateError

from .testing import bert_batch, lora_bert, saved_bert, task2_args, task_dataset, tiny_bert, train_steps

ROOT = Path(__file__).resolve().parents[1]


def rewrite_memory(path, **metadata):
    """Rewrite a memory file with some metadata fields replaced (the bases kept)."""
    tensors, data = load_file(str(path)), path.read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    save_file(tensors, str(path), metadata={**header["__metadata__"], **metadata})


# ---- whole-folder saves ----------------------------------------------------------------------------------------


def test_a_save_that_fails_half_way_leaves_the_previous_save_whole(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    first = saved_bert(folder, tasks=1)
    (folder / "notes.txt").write_text("mine")  # a file of the user's, kept by every save
    second = saved_bert(tmp_path / "other", tasks=2, seed=1)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # a kill in the middle of writing the memory

    monkeypatch.setattr(GPMemory, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        peft_gp.save_pretrained(second, folder)
    monkeypatch.undo()
    loaded = peft_gp.from_pretrained(tiny_bert(), str(folder))
    assert peft_gp.get_memory(loaded).tasks_seen == 1  # the first save, whole
    weights = dict(first.named_parameters())
    assert all(torch.equal(p, weights[n]) for n, p in loaded.named_parameters() if "lora_" in n)
    assert not list(tmp_path.glob(".tmp-*"))  # the unfinished folder was removed

    peft_gp.save_pretrained(second, folder)
    assert peft_gp.get_memory(peft_gp.from_pretrained(tiny_bert(), str(folder))).tasks_seen == 2
    assert (folder / "notes.txt").read_text() == "mine"


SAVER = """
import sys, torch
sys.path.insert(0, {root!r})
import peft_gp
from tests.testing import saved_bert
folder = sys.argv[1]
models = [saved_bert(folder + "-a", tasks=1), saved_bert(folder + "-b", tasks=2, seed=1)]
peft_gp.save_pretrained(models[0], folder)
print("ready", flush=True)
step = 0
while True:
    peft_gp.save_pretrained(models[step % 2], folder)
    step += 1
"""


def test_saves_killed_at_random_moments_leave_a_consistent_folder(tmp_path):
    """A process saving two different states in turn is killed at random moments: the folder always loads, and its
    adapter, memory and task record belong to one save."""
    folder = tmp_path / "run"
    script = SAVER.format(root=str(ROOT))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", script, str(folder)], stdout=subprocess.PIPE, env=env)
    try:
        assert process.stdout.readline().strip() == b"ready"
        reference = {
            tasks: dict(peft_gp.from_pretrained(tiny_bert(), str(tmp_path / f"run-{name}")).named_parameters())
            for tasks, name in ((1, "a"), (2, "b"))
        }
        for delay in (0.05, 0.11, 0.23, 0.37, 0.52):
            process.send_signal(signal.SIGSTOP)  # a "kill" at this moment: the files are as a kill would leave them
            shutil.copytree(folder, tmp_path / "snapshot", dirs_exist_ok=False)
            process.send_signal(signal.SIGCONT)
            loaded = peft_gp.from_pretrained(tiny_bert(), str(tmp_path / "snapshot"))
            tasks = peft_gp.get_memory(loaded).tasks_seen
            assert peft_gp.get_task_state(loaded).tasks_seen == tasks
            weights = reference[tasks]
            assert all(torch.equal(p, weights[n]) for n, p in loaded.named_parameters() if "lora_" in n)
            shutil.rmtree(tmp_path / "snapshot")
            time.sleep(delay)
    finally:
        process.kill()
        process.wait(timeout=30)


def test_memory_from_another_save_is_refused_naming_both_files(tmp_path):
    saved_bert(tmp_path / "a", tasks=1)
    saved_bert(tmp_path / "b", tasks=1, seed=1)
    shutil.copy(tmp_path / "b" / GP_MEMORY_NAME, tmp_path / "a" / GP_MEMORY_NAME)
    with pytest.raises(GPMemoryError, match=r"gp_memory.safetensors .* other adapter weights than adapter_model"):
        peft_gp.from_pretrained(tiny_bert(), str(tmp_path / "a"))
    saved_bert(tmp_path / "c", tasks=1)
    shutil.copy(tmp_path / "b" / "gp_tasks.json", tmp_path / "c" / "gp_tasks.json")
    with pytest.raises(GPMemoryError, match="gp_tasks.json .* other adapter weights"):
        peft_gp.from_pretrained(tiny_bert(), str(tmp_path / "c"))


# ---- metadata that cannot switch protection off ----------------------------------------------------------------


@pytest.mark.parametrize(
    "metadata, message",
    [
        ({"gp_thresholds": "[]", "gp_tasks_seen": "0"}, "records no stored task, but basis"),
        ({"gp_thresholds": "[]"}, "one threshold per task"),
        ({"gp_thresholds": "[NaN]"}, "not valid JSON|not a finite number"),
        ({"gp_thresholds": "[7]"}, r"outside \(0, 1\]"),
        ({"gp_thresholds": "[0.9, 0.9, 0.9, 0.9, 0.9]"}, "one threshold per task"),
        ({"gp_thresholds": "[" * 2000 + "]" * 2000}, "nested too deeply|nested more than"),
        ({"gp_dims": '{"x": "a"}'}, "whole number"),
        ({"gp_format_version": "99"}, "newer than this peft_gp"),
    ],
)
def test_damaged_memory_metadata_is_refused(tmp_path, metadata, message):
    saved_bert(tmp_path, tasks=1)
    rewrite_memory(tmp_path / GP_MEMORY_NAME, **metadata)
    with pytest.raises(GPMemoryError, match=message) as error:
        peft_gp.from_pretrained(tiny_bert(), str(tmp_path))
    assert str(tmp_path / GP_MEMORY_NAME) in str(error.value)


def test_task_record_and_memory_must_agree(tmp_path):
    saved_bert(tmp_path, tasks=2)
    record = json.loads((tmp_path / "gp_tasks.json").read_text())
    record.update(task_names=["a"], task_classes=[None])
    (tmp_path / "gp_tasks.json").write_text(json.dumps(record))
    with pytest.raises(GPMemoryError, match="stores 2 task.* records 1"):
        peft_gp.from_pretrained(tiny_bert(), str(tmp_path))


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"task_classes": ["xyz"]}, "list .or null. per task"),
        ({"task_names": "ab"}, "task_names must be a list of strings"),
        ({"accuracy_matrix": [[5.0]]}, r"not a fraction in \[0, 1\]"),
        ({"accuracy_matrix": [[-1]]}, r"not a fraction in \[0, 1\]"),
        ({"gp_format_version": "1"}, "whole number"),
    ],
)
def test_task_record_types_are_strict(tmp_path, edit, message):
    path = tmp_path / "gp_tasks.json"
    GPTaskState(["a"], [[0, 1]]).save(str(path))
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(GPTaskStateError, match=message):
        GPTaskState.load(str(path))
    with pytest.raises(GPTaskStateError, match="list of labels"):
        GPTaskState().record(0, "a", "xyz")


def test_projection_is_decided_from_the_bases():
    model = lora_bert()
    train_steps(model, bert_batch(), 2)
    peft_gp.update_memory(model, [bert_batch()])
    memory = peft_gp.get_memory(model)
    memory.thresholds.clear()  # metadata saying "no task" cannot switch the stored directions off
    assert GPProjector(model).active


# ---- parsing: size, depth, encoding, unknown keys, pickles --------------------------------------------------------


def test_unreadable_files_fail_naming_the_file(tmp_path):
    saved_bert(tmp_path, tasks=1)
    (tmp_path / "gp_tasks.json").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(ValueError, match=r"gp_tasks.json is not UTF-8"):
        peft_gp.from_pretrained(tiny_bert(), str(tmp_path))
    (tmp_path / "gp_tasks.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ValueError, match=r"gp_tasks.json is nested"):
        peft_gp.from_pretrained(tiny_bert(), str(tmp_path))
    config = tmp_path / "adapter_config.json"
    config.write_text('{"peft_type": "LORA", "gp_threshold": ')
    with pytest.raises(ValueError, match=r"adapter_config.json is not valid JSON"):
        peft_gp.from_pretrained(tiny_bert(), str(tmp_path))


def test_unknown_gp_settings_are_an_error(tmp_path):
    saved_bert(tmp_path, tasks=1)
    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "gp_thresold": 0.5}))
    with pytest.raises(ValueError, match=r"does not know: \['gp_thresold'\]"):
        peft_gp.from_pretrained(tiny_bert(), str(tmp_path))


def test_string_settings_are_type_errors():
    with pytest.raises(TypeError, match="gp_threshold_increment must be a number"):
        GPLoraConfig(gp_threshold_increment="0.1")


def test_a_folder_with_only_a_bin_adapter_is_refused(tmp_path):
    saved_bert(tmp_path, tasks=1)
    os.rename(tmp_path / "adapter_model.safetensors", tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="adapter_model.bin, a torch-serialised file"):
        peft_gp.from_pretrained(tiny_bert(), str(tmp_path))


def test_resume_skips_a_newest_checkpoint_whose_trainer_state_is_truncated(tmp_path):
    model = lora_bert(gp_threshold=0.97)
    args = task2_args(tmp_path)  # one checkpoint per step
    args.max_steps = 3
    peft_gp.GPTrainer(model=model, args=args, train_dataset=task_dataset(0, 8), gp_update_memory=False).train()
    task_folder = tmp_path / "task2" / "task-01"
    (task_folder / "checkpoint-3" / "trainer_state.json").write_text('{"global_step": 3, "log_hist')
    with pytest.warns(UserWarning, match=r"Skipping .*checkpoint-3 \(.*trainer_state.json is not valid JSON"):
        path = peft_gp.last_checkpoint(str(tmp_path / "task2"), lora_bert())
    assert path.endswith("checkpoint-2")


# ---- warnings that fire, by what a parameter is ------------------------------------------------------------------


@pytest.mark.parametrize("unfrozen", ["bert.encoder.layer.0.output.LayerNorm.weight", "bert.pooler.dense.weight"])
def test_hand_unfrozen_parameters_warn_at_attach(unfrozen):
    model = lora_bert()
    dict(model.base_model.model.named_parameters())[unfrozen].requires_grad_(True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.warns(Unprotected, match=r"not protected by gradient projection.*(LayerNorm|Linear)"):
        GPProjector(model).attach(optimizer)


def test_storing_the_same_task_twice_records_one_task():
    model = lora_bert()
    train_steps(model, bert_batch(), 2)
    peft_gp.update_memory(model, [bert_batch()], task_name="a")
    peft_gp.update_memory(model, [bert_batch()], task_name="a")
    assert peft_gp.get_memory(model).tasks_seen == 1 and peft_gp.get_task_state(model).task_names == ["a"]


# ---- numerics -----------------------------------------------------------------------------------------------------


def _step_with_one_nan(projected: bool) -> tuple[int, list]:
    model = lora_bert(gp_threshold=0.9)
    train_steps(model, bert_batch(), 2)
    peft_gp.update_memory(model, [bert_batch()])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    projector = GPProjector(model).attach(optimizer) if projected else None
    model(**bert_batch(1)).loss.backward()
    name = "layer.0.attention.self.query.lora_A.default.weight"
    lora_a = next(p for n, p in model.named_parameters() if n.endswith(name))
    lora_a.grad[0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer.step()
        if projector:
            projector.detach()
    bad = sum(int((~torch.isfinite(p)).sum()) for p in model.parameters() if p.requires_grad)
    return bad, [w for w in caught if issubclass(w.category, Unprotected)]


def test_a_nan_gradient_does_not_spread_through_the_projection():
    plain_bad, _ = _step_with_one_nan(projected=False)
    bad, caught = _step_with_one_nan(projected=True)
    assert plain_bad == 1 and bad == plain_bad  # the projection would spread it over the whole row
    assert any("Non-finite gradients" in str(w.message) for w in caught)


def test_a_task_trained_again_on_its_own_data_warns_without_naming_full_layers():
    """The same examples again: every gradient lies in the stored space although no layer's space is full."""
    model = lora_bert(gp_threshold=1.0, gp_modules_to_save="freeze", r=16)  # 8 token rows fill no basis
    train_steps(model, bert_batch(0), 2)
    peft_gp.update_memory(model, [bert_batch(0)])
    assert peft_gp.get_memory(model).full_groups() == []
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    projector = GPProjector(model).attach(optimizer)
    train_steps(model, bert_batch(0), 3, optimizer=optimizer)
    with pytest.warns(GPCapacityWarning, match=r"gradient: it could barely learn\. No layer's space is full"):
        projector.detach()


def test_a_task_whose_gradient_is_all_removed_warns_once_naming_the_full_layers():
    model = lora_bert(gp_threshold=1.0, gp_modules_to_save="freeze")
    many = bert_batch(0, rows=32)
    many["input_ids"] = torch.randint(4, 64, (32, 8), generator=torch.Generator().manual_seed(3))
    many["attention_mask"] = torch.ones_like(many["input_ids"])
    train_steps(model, many, 2)
    with pytest.warns(GPCapacityWarning):
        peft_gp.update_memory(model, [many])  # every layer's space fills (64-dim inputs, 256 token rows)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    projector = GPProjector(model).attach(optimizer)
    train_steps(model, bert_batch(1), 3, optimizer=optimizer)
    with pytest.warns(GPCapacityWarning, match=r"removed 100.0% of this task's gradient.*Full layers \(\d+\)"):
        projector.detach()
