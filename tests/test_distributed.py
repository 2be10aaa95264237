"""Two processes on the CPU (torchrun, gloo): identical bases on both ranks, equal to a one-process memory update,
and the old task's logits unchanged after the second task."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import default_data_collator

import peft_gp
from peft_gp.wiring.grams import collect_grams
from peft_gp.wiring.memory import GPMemory
from peft_gp.wiring.state import resolve_groups

from .testing import task_dataset, tiny_bert

SCRIPT = Path(__file__).parent / "scripts" / "two_tasks_ddp.py"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_build_identical_bases_equal_to_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(SCRIPT),
        str(tmp_path),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    ranks = [load_file(tmp_path / f"rank{rank}.safetensors") for rank in (0, 1)]
    assert set(ranks[0]) == set(ranks[1])
    for key in ranks[0]:
        if key.startswith("task"):
            assert torch.equal(ranks[0][key], ranks[1][key]), key  # bit-identical on both ranks

    before, after = ranks[0]["logits_before"], ranks[0]["logits_after"]
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()
    assert any(
        ranks[0][k].shape[1] > ranks[0][k.replace("task2/", "task1/")].shape[1]
        for k in ranks[0]
        if k.startswith("task2/")
    )

    # one process, the same model after task 1 and the same 8 examples: the same bases (float tolerance)
    model = peft_gp.from_pretrained(tiny_bert(), str(tmp_path / "after_task1"))
    dataset: Dataset = task_dataset(0, 8)
    batch = default_data_collator([dataset[i] for i in range(len(dataset))])
    grams, seen = collect_grams(model, resolve_groups(model), [batch])
    assert seen == 8
    reference = GPMemory(dims={name: gram.shape[0] for name, gram in grams.items()})
    reference.update(grams, 1.0)
    for name, basis in reference.bases.items():
        distributed = ranks[0][f"task1/{name}"]
        assert basis.shape == distributed.shape, name
        # same span: the projectors agree
        torch.testing.assert_close(basis @ basis.T, distributed @ distributed.T, atol=1e-4, rtol=0)
