"""Run by tests/test_fsdp2.py under torchrun: two tasks with ``GPTrainer`` (one per task) sharded by accelerate's FSDP2
preparation (``fsdp_version=2``) on 2 CPU processes (gloo).

accelerate enables FSDP only on accelerators (on a CPU-only machine ``TrainingArguments(fsdp=True)`` trains as DDP), so
each trainer's accelerator state is set to FSDP2 by hand here, as a GPU run would have it: accelerate's own
``_prepare_fsdp2`` then shards the model with ``fully_shard``. Each rank writes its bases and the old task's logits
before and after task 2 to OUT/rank{rank}.safetensors.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import peft_gp  # noqa: E402
from peft_gp import GPTrainer  # noqa: E402
from peft_gp.training.parallel import check_parallelism  # noqa: E402
from tests.scripts.two_tasks_fsdp2 import bases, small_model  # noqa: E402
from tests.testing import logits_on, task_dataset, training_args  # noqa: E402


def fsdp2_trainer(model, args, dataset) -> GPTrainer:
    trainer = GPTrainer(model=model, args=args, train_dataset=dataset)
    state = trainer.accelerator.state
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap="BertLayer"
    )
    trainer.is_fsdp_enabled = True
    check_parallelism(trainer.args, trainer.accelerator)  # FSDP2 passes
    return trainer


def main(out: str) -> None:
    torch.set_num_threads(1)
    old_task, new_task = task_dataset(0, 8), task_dataset(1, 16)
    model = small_model()
    args = training_args(out, ddp_backend="gloo", per_device_train_batch_size=2)
    trainer = fsdp2_trainer(model, args, old_task)
    assert trainer.args.world_size == 2, trainer.args.world_size
    trainer.train()
    sharded = [type(p).__name__ == "DTensor" for p in model.parameters() if p.requires_grad]
    tensors = bases(model, "task1")
    before = logits_on(model, old_task)
    fsdp2_trainer(model, args, new_task).train()  # a new trainer on the sharded model, as for any task
    after = logits_on(model, old_task)
    tensors.update(bases(model, "task2"), logits_before=before, logits_after=after)
    tensors["all_sharded"] = torch.tensor([float(all(sharded))])
    tensors["tasks_seen"] = torch.tensor([float(peft_gp.get_memory(model).tasks_seen)])
    path = os.path.join(out, f"rank{args.process_index}.safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)


if __name__ == "__main__":
    main(sys.argv[1])
