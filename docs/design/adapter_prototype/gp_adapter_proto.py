"""Prototype: bottleneck adapter (parallel / sequential) as a new PEFT 0.21.2 tuner type.

REG_MODE env var picks the registration strategy:
  own_enum    (default) separate str-Enum member used as key in PEFT's mapping dicts (no PEFT internals touched)
  extend_enum inject a member into peft's PeftType, then call peft's own register_peft_method
"""
from __future__ import annotations

import enum, os, re, warnings
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _get_submodules
from peft.utils import PeftType

REG_MODE = os.environ.get("REG_MODE", "own_enum")
# The string written into adapter_config.json. Without peft_gp imported, PEFT does
# PEFT_TYPE_TO_CONFIG_MAPPING[<this string>] -> KeyError(<this string>), so the string IS the error message.
GP_ADAPTER_VALUE = os.environ.get("GP_VALUE", "GP_ADAPTER")


if REG_MODE == "own_enum":
    class GPPeftType(str, enum.Enum):
        GP_ADAPTER = GP_ADAPTER_VALUE
        # Enum.__hash__ hashes the *name*; make it hash like the plain str so dict lookups with the json string work
        # even when name != value.
        __hash__ = str.__hash__
    GP_ADAPTER = GPPeftType.GP_ADAPTER
else:
    def _extend_peft_type(name: str, value: str):
        if value in PeftType._value2member_map_:
            return PeftType._value2member_map_[value]
        member = str.__new__(PeftType, value)
        member._name_, member._value_ = name, value
        member.__objclass__ = PeftType
        type.__setattr__(PeftType, name, member)        # bypass EnumType.__setattr__
        PeftType._member_map_[name] = member
        PeftType._value2member_map_[value] = member
        PeftType._member_names_.append(name)
        return member
    GP_ADAPTER = _extend_peft_type("GP_ADAPTER", GP_ADAPTER_VALUE)

PREFIX = "gp_adapter_"

# ---- default targets: model_type -> (target regex/suffix list, parallel input/injection mode) ----------------------
# "mlp" = whole feed-forward block (input = its first arg, add delta to its output)
# BERT-like post-LN: wrap BertOutput(hidden, input_tensor) and add the delta to the residual arg `input_tensor`
#   -> LN(dense(h) + x + s*A(x)), i.e. He et al. 2022 parallel adapter; sequential variant wraps output.dense.
DEFAULT_TARGETS = {
    "parallel": {
        "bert": r".*\.layer\.\d+\.output", "roberta": r".*\.layer\.\d+\.output",
        "vit": ["mlp"], "gpt2": ["mlp"], "llama": ["mlp"], "mistral": ["mlp"], "qwen2": ["mlp"],
    },
    "sequential": {
        "bert": r".*\.layer\.\d+\.output\.dense", "roberta": r".*\.layer\.\d+\.output\.dense",
        "vit": ["mlp"], "gpt2": ["mlp"], "llama": ["mlp"], "mistral": ["mlp"], "qwen2": ["mlp"],
    },
}
RESIDUAL_ARG = {"BertOutput": ("input_tensor", 1), "RobertaOutput": ("input_tensor", 1)}


@dataclass
class GPAdapterConfig(PeftConfig):
    target_modules: Optional[Union[list[str], str]] = field(default=None)
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    bottleneck_dim: int = field(default=16)
    adapter_style: str = field(default="parallel")  # "parallel" (AdaptFormer) | "sequential" (Houlsby)
    scaling: float = field(default=0.1)
    adapter_dropout: float = field(default=0.0)
    init_weights: bool = field(default=True)  # True: up-proj zero -> identity at init
    modules_to_save: Optional[list[str]] = field(default=None)
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None)
    layers_pattern: Optional[Union[list[str], str]] = field(default=None)
    target_parameters: Optional[list[str]] = field(default=None)  # accessed unguarded by check_target_module_exists

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = GP_ADAPTER
        if self.adapter_style not in ("parallel", "sequential"):
            raise ValueError(f"adapter_style must be 'parallel' or 'sequential', got {self.adapter_style!r}")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)


def _hidden_size(model_config, base_layer):
    for m in reversed(list(base_layer.modules())):  # last linear-like output (fc2/down_proj/c_proj/dense)
        if isinstance(m, nn.Linear):
            return m.out_features
        if type(m).__name__ == "Conv1D":
            return m.nf
    return getattr(model_config, "hidden_size")


class GPAdapterLayer(nn.Module, BaseTunerLayer):
    adapter_layer_names = ("gp_adapter_down", "gp_adapter_up")
    other_param_names = ("gp_adapter_scaling",)

    def __init__(self, base_layer, adapter_name, config, hidden_size):
        super().__init__()
        self.base_layer = base_layer
        self.gp_adapter_down = nn.ModuleDict()
        self.gp_adapter_up = nn.ModuleDict()
        self.gp_adapter_dropout = nn.ModuleDict()
        self.gp_adapter_scaling = {}
        self.style = config.adapter_style
        self.residual_arg = RESIDUAL_ARG.get(type(base_layer).__name__) if self.style == "parallel" else None
        self.hidden_size = hidden_size
        self._active_adapter = adapter_name
        self.merged_adapters = []
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name, config):
        self.gp_adapter_down[adapter_name] = nn.Linear(self.hidden_size, config.bottleneck_dim)
        self.gp_adapter_up[adapter_name] = nn.Linear(config.bottleneck_dim, self.hidden_size)
        self.gp_adapter_dropout[adapter_name] = nn.Dropout(config.adapter_dropout) if config.adapter_dropout else nn.Identity()
        self.gp_adapter_scaling[adapter_name] = config.scaling
        if config.init_weights:
            nn.init.zeros_(self.gp_adapter_up[adapter_name].weight); nn.init.zeros_(self.gp_adapter_up[adapter_name].bias)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _delta(self, x):
        out = 0
        for name in self.active_adapters:
            if name not in self.gp_adapter_down:
                continue
            h = torch.relu(self.gp_adapter_down[name](x.to(self.gp_adapter_down[name].weight.dtype)))
            out = out + self.gp_adapter_scaling[name] * self.gp_adapter_up[name](self.gp_adapter_dropout[name](h))
        return out

    def merge(self, *a, **k):
        raise NotImplementedError("bottleneck adapters are non-linear and cannot be merged")

    def unmerge(self):
        pass

    def forward(self, *args, **kwargs):
        if self.disable_adapters:
            return self.base_layer(*args, **kwargs)
        if self.style == "parallel":
            if self.residual_arg is not None:  # BERT-like: inject into the residual stream before the LayerNorm
                kw, pos = self.residual_arg
                if kw in kwargs:
                    kwargs[kw] = kwargs[kw] + self._delta(kwargs[kw]).to(kwargs[kw].dtype)
                else:
                    args = list(args); args[pos] = args[pos] + self._delta(args[pos]).to(args[pos].dtype)
                return self.base_layer(*args, **kwargs)
            x = args[0] if args else kwargs["hidden_states"]
            out = self.base_layer(*args, **kwargs)
            y = out[0] if isinstance(out, tuple) else out
            y = y + self._delta(x).to(y.dtype)
            return (y,) + tuple(out[1:]) if isinstance(out, tuple) else y
        out = self.base_layer(*args, **kwargs)  # sequential (Houlsby): y + A(y)
        y = out[0] if isinstance(out, tuple) else out
        y = y + self._delta(y).to(y.dtype)
        return (y,) + tuple(out[1:]) if isinstance(out, tuple) else y


class GPAdapterModel(BaseTuner):
    prefix = PREFIX
    tuner_layer_cls = GPAdapterLayer
    target_module_mapping = {}  # resolved per style in _prepare_adapter_config

    def _prepare_adapter_config(self, peft_config, model_config):
        if peft_config.target_modules is None:
            t = DEFAULT_TARGETS[peft_config.adapter_style].get(model_config.get("model_type"))
            if t is None:
                raise ValueError(f"GPAdapterConfig: no default feed-forward target for model_type "
                                 f"{model_config.get('model_type')!r}; pass target_modules=...")
            peft_config.target_modules = t if isinstance(t, str) else set(t)
        return peft_config

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kw):
        if isinstance(target, GPAdapterLayer):
            target.update_layer(adapter_name, peft_config)
            return
        new = GPAdapterLayer(target, adapter_name, peft_config, _hidden_size(getattr(self.model, "config", None), target))
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)
        self._replace_module(parent, target_name, new, target)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge:
            raise NotImplementedError("bottleneck adapters cannot be merged; use unload()")
        for key in [k for k, _ in self.model.named_modules() if self.prefix not in k]:
            try:
                parent, target, name = _get_submodules(self.model, key)
            except AttributeError:
                continue
            if isinstance(target, GPAdapterLayer):
                setattr(parent, name, target.get_base_layer())
        return self.model


# ---- registration --------------------------------------------------------------------------------------------------
def register():
    from peft import mapping
    if GP_ADAPTER in mapping.PEFT_TYPE_TO_TUNER_MAPPING:
        return
    if REG_MODE == "own_enum":
        mapping.PEFT_TYPE_TO_CONFIG_MAPPING[GP_ADAPTER] = GPAdapterConfig
        mapping.PEFT_TYPE_TO_TUNER_MAPPING[GP_ADAPTER] = GPAdapterModel
        mapping.PEFT_TYPE_TO_PREFIX_MAPPING[GP_ADAPTER] = PREFIX
    else:
        from peft.utils import register_peft_method
        register_peft_method(name="gp_adapter", config_cls=GPAdapterConfig, model_cls=GPAdapterModel, prefix=PREFIX)


register()
