"""A run killed in the middle of a task resumes from its last complete checkpoint with the same bases and ends
with the same weights as an uninterrupted run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import peft_gp
from peft_gp import GPTrainer

from .testing import TASK2_STEPS, logits_on, task2_args, task_dataset, tiny_bert, tiny_llama

SCRIPT = Path(__file__).parent / "scripts" / "train_until_killed.py"


def kill_once_printed(arguments: list[str], line: bytes, failure: str) -> None:
    """Run ``python arguments`` (one thread) until it prints ``line``, then kill it with SIGKILL; the test fails with
    ``failure`` if the process ends first."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, *arguments], stdout=subprocess.PIPE, env=env)
    try:
        for printed in process.stdout:
            if printed.strip() == line:
                break
        else:
            pytest.fail(failure)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=60)


def finish_task2(out, resume) -> dict[str, torch.Tensor]:
    model = peft_gp.from_pretrained(tiny_bert(), os.path.join(out, "after_task1"), is_trainable=True)
    trainer = GPTrainer(model=model, args=task2_args(out), train_dataset=task_dataset(1, 16), gp_update_memory=False)
    trainer.train(resume_from_checkpoint=resume)
    return model


def test_killed_run_resumes_and_ends_like_an_uninterrupted_one(tmp_path):
    # killed somewhere in steps 6-7 or in the middle of saving checkpoint-6
    failure = "the training process ended before its fifth checkpoint"
    kill_once_printed([str(SCRIPT), str(tmp_path)], b"saved 5", failure)
    checkpoints = sorted(p.name for p in (tmp_path / "task2" / "task-02").iterdir())
    assert "checkpoint-5" in checkpoints and f"checkpoint-{TASK2_STEPS}" not in checkpoints

    # make the newest checkpoint look like a save killed half-way: resume must skip it
    partial = tmp_path / "task2" / "task-02" / "checkpoint-99"
    shutil.copytree(tmp_path / "task2" / "task-02" / "checkpoint-5", partial)
    os.remove(partial / "trainer_state.json")
    with pytest.warns(UserWarning, match="Skipping incomplete checkpoint"):
        resumed = finish_task2(tmp_path, resume=True)
    shutil.rmtree(tmp_path / "task2")
    uninterrupted = finish_task2(tmp_path, resume=None)

    task1 = peft_gp.get_memory(uninterrupted)
    for name, basis in peft_gp.get_memory(resumed).bases.items():
        assert torch.equal(basis, task1.bases[name])
    reference = dict(uninterrupted.named_parameters())
    for name, param in resumed.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, reference[name], rtol=1e-5, atol=1e-6)
    old_task = task_dataset(0, 8)
    torch.testing.assert_close(logits_on(resumed, old_task), logits_on(uninterrupted, old_task), rtol=1e-5, atol=1e-6)


SEQUENCE_SCRIPT = Path(__file__).parent / "scripts" / "sequence_until_killed.py"


def test_sequence_in_one_output_dir_killed_in_task_2_resumes_like_an_uninterrupted_run(tmp_path):
    """Two tasks into one output_dir; killed in the middle of task 2; the same loop with resume=True skips task 1
    (its final checkpoint already stores it: no second record) and finishes task 2 from its newest checkpoint."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    kill_once_printed([str(SEQUENCE_SCRIPT), str(killed)], b"task 2 saved 3",
                      "the training process ended before task 2's third checkpoint")  # fmt: skip
    assert not (killed / "final").exists()
    resumed = subprocess.run(
        [sys.executable, str(SEQUENCE_SCRIPT), str(killed), "--resume"], env=env, capture_output=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    assert b"task 1 saved" not in resumed.stdout  # task 1 was not trained again
    uninterrupted = tmp_path / "uninterrupted"
    subprocess.run([sys.executable, str(SEQUENCE_SCRIPT), str(uninterrupted)], env=env, check=True, timeout=300)

    results = [peft_gp.from_pretrained(tiny_llama(), str(run / "final")) for run in (killed, uninterrupted)]
    states = [peft_gp.get_task_state(model) for model in results]
    assert states[0].task_names == states[1].task_names == ["first", "second"]
    memories = [peft_gp.get_memory(model) for model in results]
    assert memories[0].tasks_seen == memories[1].tasks_seen == 2
    for name, basis in memories[1].bases.items():
        torch.testing.assert_close(memories[0].bases[name], basis, rtol=0, atol=1e-5)
    reference = dict(results[1].named_parameters())
    for name, param in results[0].named_parameters():
        torch.testing.assert_close(param, reference[name], rtol=1e-5, atol=1e-6)
