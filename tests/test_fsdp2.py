"""FSDP2 (``fully_shard``) on 2 CPU processes (torchrun, gloo): each rank projects its own rows of the sharded adapter.
The bases are identical on both ranks and equal to a one-process memory update over the same data (≤ 1e-6), and the
old task's logits stay where they were after the second task, as under DDP (``test_distributed``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from .testing import one_process_memory, run_two_ranks, task_dataset

SCRIPT = Path(__file__).parent / "scripts" / "two_tasks_fsdp2.py"


def _fsdp2_missing() -> str | None:
    if not dist.is_available() or not dist.is_gloo_available():
        return "torch.distributed with the gloo backend is not available in this torch build"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return "torch.distributed.fsdp.fully_shard (FSDP2) is not available in this torch"
    return None


pytestmark = pytest.mark.skipif(_fsdp2_missing() is not None, reason=str(_fsdp2_missing()))


def small_model():
    from .scripts.two_tasks_fsdp2 import small_model as build  # imports fully_shard: only once it is known there

    return build()


def test_fully_shard_two_processes_match_one_process_and_keep_old_outputs(tmp_path):
    run_two_ranks(SCRIPT, tmp_path)

    ranks = [load_file(tmp_path / f"rank{rank}.safetensors") for rank in (0, 1)]
    assert ranks[0]["all_sharded"].item() == 1.0  # the adapter really was sharded (DTensor parameters)
    assert set(ranks[0]) == set(ranks[1])
    task_keys = [key for key in ranks[0] if key.startswith("task")]
    assert any(key.endswith("lora_A") for key in task_keys) and any("classifier" in key for key in task_keys)
    for key in task_keys:
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # bit-identical on both ranks

    before, after = ranks[0]["logits_before"], ranks[0]["logits_after"]
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()  # the old task's outputs kept
    assert any(
        ranks[0][key].shape[1] > ranks[0][key.replace("task2/", "task1/")].shape[1]
        for key in task_keys
        if key.startswith("task2/")
    )  # task 2 trained and added directions
    assert ranks[0]["dora_refused"].item() == 1.0  # a sharded DoRA magnitude: refused, naming it and DDP

    # one process, the adapter after task 1 gathered from the shards, the same 8 examples: the same bases
    model = small_model()
    trained = load_file(tmp_path / "after_task1.safetensors")
    missing = [name for name in trained if name not in dict(model.named_parameters())]
    assert not missing, missing
    model.load_state_dict(trained, strict=False)
    reference = one_process_memory(model, task_dataset(0, 8))
    for name, basis in reference.bases.items():
        sharded = ranks[0][f"task1/{name}"]
        assert basis.shape == sharded.shape, name
        torch.testing.assert_close(basis @ basis.T, sharded @ sharded.T, atol=1e-6, rtol=0)  # same projector


TRAINER_SCRIPT = Path(__file__).parent / "scripts" / "two_tasks_fsdp2_trainer.py"


def test_gptrainer_under_accelerate_fsdp2_keeps_old_outputs(tmp_path):
    """One GPTrainer per task on a model that accelerate's FSDP2 preparation shards (its state set to FSDP2 by hand:
    accelerate enables FSDP only on accelerators): identical bases on both ranks, the old task's logits kept."""
    run_two_ranks(TRAINER_SCRIPT, tmp_path)

    ranks = [load_file(tmp_path / f"rank{rank}.safetensors") for rank in (0, 1)]
    assert ranks[0]["all_sharded"].item() == 1.0 and ranks[0]["tasks_seen"].item() == 2.0
    for key in (key for key in ranks[0] if key.startswith("task")):
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    before, after = ranks[0]["logits_before"], ranks[0]["logits_after"]
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()
