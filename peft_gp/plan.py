"""``peft-gp plan``: what gradient projection costs on a model, worked out from its config alone (no weights).

The model is built on the meta device from its ``config.json``, the GP adapter is wired on it exactly as for
training (``peft_gp.get_peft_model``), and every projected group is costed the way peft_gp stores and uses its basis
today. Groups that read the same inputs (``q/k/v``, ``gate/up``) share one Gram matrix and one basis: they are found
by one dry forward pass through the memory update's own hooks (``plan_sources.shared_inputs``), as the update finds
them, and each shared basis is costed once, on the layer of its first group.

* memory file: ``gp_memory.safetensors`` holds one float32 matrix per distinct input, the smaller of its ``(d, k)``
  basis and the ``(d, d − k)`` complement (``k`` = ``fill · d`` rounded; frozen groups hold none; with
  ``gp_importance_scale`` the basis with a ``(k,)`` importance beside it), plus a JSON header written as safetensors
  writes it (``GPMemory.layout`` and ``metadata`` themselves, on meta tensors);
* adapter file: PEFT's ``adapter_model.safetensors`` (its state dict, in the adapter parameters' own dtype; prefix and
  prompt tuning: the prompt encoder's output, ``plan_adapter``);
* memory update: the float64 ``d × d`` Gram matrix of every distinct input, in passes over the task's sample whose
  Grams fit ``gp_update_budget_gb`` (``wiring.passes``); per pass its Grams, its widest eigendecomposition
  (``core.maths.grow_basis``: about ``5 d²`` float64 measured on CPU) and its new float32 bases (``plan_update``);
* ``gp_max_basis_rank``: no basis wider than its cap, in the file, on the device and in the projection's FLOPs;
* ``gp_sketch_above``: a sketched input holds a ``2ℓ × d`` float64 sketch and an SVD of it, not a Gram and its eigh;
* projection: per optimizer step and group, ``(G M) Mᵀ`` costs ``4 · rows · d · k`` FLOPs, twice in ``"update"``
  mode (the gradient and the step); the bases stay on the device in float32 during training, one copy per shared
  basis.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields

import torch

from .continual.paradigms import PARADIGMS
from .core.peft_utils import unwrap_peft_model
from .plan_adapter import adapter_tensors, plan_peft_config, wired_model
from .plan_sources import (
    MODEL_CLASSES,
    PlanError,
    infer_task_type,
    load_model_config,
    safetensors_bytes,
    shared_inputs,
)
from .plan_update import held_bytes, update_cost
from .wiring.gp_settings import rank_caps
from .wiring.memory import GPMemory
from .wiring.sketches import sketch_rows
from .wiring.state import get_state

__all__ = ["GPPlan", "LayerPlan", "PlanError", "plan", "plan_peft_model", "safetensors_bytes"]
BASIS_BYTES = 4  # float32 bases (wiring.memory, wiring.units)
ALWAYS_SHOWN = ("peft_type", "task_type", "r", "target_modules", "bottleneck_size", "num_virtual_tokens")
FACTOR = re.compile(r"(\.(lora_[A-Za-z_]+|gp_adapter_\w+|(key|value)_prefix|head\d+|block\d+))+$")


@dataclass
class LayerPlan:
    """The cost of one adapted layer (all its projected groups); sizes in bytes, FLOPs per optimizer step."""

    name: str
    groups: list[str]
    dims: list[int]
    adapter_params: int = 0
    memory_bytes_full: int = 0
    memory_bytes_worst: int = 0
    memory_bytes: int = 0
    gram_bytes: int = 0
    projection_flops_full: int = 0
    projection_flops: int = 0
    shared: dict[str, str] = field(default_factory=dict)  # group -> the group whose Gram and basis it shares


@dataclass
class GPPlan:
    """What GP costs on one model: per layer and in total (bytes, FLOPs per optimizer step).

    ``fill`` is the share of each basis assumed filled (``None``: a per-group mapping was given); ``*_full``: every
    basis full (the most FLOPs and device memory; the memory file then holds flags, not matrices); ``*_worst``: the
    memory file at its largest, every basis half full (the smaller of basis and complement is stored; with
    ``gp_importance_scale`` the bases themselves, largest when full). ``update_peak_bytes`` is an estimate (see the
    module docstring); the other sizes are what peft_gp writes and allocates today.
    """

    source: str
    model_type: str
    paradigm: str
    task_type: str | None
    fill: float | None
    gp_projection: str
    peft_config: dict
    layers: list[LayerPlan]
    adapter_params: int
    adapter_file_bytes: int
    memory_file_bytes_full: int
    memory_file_bytes_worst: int
    memory_file_bytes: int
    update_gram_bytes: int
    update_passes: int
    update_pass_gram_bytes: int
    update_peak_bytes_full: int
    update_peak_bytes: int
    projection_flops_full: int
    projection_flops: int
    device_basis_bytes_full: int
    device_basis_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


def _fills(names: list[str], fill: float | Mapping[str, float]) -> dict[str, float]:
    shares = dict(fill) if isinstance(fill, Mapping) else dict.fromkeys(names, fill)
    missing = sorted(set(names) - set(shares))
    if missing:
        raise PlanError(f"fill gives no share for the projected groups {missing[:4]}: give one for every group.")
    for name, share in shares.items():
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
            raise PlanError(f"fill must be a number in [0, 1] (share of each basis filled; 1 = worst case), got "
                            f"{share!r}{'' if not isinstance(fill, Mapping) else f' for {name!r}'}.")  # fmt: skip
    return shares


def layer_of(group_name: str) -> str:
    """The adapted layer a group belongs to: its name without the factor (``….q_proj.lora_A`` -> ``….q_proj``)."""
    return FACTOR.sub("", group_name) or group_name


def stored_width(k: int, dim: int, scaled: bool) -> int:
    """Columns the memory file holds for a ``(dim, k)`` basis: the smaller of the basis and its complement
    (``wiring.memory.compact_form``), the basis itself when it carries SGP importances."""
    return k if scaled or 2 * k <= dim else dim - k


def _memory_file_bytes(state, owners: dict[str, str], ks: dict[str, int], threshold: float, scaled: bool) -> int:
    """The size of ``gp_memory.safetensors`` with one task stored and these basis widths (``save_pretrained``'s): the
    memory's own ``layout`` and ``metadata`` of meta tensors, groups of one class holding one tensor, a basis filling
    more than half its space held with its complement."""
    dims = state.memory.dims
    held = {name: torch.empty(dims[name], ks[name], device="meta") for name in set(owners.values())}
    weights = {name: torch.empty(ks[name], device="meta") for name in held} if scaled else {}
    compact = {name: (basis, torch.empty(dims[name], dims[name] - ks[name], device="meta"))
               for name, basis in held.items() if stored_width(ks[name], dims[name], scaled) != ks[name]}  # fmt: skip
    memory = GPMemory(dims=dict(dims), thresholds=[threshold],
                      bases={name: held[owner] for name, owner in owners.items()},
                      importances={name: weights[owner] for name, owner in owners.items()} if scaled else {},
                      complements={name: compact[owner] for name, owner in owners.items() if owner in compact},
                      info={**state.memory.info, "last_task_fingerprint": "0" * 64})  # fmt: skip
    tensors, _, _ = memory.layout()
    shapes = {name: (tuple(tensor.shape), torch.float32) for name, tensor in tensors.items()}
    return safetensors_bytes(shapes, memory.metadata(adapter_sha256="0" * 64))


def _owners(peft_model, state) -> dict[str, str]:
    """Each group's owner: the first group (in the model's order) of those that read the same inputs, whose Gram
    matrix and basis they share (``plan_sources.shared_inputs``)."""
    order = {group.name: position for position, group in enumerate(state.groups)}
    owners = {}
    for members in shared_inputs(peft_model, state.groups):
        owner = min(members, key=order.__getitem__)
        owners.update(dict.fromkeys(members, owner))
    return owners


def _adapter_params(group, layer: LayerPlan, seen: set) -> None:
    for param, view in ((group.weight, group.view), (group.bias, group.bias_view)):
        key = (id(param), str(group.index), str(group.bias_index))
        if param is not None and key not in seen:
            seen.add(key)
            layer.adapter_params += view(param).numel()


def plan_peft_model(model, fill: float | Mapping[str, float] = 1.0, adapter_name: str | None = None) -> GPPlan:
    """The plan of a PEFT model already built from a GP config (on the meta device or with weights).

    ``fill``: share of each basis assumed filled, in [0, 1], or a mapping from projected-group name to share (groups
    sharing a basis take their first group's share).
    """
    peft_model = unwrap_peft_model(model)
    adapter_name = adapter_name or peft_model.active_adapter
    config, state = peft_model.peft_config[adapter_name], get_state(peft_model, adapter_name)
    shares = _fills([g.name for g in state.groups], fill)
    owners = _owners(peft_model, state)
    caps: dict[str, int] = {}  # per owner, the smallest cap of the groups sharing its basis (GPMemory.grow)
    for name, cap in rank_caps(list(owners), config.gp_max_basis_rank).items():
        caps[owners[name]] = min(caps.get(owners[name], 1 << 62), cap or 1 << 62)
    ks_full = {g.name: 0 if g.frozen else min(g.dim, caps[owners[g.name]]) for g in state.groups}
    ks = {g.name: min(ks_full[g.name], round(shares[owners[g.name]] * g.dim)) for g in state.groups}
    scaled = config.gp_importance_scale is not None  # SGP: a (k,) importance beside each basis, never a complement
    ks_worst = {name: k if scaled or 2 * k < memory_dim else memory_dim // 2
                for name, k, memory_dim in ((g.name, ks_full[g.name], g.dim) for g in state.groups)}  # fmt: skip
    update = 2 if config.gp_projection == "update" else 1
    sketched = sketch_rows(state.groups, config.gp_sketch_above, config.gp_sketch_rows)
    layers: dict[str, LayerPlan] = {}
    seen: set = set()
    for group in state.groups:
        layer = layers.setdefault(layer_of(group.name), LayerPlan(layer_of(group.name), [], []))
        rows = group.view(group.weight).shape[0] if group.weight.dim() > 1 else 1
        _adapter_params(group, layer, seen)
        layer.groups.append(group.name)
        layer.dims.append(group.dim)
        layer.projection_flops_full += 4 * update * rows * group.dim * ks_full[group.name]
        layer.projection_flops += 4 * update * rows * group.dim * ks[group.name]
        if owners[group.name] != group.name:  # its Gram and basis are its owner's
            layer.shared[group.name] = owners[group.name]
            continue
        for field_name, widths in (("memory_bytes_full", ks_full), ("memory_bytes_worst", ks_worst),
                                   ("memory_bytes", ks)):  # fmt: skip
            k = widths[group.name]
            stored = stored_width(k, group.dim, scaled) * group.dim + (k if scaled else 0)
            setattr(layer, field_name, getattr(layer, field_name) + stored * BASIS_BYTES)
        layer.gram_bytes += held_bytes(group.dim, sketched.get(group.name))
    widths = (owners, ks, ks_full, ks_worst)
    return _totals(peft_model, adapter_name, state, list(layers.values()), widths, fill)


def _totals(peft_model, adapter_name, state, layers, widths, fill) -> GPPlan:
    owners, ks, ks_full, ks_worst = widths
    config = peft_model.peft_config[adapter_name]
    update = update_cost(state.groups, owners, (ks_full, ks), config)
    adapter = adapter_tensors(peft_model, adapter_name)
    held = [name for name in owners if owners[name] == name]  # one device copy per shared basis (wiring.units)
    dims = state.memory.dims
    bases_full, bases = (sum(dims[n] * ks_full[n] * BASIS_BYTES for n in held),
                         sum(dims[n] * ks[n] * BASIS_BYTES for n in held))  # fmt: skip
    threshold, scaled = float(config.gp_threshold), config.gp_importance_scale is not None
    base_config = getattr(peft_model.get_base_model(), "config", None)
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    task_type = getattr(config, "task_type", None)
    defaults = {f.name: f.default for f in fields(config) if f.default is not MISSING}
    options = {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.to_dict().items()
               if k in ALWAYS_SHOWN or k.startswith("gp_") or v != defaults.get(k, v)}  # fmt: skip
    return GPPlan(
        source=str(getattr(base_config, "_name_or_path", "") or ""),
        model_type=str(getattr(base_config, "model_type", "") or ""),
        paradigm={"LORA": "lora", "PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt"}.get(peft_type, "adapter"),
        task_type=str(getattr(task_type, "value", task_type)) if task_type else None,
        fill=None if isinstance(fill, Mapping) else float(fill),
        gp_projection=config.gp_projection,
        peft_config=json.loads(json.dumps(options, default=str)),
        layers=layers,
        adapter_params=sum(torch.Size(shape).numel() for shape, _ in adapter.values()),
        adapter_file_bytes=safetensors_bytes(adapter, {"format": "pt"}),
        memory_file_bytes_full=_memory_file_bytes(state, owners, ks_full, threshold, scaled),
        memory_file_bytes_worst=_memory_file_bytes(state, owners, ks_worst, threshold, scaled),
        memory_file_bytes=_memory_file_bytes(state, owners, ks, threshold, scaled),
        update_gram_bytes=update.gram_bytes,
        update_passes=update.passes,
        update_pass_gram_bytes=update.pass_gram_bytes,
        update_peak_bytes_full=update.peak_bytes_full,
        update_peak_bytes=update.peak_bytes,
        projection_flops_full=sum(layer.projection_flops_full for layer in layers),
        projection_flops=sum(layer.projection_flops for layer in layers),
        device_basis_bytes_full=bases_full,
        device_basis_bytes=bases,
    )


def plan(
    config_source: str,
    paradigm: str = "lora",
    fill: float | Mapping[str, float] = 0.5,
    task_type: str | None = "auto",
    gp: Mapping | None = None,
    **options,
) -> GPPlan:
    """Plan GP on the model of ``config_source`` (``config.json``, a folder holding one, or a Hub id) without weights.

    Args:
        config_source: where the model's config is.
        paradigm: ``lora``, ``adapter``, ``prefix`` or ``prompt``.
        fill: share of each basis assumed filled, in [0, 1] (1: the worst case); or one share per projected group.
        task_type: the PEFT task type (``CAUSAL_LM``, ``SEQ_CLS``, ...; ``None``: the bare model; ``"auto"``: from
            the config's ``architectures``).
        gp: the ``gp_*`` settings (``gp_threshold``, ``gp_projection``, ...).
        options: the paradigm config's own arguments (LoRA: ``r``, ``target_modules`` such as ``"all-linear"``, ...);
            ``gp_*`` ones join ``gp``.
    """
    if paradigm not in PARADIGMS:
        raise PlanError(f"Unknown paradigm {paradigm!r}: peft-gp plan knows {sorted(PARADIGMS)}.")
    if not isinstance(fill, Mapping):
        _fills(["fill"], fill)
    config = load_model_config(config_source)
    task_type = infer_task_type(config) if task_type == "auto" else task_type
    if task_type not in MODEL_CLASSES:
        raise PlanError(f"task_type must be one of {sorted(str(k) for k in MODEL_CLASSES)}, got {task_type!r}.")
    gp = {**(gp or {}), **{name: options.pop(name) for name in list(options) if name.startswith("gp_")}}
    peft_config = plan_peft_config(paradigm, options, gp, task_type)
    model = wired_model(config, paradigm, peft_config, task_type, {**options, **gp})
    result = plan_peft_model(model, fill)
    result.source = config_source
    return result
