"""What every paradigm handler produces: projected groups, plus the handling of ``modules_to_save``."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from peft import PeftModel
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from ..config import is_gp_config


class FeatureSource:
    """Where a group's features come from when they are not a module's first input (queries, attention weights).

    ``attach(emit)`` starts calling ``emit(features, masked)`` during forward passes and returns a handle with
    ``remove()``; ``features`` has the feature axis last, and with ``masked=True`` its first two axes are laid out as
    the batch's ``(batch, sequence)`` so that padding can be left out.
    """

    def attach(self, emit: Callable[[torch.Tensor, bool], None]):  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(eq=False)
class ProjectedGroup:
    """Parameters whose update is projected against one basis, and where the features of that basis come from.

    ``weight`` has the input-feature axis last (``(out, d_in)``, as ``nn.Linear``). With a ``bias`` the basis lives
    in ``d_in + 1`` dimensions: the bias is the weight of a constant-1 feature, so ``[W | b]`` is projected as one
    matrix and the protection stays exact for every old input. A group may also own a block of a larger parameter
    (``index``, e.g. one head's slice of a prefix) and project it along its first axis (``transpose``).

    Attributes:
        name: key of the basis in the memory (module path inside the base model, adapter name left out).
        weight: the parameter holding the projected block.
        bias: the projected bias, if any.
        feature_module: the module whose first positional input holds the features of this basis.
        frozen: from the second task on, the group is kept fixed instead of projected.
        index: basic index of the block inside ``weight`` (``None``: all of it).
        transpose: project the block along its first axis (the features index its rows).
        source: the features come from this source instead of ``feature_module``'s input.
        output_side: the group whose features are this group's outputs (``lora_B`` for ``lora_A``), when they are
            exactly ``view(weight) @ x``: while that group's weight is zero, the memory keeps this group's rows out of
            the stored space instead of protecting the output side (``collect.update_memory``).
    """

    name: str
    weight: nn.Parameter
    bias: nn.Parameter | None
    feature_module: nn.Module | None
    frozen: bool = False
    index: tuple | None = None
    transpose: bool = False
    source: FeatureSource | None = None
    output_side: ProjectedGroup | None = None

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """The projected block of ``tensor`` (the weight, its gradient or update), feature axis last; a view."""
        block = tensor if self.index is None else tensor[self.index]
        return block.T if self.transpose else block

    @property
    def dim(self) -> int:
        return self.view(self.weight).shape[-1] + (1 if self.bias is not None else 0)

    @property
    def parameters(self) -> list[nn.Parameter]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        """Feature rows of this basis from the feature module's input (constant-1 column appended with a bias)."""
        rows = inputs.reshape(-1, inputs.shape[-1])
        if self.bias is not None:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        return rows


class _Handles:
    def __init__(self, handles: list) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class PooledHeadFeatures(FeatureSource):
    """The input of a decoder classifier head (Llama, GPT-2 ``*ForSequenceClassification``) at the pooled position.

    Such a head scores every position and the model keeps one per example: the rightmost token that is not the pad
    token (the last position with no pad token id, or when the model gets ``inputs_embeds``, as prompt tuning passes).
    Only those rows reach the loss, so only they belong in the head's memory: all tokens' features would fill it and
    keep the head from learning later tasks. A head that gets pooled ``(batch, d)`` input (BERT) passes through.
    """

    def __init__(self, model: nn.Module, head: nn.Module) -> None:
        self.model, self.head = model, head
        config = getattr(model, "config", None)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.pad_token_id = getattr(text_config, "pad_token_id", None)

    def positions(self, length: int, input_ids: torch.Tensor | None) -> torch.Tensor | int:
        """Per example, the position the model pools (as transformers' sequence classifiers pick it)."""
        if self.pad_token_id is None or input_ids is None or input_ids.shape[-1] != length:
            return length - 1
        non_pad = (input_ids != self.pad_token_id).to(torch.int32)
        return (torch.arange(length, device=input_ids.device, dtype=torch.int32) * non_pad).argmax(-1)

    def attach(self, emit):
        batch: dict = {}

        def pre_hook(module, args, kwargs):
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            no_ids = kwargs.get("inputs_embeds") is not None or not isinstance(input_ids, torch.Tensor)
            batch["input_ids"] = None if no_ids else input_ids

        def hook(module, args, output):
            inputs = args[0] if args else None
            if not isinstance(inputs, torch.Tensor):
                return
            if inputs.dim() != 3:
                emit(inputs, True)
                return
            index = self.positions(inputs.shape[1], batch.get("input_ids"))
            if isinstance(index, torch.Tensor):
                index = index.to(inputs.device)
            emit(inputs[torch.arange(inputs.shape[0], device=inputs.device), index], False)

        return _Handles(
            [
                self.model.register_forward_pre_hook(pre_hook, with_kwargs=True),
                self.head.register_forward_hook(hook),
            ]
        )


Handler = Callable[[PeftModel, str, object], list[ProjectedGroup]]
_HANDLERS: dict[str, Handler] = {}


def register_paradigm(peft_type: str) -> Callable[[Handler], Handler]:
    """Register the handler that finds the projected groups of one PEFT type (``"LORA"``, ...)."""

    def decorator(handler: Handler) -> Handler:
        _HANDLERS[peft_type] = handler
        return handler

    return decorator


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


def gp_config_of(model: PeftModel, adapter_name: str | None = None):
    """The GP config of ``adapter_name`` (default: the active adapter), with a clear error if it has none."""
    adapter_name = adapter_name or model.active_adapter
    if adapter_name not in model.peft_config:
        raise KeyError(f"Adapter {adapter_name!r} not found; the model has {sorted(model.peft_config)}.")
    config = model.peft_config[adapter_name]
    if not is_gp_config(config):
        raise TypeError(
            f"Adapter {adapter_name!r} was built from {type(config).__name__}, which has no gradient-projection "
            "settings. Use the matching peft_gp config (for example GPLoraConfig instead of LoraConfig)."
        )
    return config


def _module_key(model: PeftModel, module_name: str) -> str:
    prefix = "base_model.model."
    return module_name[len(prefix) :] if module_name.startswith(prefix) else module_name


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
        name = _module_key(model, module_name)
        if isinstance(copy, nn.Linear):
            source = PooledHeadFeatures(base, copy) if pooled else None
            groups.append(ProjectedGroup(name, copy.weight, copy.bias, copy, frozen=policy == "freeze", source=source))
        elif policy == "freeze":
            for param_name, param in copy.named_parameters():
                groups.append(ProjectedGroup(f"{name}.{param_name}", param, None, copy, frozen=True))
        else:
            raise ValueError(
                f"modules_to_save holds {name!r} ({type(copy).__name__}), which gp_modules_to_save='project' cannot "
                "protect (only nn.Linear can be projected). Set gp_modules_to_save='freeze' to keep it fixed after "
                "the first task, or 'train' to leave it unprotected."
            )
    return groups


def resolve_groups(model: nn.Module, adapter_name: str | None = None) -> list[ProjectedGroup]:
    """All projected groups of ``adapter_name``: the paradigm's own plus those of ``modules_to_save``.

    Called once at setup; the training step then works on the returned parameters without any name matching.
    Warns about trainable parameters that nothing protects.
    """
    peft_model = unwrap_peft_model(model)
    adapter_name = adapter_name or peft_model.active_adapter
    config = gp_config_of(peft_model, adapter_name)
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    if peft_type not in _HANDLERS:
        raise NotImplementedError(f"peft_gp has no gradient-projection handler for PEFT type {peft_type!r} yet.")
    groups = _HANDLERS[peft_type](peft_model, adapter_name, config)
    groups += modules_to_save_groups(peft_model, adapter_name, config.gp_modules_to_save)
    if not groups:
        raise ValueError(f"Adapter {adapter_name!r} has no parameters that gradient projection can protect.")

    covered = {id(p) for group in groups for p in group.parameters}
    uncovered = [
        name
        for name, param in peft_model.named_parameters()
        if param.requires_grad and id(param) not in covered and f".{adapter_name}." in f".{name}."
    ]
    if uncovered and config.gp_modules_to_save != "train":
        warnings.warn(
            f"These trainable parameters of adapter {adapter_name!r} are not protected by gradient projection and "
            f"will change old-task outputs: {uncovered[:8]}{' ...' if len(uncovered) > 8 else ''}",
            stacklevel=2,
        )
    return groups
