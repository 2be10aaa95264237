"""Prompt tuning on vision transformers: virtual tokens after the class token, before the patch tokens (VPT-shallow).

PEFT's prompt tuning prepends its prompt to the word embeddings of ``input_ids``; a ViT has none, and PEFT refuses
it. For a ``GPPromptTuningConfig`` adapter on a ``transformers`` vision encoder with a patch embedding (a module
``*embeddings`` holding ``patch_embeddings``: ViT, DeiT, Dinov2, ...), peft_gp routes the model's forward (on the
instance, as for prefix tuning): the base model runs on ``pixel_values`` and the embeddings' output, the class
token and the patch tokens with their position embeddings, becomes ``[cls; p; patches]``. The class token stays
first, so heads that read it are unchanged; the prompt gets no position embedding (as in VPT).

GP protects the prompt rows against the old tasks' embedding rows (class and patch tokens) at the energy threshold
and against the old prompt rows exactly, as for text (``paradigms.prompt.PromptFeatures``).
"""

from __future__ import annotations

import torch
from peft import PeftModel
from torch import nn


def patch_embeddings(model: nn.Module) -> nn.Module | None:
    """The embeddings module of a ``transformers`` vision encoder (the one holding ``patch_embeddings``), if any."""
    for name, module in model.named_modules():
        if name.rpartition(".")[2] == "embeddings" and hasattr(module, "patch_embeddings"):
            return module
    return None


class VisionPrompt:
    """The forward of a PEFT prompt-tuning model on a vision encoder: the prompt inserted after the class token."""

    def __init__(self, model: PeftModel, adapter_name: str) -> None:
        self.model, self.adapter_name = model, adapter_name
        self.embeddings = patch_embeddings(model.get_base_model())
        if self.embeddings is None:
            raise NotImplementedError(
                f"GPPromptTuningConfig needs input token embeddings or a vision encoder's patch embeddings; "
                f"{type(model.get_base_model()).__name__} has neither. Use GPLoraConfig for it."
            )

    def __call__(self, *args, **kwargs):
        if args:
            if len(args) > 1 or "pixel_values" in kwargs:
                raise TypeError("Pass the inputs of a GP vision prompt model as keyword arguments (pixel_values=...).")
            kwargs["pixel_values"] = args[0]
        for name in ("task_ids", "input_ids", "inputs_embeds", *getattr(self.model, "special_peft_forward_args", ())):
            kwargs.pop(name, None)
        pixel_values = kwargs.get("pixel_values")
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError("A GP vision prompt model needs pixel_values.")
        prompt = self.model.get_prompt(batch_size=pixel_values.shape[0])

        def insert(module, inputs, output):
            return torch.cat([output[:, :1], prompt.to(output.dtype), output[:, 1:]], dim=1)

        handle = self.embeddings.register_forward_hook(insert)  # after any hook already there (the memory's)
        try:
            return self.model.get_base_model()(**kwargs)
        finally:
            handle.remove()
