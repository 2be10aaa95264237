"""LoRA (PEGP eq. 7, 14): ``lora_A`` against the adapted layer's inputs ``x``, ``lora_B`` against ``y = A x``."""

from __future__ import annotations

from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn

from ...core.peft_utils import module_key
from ..groups import ProjectedGroup


def lora_groups(model: PeftModel, adapter_name: str, config) -> list[ProjectedGroup]:
    groups = []
    for module_name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        name = module_key(module_name)
        if adapter_name in getattr(module, "lora_embedding_A", {}):
            raise ValueError(
                f"LoRA on the embedding {name!r} is not supported by gradient projection yet: "
                "remove it from target_modules."
            )
        if adapter_name not in module.lora_A:
            continue
        lora_a, lora_b = module.lora_A[adapter_name], module.lora_B[adapter_name]
        if not (isinstance(lora_a, nn.Linear) and isinstance(lora_b, nn.Linear)):
            raise ValueError(
                f"LoRA on {name!r} ({type(module).__name__}) is not supported by gradient projection yet: only "
                "layers whose LoRA factors are nn.Linear (Linear, Conv1D) can be projected. Remove it from "
                "target_modules."
            )
        group_b = ProjectedGroup(f"{name}.lora_B", lora_b.weight, lora_b.bias, lora_b)
        output_side = group_b if lora_a.bias is None else None  # lora_B reads A x (dropout is off in eval mode)
        groups.append(ProjectedGroup(f"{name}.lora_A", lora_a.weight, lora_a.bias, lora_a, output_side=output_side))
        groups.append(group_b)
    return groups
