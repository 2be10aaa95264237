"""The gradient-projection fields (one mixin) and the ``GP*Config`` classes built on PEFT's configs."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

from peft import LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig

from .bottleneck import LEGACY_PEFT_TYPES, BottleneckConfig, GPPeftType, register_bottleneck
from .gp_settings import check_gp_settings
from .slices import TASK_SLICES_HELP, check_slice_settings


@dataclass
class GPConfigMixin:
    """Fields shared by every gradient-projection config.

    Args:
        gp_threshold: Energy threshold τ in (0, 1] of the memory: after each task, each protected layer keeps the
            smallest basis that holds at least this share of the energy of the task's features. 1.0 keeps their
            whole (numerical) span: exact protection, least room for later tasks.
        gp_threshold_increment: Added to the threshold for every task already stored (GPM uses 0.003): task
            ``task_id`` (0-based) is stored with ``min(1, gp_threshold + gp_threshold_increment * task_id)``.
        gp_projection: ``"gradient"`` projects each gradient before the optimizer step (the paper's method; with Adam
            or weight decay the step then leaks slightly into the protected space). ``"update"`` also projects the
            optimizer's final update, which keeps the protection exact with any optimizer.
        gp_memory_samples: How many examples of a finished task feed its memory (every token of an example is a
            feature row). A few hundred suffice; more costs one forward pass each.
        gp_modules_to_save: What happens to trainable copies in ``modules_to_save`` (a classifier head, say) from the
            second task on: ``"project"`` protects ``nn.Linear`` ones like the adapter (bias included, on a constant-1
            feature), ``"freeze"`` keeps them fixed, ``"train"`` lets them change freely (old outputs then drift).
        gp_importance_scale: Scaled projection (SGP, Saha & Roy 2023) with this scale ``α``: each stored direction
            ``m_i`` keeps an importance ``λ_i = (α+1)σ_i / (ασ_i + σ_max)`` in [0, 1] from the tasks' singular values
            along it, and updates are projected as ``G (I − M Λ Mᵀ)``: weak directions stay partly open to new tasks.
            ``None`` (default): ``λ = 1``, the hard projection; a larger ``α`` comes closer to it.
        gp_update_budget_gb: The most GB (10⁹ bytes) of Gram matrices a memory update holds at once: each distinct
            input's float64 ``d × d`` sum and the batch's Gram being added to it. Groups
            whose Grams exceed it are split into passes, the sample streamed once per pass (hooks on that pass's
            groups alone), each pass's bases grown and its Grams freed before the next; the bases are the same as in
            one pass. The update's peak is about the budget plus the widest ``d``'s decomposition (``5 d²`` float64)
            and the pass's new bases (``peft-gp plan`` prints it). Models whose Grams fit take one pass. ``None``:
            one pass, whatever it holds.
        gp_max_basis_rank: Keep at most this many columns in each distinct input's basis (an int, or a dict from a
            regular expression searched in the projected group's name to an int; unmatched groups are uncapped, but
            groups sharing one basis, e.g. ``q/k/v``, take the smallest cap of any of them, and a pattern that
            matches no group is refused at the first memory update): the
            first tasks' directions stay and each task adds its highest-energy ones until the cap. Protection is
            then partial: features beyond the cap's directions are not protected (``gp_threshold=1.0`` is no longer
            exact). The file then holds at most ``cap · d`` floats per input. ``None`` (default): no cap.
        gp_sketch_above: Inputs read by LoRA or adapter layers whose feature dimension ``d`` is above this (Llama's
            14336-wide ``down_proj``) stream their residual features (outside the old basis) into a Frequent
            Directions sketch ``B`` of ``gp_sketch_rows`` rows instead of a ``d × d`` Gram: ``2ℓ · d`` float64 and an
            SVD of a ``2ℓ × d`` matrix instead of ``d²`` and an eigendecomposition. The energies the threshold reads
            stay exact; the new directions are ``B``'s top right singular vectors. For any unit ``x`` and ``k < ℓ``,
            ``0 ≤ ‖Ax‖² − ‖Bx‖² ≤ ‖A − A_k‖_F² / (ℓ − k)`` (``A``: the residual features): features of rank
            ``< ℓ`` are captured exactly. Merged over processes under DDP/FSDP2. Not with ``gp_importance_scale``.
            ``None`` (default): every input keeps its Gram.
        gp_sketch_rows: ``ℓ``, the rows a sketch keeps (its buffer holds ``2ℓ``; default 512).
        gp_gram_dtype: ``"float32"`` computes each batch's Gram product ``Xᵀ X`` in float32 (no TF32), added to the
            float64 sums: float64 matmuls are 2–64× slower on GPUs (not measured here: CPU only). Sums, all-reduce,
            eigendecomposition and bases stay float64; eigenvalues below ``16 · eps₃₂ · tr(C)`` (≈ 1.9e-6, ~100×
            the measured rounding) are zeros instead of ``1e-10``: ``core.maths.FLOAT32_EIGEN_TOLERANCE``.
            Sketches (``gp_sketch_above``) stay float64. Default ``"float64"``.
    """

    gp_threshold: float = field(
        default=0.97,
        metadata={"help": "Energy threshold in (0, 1] of the memory: share of each task's feature energy protected."},
    )
    gp_threshold_increment: float = field(
        default=0.0,
        metadata={"help": "Added to gp_threshold for every task already stored (GPM uses 0.003); capped at 1."},
    )
    gp_projection: Literal["gradient", "update"] = field(
        default="update",
        metadata={
            "help": "'gradient' projects gradients (the paper's); 'update' also projects the optimizer's update, "
            "exact with any optimizer."
        },
    )
    gp_memory_samples: int = field(
        default=256, metadata={"help": "How many examples of a finished task feed its memory."}
    )
    gp_modules_to_save: Literal["project", "freeze", "train"] = field(
        default="project",
        metadata={
            "help": "From the second task on, 'project' protects nn.Linear modules_to_save (e.g. a classifier head), "
            "'freeze' keeps them fixed, 'train' leaves them unprotected."
        },
    )
    gp_importance_scale: float | None = field(
        default=None, metadata={"help": "SGP's scale alpha of the directions' importances; None: hard projection."}
    )
    gp_class_statistics: bool = field(
        default=False,
        metadata={
            "help": "Also take per-class statistics of the classification head's input in each memory update "
            "(gp_class_stats.safetensors), for the replay-free heads of peft_gp.statistics_head."
        },
    )
    gp_update_budget_gb: float | None = field(
        default=8.0,
        metadata={"help": "GB of Gram matrices a memory update holds at once (passes over the sample); None: one."},
    )
    gp_max_basis_rank: int | dict[str, int] | None = field(
        default=None,
        metadata={"help": "Most columns per basis (int or {name regex: int}); protection then partial. None: no cap."},
    )

    gp_sketch_above: int | None = field(
        default=None,
        metadata={"help": "Inputs wider than this get a Frequent Directions sketch instead of a Gram; None: none."},
    )
    gp_sketch_rows: int = field(default=512, metadata={"help": "Rows (ell) of each Frequent Directions sketch."})
    gp_gram_dtype: Literal["float64", "float32"] = field(
        default="float64", metadata={"help": "dtype of each batch's Gram product (sums stay float64); float32: GPUs."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_gp_settings(self.gp_fields())

    def gp_fields(self) -> dict:
        """The GP settings alone, as a plain dict (stored in the memory file's metadata)."""
        return {f.name: getattr(self, f.name) for f in fields(GPConfigMixin)}


GP_DEFAULTS = {f.name: f.default for f in fields(GPConfigMixin)}  # one source of the defaults (RunConfig reads it)


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
