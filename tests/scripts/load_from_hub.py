"""Run by tests/test_hub.py in a fresh process with HF_ENDPOINT set: plain PEFT loads a task branch for inference.

HF_ENDPOINT is read when huggingface_hub is first imported, as for a user pointing at a private Hub mirror.
Writes the logits on task 0's inputs to the file given as the last argument.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402

from tests.testing import (  # noqa: E402
    logits_on,
    task_dataset,
    tiny_bert,  # noqa: E402
)


def main(repo_id: str, revision: str, out: str) -> None:
    torch.set_num_threads(1)
    model = PeftModel.from_pretrained(tiny_bert(), repo_id, revision=revision)
    torch.save(logits_on(model, task_dataset(0, 8)), out)


if __name__ == "__main__":
    main(*sys.argv[1:])
