"""The trainable copies in ``modules_to_save`` (classifier heads) under ``gp_modules_to_save``."""

from __future__ import annotations

import warnings

from peft import PeftModel
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from ...core.peft_utils import module_key
from ..features import NoFeatures
from ..groups import PooledHeadFeatures, ProjectedGroup


def modules_to_save_groups(model: PeftModel, adapter_name: str, policy: str) -> list[ProjectedGroup]:
    """Groups for the trainable copies in ``modules_to_save`` (classifier heads) under ``gp_modules_to_save``."""
    groups = []
    if policy == "train":
        return groups
    base = model.get_base_model()
    pooled = type(base).__name__.endswith("ForSequenceClassification") and not getattr(
        getattr(base, "config", None), "is_encoder_decoder", False
    )
    for module_name, module in model.named_modules():
        if not isinstance(module, ModulesToSaveWrapper) or adapter_name not in module.modules_to_save:
            continue
        copy = module.modules_to_save[adapter_name]
        name = module_key(module_name)
        if isinstance(copy, nn.Linear):
            source = PooledHeadFeatures(base, copy) if pooled else None
            groups.append(ProjectedGroup(name, copy.weight, copy.bias, copy, frozen=policy == "freeze", source=source))
        else:
            if policy == "project":  # only nn.Linear can be projected: the exact protection left is to keep it fixed
                warnings.warn(
                    f"modules_to_save holds {name!r} ({type(copy).__name__}), which cannot be projected (only "
                    "nn.Linear can): it is kept fixed from the second task on. Set gp_modules_to_save='freeze' to say "
                    "so, or 'train' to leave it unprotected.",
                    stacklevel=4,
                )
            for param_name, param in copy.named_parameters():  # kept fixed: no features needed
                fixed = ProjectedGroup(f"{name}.{param_name}", param, None, None, frozen=True, source=NoFeatures())
                groups.append(fixed)
    return groups
