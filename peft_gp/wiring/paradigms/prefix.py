"""Prefix tuning (PEGP eq. 3, 12): layer ``l``'s key prefix against its old queries; optionally its value prefix.

PEFT keeps all prefixes in ``prompt_encoder[adapter].embedding.weight`` of shape ``(m, num_layers · 2 · D)`` with
``D = kv_heads · head_dim``: layer ``l``'s keys are columns ``[2l·D, (2l+1)·D)``, its values the next ``D``, head ``g``
the ``g``-th ``head_dim`` inside. Every group owns one such block:

* ``<attention>.key_prefix.head<g>`` (``gp_per_head``): head ``g``'s keys ``(m, head_dim)`` against the old queries
  of the query heads that read it, so every old attention score on the prefix stays the same;
  ``<attention>.key_prefix``: all keys ``(m, D)`` against the queries summed per key head and concatenated, which
  keeps only the sum over heads of the scores.
* ``<attention>.value_prefix[.head<g>]`` (``gp_protect_values``): values projected along the prefix-token axis
  against the old attention weights on the prefix (``m``-dimensional), so ``A_p ΔP_V = 0``.
"""

from __future__ import annotations

import torch
from peft import PeftModel

from ...core.peft_utils import module_key
from ..attention import prefix_layout, register_capture
from ..groups import FeatureSource, ProjectedGroup


class AttentionFeatures(FeatureSource):
    """Queries (``kind="query"``) or attention weights on the prefix (``kind="weights"``) of one attention module,
    restricted to query heads ``heads``; ``summed`` adds the heads of each key head and concatenates the sums."""

    def __init__(self, module: torch.nn.Module, kind: str, heads: list[list[int]], summed: bool) -> None:
        self.module, self.kind, self.heads, self.summed = module, kind, heads, summed

    def attach(self, emit):
        def capture(queries: torch.Tensor, weights: torch.Tensor) -> None:
            source = queries if self.kind == "query" else weights  # (b, H, n, ·)
            if self.summed:
                emit(torch.cat([source[:, group].sum(1) for group in self.heads], dim=-1), True)
            else:
                for group in self.heads:
                    for head in group:
                        emit(source[:, head], True)

        return register_capture(self.module, capture)


def prefix_groups(model: PeftModel, adapter_name: str, config) -> list[ProjectedGroup]:
    modules = prefix_layout(model, adapter_name)
    weight = model.prompt_encoder[adapter_name].embedding.weight
    kv_heads = config.num_attention_heads
    head_dim = config.token_dim // kv_heads
    width = config.token_dim
    names = {module: name for name, module in model.get_base_model().named_modules()}
    groups = []
    for layer, module in enumerate(modules):
        query_heads = getattr(module, "num_heads", None) or getattr(module, "num_attention_heads", None)
        query_heads = query_heads or getattr(module.config, "num_attention_heads", kv_heads)
        per_kv = query_heads // kv_heads
        heads = [list(range(g * per_kv, (g + 1) * per_kv)) for g in range(kv_heads)]
        name = module_key(names[module])
        kinds = [("key", "query", 2 * layer * width)]
        if config.gp_protect_values:
            kinds.append(("value", "weights", (2 * layer + 1) * width))
        for kind, features, start in kinds:
            transpose = kind == "value"
            if config.gp_per_head:
                for g in range(kv_heads):
                    columns = slice(start + g * head_dim, start + (g + 1) * head_dim)
                    source = AttentionFeatures(module, features, [heads[g]], summed=False)
                    groups.append(
                        ProjectedGroup(
                            f"{name}.{kind}_prefix.head{g}",
                            weight,
                            None,
                            None,
                            index=(slice(None), columns),
                            transpose=transpose,
                            source=source,
                        )
                    )
            else:
                source = AttentionFeatures(module, features, heads, summed=not transpose)
                groups.append(
                    ProjectedGroup(
                        f"{name}.{kind}_prefix",
                        weight,
                        None,
                        None,
                        index=(slice(None), slice(start, start + width)),
                        transpose=transpose,
                        source=source,
                    )
                )
    return groups
