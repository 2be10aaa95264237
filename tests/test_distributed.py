"""Two processes on the CPU (torchrun, gloo): identical bases on both ranks, equal to a one-process memory update,
and the old task's logits unchanged after the second task."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

import peft_gp

from .testing import one_process_memory, run_two_ranks, task_dataset, tiny_bert

SCRIPT = Path(__file__).parent / "scripts" / "two_tasks_ddp.py"


def test_two_processes_build_identical_bases_equal_to_one_process(tmp_path):
    run_two_ranks(SCRIPT, tmp_path)

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
    reference = one_process_memory(model, task_dataset(0, 8))
    for name, basis in reference.bases.items():
        distributed = ranks[0][f"task1/{name}"]
        assert basis.shape == distributed.shape, name
        # same span: the projectors agree
        torch.testing.assert_close(basis @ basis.T, distributed @ distributed.T, atol=1e-4, rtol=0)
