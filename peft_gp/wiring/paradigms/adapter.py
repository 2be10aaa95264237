"""Bottleneck adapter (PEGP eq. 5, 14): ``W_down`` against the adapter inputs ``x``, ``W_up`` against its activations.

Both projections are ``nn.Linear`` with optional biases, which join their weights on a constant-1 feature, so with
exact projection the adapter's output on old-task inputs does not change. With ``gp_task_slices`` each task trains its
own bottleneck units instead (``wiring.slices``).
"""

from __future__ import annotations

from peft import PeftModel

from ...core.peft_utils import module_key
from ..bottleneck import BottleneckLayer
from ..groups import ProjectedGroup
from ..slices import sliced_pair


def adapter_groups(model: PeftModel, adapter_name: str, config) -> list[ProjectedGroup]:
    groups = []
    for module_name, module in model.named_modules():
        if not isinstance(module, BottleneckLayer) or adapter_name not in module.gp_adapter_down:
            continue
        name = module_key(module_name)
        down, up = module.gp_adapter_down[adapter_name], module.gp_adapter_up[adapter_name]
        if config.gp_task_slices is not None:  # per-task bottleneck units (wiring.slices)
            down_side, up_side = (f"{name}.gp_adapter_down", down), (f"{name}.gp_adapter_up", up)
            groups += sliced_pair(name, down_side, up_side, config.gp_task_slices)
            continue
        groups.append(ProjectedGroup(f"{name}.gp_adapter_down", down.weight, down.bias, down))
        groups.append(ProjectedGroup(f"{name}.gp_adapter_up", up.weight, up.bias, up))
    return groups
