"""The ``GP*Config`` classes: PEFT's configs with the gradient-projection fields (``gp_fields.GPConfigMixin``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig

from .bottleneck import LEGACY_PEFT_TYPES, BottleneckConfig, GPPeftType, register_bottleneck
from .gp_fields import GPConfigMixin
from .slices import TASK_SLICES_HELP, check_slice_settings


@dataclass
class GPLoraConfig(GPConfigMixin, LoraConfig):
    """A ``LoraConfig`` whose adapter trains with gradient projection (PEGP eq. 7 and 14).

    Both ``lora_A`` (against the inputs ``x`` of the adapted layer) and ``lora_B`` (against ``A x``) are protected, so
    with exact projection the adapted layer's output on old-task inputs does not change. Use it wherever a
    ``LoraConfig`` goes: ``get_peft_model(model, GPLoraConfig(r=8, target_modules=["query", "value"]))``. Linear,
    ``Conv1D``, embedding, convolution (grouped too) and ``nn.MultiheadAttention`` targets, 2-d ``target_parameters``,
    ``lora_bias``, ``trainable_token_indices`` and the variants DoRA, aLoRA, VeLoRA, MiCA, KaSA, MonteCLoRA and BD-LoRA
    are protected exactly (docs/paradigms.md); what cannot be (Arrow, QA-LoRA, 3-d expert parameters) is refused when
    the adapter's GP state is set up.
    The saved ``adapter_config.json`` stays loadable by plain PEFT for inference (it warns about the ``gp_*`` keys).

    Args:
        gp_task_slices: per-task capacity: the adapter's rank ``r`` is cut into this many slices of
            ``r / gp_task_slices`` components, and task ``t`` (0-based, the memory's task count) trains slice ``t``
            alone: its ``lora_A`` rows start and stay orthogonal to the old tasks' inputs, its ``lora_B`` columns
            train freely, every other slice is kept fixed. Old outputs are kept exactly (at ``gp_threshold=1.0``)
            while each task picks its own output directions. It counts slices, not ranks, because that number is the
            cap (a task past the last slice is refused) and ``r`` keeps PEFT's meaning, the rank saved and loaded by
            plain PEFT. PEFT scales by ``lora_alpha / r``: keep that ratio as for a plain LoRA of the slice's rank
            (``r=32, lora_alpha=64, gp_task_slices=4`` trains each task like ``r=8, lora_alpha=16``). Linear LoRA
            layers without variants; ``init_lora_weights`` True or ``"gaussian"`` (``lora_B`` must start at zero).
    """

    gp_task_slices: int | None = field(default=None, metadata={"help": TASK_SLICES_HELP})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_slice_settings(self, "r", self.init_lora_weights in (True, "gaussian"))

    def gp_fields(self) -> dict:
        return {**super().gp_fields(), "gp_task_slices": self.gp_task_slices}


@dataclass
class GPAdapterConfig(GPConfigMixin, BottleneckConfig):
    """A bottleneck adapter trained with gradient projection (PEGP eq. 5 and 14).

    Parallel (AdaptFormer) by default, beside each layer's feed-forward block; ``adapter_style="sequential"`` puts a
    Houlsby adapter after it. ``W_down`` is protected against the adapter inputs, ``W_up`` against the bottleneck
    activations, biases on a constant-1 feature, so with exact projection old-task outputs do not change. PEFT has no
    bottleneck adapter: importing peft_gp registers it, and loading one needs ``import peft_gp`` first.
    Use it wherever a PEFT config goes: ``get_peft_model(model, GPAdapterConfig(bottleneck_size=16))``.

    Args:
        gp_task_slices: per-task capacity, as for ``GPLoraConfig``: task ``t`` trains bottleneck units
            ``t·w .. (t+1)·w`` (``w = bottleneck_size / gp_task_slices``) alone, ``W_down``'s rows and bias kept so
            that ``W_down x + b = 0`` on old inputs, ``W_up``'s columns free, every other unit fixed; ``W_up``'s bias
            (shared) trains with the first task only. Exact because the activation maps 0 to 0 (refused otherwise)
            and ``W_up`` starts at zero (``init_weights=True``). ``scaling`` does not depend on the width, so each
            task trains like an adapter of width ``w``.
    """

    gp_task_slices: int | None = field(default=None, metadata={"help": TASK_SLICES_HELP})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_slice_settings(self, "bottleneck_size", self.init_weights, self.activation)

    def gp_fields(self) -> dict:
        return {**super().gp_fields(), "gp_task_slices": self.gp_task_slices}


register_bottleneck(GPAdapterConfig)


def _check_task_type(config) -> None:
    if config.task_type is None:
        raise ValueError(
            f"{type(config).__name__} needs a task_type (e.g. 'SEQ_CLS', also for ViT image classification, or "
            "'CAUSAL_LM'): PEFT builds prompt-learning models per task type and fails without one."
        )


@dataclass
class GPPromptTuningConfig(GPConfigMixin, PromptTuningConfig):
    """A ``PromptTuningConfig`` whose prompt trains with gradient projection (PEGP eq. 1 and 10).

    The first layer sees ``[p; x]``. From the second task on, every change of the prompt rows ``p`` is kept orthogonal
    to the old tasks' input token embeddings ``x`` and to the old prompt rows, so the inner products ``x pᵀ`` (the
    paper's first-layer attention logits) of old inputs do not change. Decoder-only and encoder models
    (``CAUSAL_LM``, ``SEQ_CLS``, ...) and, with ``task_type="SEQ_CLS"``, vision encoders with a patch embedding (ViT:
    the prompt follows the class token, see ``peft_gp.wiring.vision_prompt``); encoder-decoder models are refused.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_task_type(self)


@dataclass
class GPPrefixTuningConfig(GPConfigMixin, PrefixTuningConfig):
    """A ``PrefixTuningConfig`` whose prefix trains with gradient projection (PEGP eq. 3 and 12).

    Layer ``l``'s key prefix is protected against the old tasks' queries at layer ``l``, so their attention weights on
    the prefix do not change; optionally the value prefix too (null space of those weights), which keeps the old
    outputs exactly. peft_gp injects the prefix through a registered attention function, so it works where PEFT's
    cache route fails (BERT-like encoders, sequence classification with Llama, ViT features).

    Args:
        gp_per_head: one basis per (key/value) head, which protects every head's attention scores exactly; ``False``
            uses one basis over the concatenated heads, which keeps only the sum over heads of the key condition.
        gp_protect_values: also project the value prefix along the prefix-token axis onto the null space of the old
            attention weights on the prefix, which keeps the old outputs exactly (default). ``False`` is the authors'
            keys-only setting: their code trains a prefix per task, while one shared prefix whose values move
            forgot as much as without GP on Fortunes-20 (docs/paradigms.md).
    """

    gp_per_head: bool = field(
        default=True, metadata={"help": "One basis per attention head (exact) instead of one over all heads."}
    )
    gp_protect_values: bool = field(
        default=True,
        metadata={"help": "Also protect the value prefix (null space of old attention weights); False: keys only."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prefix_projection:
            raise ValueError(
                "GPPrefixTuningConfig does not support prefix_projection=True: the MLP reparametrisation cannot be "
                "projected through its gradients. Set prefix_projection=False (the prefix is then trained directly)."
            )
        _check_task_type(self)
        for name in ("gp_per_head", "gp_protect_values"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if self.gp_protect_values and not self.gp_per_head:
            raise ValueError(
                "gp_protect_values=True needs gp_per_head=True: with one basis over all heads only the sum over heads "
                "of the old attention scores is kept, so the old attention weights on the prefix, against which the "
                "values are protected, still change and the value condition would not hold. Set gp_per_head=True, or "
                "gp_protect_values=False for the keys-only setting."
            )

    def gp_fields(self) -> dict:
        return {**super().gp_fields(), "gp_per_head": self.gp_per_head, "gp_protect_values": self.gp_protect_values}


GP_CONFIG_CLASSES = {
    "LORA": GPLoraConfig,
    GPPeftType.GP_ADAPTER: GPAdapterConfig,
    **{legacy: GPAdapterConfig for legacy in LEGACY_PEFT_TYPES},
    "PROMPT_TUNING": GPPromptTuningConfig,
    "PREFIX_TUNING": GPPrefixTuningConfig,
}


def is_gp_config(config: object) -> bool:
    """True for configs carrying the gradient-projection fields."""
    return isinstance(config, GPConfigMixin)


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
