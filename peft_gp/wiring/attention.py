"""The registered attention function: prefix keys/values injected per layer, and query capture for the memory.

PEFT's prefix tuning hands the prefix to the model as a key/value cache. With transformers 5 that fails for encoders
and classification heads (the forward argument was renamed to ``cache``; PEFT inspects the signature), and the cache
route can neither show peft_gp the queries it must protect against nor reach models without a cache (ViT). So for
adapters built from ``GPPrefixTuningConfig`` peft_gp takes the prefix route itself:

* ``ATTENTION_NAME`` is registered in transformers' ``AttentionInterface`` (and its mask interface) and set as the
  base model's attention implementation. Without an active prefix it is plain SDPA attention.
* ``prefix_forward`` replaces, on one model instance (never on PEFT's classes; ``route.ForwardRoute``), PEFT's
  prompt-learning forward while a GP prefix adapter is active: it slices layer ``l``'s key and value prefix out of
  ``prompt_encoder[adapter].embedding.weight`` (PEFT's own layout, so the file stays PEFT's) and runs the base model
  with them active; the attention function prepends them to each layer's keys and values and opens the attention
  mask over them. Decoder-only models get positions shifted by the prefix length, as with PEFT's cache, so that
  plain PEFT computes the same outputs from the saved adapter. ``remove()`` restores the class's forward. peft_gp
  installs it with the adapter's state (``peft_gp.get_peft_model``, ``from_pretrained``, the trainer or callback).
* ``register_capture`` lets the memory update see each layer's queries and its attention weights on the prefix.
"""

from __future__ import annotations

import contextvars
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import PeftConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig
from peft.utils import TaskType
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from .vision_prompt import patch_embeddings

ATTENTION_NAME = "peft_gp_prefix"

Capture = Callable[[torch.Tensor, torch.Tensor], None]  # (queries (b, H, n, hd), prefix weights (b, H, n, m))


@dataclass
class PrefixState:
    """The prefix of one forward pass: per attention module, its ``(key, value)`` of shape ``(kv_heads, m, hd)``."""

    prefixes: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]


_ACTIVE: contextvars.ContextVar[PrefixState | None] = contextvars.ContextVar("peft_gp_prefix", default=None)
_CAPTURES: weakref.WeakKeyDictionary[nn.Module, list[Capture]] = weakref.WeakKeyDictionary()


class _CaptureHandle:
    def __init__(self, module: nn.Module, capture: Capture) -> None:
        self._module, self._capture = weakref.ref(module), capture

    def remove(self) -> None:
        module = self._module()
        captures = _CAPTURES.get(module) if module is not None else None
        if captures and self._capture in captures:
            captures.remove(self._capture)


def register_capture(module: nn.Module, capture: Capture) -> _CaptureHandle:
    """Call ``capture(queries, prefix_weights)`` whenever ``module`` attends with a prefix; returns a handle."""
    _CAPTURES.setdefault(module, []).append(capture)
    return _CaptureHandle(module, capture)


def _open_mask(module: nn.Module, mask: torch.Tensor | None, query: torch.Tensor, key_length: int, m: int):
    """The attention mask over ``[prefix; keys]``: prefix columns open to every query."""
    batch, q_length = query.shape[0], query.shape[2]
    if mask is None:
        mask = torch.zeros(batch, 1, q_length, key_length, dtype=query.dtype, device=query.device)
        if getattr(module, "is_causal", False) and q_length > 1:
            blocked = torch.ones(q_length, key_length, dtype=torch.bool, device=query.device)
            blocked = blocked.triu(key_length - q_length + 1)
            mask = mask.masked_fill(blocked, torch.finfo(query.dtype).min)
    if mask.dtype == torch.bool:
        opened = torch.ones(*mask.shape[:-1], m, dtype=torch.bool, device=mask.device)
    else:
        opened = torch.zeros(*mask.shape[:-1], m, dtype=mask.dtype, device=mask.device)
    return torch.cat([opened, mask], dim=-1)


def prefix_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
):
    """SDPA attention that prepends the active prefix of ``module`` (if any) to its keys and values."""
    state = _ACTIVE.get()
    prefix = state.prefixes.get(module) if state is not None else None
    if prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    batch = query.shape[0]
    prefix_key, prefix_value = (t.to(key.dtype).unsqueeze(0).expand(batch, -1, -1, -1) for t in prefix)
    m = prefix_key.shape[2]
    mask = _open_mask(module, attention_mask, query, key.shape[2], m)
    key, value = torch.cat([prefix_key, key], dim=2), torch.cat([prefix_value, value], dim=2)
    captures = _CAPTURES.get(module)
    if captures:
        with torch.no_grad():
            repeat = query.shape[1] // key.shape[1]
            scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
            scores = query @ key.repeat_interleave(repeat, dim=1).transpose(-1, -2) * scaling
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, float("-inf"))
            else:
                scores = scores + mask
            weights = scores.float().softmax(dim=-1)[..., :m]
            for capture in captures:
                capture(query.detach(), weights)
    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, mask, is_causal=False, **kwargs)


AttentionInterface.register(ATTENTION_NAME, prefix_attention)
AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of ``model`` in layer order (those that call the attention interface)."""
    found = []
    for module in model.modules():
        if "cross" in type(module).__name__.lower() or getattr(module, "is_cross_attention", False):
            continue
        if hasattr(module, "is_causal") and hasattr(module, "scaling") and hasattr(module, "config"):
            found.append(module)
    return found


def prefix_layout(model: PeftModel, adapter_name: str) -> list[nn.Module]:
    """The attention modules that receive layer ``l``'s prefix, checked against the prefix config."""
    config = model.peft_config[adapter_name]
    base = model.get_base_model()
    if getattr(getattr(base, "config", None), "is_encoder_decoder", False):
        raise NotImplementedError(
            "GPPrefixTuningConfig does not support encoder-decoder models (T5, BART) yet: PEFT's prefix reaches only "
            "their decoder, and peft_gp's prefix route covers one stack of self-attention layers. Use "
            "GPLoraConfig or GPAdapterConfig for them."
        )
    modules = attention_modules(base)
    if len(modules) != config.num_layers:
        raise NotImplementedError(
            f"GPPrefixTuningConfig found {len(modules)} attention layers in {type(base).__name__} but the prefix has "
            f"num_layers={config.num_layers}: this architecture is not supported by peft_gp's prefix route yet."
        )
    return modules


def layer_prefixes(
    model: PeftModel, adapter_name: str, modules: list[nn.Module]
) -> dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """Per attention module (layer order), its ``(key, value)`` prefix as views of the prompt encoder's weight."""
    config = model.peft_config[adapter_name]
    weight = model.prompt_encoder[adapter_name].embedding.weight
    heads = config.num_attention_heads
    head_dim = config.token_dim // heads
    # PEFT's layout: (m, num_layers * 2 * token_dim), layer l's key then value, heads inside (see get_prompt)
    stacked = weight.view(config.num_virtual_tokens, config.num_layers * 2, heads, head_dim).permute(1, 2, 0, 3)
    return {module: (stacked[2 * layer], stacked[2 * layer + 1]) for layer, module in enumerate(modules)}


def _use_prefix_attention(model: PeftModel) -> None:
    base = model.get_base_model()
    if getattr(base.config, "_attn_implementation", None) != ATTENTION_NAME:
        base.set_attn_implementation(ATTENTION_NAME)


def prefix_forward(model: PeftModel, modules: list[nn.Module], *args, **kwargs):
    """PEFT's forward for a GP prefix adapter: the base model runs with each layer's prefix active."""
    if len(args) > 1 or (args and "input_ids" in kwargs):
        raise TypeError("Pass the inputs of a GP prefix-tuning model as keyword arguments (input_ids=..., ...).")
    if args:
        kwargs["input_ids"] = args[0]
    adapter_name = model.active_adapter
    config = model.peft_config[adapter_name]
    _use_prefix_attention(model)
    prefixes = layer_prefixes(model, adapter_name, modules)
    for name in ("task_ids", *getattr(model, "special_peft_forward_args", ())):
        kwargs.pop(name, None)
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    if config.task_type == TaskType.CAUSAL_LM and "position_ids" not in kwargs:
        # PEFT's cache shifts positions by the prefix length; keep that so plain PEFT gives the same outputs
        tokens = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if tokens is not None:
            start = config.num_virtual_tokens
            positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
            kwargs["position_ids"] = positions.unsqueeze(0).expand(tokens.shape[0], -1)
    token = _ACTIVE.set(PrefixState(prefixes))
    try:
        return model.get_base_model()(**kwargs)
    finally:
        _ACTIVE.reset(token)


def _is_gp(config: PeftConfig, kind: type) -> bool:
    return isinstance(config, kind) and hasattr(config, "gp_threshold")


@contextmanager
def vocabulary_for_prefix(base_model: nn.Module, config: PeftConfig) -> Iterator[None]:
    """Let PEFT set up a GP prefix, or a GP prompt on a vision encoder, on a model without a vocabulary (ViT).

    PEFT looks for word embeddings by the config's ``vocab_size`` even for prefix tuning, which needs none; a model
    config without one makes that search fail. For the duration of the build, ``vocab_size = -1`` matches no weight.
    A prompt then needs random initialisation (``TEXT`` reads word embeddings) and a patch embedding to follow.
    """
    model_config = getattr(base_model, "config", None)
    missing = model_config is not None and not hasattr(model_config.get_text_config(), "vocab_size")
    prompt = missing and _is_gp(config, PromptTuningConfig)
    if prompt and patch_embeddings(base_model) is None:
        raise NotImplementedError(
            f"GPPromptTuningConfig needs input token embeddings or a vision encoder's patch embeddings, and "
            f"{type(base_model).__name__} has neither. Use GPPrefixTuningConfig or GPLoraConfig for it."
        )
    if prompt and str(getattr(config.prompt_tuning_init, "value", config.prompt_tuning_init)) != "RANDOM":
        raise ValueError(
            f"{type(base_model).__name__} has no vocabulary to initialise a prompt from text: use "
            "prompt_tuning_init='RANDOM' (the default) for prompt tuning on a vision encoder."
        )
    if not (prompt or (missing and _is_gp(config, PrefixTuningConfig))):
        yield
        return
    model_config.vocab_size = -1
    try:
        yield
    finally:
        del model_config.vocab_size
