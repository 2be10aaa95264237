"""Run by tests/test_distributed.py under torchrun: two tasks with GPTrainer on 2 CPU processes (gloo).

Each rank writes its bases and the task-1 logits before/after task 2 to OUT/rank{rank}.safetensors; rank 0 saves the
model after task 1 to OUT/after_task1 so the test can rebuild the memory in one process and compare.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import peft_gp  # noqa: E402
from peft_gp import GPTrainer  # noqa: E402
from tests.testing import gp_model, logits_on, task_dataset, training_args  # noqa: E402


def main(out: str) -> None:
    torch.set_num_threads(1)
    old_task, new_task = task_dataset(0, 8), task_dataset(1, 16)
    model = gp_model()
    args = training_args(out, ddp_backend="gloo", per_device_train_batch_size=2)
    trainer = GPTrainer(model=model, args=args, train_dataset=old_task)
    assert trainer.args.world_size == 2, trainer.args.world_size
    trainer.train()
    if trainer.args.process_index == 0:
        peft_gp.save_pretrained(model, os.path.join(out, "after_task1"))
    task1_bases = {f"task1/{k}": v.clone() for k, v in peft_gp.get_memory(model).bases.items()}
    before = logits_on(model, old_task)
    GPTrainer(model=model, args=args, train_dataset=new_task).train()
    after = logits_on(model, old_task)
    bases = {f"task2/{k}": v.clone() for k, v in peft_gp.get_memory(model).bases.items()}
    tensors = {**task1_bases, **bases, "logits_before": before, "logits_after": after}
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        os.path.join(out, f"rank{trainer.args.process_index}.safetensors"),
    )


if __name__ == "__main__":
    main(sys.argv[1])
