"""Small facts about PEFT models that every layer needs: the ``PeftModel`` inside wrappers, names, folders."""

from __future__ import annotations

import os

from peft import PeftModel
from torch import nn

BASE_PREFIX = "base_model.model."


def unwrap_peft_model(model: nn.Module) -> PeftModel:
    """Return the ``PeftModel`` inside ``model`` (which may be wrapped by DDP, accelerate or torch.compile)."""
    seen = model
    for _ in range(8):
        if isinstance(seen, PeftModel):
            return seen
        seen = getattr(seen, "module", None) or getattr(seen, "_orig_mod", None)
        if seen is None:
            break
    raise TypeError(
        f"Expected a PEFT model built from a GP config, got {type(model).__name__}. "
        "Build it with peft.get_peft_model(model, GPLoraConfig(...)) or load it with peft_gp.from_pretrained(...)."
    )


def module_key(module_name: str) -> str:
    """A module's path inside the base model (``named_modules`` of a ``PeftModel`` prefix it with the wrapper's)."""
    return module_name[len(BASE_PREFIX) :] if module_name.startswith(BASE_PREFIX) else module_name


def adapter_directory(save_directory: str, adapter_name: str) -> str:
    """Where PEFT puts an adapter's files: the directory itself for ``default``, a subfolder otherwise."""
    return save_directory if adapter_name == "default" else os.path.join(save_directory, adapter_name)
