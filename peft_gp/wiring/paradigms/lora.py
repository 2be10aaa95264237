"""LoRA (PEGP eq. 7, 14): ``lora_A`` against the adapted layer's inputs ``x``, ``lora_B`` against ``y = A x``.

Every layer type and variant of PEFT's LoRA layer is read from what it computes (``lora_layers`` holds the layer types
whose features are not a module's last input axis): ``nn.Linear`` and transformers' ``Conv1D`` (with ``lora_bias``:
``lora_B``'s bias on a constant-1 feature), embeddings, convolutions (grouped too), ``nn.MultiheadAttention``, and the
variants aLoRA, VeLoRA, MiCA, KaSA, MonteCLoRA, BD-LoRA and DoRA, and LoRA on 2-d parameters (``target_parameters``,
read where the module computes with them: ``parameter_uses``). Arrow, QA-LoRA, 3-d (expert) parameters and any variant
peft_gp does not know are refused with the reason and the fix. With ``gp_task_slices`` (linear layers without a variant
only) each task trains its own slice of the rank instead (``wiring.slices``).
"""

from __future__ import annotations

from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import Embedding, MultiheadAttention, ParamWrapper, _ConvNd
from peft.tuners.lora.variants import (
    ALoraLinearVariant,
    ArrowLinearVariant,
    BdLoraLinearVariant,
    BlockDiagonalLinear,
    DoraEmbeddingVariant,
    DoraLinearVariant,
    KasaLinearVariant,
    MiCAEmbeddingVariant,
    MiCALinearVariant,
    MontecloraLinearVariant,
    QALoraLinearVariant,
    VeloraLinearVariant,
    _DoraConvNdVariant,
)
from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from ...core.peft_utils import module_key
from ..features import ChannelBlock, NoFeatures, Through
from ..groups import ProjectedGroup
from ..slices import sliced_pair
from .lora_layers import (
    attention_groups,
    conv_groups,
    dora_groups,
    embedding_groups,
    parameter_groups,
    trainable_token_groups,
)

# variants whose adapter output is lora_B(lora_A(x)) in eval mode, each factor called as a module: the vanilla rule
PLAIN_VARIANTS = (
    ALoraLinearVariant,
    BdLoraLinearVariant,
    VeloraLinearVariant,
    MiCALinearVariant,
    MiCAEmbeddingVariant,
)
KNOWN_VARIANTS = (
    *PLAIN_VARIANTS,
    KasaLinearVariant,
    MontecloraLinearVariant,
    DoraLinearVariant,
    DoraEmbeddingVariant,
    _DoraConvNdVariant,
    type(None),
)
REFUSED_VARIANTS = {
    ArrowLinearVariant: (
        "Arrow routes each token to the top-k LoRA experts by its similarity to prototypes built from the experts' "
        "own weights, so the adapter's output is not linear in them and no projection keeps old outputs",
        "train the experts as plain LoRA adapters with GPLoraConfig and build the Arrow model from them afterwards",
    ),
    QALoraLinearVariant: (
        "QA-LoRA is not supported yet (its lora_A reads group-pooled inputs without being called as a module, and "
        "this quantized path is untested here)",
        "set use_qalora=False",
    ),
}


def _refuse(name: str, what: str, why: str, fix: str) -> None:
    raise ValueError(f"GPLoraConfig cannot protect {what} on {name!r}: {why}. Fix: {fix}.")


def check_variant(module: LoraLayer, adapter_name: str, name: str):
    """The LoRA variant of ``adapter_name`` on ``module`` (``None``: vanilla), refused where no projection is exact."""
    variant = module.lora_variant.get(adapter_name)
    if type(variant) in REFUSED_VARIANTS:
        why, fix = REFUSED_VARIANTS[type(variant)]
        _refuse(name, f"the LoRA variant {type(variant).__name__}", why, fix)
    if not isinstance(variant, KNOWN_VARIANTS):
        _refuse(
            name,
            f"the LoRA variant {type(variant).__name__}",
            "peft_gp does not know what this variant computes, so it cannot state a condition that keeps old "
            "outputs",
            "use plain LoRA (or a variant listed in docs/paradigms.md), or open an issue for this variant",
        )
    return variant


def factor_groups(name: str, factor: nn.Module, layer: nn.Module | None = None) -> list[ProjectedGroup]:
    """The groups of one LoRA factor of a linear layer: an ``nn.Linear`` (its input, its bias on a constant 1), or
    BD-LoRA's block-diagonal factor (block ``i`` of its rows reads only block ``i`` of its input: one basis each).
    ``layer``: the module whose input holds the features, when the factor is not called as a module itself."""
    if isinstance(factor, nn.Linear):
        return [ProjectedGroup(name, factor.weight, factor.bias, layer or factor)]
    if isinstance(factor, BlockDiagonalLinear):
        rows, width = factor.out_features // factor.nblocks, factor.in_features // factor.nblocks
        return [
            ProjectedGroup(
                f"{name}.block{i}",
                factor.weight,
                None,
                layer or factor,
                index=(slice(i * rows, (i + 1) * rows),),
                rows=ChannelBlock(i * width, (i + 1) * width),
            )
            for i in range(factor.nblocks)
        ]
    _refuse(
        name,
        f"a LoRA factor of type {type(factor).__name__}",
        "only nn.Linear factors (LoRA on Linear, Conv1D, quantized linear layers) and BD-LoRA's block-diagonal "
        "ones can be projected",
        "remove this layer from target_modules",
    )
    return []


def linear_groups(module: LoraLayer, adapter_name: str, name: str, variant) -> list[ProjectedGroup]:
    lora_a, lora_b = module.lora_A[adapter_name], module.lora_B[adapter_name]
    # MonteCLoRA calls F.linear with lora_A's weight (perturbed while training), DoRA also passes the identity matrix
    # through both factors to get BA: there the features are read from the layer's own input
    dora = isinstance(variant, DoraLinearVariant)
    reader = module if dora or isinstance(variant, MontecloraLinearVariant) else None
    groups_a = factor_groups(f"{name}.lora_A", lora_a, reader)
    groups_b = factor_groups(f"{name}.lora_B", lora_b, module if dora else None)
    if dora:
        groups_b[0].rows = Through(lora_a)
    if variant is None and len(groups_a) == len(groups_b) == 1 and lora_a.bias is None:
        groups_a[0].output_side = groups_b[0]  # lora_B reads A x exactly (dropout is off in eval mode)
    return groups_a + groups_b


def frozen_groups(prefix: str, parameters) -> list[ProjectedGroup]:
    """Parameters kept fixed from the second task on (no basis): exact, whatever they compute."""
    return [
        ProjectedGroup(f"{prefix}.{param_name}", param, None, None, frozen=True, source=NoFeatures())
        for param_name, param in parameters
        if param.requires_grad
    ]


def variant_groups(module: LoraLayer, adapter_name: str, name: str, variant) -> list[ProjectedGroup]:
    """The variants' own trainable parameters: KaSA's singular values (``lora_B`` reads ``diag ⊙ A x``, so they are
    kept fixed once a task is stored), MonteCLoRA's sampler (used only while training: old outputs, computed in eval
    mode, never read it; kept fixed), DoRA's magnitude (``dora_groups``)."""
    if isinstance(variant, KasaLinearVariant):
        return frozen_groups(name, [("lora_diag", module.lora_diag[adapter_name])])
    if isinstance(variant, MontecloraLinearVariant):
        sampler = module.lora_monteclora_sampler[adapter_name]
        return frozen_groups(f"{name}.lora_monteclora_sampler", sampler.named_parameters())
    if isinstance(variant, (DoraLinearVariant, _DoraConvNdVariant)):
        return dora_groups(module, adapter_name, name)
    return []


def sliced_groups(module: LoraLayer, adapter_name: str, name: str, variant, count: int) -> list[ProjectedGroup]:
    """``gp_task_slices``: ``lora_A``'s rows and ``lora_B``'s columns in per-task slices (``wiring.slices``)."""
    lora_a = module.lora_A[adapter_name] if adapter_name in module.lora_A else None
    lora_b = module.lora_B[adapter_name] if adapter_name in module.lora_B else None
    special = isinstance(module, (ParamWrapper, MultiheadAttention, Embedding, _ConvNd))
    linear = isinstance(lora_a, nn.Linear) and isinstance(lora_b, nn.Linear) and lora_a.bias is None
    if variant is not None or special or not linear:
        what = type(variant).__name__ if variant is not None else type(module).__name__
        _refuse(
            name,
            f"gp_task_slices on {what}",
            "per-task slices are implemented for linear LoRA layers without a variant (nn.Linear, transformers' "
            "Conv1D, quantized linear layers)",
            "target linear layers only, or leave gp_task_slices unset",
        )
    return sliced_pair(name, (f"{name}.lora_A", lora_a), (f"{name}.lora_B", lora_b), count)


def layer_groups(module: LoraLayer, adapter_name: str, name: str, slices: int | None = None) -> list[ProjectedGroup]:
    """All groups of one adapted layer (``slices``: the config's ``gp_task_slices``)."""
    variant = check_variant(module, adapter_name, name)
    if slices is not None:
        return sliced_groups(module, adapter_name, name, variant, slices)
    if isinstance(module, ParamWrapper):
        groups = parameter_groups(module, adapter_name, name)
    elif isinstance(module, MultiheadAttention):
        groups = attention_groups(module, adapter_name, name)
    elif isinstance(module, Embedding):
        groups = embedding_groups(module, adapter_name, name)
    elif isinstance(module, _ConvNd):
        groups = conv_groups(module, adapter_name, name)
    else:
        groups = linear_groups(module, adapter_name, name, variant)
    return groups + variant_groups(module, adapter_name, name, variant)


def trainable_bias_groups(model: PeftModel, config, covered: set[int]) -> list[ProjectedGroup]:
    """``bias="all"`` or ``"lora_only"`` trains the base model's biases: a bias moves every output, so they are kept
    fixed from the second task on (``modules_to_save`` copies are ``gp_modules_to_save``'s)."""
    if getattr(config, "bias", "none") == "none":
        return []
    copies = {id(p) for m in model.modules() if isinstance(m, ModulesToSaveWrapper) for p in m.parameters()}
    free = [
        (module_key(param_name), param)
        for param_name, param in model.named_parameters()
        if param.requires_grad and "bias" in param_name.split(".")[-1] and id(param) not in covered | copies
    ]
    return [
        ProjectedGroup(param_name, param, None, None, frozen=True, source=NoFeatures()) for param_name, param in free
    ]


def _peft_forward(cls: type) -> bool:
    """Whether ``cls`` computes with the forward of one of PEFT's own layers (custom subclasses that only register a
    layer for another module type, ``_register_custom_module``, keep it)."""
    owner = next((klass for klass in cls.__mro__ if "forward" in vars(klass)), object)
    return owner.__module__.startswith("peft.")


def _trains_for(module: nn.Module, adapter_name: str) -> bool:
    """Whether a layer holds trainable parameters of ``adapter_name`` anywhere (a custom layer with none, such as
    one registered for a module type that ``update_layer`` never filled, changes nothing and needs no projection)."""
    return any(p.requires_grad and adapter_name in name.split(".") for name, p in module.named_parameters())


def lora_groups(model: PeftModel, adapter_name: str, config) -> list[ProjectedGroup]:
    groups, inner = [], set()
    for module_name, module in model.named_modules():
        tokens = getattr(module, "trainable_tokens_delta", {})
        if isinstance(module, TrainableTokensLayer) and adapter_name in tokens:
            groups += trainable_token_groups(module, adapter_name, module_key(module_name))
        if not isinstance(module, LoraLayer) or id(module) in inner:
            continue
        held = adapter_name in module.lora_A or adapter_name in getattr(module, "lora_embedding_A", {})
        if (held or _trains_for(module, adapter_name)) and not _peft_forward(type(module)):
            _refuse(
                module_key(module_name),
                f"the custom LoRA layer {type(module).__name__}",
                "its forward is not one of PEFT's LoRA layers, so peft_gp does not know what it computes",
                "target layers PEFT's own LoRA layers handle (a layer registered with _register_custom_module that "
                "subclasses one of them without a forward of its own is protected like it), or leave it out",
            )
        if not held:
            continue
        if isinstance(module, MultiheadAttention):  # its out_proj is a LoRA Linear whose forward never runs
            inner.add(id(module.get_base_layer().out_proj))
        groups += layer_groups(module, adapter_name, module_key(module_name), getattr(config, "gp_task_slices", None))
    covered = {id(p) for group in groups for p in group.parameters}
    return groups + trainable_bias_groups(model, config, covered)
