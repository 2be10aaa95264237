"""Prompt tuning (PEGP eq. 1, 10): the prompt rows ``p`` against old input token embeddings and old prompt rows (on a
vision encoder: the class and patch tokens the prompt sits beside, see ``vision_prompt``)."""

from __future__ import annotations

import torch
from peft import PeftModel

from ..groups import FeatureSource, ProjectedGroup
from ..vision_prompt import patch_embeddings


class PromptFeatures(FeatureSource):
    """The rows that sit beside the prompt in the first layer's input, from two sources kept apart: the token
    embeddings of each batch (padding left out), whose basis keeps the energy threshold's share, and the current
    prompt rows, whose span is kept whole (``exact``: at most ``num_virtual_tokens`` directions a task), so that
    ``Δp`` keeps both ``x Δpᵀ = 0`` and ``p_old Δpᵀ = 0``. In one Gram matrix the prompt rows (norm² ≈ d for PEFT's
    N(0, 1) initialisation, against ≈ 1 for token embeddings) would take the whole threshold for themselves."""

    def __init__(self, embeddings: torch.nn.Module, prompt: torch.nn.Parameter, rows: slice, masked: bool = True):
        self.embeddings, self.prompt, self.rows, self.masked = embeddings, prompt, rows, masked

    def attach(self, emit):
        def hook(module, args, output):
            emit(output, self.masked)
            emit(self.prompt.detach()[self.rows].double(), False, True)

        return self.embeddings.register_forward_hook(hook)


def prompt_groups(model: PeftModel, adapter_name: str, config) -> list[ProjectedGroup]:
    base_config = getattr(model.get_base_model(), "config", None)
    if getattr(base_config, "is_encoder_decoder", False) or config.num_transformer_submodules != 1:
        raise NotImplementedError(
            "GPPromptTuningConfig does not support encoder-decoder models (T5, BART) yet: their prompt feeds two "
            "stacks whose token embeddings peft_gp cannot tell apart. Use GPLoraConfig for them."
        )
    embeddings, masked = getattr(model, "word_embeddings", None), True
    if embeddings is None:  # a vision encoder: its class and patch tokens (no padding), see vision_prompt
        embeddings, masked = patch_embeddings(model.get_base_model()), False
    if embeddings is None:
        raise NotImplementedError(
            f"GPPromptTuningConfig needs a model with input token embeddings or a vision encoder's patch embeddings; "
            f"{type(model.get_base_model()).__name__} has neither."
        )
    prompt = model.prompt_encoder[adapter_name].embedding.weight
    rows = slice(0, config.num_virtual_tokens)
    return [
        ProjectedGroup(
            "prompt_encoder.embedding",
            prompt,
            None,
            None,
            index=(rows,),
            source=PromptFeatures(embeddings, prompt, rows, masked),
        )
    ]
