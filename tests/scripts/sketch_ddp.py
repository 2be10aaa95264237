"""Run by tests/test_sketch.py under torchrun: one memory update on 2 CPU processes (gloo) with every input wider
than 16 sketched, each rank streaming its own sequence; each rank writes its bases to OUT/rank{rank}.safetensors."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import peft_gp  # noqa: E402
from tests.testing import SKETCH_ROWS, lora_llama, repeated  # noqa: E402


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = lora_llama(gp_threshold=1.0, gp_sketch_above=16, gp_sketch_rows=SKETCH_ROWS)
    peft_gp.update_memory(model, repeated(rank, rows=1))  # rank r: task r's first sequence, three times
    bases = {name: basis.clone().contiguous() for name, basis in peft_gp.get_memory(model).bases.items()}
    save_file(bases, os.path.join(out, f"rank{rank}.safetensors"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
