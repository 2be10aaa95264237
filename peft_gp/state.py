"""Where a PEFT model keeps its GP memory (one ``GPMemory`` per adapter, in ``model.gp_memories``) and the guard that
warns when an adapter with stored tasks trains unprojected (``model.gp_guards``)."""

from __future__ import annotations

import json
import warnings
import weakref

from peft import PeftModel
from torch import nn

from .guard import TrainingGuard
from .memory import GPMemory, GPMemoryError
from .paradigms import resolve_groups
from .paradigms.base import gp_config_of, unwrap_peft_model


def _memories(model: PeftModel) -> dict[str, GPMemory]:
    if "gp_memories" not in model.__dict__:
        model.__dict__["gp_memories"] = {}
    return model.__dict__["gp_memories"]


def _guards(model: PeftModel) -> dict[str, TrainingGuard]:
    if "gp_guards" not in model.__dict__:
        model.__dict__["gp_guards"] = {}
    return model.__dict__["gp_guards"]


def guard_of(model: nn.Module, adapter_name: str | None = None, groups=None) -> TrainingGuard:
    """The unprotected-training guard of ``adapter_name``, installed on its protected parameters on first use."""
    peft_model = unwrap_peft_model(model)
    adapter_name = adapter_name or peft_model.active_adapter
    guards = _guards(peft_model)
    if adapter_name not in guards:
        groups = resolve_groups(peft_model, adapter_name) if groups is None else groups
        parameters = list({id(p): p for group in groups for p in group.parameters if p.requires_grad}.values())
        owner = weakref.ref(peft_model)
        guards[adapter_name] = TrainingGuard(parameters, adapter_name, lambda: get_memory(owner(), adapter_name))
    return guards[adapter_name]


def _describe(model: PeftModel, adapter_name: str) -> dict[str, str]:
    config = gp_config_of(model, adapter_name)
    base_config = getattr(model.get_base_model(), "config", None)
    return {
        "adapter_name": adapter_name,
        "peft_type": str(getattr(config.peft_type, "value", config.peft_type)),
        "base_model": str(config.base_model_name_or_path or getattr(base_config, "_name_or_path", "") or ""),
        "model_type": str(getattr(base_config, "model_type", "") or ""),
        "config": json.dumps(config.gp_fields(), sort_keys=True),
    }


def get_memory(model: nn.Module, adapter_name: str | None = None) -> GPMemory:
    """The GP memory of ``adapter_name`` (default: the active adapter), created empty on first use."""
    peft_model = unwrap_peft_model(model)
    adapter_name = adapter_name or peft_model.active_adapter
    memories = _memories(peft_model)
    if adapter_name not in memories:
        groups = resolve_groups(peft_model, adapter_name)
        dims = {group.name: group.dim for group in groups}
        memories[adapter_name] = GPMemory(dims=dims, info=_describe(peft_model, adapter_name))
        guard_of(peft_model, adapter_name, groups)
    return memories[adapter_name]


def set_memory(model: nn.Module, memory: GPMemory, adapter_name: str | None = None, source: str = "memory") -> None:
    """Attach ``memory`` to ``adapter_name`` after checking that it fits the model (layers, dims, base model)."""
    peft_model = unwrap_peft_model(model)
    adapter_name = adapter_name or peft_model.active_adapter
    expected = _describe(peft_model, adapter_name)
    dims = {group.name: group.dim for group in resolve_groups(peft_model, adapter_name)}
    recorded_type, expected_type = memory.info.get("model_type", ""), expected["model_type"]
    if recorded_type and expected_type and recorded_type != expected_type:
        raise GPMemoryError(
            f"{source} was built on a {recorded_type!r} model, but this base model is {expected_type!r}. Load the "
            "base model the adapter was trained on."
        )
    memory.check_fits(dims, source=source)
    recorded_base, expected_base = memory.info.get("base_model", ""), expected["base_model"]
    if recorded_base and expected_base and recorded_base != expected_base:
        warnings.warn(
            f"{source} was built on base model {recorded_base!r}, the model now is {expected_base!r}. The layer "
            "shapes match; if these are not the same weights, old tasks are not protected.",
            stacklevel=2,
        )
    memory.info = {**expected, "base_model": recorded_base or expected_base}
    memory.version += 1
    _memories(peft_model)[adapter_name] = memory
    guard_of(peft_model, adapter_name)


def has_memory(model: nn.Module, adapter_name: str) -> bool:
    return adapter_name in _memories(unwrap_peft_model(model))
