"""A bottleneck adapter as a PEFT tuner: ``h = f(x) + s·W_up act(W_down x)`` (parallel) or ``y + s·A(y)`` (sequential).

PEFT 0.21 has no bottleneck adapter, and ``peft.register_peft_method`` only accepts names already in ``PeftType``, so
the tuner registers itself under its own ``str`` enum member in PEFT's public type registries (the
``peft.mapping.PEFT_TYPE_TO_*`` dicts that ``register_peft_method`` fills). ``adapter_config.json`` stores the stable
``peft_type`` ``"GP_ADAPTER"``; adapters saved by peft_gp 0.1.0 under its longer name still load.
"""

from __future__ import annotations

import enum
import inspect
from dataclasses import dataclass, field
from typing import Literal

import torch
from peft import mapping
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn
from transformers.activations import ACT2FN
from transformers.pytorch_utils import Conv1D


class GPPeftType(str, enum.Enum):
    """PEFT types that peft_gp adds; the value is stored in ``adapter_config.json``."""

    GP_ADAPTER = "GP_ADAPTER"

    # Enum hashes the member *name*; PEFT looks the JSON string up in its dicts, so hash like that string instead.
    __hash__ = str.__hash__

    def __str__(self) -> str:
        return self.value


LEGACY_PEFT_TYPES = ("GP_ADAPTER (requires peft_gp: pip install peft_gp, then import peft_gp)",)  # peft_gp 0.1.0
ADAPTER_STYLES = ("parallel", "sequential")
BOTTLENECK_PREFIX = "gp_adapter_"

# Each layer's feed-forward block, per model type. BERT-like models get their FFN output module
# (``BertOutput(h, input_tensor) = LN(dense(h) + input_tensor)``): the parallel adapter reads the FFN's input from the
# residual argument and adds its output there, before the LayerNorm (He et al. 2022); the sequential one wraps
# ``output.dense`` (Houlsby et al. 2019: after the FFN projection, before residual and LayerNorm).
_BERT_LIKE = ("bert", "roberta", "xlm-roberta", "electra", "camembert", "distilroberta")
_MLP_BLOCK = ("vit", "gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "granite")
DEFAULT_TARGET_MODULES: dict[str, dict[str, str | list[str]]] = {
    "parallel": {
        **{model_type: r".*\.layer\.\d+\.output" for model_type in _BERT_LIKE},
        **{model_type: ["mlp"] for model_type in _MLP_BLOCK},
        "t5": ["DenseReluDense"],
    },
    "sequential": {
        **{model_type: r".*\.layer\.\d+\.output\.dense" for model_type in _BERT_LIKE},
        **{model_type: ["mlp"] for model_type in _MLP_BLOCK},
        "t5": ["DenseReluDense"],
    },
}


@dataclass
class BottleneckConfig(PeftConfig):
    """Settings of the bottleneck adapter (see ``peft_gp.GPAdapterConfig`` for the class to use).

    Args:
        bottleneck_size: width ``r`` of the bottleneck.
        adapter_style: ``"parallel"`` (AdaptFormer, He et al. 2022: beside the target, reading its input) or
            ``"sequential"`` (Houlsby et al. 2019: after the target, reading its output).
        target_modules: modules to adapt; ``None`` picks each layer's feed-forward block for BERT-, ViT-, GPT-2-,
            Llama- and T5-style models. A list matches name suffixes, a string is a full-match regex (as in PEFT).
        activation: bottleneck non-linearity, a key of ``transformers.activations.ACT2FN`` (``relu``, ``gelu``, ...).
        scaling: factor ``s`` on the adapter's output (AdaptFormer uses 0.1).
        adapter_dropout: dropout on the bottleneck activations during training.
        adapter_bias: give both projections a bias.
        init_weights: zero the up-projection, so the adapted model starts equal to the base model.
        exclude_modules, layers_to_transform, layers_pattern, modules_to_save: as in PEFT's other configs.
    """

    bottleneck_size: int = field(default=16, metadata={"help": "Width r of the bottleneck."})
    adapter_style: Literal["parallel", "sequential"] = field(
        default="parallel", metadata={"help": "'parallel' (AdaptFormer) or 'sequential' (Houlsby)."}
    )
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules to adapt; None: each layer's feed-forward block."}
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules not to adapt."})
    activation: str = field(default="relu", metadata={"help": "Bottleneck activation (a key of ACT2FN)."})
    scaling: float = field(default=1.0, metadata={"help": "Factor on the adapter output (AdaptFormer: 0.1)."})
    adapter_dropout: float = field(default=0.0, metadata={"help": "Dropout on the bottleneck activations."})
    adapter_bias: bool = field(default=True, metadata={"help": "Biases on both projections."})
    init_weights: bool = field(default=True, metadata={"help": "Zero up-projection: identity at the start."})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained and saved in full."})
    target_parameters: list[str] | None = field(default=None, metadata={"help": "Unused (PEFT reads the field)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = GPPeftType.GP_ADAPTER
        if self.adapter_style not in ADAPTER_STYLES:
            raise ValueError(f"adapter_style must be one of {ADAPTER_STYLES}, got {self.adapter_style!r}.")
        if isinstance(self.bottleneck_size, bool) or not isinstance(self.bottleneck_size, int):
            raise TypeError(f"bottleneck_size must be a positive integer, got {self.bottleneck_size!r}.")
        if self.bottleneck_size < 1:
            raise ValueError(f"bottleneck_size must be at least 1, got {self.bottleneck_size}.")
        if self.activation not in ACT2FN:
            raise ValueError(f"Unknown activation {self.activation!r}; use one of {sorted(ACT2FN)}.")
        if not 0.0 <= self.adapter_dropout < 1.0:
            raise ValueError(f"adapter_dropout must be in [0, 1), got {self.adapter_dropout}.")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return tuple(module.weight.shape)
    return None


def _residual_argument(module: nn.Module) -> tuple[str, int] | None:
    """``("input_tensor", i)`` for BERT-style FFN output modules ``forward(hidden_states, input_tensor)``."""
    parameters = list(inspect.signature(module.forward).parameters)
    return ("input_tensor", parameters.index("input_tensor")) if "input_tensor" in parameters else None


def _adapter_dims(target: nn.Module, style: str, residual: tuple[str, int] | None) -> tuple[int, int]:
    """(input width, output width) of the adapter beside or after ``target``."""
    own = _linear_shape(target)
    linears = [shape for shape in map(_linear_shape, target.modules()) if shape is not None]
    if not linears:
        raise ValueError(
            f"Cannot tell the hidden size of {type(target).__name__}: it holds no nn.Linear or Conv1D. Target the "
            "feed-forward block (or one of its linear layers) instead."
        )
    out_width = (own or linears[-1])[1]
    if style == "sequential" or residual is not None:
        return out_width, out_width
    return (own or linears[0])[0], out_width


class BottleneckLayer(nn.Module, BaseTunerLayer):
    """Wraps a target module and adds ``s·up(dropout(act(down(x))))`` beside it (parallel) or after it (sequential).

    ``down`` and ``up`` are ``nn.Linear`` so that gradient projection finds their inputs with forward hooks.
    """

    adapter_layer_names = ("gp_adapter_down", "gp_adapter_up")
    other_param_names = ("gp_adapter_scaling", "gp_adapter_act", "gp_adapter_dropout")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: BottleneckConfig):
        super().__init__()
        self.base_layer = base_layer
        self.gp_adapter_down = nn.ModuleDict()
        self.gp_adapter_up = nn.ModuleDict()
        self.gp_adapter_act = nn.ModuleDict()
        self.gp_adapter_dropout = nn.ModuleDict()
        self.gp_adapter_scaling: dict[str, float] = {}
        self.adapter_style = config.adapter_style
        self.residual_argument = _residual_argument(base_layer) if config.adapter_style == "parallel" else None
        self.in_features, self.out_features = _adapter_dims(base_layer, config.adapter_style, self.residual_argument)
        self._active_adapter = adapter_name
        self.merged_adapters: list[str] = []
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: BottleneckConfig) -> None:
        if config.adapter_style != self.adapter_style:
            raise ValueError(
                f"Module already holds a {self.adapter_style} adapter; a {config.adapter_style} one cannot share it."
            )
        down = nn.Linear(self.in_features, config.bottleneck_size, bias=config.adapter_bias)
        up = nn.Linear(config.bottleneck_size, self.out_features, bias=config.adapter_bias)
        if config.init_weights:
            nn.init.zeros_(up.weight)
            if up.bias is not None:
                nn.init.zeros_(up.bias)
        self.gp_adapter_down[adapter_name] = down
        self.gp_adapter_up[adapter_name] = up
        self.gp_adapter_act[adapter_name] = ACT2FN[config.activation]
        self.gp_adapter_dropout[adapter_name] = (
            nn.Dropout(config.adapter_dropout) if config.adapter_dropout > 0 else nn.Identity()
        )
        self.gp_adapter_scaling[adapter_name] = config.scaling
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """Sum of the active adapters' outputs for input ``x`` (``None`` if none is active here)."""
        total = None
        for name in self.active_adapters:
            if name not in self.gp_adapter_down:
                continue
            down = self.gp_adapter_down[name]
            hidden = self.gp_adapter_dropout[name](self.gp_adapter_act[name](down(x.to(down.weight.dtype))))
            out = self.gp_adapter_scaling[name] * self.gp_adapter_up[name](hidden)
            total = out if total is None else total + out
        return total

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError("A bottleneck adapter is non-linear and cannot be merged into the base weights.")

    def unmerge(self) -> None:
        pass

    def forward(self, *args, **kwargs):
        if self.disable_adapters:
            return self.base_layer(*args, **kwargs)
        if self.residual_argument is not None:  # BERT-like FFN output: add to the residual input, before the LN
            keyword, position = self.residual_argument
            args = list(args)
            if keyword in kwargs:
                residual = kwargs[keyword]
            else:
                residual = args[position]
            delta = self.delta(residual)
            if delta is not None:
                residual = residual + delta.to(residual.dtype)
                if keyword in kwargs:
                    kwargs[keyword] = residual
                else:
                    args[position] = residual
            return self.base_layer(*args, **kwargs)
        out = self.base_layer(*args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
        if self.adapter_style == "sequential":
            x = hidden
        elif args:
            x = args[0]
        else:  # called with keywords only: the hidden states by their usual names, else the first keyword
            x = kwargs.get("hidden_states", kwargs.get("x", next(iter(kwargs.values()))))
        delta = self.delta(x)
        if delta is None:
            return out
        hidden = hidden + delta.to(hidden.dtype)
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden


class BottleneckModel(BaseTuner):
    """The PEFT tuner that puts ``BottleneckLayer`` around each target module."""

    prefix = BOTTLENECK_PREFIX
    tuner_layer_cls = BottleneckLayer
    target_module_mapping: dict = {}

    def _prepare_adapter_config(self, peft_config: BottleneckConfig, model_config: dict) -> BottleneckConfig:
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            targets = DEFAULT_TARGET_MODULES[peft_config.adapter_style].get(model_type)
            if targets is None:
                raise ValueError(
                    f"GPAdapterConfig has no default target for model_type {model_type!r}: pass target_modules, for "
                    "example the name of each layer's feed-forward block (target_modules=['mlp'])."
                )
            peft_config.target_modules = targets if isinstance(targets, str) else set(targets)
        return peft_config

    def _create_and_replace(
        self, peft_config, adapter_name, target, target_name, parent, current_key=None, **kwargs
    ) -> None:
        if isinstance(target, BottleneckLayer):
            target.update_layer(adapter_name, peft_config)
            return
        new_module = BottleneckLayer(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        if not isinstance(new_module, BottleneckLayer):  # unloading: put the untouched base module back
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def _check_merge_allowed(self) -> None:
        raise NotImplementedError(
            "A bottleneck adapter is non-linear and cannot be merged into the base weights: use unload() to remove "
            "it, or keep the PEFT model for inference."
        )


def register_bottleneck(config_cls: type[BottleneckConfig]) -> None:
    """Put the bottleneck tuner into PEFT's type registries (idempotent), with ``config_cls`` as its config class."""
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[GPPeftType.GP_ADAPTER] = config_cls
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[GPPeftType.GP_ADAPTER] = BottleneckModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[GPPeftType.GP_ADAPTER] = BOTTLENECK_PREFIX
    for legacy in LEGACY_PEFT_TYPES:  # the config's __post_init__ sets the stable type again
        mapping.PEFT_TYPE_TO_CONFIG_MAPPING[legacy] = config_cls
