"""Which PEFT method a run uses: a name -> config factory mapping, easy to extend.

A factory takes the run's ``paradigm_kwargs`` (the PEFT config's own arguments), the GP settings (a dict of ``gp_*``
fields, or ``None`` for the baseline without gradient projection), and the task type, and returns the PEFT config.
The baseline is trained with a plain ``transformers.Trainer``: no projection and no memory, whatever the config.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from peft import LoraConfig, PeftConfig

import peft_gp

from .config import RunConfigError

ParadigmFactory = Callable[[dict[str, Any], "dict[str, Any] | None", "str | None"], PeftConfig]


LORA_DEFAULTS = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}


def lora_config(options: dict[str, Any], gp: dict[str, Any] | None, task_type: str | None) -> PeftConfig:
    """``GPLoraConfig`` with GP, plain PEFT ``LoraConfig`` without; ``LORA_DEFAULTS`` unless ``options`` say
    otherwise (``target_modules`` default: PEFT's own for the model type)."""
    kwargs = {"task_type": task_type, **LORA_DEFAULTS, **options}
    return peft_gp.GPLoraConfig(**kwargs, **gp) if gp is not None else LoraConfig(**kwargs)


def _gp_only(class_name: str) -> ParadigmFactory:
    """A paradigm whose only config is peft_gp's own (no plain PEFT class): the baseline uses it with ``Trainer``."""

    def factory(options: dict[str, Any], gp: dict[str, Any] | None, task_type: str | None) -> PeftConfig:
        config_class = getattr(peft_gp, class_name)
        kwargs = {"task_type": task_type, **options} if task_type else dict(options)
        return config_class(**kwargs, **(gp or {}))

    factory.__doc__ = f"``peft_gp.{class_name}`` (the baseline trains the same config without projection)."
    return factory


PARADIGMS: dict[str, ParadigmFactory] = {"lora": lora_config}
"""Paradigm name -> config factory. Register a new one with ``PARADIGMS["name"] = factory``."""

for _name, _class in (("adapter", "GPAdapterConfig"), ("prefix", "GPPrefixTuningConfig"), ("prompt",
                      "GPPromptTuningConfig")):  # fmt: skip
    if hasattr(peft_gp, _class):  # added as peft_gp grows these paradigms
        PARADIGMS[_name] = _gp_only(_class)


def make_peft_config(
    paradigm: str, options: dict[str, Any], gp: dict[str, Any] | None, task_type: str | None
) -> PeftConfig:
    """The PEFT config of ``paradigm``; an unknown name fails with the known ones."""
    if paradigm not in PARADIGMS:
        import difflib

        close = difflib.get_close_matches(paradigm, list(PARADIGMS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RunConfigError(f"Unknown paradigm {paradigm!r}.{hint} Known: {sorted(PARADIGMS)}.")
    try:
        return PARADIGMS[paradigm](dict(options), gp, task_type)
    except TypeError as error:  # an unknown keyword in paradigm_kwargs
        raise RunConfigError(f"paradigm_kwargs do not fit the {paradigm!r} config: {error}") from error
    except ValueError as error:  # a value the config's own validation refuses (gp_threshold=2, say)
        raise RunConfigError(f"The {paradigm!r} config refused the run's settings: {error}") from error
