"""``ForwardRoute``: one model instance's forward routed through peft_gp while one of its GP adapters that PEFT's own
forward cannot run is active: a prefix adapter (``attention.prefix_forward``, PEFT's cache route fails on many
models) or a prompt adapter on a vision encoder (``vision_prompt.VisionPrompt``, PEFT has no prompt route there).

It is set as the instance's ``forward`` (PEFT's classes are untouched); other adapters run the class's own forward.
A deep copy of the model routes the copy (the route and its forwards are copied with it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from peft import PeftModel

from .attention import prefix_forward, prefix_layout
from .vision_prompt import VisionPrompt


class ForwardRoute:
    """Per adapter, the forward peft_gp runs for it; see the module's docstring."""

    def __init__(self, model: PeftModel) -> None:
        self.model = model  # a strong reference: a deep copy of the model then routes the copy
        self.forwards: dict[str, Callable] = {}

    @classmethod
    def of(cls, model: PeftModel) -> ForwardRoute:
        """The model's route (a new one if it has none yet)."""
        forward = model.__dict__.get("forward")
        return forward if isinstance(forward, cls) else cls(model)

    def add_prefix(self, adapter_name: str) -> None:
        """Route a GP prefix adapter (its attention layout is checked now: unsupported models fail here)."""
        self._add(adapter_name, functools.partial(prefix_forward, self.model, prefix_layout(self.model, adapter_name)))

    def add_vision_prompt(self, adapter_name: str) -> None:
        """Route a GP prompt adapter on a vision encoder (one without input token embeddings fails here)."""
        self._add(adapter_name, VisionPrompt(self.model, adapter_name))

    def _add(self, adapter_name: str, forward: Callable) -> None:
        self.forwards[adapter_name] = forward
        self.model.__dict__["forward"] = self

    def __call__(self, *args, **kwargs):
        model = self.model
        forward = self.forwards.get(model.active_adapter) if isinstance(model.active_adapter, str) else None
        if forward is None:
            return type(model).forward(model, *args, **kwargs)
        return forward(*args, **kwargs)

    def remove(self) -> None:
        """Give the model its class's forward back."""
        if self.model.__dict__.get("forward") is self:
            del self.model.__dict__["forward"]
