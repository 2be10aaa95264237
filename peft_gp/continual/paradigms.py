"""Which PEFT method a run uses: a name -> config factory mapping, easy to extend.

A factory takes the run's ``paradigm_kwargs`` (the PEFT config's own arguments), the GP settings (a dict of ``gp_*``
fields, or ``None`` for the baseline without gradient projection), and the task type, and returns the PEFT config.
The baseline is trained with a plain ``transformers.Trainer``: no projection and no memory, whatever the config.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import peft
from peft import LoraConfig, PeftConfig, PeftModel, PromptTuningConfig
from torch import nn

from ..wiring.build import get_peft_model
from ..wiring.config import (
    GPAdapterConfig,
    GPConfigMixin,
    GPLoraConfig,
    GPPrefixTuningConfig,
    GPPromptTuningConfig,
)
from .run_checks import RunConfigError

ParadigmFactory = Callable[[dict[str, Any], "dict[str, Any] | None", "str | None"], PeftConfig]


def build_peft_model(model: nn.Module, peft_config: PeftConfig) -> PeftModel:
    """``peft_gp.get_peft_model`` for a GP config (its wiring in place before any forward), PEFT's own otherwise."""
    if isinstance(peft_config, GPConfigMixin):
        return get_peft_model(model, peft_config)
    return peft.get_peft_model(model, peft_config)


LORA_DEFAULTS = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}
ADAPTER_WIDTH = GPAdapterConfig.__dataclass_fields__["bottleneck_size"].default


def lora_config(options: dict[str, Any], gp: dict[str, Any] | None, task_type: str | None) -> PeftConfig:
    """``GPLoraConfig`` with GP, plain PEFT ``LoraConfig`` without; ``LORA_DEFAULTS`` unless ``options`` say
    otherwise (``target_modules`` default: PEFT's own for the model type)."""
    kwargs = {"task_type": task_type, **LORA_DEFAULTS, **options}
    return GPLoraConfig(**kwargs, **gp) if gp is not None else LoraConfig(**kwargs)


def _paired(gp_class: type, plain_class: type | None) -> ParadigmFactory:
    """``gp_class`` with GP; without, ``plain_class`` (PEFT's own) or, where PEFT has none, ``gp_class`` itself (the
    baseline then trains the same config with a plain ``Trainer``: no memory, no projection)."""

    def factory(options: dict[str, Any], gp: dict[str, Any] | None, task_type: str | None) -> PeftConfig:
        kwargs = {"task_type": task_type, **options} if task_type else dict(options)
        if gp is None and plain_class is not None:
            return plain_class(**kwargs)
        return gp_class(**kwargs, **(gp or {}))

    factory.__doc__ = f"``peft_gp.{gp_class.__name__}`` with GP; the baseline's config without it."
    return factory


PARADIGMS: dict[str, ParadigmFactory] = {
    "lora": lora_config,
    "adapter": _paired(GPAdapterConfig, None),  # PEFT has no bottleneck adapter
    # PEFT's own prefix tuning fails on BERT-like encoders with transformers 5: the baseline uses peft_gp's route
    "prefix": _paired(GPPrefixTuningConfig, None),
    "prompt": _paired(GPPromptTuningConfig, PromptTuningConfig),
}
"""Paradigm name -> config factory. Register a new one with ``PARADIGMS["name"] = factory``."""


def widened(paradigm: str, options: dict[str, Any], slices: int) -> dict[str, Any]:
    """The options of a GP run with ``gp_task_slices``: ``slices`` slices each as wide as the run's rank (LoRA, with
    ``lora_alpha`` scaled alike so that ``lora_alpha / r`` stays) or bottleneck (the adapter)."""
    if paradigm == "lora":
        defaults = {**LORA_DEFAULTS, **options}
        return {**options, "r": defaults["r"] * slices, "lora_alpha": defaults["lora_alpha"] * slices}
    if paradigm == "adapter":
        return {**options, "bottleneck_size": options.get("bottleneck_size", ADAPTER_WIDTH) * slices}
    raise RunConfigError(f"gp_task_slices is a LoRA and adapter option, not {paradigm!r}'s.")


def make_peft_config(
    paradigm: str, options: dict[str, Any], gp: dict[str, Any] | None, task_type: str | None
) -> PeftConfig:
    """The PEFT config of ``paradigm``; an unknown name fails with the known ones."""
    if paradigm not in PARADIGMS:
        import difflib

        close = difflib.get_close_matches(paradigm, list(PARADIGMS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RunConfigError(f"Unknown paradigm {paradigm!r}.{hint} Known: {sorted(PARADIGMS)}.")
    slices = (gp or {}).get("gp_task_slices")
    options = widened(paradigm, options, slices) if slices else dict(options)
    try:
        return PARADIGMS[paradigm](options, gp, task_type)
    except TypeError as error:  # an unknown keyword in paradigm_kwargs
        raise RunConfigError(f"paradigm_kwargs do not fit the {paradigm!r} config: {error}") from error
    except ValueError as error:  # a value the config's own validation refuses (gp_threshold=2, say)
        raise RunConfigError(f"The {paradigm!r} config refused the run's settings: {error}") from error
