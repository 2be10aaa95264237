"""The LoRA layer types whose factors' features are not a module's last input axis: embeddings, convolutions and
``nn.MultiheadAttention``; and DoRA's magnitude, which follows the direction's norm from the second task on.

DoRA computes ``h = (m / ‖W + s·BA‖) ⊙ (W x + s·B A x)`` per output row. Once ``A`` and ``B`` are projected,
``(W + s·BA) x`` is unchanged on old inputs, but the row norms still move with every update. Keeping the ratio
``c = m / ‖W + s·BA‖`` fixed (``m ← c ⊙ ‖W + s·B'A'‖`` after each step) keeps the old outputs exactly: from the second
task on the magnitude is set by that rule instead of trained.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import Embedding, ParamWrapper, _ConvNd
from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
from peft.utils.integrations import dequantize_module_weight
from torch import nn

from ..features import (
    AttentionInputs,
    ConvPatches,
    EmbeddingLookup,
    NoFeatures,
    TokenCounts,
    TokenPositions,
    embedding_blocks,
)
from ..groups import ProjectedGroup, StepRule
from ..parameter_uses import ParameterUses, ParameterWatch


def embedding_groups(module: Embedding, adapter_name: str, name: str) -> list[ProjectedGroup]:
    """``lora_embedding_A`` (``r × V``) against the one-hot ids seen (one basis per block of the vocabulary), and
    ``lora_embedding_B`` (``d × r``) against ``A[:, id]``."""
    lora_a, lora_b = module.lora_embedding_A[adapter_name], module.lora_embedding_B[adapter_name]
    blocks = embedding_blocks(lora_a.shape[1])
    groups = [
        ProjectedGroup(
            f"{name}.lora_embedding_A" + ("" if len(blocks) == 1 else f".tokens{start}-{stop}"),
            lora_a,
            None,
            module,
            index=None if len(blocks) == 1 else (slice(None), slice(start, stop)),
            rows=TokenCounts(start, stop),
        )
        for start, stop in blocks
    ]
    return groups + [ProjectedGroup(f"{name}.lora_embedding_B", lora_b, None, module, rows=EmbeddingLookup(lora_a))]


def trainable_token_groups(module: TrainableTokensLayer, adapter_name: str, name: str) -> list[ProjectedGroup]:
    """``trainable_token_indices``: row ``j`` of the delta is the embedding of token ``indices[j]``, so the rows of the
    tokens old tasks used are kept (a basis over the listed tokens, along the delta's first axis). When the embedding
    is tied to the output layer, row ``j`` is also the output weight of token ``indices[j]``: there the delta is
    projected against the output layer's inputs as well (the two projections act on different axes and commute)."""
    delta = module.trainable_tokens_delta[adapter_name]
    if isinstance(module.get_base_layer(), nn.Embedding):
        rows = TokenPositions(module.token_indices[adapter_name])
        return [ProjectedGroup(f"{name}.trainable_tokens_delta", delta, None, module, transpose=True, rows=rows)]
    return [ProjectedGroup(f"{name}.trainable_tokens_delta.outputs", delta, None, module)]


def conv_factor_groups(name: str, conv: nn.Module) -> list[ProjectedGroup]:
    """A convolution against its unfolded input patches; a grouped one group by group (output channels of group ``g``
    read only its input channels, with its block of the bias)."""
    if conv.groups == 1:
        return [ProjectedGroup(name, conv.weight, conv.bias, conv, rows=ConvPatches.of(conv))]
    outputs, inputs = conv.out_channels // conv.groups, conv.in_channels // conv.groups
    return [
        ProjectedGroup(
            f"{name}.group{g}",
            conv.weight,
            conv.bias,
            conv,
            index=(slice(g * outputs, (g + 1) * outputs),),
            bias_index=slice(g * outputs, (g + 1) * outputs),
            rows=ConvPatches.of(conv, channels=(g * inputs, (g + 1) * inputs)),
        )
        for g in range(conv.groups)
    ]


def conv_groups(module: _ConvNd, adapter_name: str, name: str) -> list[ProjectedGroup]:
    """``lora_A`` (a convolution with the base layer's kernel, stride and padding) against the input patches,
    ``lora_B`` (a 1×1 convolution, grouped like the base layer) against ``lora_A``'s output channels."""
    lora_a, lora_b = module.lora_A[adapter_name], module.lora_B[adapter_name]
    return conv_factor_groups(f"{name}.lora_A", lora_a) + conv_factor_groups(f"{name}.lora_B", lora_b)


def attention_groups(module: LoraLayer, adapter_name: str, name: str) -> list[ProjectedGroup]:
    """PEFT's ``MultiheadAttention`` LoRA: the packed input projection's factors against every query, key and value
    row (``lora_B`` against ``A`` of them: its q, k and v rows each read their own, one basis over the three keeps
    them all), the output projection's against the attention's values before ``out_proj``."""
    mha = module.get_base_layer()
    groups = []
    for prefix, part, layer in ((name, "in", module), (f"{name}.out_proj", "out", mha.out_proj)):
        if adapter_name not in layer.lora_A:
            continue
        lora_a, lora_b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        groups += [
            ProjectedGroup(f"{prefix}.lora_A", lora_a.weight, None, None, source=AttentionInputs(mha, part)),
            ProjectedGroup(
                f"{prefix}.lora_B", lora_b.weight, lora_b.bias, None, source=AttentionInputs(mha, part, lora_a)
            ),
        ]
    return groups


def parameter_groups(module: ParamWrapper, adapter_name: str, name: str) -> list[ProjectedGroup]:
    """LoRA on a 2-d parameter: each factor in both orientations (``parameter_uses``), fed where the parameter is
    used. A 3-d parameter (experts) is refused: which tokens reach each expert is the model's routing, not visible."""
    if module.num_experts > 1:
        raise ValueError(
            f"GPLoraConfig cannot protect LoRA on the 3-d parameter {module.parameter_name!r} of {name!r} "
            f"({module.num_experts} experts, target_parameters): which inputs reach each expert is decided by the "
            "model's routing inside its forward, so no condition on the experts' features can be stated. Fix: "
            "target the experts' linear modules (target_modules) where the model has them, or leave it out."
        )
    lora_a, lora_b = module.lora_A[adapter_name], module.lora_B[adapter_name]
    watch = ParameterWatch(module, lora_a, lora_b, f"{name}.{module.parameter_name}")
    return [
        ProjectedGroup(f"{name}.lora_A", lora_a.weight, None, None, source=ParameterUses(watch, "A")),
        ProjectedGroup(f"{name}.lora_B", lora_b.weight, None, None, source=ParameterUses(watch, "B")),
        ProjectedGroup(f"{name}.lora_A.first_axis", lora_a.weight, None, None, transpose=True,
                       source=ParameterUses(watch, "At")),
        ProjectedGroup(f"{name}.lora_B.first_axis", lora_b.weight, None, None, transpose=True,
                       source=ParameterUses(watch, "Bt")),
    ]  # fmt: skip


def dora_norm(module: LoraLayer, adapter_name: str) -> torch.Tensor:
    """``‖W + s·BA‖`` per output row, as DoRA's forward computes it (PEFT's own functions)."""
    dora, scaling = module.lora_magnitude_vector[adapter_name], module.scaling[adapter_name]
    base = module.get_base_layer()
    if isinstance(module, Embedding):
        lora_a, lora_b = module.lora_embedding_A[adapter_name].T, module.lora_embedding_B[adapter_name].T
        weight = base.weight
        lora_weight = dora.get_lora_weight(lora_A=lora_a, lora_B=lora_b)
    elif isinstance(module, _ConvNd):
        weight = base.weight
        lora_weight = dora.get_lora_weight(module.lora_A[adapter_name], module.lora_B[adapter_name])
        lora_weight = lora_weight.reshape(weight.shape)
    else:
        weight = dequantize_module_weight(base)
        lora_weight = dora.get_lora_weight(module.lora_A[adapter_name], module.lora_B[adapter_name])
    return dora.get_weight_norm(weight=weight, lora_weight=lora_weight.to(weight.dtype), scaling=scaling)


class DoraMagnitude(StepRule):
    """Sets DoRA's magnitude after each projected step so that ``m / ‖W + s·BA‖`` stays what it was."""

    def __init__(self, module: LoraLayer, adapter_name: str) -> None:
        self.module, self.adapter_name = module, adapter_name
        self.magnitude = module.lora_magnitude_vector[adapter_name].weight

    def before(self) -> torch.Tensor:
        return self.magnitude.detach() / dora_norm(self.module, self.adapter_name).detach()

    def after(self, ratio: torch.Tensor) -> None:
        norm = dora_norm(self.module, self.adapter_name).detach()
        self.magnitude.copy_((ratio * norm).to(self.magnitude.dtype))


def dora_groups(module: LoraLayer, adapter_name: str, name: str) -> list[ProjectedGroup]:
    magnitude = module.lora_magnitude_vector[adapter_name].weight
    rule = DoraMagnitude(module, adapter_name)
    group = ProjectedGroup(f"{name}.lora_magnitude_vector", magnitude, None, None, frozen=True, source=NoFeatures())
    group.rule = rule
    return [group]
