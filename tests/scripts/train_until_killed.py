"""Run by tests/test_interrupted.py: task 1, then task 2 with a checkpoint every step, until the test kills it.

Prints "saved N" after each checkpoint so that the test knows when to kill the process.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import peft_gp  # noqa: E402
from peft_gp import GPTrainer  # noqa: E402
from tests.testing import TASK2_STEPS, gp_model, task2_args, task_dataset, training_args  # noqa: E402


class Announce(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        print(f"saved {state.global_step}", flush=True)


def main(out: str) -> None:
    torch.set_num_threads(1)
    model = gp_model()
    GPTrainer(model=model, args=training_args(os.path.join(out, "task1")), train_dataset=task_dataset(0, 8)).train()
    peft_gp.save_pretrained(model, os.path.join(out, "after_task1"))
    print("task 1 done", flush=True)
    trainer = GPTrainer(model=model, args=task2_args(out), train_dataset=task_dataset(1, 16), callbacks=[Announce()])
    assert trainer.args.max_steps == TASK2_STEPS
    trainer.train()


if __name__ == "__main__":
    main(sys.argv[1])
