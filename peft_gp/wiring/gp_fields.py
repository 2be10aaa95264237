"""The gradient-projection fields shared by every ``GP*Config`` (one mixin), their defaults and their checks."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

from .gp_settings import check_gp_settings


@dataclass
class GPConfigMixin:
    """Fields shared by every gradient-projection config.

    Args:
        gp_threshold: Energy threshold τ in (0, 1] of the memory: after each task, each protected layer keeps the
            smallest basis that holds at least this share of the energy of the task's features. 1.0 keeps their
            whole (numerical) span: exact protection, least room for later tasks.
        gp_threshold_pattern: Per-layer thresholds: a dict from a regular expression, searched in each projected
            group's name (``model.layers.3.self_attn.q_proj.lora_A``), to the threshold used there instead of
            ``gp_threshold`` (where several match, the highest). Layers differ: after 4 SmolLM2 tasks at τ = 0.97 the
            input bases fill 36% of layer 0 and 85% of layers 25–29 (benchmarks/README.md). A pattern matching no
            group is refused when the adapter is wired. ``None`` (default): ``gp_threshold`` everywhere.
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
            matches no group is refused when the adapter is wired): the
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
    gp_threshold_pattern: dict[str, float] | None = field(
        default=None,
        metadata={"help": "Per-layer thresholds: {name regex: threshold}, overriding gp_threshold where it matches."},
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
