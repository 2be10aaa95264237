"""``GPState``: everything peft_gp keeps for one adapter of a PEFT model, resolved once.

One store per model (``model.gp_states``, keyed by adapter name) holds, per GP adapter, its projected groups, its
memory, its task record, the guard that warns about unprotected training and, for a prefix adapter, the prefix route.
It is created on first use (``peft_gp.get_peft_model``, ``from_pretrained``, ``GPTrainer``, ``GPCallback``,
``GPProjector``, ``update_memory``, ``get_memory``), so the training step never matches names.
"""

from __future__ import annotations

import json
import warnings
import weakref
from dataclasses import dataclass

from peft import PeftModel
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from ..core.peft_utils import unwrap_peft_model
from .adapter_states import AdapterStates
from .bottleneck import GPPeftType
from .class_stats import ClassStatistics
from .config import GPPrefixTuningConfig, GPPromptTuningConfig, gp_config_of
from .gp_settings import group_thresholds, rank_caps
from .groups import ProjectedGroup
from .guard import TrainingGuard
from .memory import GPMemory, GPMemoryError
from .paradigms.adapter import adapter_groups
from .paradigms.heads import modules_to_save_groups
from .paradigms.lora import lora_groups
from .paradigms.prefix import prefix_groups
from .paradigms.prompt import prompt_groups
from .route import ForwardRoute
from .sharding import is_sharded, reshard
from .task_record import GPTaskState

STATES = "gp_states"

HANDLERS = {
    "LORA": lora_groups,
    GPPeftType.GP_ADAPTER.value: adapter_groups,
    "PREFIX_TUNING": prefix_groups,
    "PROMPT_TUNING": prompt_groups,
}


def resolve_groups(model: nn.Module, adapter_name: str | None = None) -> list[ProjectedGroup]:
    """All projected groups of ``adapter_name``: the paradigm's own plus those of ``modules_to_save``.

    Called once at setup; the training step then works on the returned parameters without any name matching.
    """
    peft_model = unwrap_peft_model(model)
    adapter_name = adapter_name or peft_model.active_adapter
    config = gp_config_of(peft_model, adapter_name)
    reshard(peft_model)  # FSDP2: the sharded parameters, which the optimizer holds, not gathered copies
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    if peft_type not in HANDLERS:
        raise NotImplementedError(f"peft_gp has no gradient-projection handler for PEFT type {peft_type!r} yet.")
    groups = HANDLERS[peft_type](peft_model, adapter_name, config)
    groups += modules_to_save_groups(peft_model, adapter_name, config.gp_modules_to_save)
    if not groups and any(p.requires_grad for p in peft_model.parameters()):  # with none, nothing can change
        raise ValueError(f"Adapter {adapter_name!r} has no parameters that gradient projection can protect.")

    return groups


@dataclass(eq=False)
class GPState:
    """What peft_gp keeps for one adapter: its groups, memory, task record, guard and prefix route (if any)."""

    adapter_name: str
    groups: list[ProjectedGroup]
    memory: GPMemory
    tasks: GPTaskState
    guard: TrainingGuard | None = None
    route: ForwardRoute | None = None
    class_stats: ClassStatistics | None = None  # with gp_class_statistics: the head's input per class


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


def get_state(model: nn.Module, adapter_name: str | None = None) -> GPState:
    """The ``GPState`` of ``adapter_name`` (default: the active adapter), created on first use."""
    peft_model = unwrap_peft_model(model)
    adapter_name = adapter_name or peft_model.active_adapter
    states = peft_model.__dict__.get(STATES)
    if not isinstance(states, AdapterStates):  # forgets adapters PEFT deleted or replaced
        states = peft_model.__dict__[STATES] = AdapterStates(peft_model, states)
    if adapter_name in states:
        refresh_groups(peft_model, states[adapter_name])
        return states[adapter_name]
    config = gp_config_of(peft_model, adapter_name)
    route = None
    if isinstance(config, GPPrefixTuningConfig):  # before any forward: PEFT's prefix route fails on many models
        route = ForwardRoute.of(peft_model)
        route.add_prefix(adapter_name)
    elif isinstance(config, GPPromptTuningConfig) and peft_model.word_embeddings is None:  # a vision encoder
        route = ForwardRoute.of(peft_model)
        route.add_vision_prompt(adapter_name)
    groups = resolve_groups(peft_model, adapter_name)
    rank_caps([g.name for g in groups], config.gp_max_basis_rank)  # a pattern matching no group: refused now
    group_thresholds([g.name for g in groups], config, 0)
    memory = GPMemory(dims={g.name: g.dim for g in groups}, info=_describe(peft_model, adapter_name))
    state = GPState(adapter_name, groups, memory, GPTaskState(), route=route)
    state.guard = _guard(state)
    states[adapter_name] = state
    return state


def _guard(state: GPState) -> TrainingGuard:
    owner = weakref.ref(state)
    parameters = list({id(p): p for group in state.groups for p in group.parameters if p.requires_grad}.values())
    sliced = any(group.slices is not None for group in state.groups)
    return TrainingGuard(parameters, state.adapter_name, lambda: owner().memory, sliced=sliced)


def refresh_groups(model: nn.Module, state: GPState) -> bool:
    """Resolve ``state``'s groups again on a model whose parameters were replaced since they were resolved:
    ``fully_shard`` (FSDP2) swaps every parameter for a sharded ``DTensor`` one. Returns whether it did. A model with
    no sharded parameter is left alone; the check costs one pass over its modules and parameters."""
    peft_model = unwrap_peft_model(model)
    fsdp = reshard(peft_model)  # FSDP2: the sharded parameters (the optimizer's) back in the modules' attributes
    params = list(peft_model.parameters())
    if not fsdp and not any(is_sharded(param) for param in params):
        return False
    current = {id(param) for param in params}
    if all(id(param) in current for group in state.groups for param in group.parameters):
        return False
    state.groups = resolve_groups(model, state.adapter_name)
    attached, warned = state.guard.attached, state.guard.warned
    state.guard.remove()
    state.guard = _guard(state)
    state.guard.attached, state.guard.warned = attached, warned
    return True


def uncovered_parameters(model: nn.Module, adapter_name: str | None = None) -> list[str]:
    """Trainable parameters of the whole model that no projected group covers, named with their module's type.

    Judged by what they are (``requires_grad`` and not in a group), not by their names: a head, a base ``Linear`` or a
    LayerNorm unfrozen by hand counts. The ``modules_to_save`` copies of a ``gp_modules_to_save="train"`` adapter are
    free on purpose and left out.
    """
    peft_model = unwrap_peft_model(model)
    state = get_state(peft_model, adapter_name)
    covered = {id(p) for group in state.groups for p in group.parameters}
    if gp_config_of(peft_model, state.adapter_name).gp_modules_to_save == "train":
        for module in peft_model.modules():
            if isinstance(module, ModulesToSaveWrapper) and state.adapter_name in module.modules_to_save:
                covered |= {id(p) for p in module.modules_to_save[state.adapter_name].parameters()}
    found = []
    for module_name, module in peft_model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad and id(param) not in covered:
                found.append(f"{module_name}.{name} ({type(module).__name__})")
    return found


def get_memory(model: nn.Module, adapter_name: str | None = None) -> GPMemory:
    """The GP memory of ``adapter_name`` (default: the active adapter), created empty on first use."""
    return get_state(model, adapter_name).memory


def get_task_state(model: nn.Module, adapter_name: str | None = None) -> GPTaskState:
    """The task record of ``adapter_name`` (default: active adapter), created empty on first use."""
    return get_state(model, adapter_name).tasks


def has_task_state(model: nn.Module, adapter_name: str) -> bool:
    """True once a task was recorded for ``adapter_name`` (only then is ``gp_tasks.json`` written)."""
    tasks = get_state(model, adapter_name).tasks
    return tasks.tasks_seen > 0 or tasks.accuracy_matrix is not None


def set_task_state(model: nn.Module, tasks: GPTaskState, adapter_name: str | None = None) -> None:
    get_state(model, adapter_name).tasks = tasks


def _task_slices(info: dict[str, str]) -> int | None:
    """``gp_task_slices`` of the GP settings recorded in a memory's metadata (``None``: none, or not recorded)."""
    try:
        settings = json.loads(info.get("config", "{}"))
    except ValueError:
        return None
    return settings.get("gp_task_slices") if isinstance(settings, dict) else None


def set_memory(model: nn.Module, memory: GPMemory, adapter_name: str | None = None, source: str = "memory") -> None:
    """Attach ``memory`` to ``adapter_name`` after checking that it fits the model (layers, dims, base model)."""
    peft_model = unwrap_peft_model(model)
    state = get_state(peft_model, adapter_name)
    expected = _describe(peft_model, state.adapter_name)
    recorded_type, expected_type = memory.info.get("model_type", ""), expected["model_type"]
    if recorded_type and expected_type and recorded_type != expected_type:
        raise GPMemoryError(
            f"{source} was built on a {recorded_type!r} model, but this base model is {expected_type!r}. Load the "
            "base model the adapter was trained on."
        )
    memory.check_fits(state.memory.dims, source=source)
    recorded_slices, slices = _task_slices(memory.info), _task_slices(expected)
    if recorded_slices != slices:
        raise GPMemoryError(
            f"{source} was stored by an adapter with gp_task_slices={recorded_slices}, this one has {slices}: the "
            "bases mean different things (a sliced adapter keeps none for its output side). Load it with the config "
            "it was saved with (peft_gp.from_pretrained reads it from adapter_config.json)."
        )
    recorded_base, expected_base = memory.info.get("base_model", ""), expected["base_model"]
    if recorded_base and expected_base and recorded_base != expected_base:
        warnings.warn(
            f"{source} was built on base model {recorded_base!r}, the model now is {expected_base!r}. The layer "
            "shapes match; if these are not the same weights, old tasks are not protected.",
            stacklevel=2,
        )
    memory.info = {**memory.info, **expected, "base_model": recorded_base or expected_base}
    memory.version += 1
    state.memory = memory
