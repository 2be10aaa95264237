"""Run by tests/test_interrupted.py: two generative tasks into one output_dir, a checkpoint every step, until killed.

``python sequence_until_killed.py OUT`` trains the sequence and prints "task T saved N" after each checkpoint, so that
the test can kill it in the middle of task 2. ``--resume`` runs the same loop with ``resume_from_checkpoint=True``,
as a user would after a crash, and saves the final model to ``OUT/final``.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import peft_gp  # noqa: E402
from peft_gp import GPTrainer  # noqa: E402
from tests.testing import args_for, causal_gp_model, lm_task  # noqa: E402

TASKS = ["first", "second"]


class Announce(TrainerCallback):
    def __init__(self, task: int) -> None:
        self.task = task

    def on_save(self, args, state, control, **kwargs):
        print(f"task {self.task} saved {state.global_step}", flush=True)


def run(out: str, resume: bool) -> torch.nn.Module:
    torch.set_num_threads(1)
    model = causal_gp_model("llama", gp_threshold=0.99)
    args = args_for(out, save_strategy="steps", save_steps=1, num_train_epochs=3)
    for task_id, name in enumerate(TASKS):
        data, announce = lm_task(task_id), [Announce(task_id + 1)]
        trainer = GPTrainer(model=model, args=args, train_dataset=data, gp_task_name=name, callbacks=announce)
        trainer.train(resume_from_checkpoint=True if resume else None)
    return model


if __name__ == "__main__":
    out = sys.argv[1]
    model = run(out, resume="--resume" in sys.argv)
    peft_gp.save_pretrained(model, os.path.join(out, "final"))
