"""Run by tests/test_fsdp2.py under torchrun: two tasks of GP-LoRA on a model sharded with FSDP2 (``fully_shard``),
2 CPU processes (gloo), a plain PyTorch loop with ``GPProjector`` and ``update_memory``.

Each rank trains on its own examples (every ``world_size``-th one) and writes to OUT/rank{rank}.safetensors its bases
after each task, the old task's logits before and after task 2, and whether a sharded DoRA adapter was refused; rank 0
writes the whole adapter after task 1 (gathered) to OUT/after_task1.safetensors, from which the test rebuilds the
task-1 memory in one process and compares.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from peft import get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, default_data_collator  # noqa: E402

import peft_gp  # noqa: E402
from peft_gp import GPLoraConfig, GPProjector  # noqa: E402
from tests.testing import logits_on, task_dataset  # noqa: E402

HIDDEN, RANK = 32, 5  # r = 5 over 2 ranks: uneven shards of lora_A (3 + 2 rows)


def small_model(**lora) -> torch.nn.Module:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, num_labels=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    settings = dict(task_type="SEQ_CLS", r=RANK, lora_alpha=RANK, lora_dropout=0.0, target_modules=["query", "value"])
    gp = dict(gp_threshold=1.0, gp_projection="update")
    return get_peft_model(BertForSequenceClassification(config), GPLoraConfig(**settings, **gp, **lora))


def shard(model: torch.nn.Module) -> torch.nn.Module:
    for layer in model.get_base_model().bert.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
    return model


def batches(dataset, rank: int, world: int, size: int) -> list[dict]:
    mine = [dataset[i] for i in range(rank, len(dataset), world)]
    return [default_data_collator(mine[i : i + size]) for i in range(0, len(mine), size)]


def train(model, data: list[dict], epochs: int = 4) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    projector = GPProjector(model).attach(optimizer)
    model.train()
    for _ in range(epochs):
        for batch in data:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    projector.detach()


def bases(model, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}/{name}": basis.clone() for name, basis in peft_gp.get_memory(model).bases.items()}


def dora_refused() -> float:
    model = shard(small_model(use_dora=True))
    try:
        GPProjector(model).attach(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
    except NotImplementedError as error:
        return float("is sharded (FSDP/DTensor)" in str(error) and "DDP" in str(error))
    return 0.0


def main(out: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    old_task, new_task = task_dataset(0, 8), task_dataset(1, 16)
    model = shard(small_model())
    train(model, batches(old_task, rank, world, 2))
    trained = {name: param.full_tensor() for name, param in model.named_parameters() if param.requires_grad}
    peft_gp.update_memory(model, batches(old_task, rank, world, 4))
    if rank == 0:
        save_file({k: v.contiguous() for k, v in trained.items()}, os.path.join(out, "after_task1.safetensors"))
    tensors = bases(model, "task1")
    sharded = {name: float(type(p).__name__ == "DTensor") for name, p in model.named_parameters() if p.requires_grad}
    before = logits_on(model, old_task)
    train(model, batches(new_task, rank, world, 2))
    after = logits_on(model, old_task)
    peft_gp.update_memory(model, batches(new_task, rank, world, 4))
    tensors.update(bases(model, "task2"))
    tensors.update(logits_before=before, logits_after=after, all_sharded=torch.tensor([min(sharded.values())]))
    tensors["dora_refused"] = torch.tensor([dora_refused()])
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, f"rank{rank}.safetensors"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
