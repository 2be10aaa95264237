"""``peft_gp.get_peft_model``: PEFT's ``get_peft_model`` plus the GP wiring, ready before the first forward.

``peft.get_peft_model(model, GPLoraConfig(...))`` works as it is for LoRA, the bottleneck adapter and prompt tuning:
peft_gp wires the adapter (its ``GPState``) the first time it sees the model. Prefix tuning needs peft_gp before
any forward on the models where PEFT's own prefix route fails (BERT-like encoders, ViT, Llama sequence
classification), and PEFT cannot build a prefix at all on a model without a vocabulary (ViT): this function does
both, without touching PEFT's classes.
"""

from __future__ import annotations

import peft
from peft import PeftConfig, PeftModel
from torch import nn

from .attention import vocabulary_for_prefix
from .config import is_gp_config
from .state import get_state


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", **kwargs) -> PeftModel:
    """``peft.get_peft_model`` for a GP config, with the adapter's GP state (and prefix route) set up at once.

    ``kwargs`` go to ``peft.get_peft_model`` (``mixed``, ``autocast_adapter_dtype``, ``revision``, ...).
    """
    if not is_gp_config(peft_config):
        raise TypeError(
            f"peft_gp.get_peft_model builds adapters from GP configs, got {type(peft_config).__name__}: use "
            "GPLoraConfig, GPAdapterConfig, GPPrefixTuningConfig or GPPromptTuningConfig (or peft.get_peft_model)."
        )
    with vocabulary_for_prefix(model, peft_config):
        peft_model = peft.get_peft_model(model, peft_config, adapter_name=adapter_name, **kwargs)
    get_state(peft_model, adapter_name)
    return peft_model
