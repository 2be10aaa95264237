"""What runs under which parallelism, decided before training (``training.parallel``, from the settings alone, so
DeepSpeed need not be installed), and the projection of FSDP2-sharded parameters in one process (a 1-rank mesh):
the same steps as unsharded, and the groups it cannot project row by row refused by name."""

from __future__ import annotations

import copy
import json
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from transformers import default_data_collator

import peft_gp
from peft_gp import GPCallback, GPProjector
from peft_gp.training.parallel import check_parallelism, deepspeed_config, deepspeed_problem, fsdp_version
from peft_gp.wiring import sharding
from peft_gp.wiring.state import get_state

from .testing import gp_model, task_dataset

try:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard
except ImportError:  # pragma: no cover - depends on the torch build
    fully_shard = None


def accelerator(fsdp: int | None = None, deepspeed: dict | None = None):
    plugin = None if fsdp is None else SimpleNamespace(fsdp_version=fsdp)
    ds_plugin = None if deepspeed is None else SimpleNamespace(deepspeed_config=deepspeed)
    return SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin, deepspeed_plugin=ds_plugin))


def zero(stage, **extra) -> dict:
    return {"zero_optimization": {"stage": stage}, **extra}


# ---- settings: FSDP and DeepSpeed ----------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [1, 2, 3, "auto"])
def test_deepspeed_zero_stages_are_refused_naming_fsdp2_and_ddp(stage):
    with pytest.raises(NotImplementedError, match=f"ZeRO stage {stage}") as error:
        check_parallelism(SimpleNamespace(deepspeed=zero(stage), fsdp=None))
    assert "FSDP2" in str(error.value) and "DDP" in str(error.value) and "whole gradient row" in str(error.value)


def test_deepspeed_zero0_in_fp32_passes_and_its_mixed_precision_optimizers_do_not():
    check_parallelism(SimpleNamespace(deepspeed=zero(0), fsdp=None))
    check_parallelism(SimpleNamespace(deepspeed={"train_batch_size": 8}, fsdp=None))  # no ZeRO section: stage 0
    check_parallelism(SimpleNamespace(deepspeed=zero(0, bf16={"enabled": "auto"}), bf16=False, fsdp=None))
    for precision in ("bf16", "fp16"):
        with pytest.raises(NotImplementedError, match=f"DeepSpeed's {precision} optimizer"):
            check_parallelism(SimpleNamespace(deepspeed=zero(0, **{precision: {"enabled": True}}), fsdp=None))
    auto = SimpleNamespace(deepspeed=zero(0, bf16={"enabled": "auto"}), bf16=True, fsdp=None)  # "auto": the Trainer's
    assert "bf16" in deepspeed_problem(deepspeed_config(auto), auto)


def test_deepspeed_config_is_read_from_accelerate_the_trainer_or_a_file(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(zero(2)))
    assert deepspeed_config(SimpleNamespace(deepspeed=str(path))) == zero(2)
    processed = SimpleNamespace(deepspeed=str(path), hf_deepspeed_config=SimpleNamespace(config=zero(1)))
    assert deepspeed_config(processed) == zero(1)  # the Trainer's processed config first
    assert deepspeed_config(processed, accelerator(deepspeed=zero(3))) == zero(3)  # accelerate's before both
    assert deepspeed_config(SimpleNamespace(deepspeed=None)) is None
    with pytest.raises(ValueError, match="Cannot read the DeepSpeed config"):
        deepspeed_config(SimpleNamespace(deepspeed=str(tmp_path / "missing.json")))
    with pytest.raises(NotImplementedError, match="ZeRO stage 3"):
        check_parallelism(SimpleNamespace(deepspeed=None, fsdp=None), accelerator(deepspeed=zero(3)))


def test_fsdp1_is_refused_fsdp2_passes_and_accelerate_decides_what_runs():
    with pytest.raises(NotImplementedError, match="FSDP1") as error:
        check_parallelism(SimpleNamespace(deepspeed=None), accelerator(fsdp=1))
    assert "fsdp_config={'version': 2}" in str(error.value) and "DDP" in str(error.value)
    check_parallelism(SimpleNamespace(deepspeed=None), accelerator(fsdp=2))
    # with an accelerator its state decides (on a CPU-only machine accelerate enables no FSDP: DDP runs)
    cpu_fsdp1 = SimpleNamespace(deepspeed=None, fsdp=True, fsdp_config={"version": 1})
    assert fsdp_version(cpu_fsdp1, accelerator()) is None
    # without one (a callback on a plain Trainer), what the arguments ask for; transformers 5 defaults to FSDP2
    assert fsdp_version(cpu_fsdp1) == 1 and fsdp_version(SimpleNamespace(fsdp=True, fsdp_config={})) == 2
    assert fsdp_version(SimpleNamespace(fsdp=[])) is None


def test_gpcallback_refuses_deepspeed_zero3_before_attaching(tmp_path):
    args = SimpleNamespace(deepspeed=zero(3), fsdp=None, output_dir=str(tmp_path))
    with pytest.raises(NotImplementedError, match="GPCallback: DeepSpeed ZeRO stage 3"):
        GPCallback().on_train_begin(args, SimpleNamespace(global_step=0), None, model=None, optimizer=None)


def test_an_optimizer_wrapping_something_other_than_a_torch_optimizer_is_refused():
    model = gp_model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    optimizer.optimizer = SimpleNamespace(step=lambda: None)  # as DeepSpeed's wrapper around its ZeRO optimizer
    with pytest.raises(NotImplementedError, match="not a torch.optim.Optimizer") as error:
        GPProjector(model).attach(optimizer)
    assert "FSDP2" in str(error.value) and "DDP" in str(error.value)
    with pytest.raises(NotImplementedError, match="SimpleNamespace"):
        GPProjector(model).attach(SimpleNamespace(step=lambda: None))


# ---- FSDP2 in one process: a 1-rank mesh ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_rank():
    if fully_shard is None or not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("FSDP2 (torch.distributed.fsdp.fully_shard) with gloo is not available in this torch")
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, 1, True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def small_model(**lora):
    from .scripts.two_tasks_fsdp2 import small_model as build  # imports fully_shard: only once it is known there

    return build(**lora)


def batch(task_id: int):
    dataset = task_dataset(task_id, 8)
    return default_data_collator([dataset[i] for i in range(len(dataset))])


def step(model, data) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    projector = GPProjector(model).attach(optimizer)
    model.train()
    model(**data).loss.backward()
    optimizer.step()
    projector.detach()


def test_a_sharded_model_takes_the_same_projected_steps_as_a_plain_one(one_rank):
    plain = small_model()
    step(plain, batch(0))
    peft_gp.update_memory(plain, [batch(0)])
    sharded = copy.deepcopy(plain)
    fully_shard(sharded)
    peft_gp.get_memory(sharded)  # the memory came along; the groups are resolved again on the sharded parameters
    assert all(sharding.is_sharded(p) for group in get_state(sharded).groups for p in group.parameters)
    for model in (plain, sharded):
        step(model, batch(1))
    trained = {name: p for name, p in plain.named_parameters() if p.requires_grad}
    for name, param in sharded.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.full_tensor(), trained[name], atol=1e-6, rtol=0)


def test_write_puts_each_rank_rows_of_a_whole_value(one_rank):
    model = torch.nn.Linear(4, 3)
    fully_shard(model)
    value = torch.arange(12.0).view(3, 4)
    sharding.write(model.weight, value)
    torch.testing.assert_close(model.weight.full_tensor(), value)
    assert sharding.full(value) is value and sharding.local(value) is value


@pytest.mark.parametrize(
    "lora, shard_dim, reason",
    [
        ({"use_dora": True}, 0, "read from another parameter"),
        ({"gp_task_slices": 5}, 0, "per-task slices"),
        ({}, 1, "not along its rows"),
    ],
)
def test_groups_that_cannot_be_projected_row_by_row_are_refused_by_name(one_rank, lora, shard_dim, reason):
    model = small_model(**lora)
    fully_shard(model, shard_placement_fn=lambda param: Shard(shard_dim if param.dim() > 1 else 0))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(NotImplementedError, match=reason) as error:
        GPProjector(model).attach(optimizer)
    assert "is sharded (FSDP/DTensor)" in str(error.value) and "DDP" in str(error.value)
