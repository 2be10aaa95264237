"""Prompt tuning (PEGP eq. 1, 10): the prompt rows ``p`` against old input token embeddings and old prompt rows."""

from __future__ import annotations

import torch
from peft import PeftModel

from ..groups import FeatureSource, ProjectedGroup


class PromptFeatures(FeatureSource):
    """The rows that sit beside the prompt in the first layer's input, from two sources kept apart: the token
    embeddings of each batch (padding left out), whose basis keeps the energy threshold's share, and the current
    prompt rows, whose span is kept whole (``exact``: at most ``num_virtual_tokens`` directions a task), so that
    ``Δp`` keeps both ``x Δpᵀ = 0`` and ``p_old Δpᵀ = 0``. In one Gram matrix the prompt rows (norm² ≈ d for PEFT's
    N(0, 1) initialisation, against ≈ 1 for token embeddings) would take the whole threshold for themselves."""

    def __init__(self, word_embeddings: torch.nn.Module, prompt: torch.nn.Parameter, rows: slice) -> None:
        self.word_embeddings, self.prompt, self.rows = word_embeddings, prompt, rows

    def attach(self, emit):
        def hook(module, args, output):
            emit(output, True)
            emit(self.prompt.detach()[self.rows].double(), False, True)

        return self.word_embeddings.register_forward_hook(hook)


def prompt_groups(model: PeftModel, adapter_name: str, config) -> list[ProjectedGroup]:
    base_config = getattr(model.get_base_model(), "config", None)
    if getattr(base_config, "is_encoder_decoder", False) or config.num_transformer_submodules != 1:
        raise NotImplementedError(
            "GPPromptTuningConfig does not support encoder-decoder models (T5, BART) yet: their prompt feeds two "
            "stacks whose token embeddings peft_gp cannot tell apart. Use GPLoraConfig for them."
        )
    word_embeddings = getattr(model, "word_embeddings", None)
    if word_embeddings is None:
        raise NotImplementedError(
            f"GPPromptTuningConfig needs a model with input token embeddings; {type(model.get_base_model()).__name__} "
            "has none that PEFT's prompt tuning can find."
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
            source=PromptFeatures(word_embeddings, prompt, rows),
        )
    ]
