"""Feature rows of the LoRA factors whose features are not their input's last axis (GPM's rules, from what each adapted
layer computes), and the sources for layers whose factors are never called as modules.

* Convolutions: a kernel ``(out, in, *k)`` maps each unfolded input patch (``in · ∏k`` values) to one output position,
  so its features are the patches (GPM, Saha et al. 2021), the basis lives in ``in × kernel`` space; a grouped
  convolution's group reads only its block of input channels.
* Embeddings: ``lora_embedding_A`` (``r × V``) reads one-hot token ids, so its features are the unit vectors of the
  tokens seen (Gram: their counts on the diagonal). The vocabulary is cut into blocks, one basis each (exact, as the
  Gram is diagonal), so no ``V × V`` matrix is ever built. ``lora_embedding_B`` reads ``A[:, id]``.
* ``nn.MultiheadAttention``: PEFT merges LoRA into the packed input projection and the output projection for the
  forward, so the factors' inputs are read from the attention's own call (query, key, value) and, for the output
  projection, recomputed (the attention's values before ``out_proj``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .groups import FeatureRows, FeatureSource, Handles, token_rows

EMBEDDING_BLOCK = 512  # tokens per basis of lora_embedding_A: Gram 2 MB in float64, whatever the vocabulary


@dataclass(frozen=True)
class ConvPatches(FeatureRows):
    """The unfolded input patches of a convolution (optionally of one block of its input channels), one row per output
    position, laid out as the kernel flattened from its second axis: ``(in, *kernel)``."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[int, ...]  # as F.pad takes it, last spatial axis first
    padding_mode: str = "zeros"
    channels: tuple[int, int] | None = None

    @classmethod
    def of(cls, conv: nn.Module, channels: tuple[int, int] | None = None) -> ConvPatches:
        return cls(
            tuple(conv.kernel_size),
            tuple(conv.stride),
            tuple(conv.dilation),
            tuple(conv._reversed_padding_repeated_twice),
            conv.padding_mode,
            channels,
        )

    @property
    def key(self) -> tuple:
        return ("conv", self.kernel, self.stride, self.dilation, self.padding, self.padding_mode, self.channels)

    def __call__(self, inputs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        axes = len(self.kernel)
        x = inputs if inputs.dim() == axes + 2 else inputs.unsqueeze(0)  # unbatched input
        if self.channels is not None:
            x = x[:, self.channels[0] : self.channels[1]]
        if any(self.padding):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self.padding, mode=mode)
        for axis, (size, step, spacing) in enumerate(zip(self.kernel, self.stride, self.dilation)):
            x = x.unfold(2 + axis, (size - 1) * spacing + 1, step)
            if spacing > 1:
                x = x[..., ::spacing]
        # (N, C, *positions, *kernel) -> (N, *positions, C, *kernel): one row per output position
        order = [0, *range(2, 2 + axes), 1, *range(2 + axes, 2 + 2 * axes)]
        return x.permute(order).reshape(-1, x.shape[1] * math.prod(self.kernel))


@dataclass(frozen=True)
class ChannelBlock(FeatureRows):
    """One block ``[start, stop)`` of the last axis (a block-diagonal factor's block reads only its slice)."""

    start: int
    stop: int

    @property
    def key(self) -> tuple:
        return ("block", self.start, self.stop)

    def __call__(self, inputs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return token_rows(inputs, mask)[:, self.start : self.stop]


class Through(FeatureRows):
    """What a factor's output rows are on the feature module's input: ``factor(x)`` (DoRA's ``lora_B`` reads
    ``lora_A(x)``; its own hooks would also see the identity matrix DoRA passes through both to get ``BA``)."""

    def __init__(self, factor: nn.Linear) -> None:
        self.factor = factor

    @property
    def key(self) -> tuple:
        return ("through", id(self.factor))

    def __call__(self, inputs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        weight = self.factor.weight  # F.linear, not the module: no hook of the factor fires from inside this one
        return token_rows(F.linear(inputs.to(weight.dtype), weight, self.factor.bias), mask)


def _token_ids(ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is not None and tuple(ids.shape) == tuple(mask.shape):
        ids = ids[mask.bool()]
    return ids.reshape(-1)


@dataclass(frozen=True)
class TokenCounts(FeatureRows):
    """One-hot token ids restricted to the vocabulary block ``[start, stop)``: one row ``√count · e_id`` per token id
    seen, whose Gram is the diagonal of the counts (what the one-hot rows of every occurrence give), at a fraction of
    their cost."""

    start: int
    stop: int

    @property
    def key(self) -> tuple:
        return ("tokens", self.start, self.stop)

    def __call__(self, inputs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        ids = _token_ids(inputs, mask)
        inside = ids[(ids >= self.start) & (ids < self.stop)] - self.start
        counts = torch.bincount(inside, minlength=self.stop - self.start).to(torch.float64)
        seen = counts.nonzero().squeeze(1)
        rows = counts.new_zeros(len(seen), self.stop - self.start)
        rows[torch.arange(len(seen), device=rows.device), seen] = counts[seen].sqrt()
        return rows


class TokenPositions(FeatureRows):
    """One-hot positions in ``indices`` of the token ids seen (trainable tokens: row ``j`` of the delta is the
    embedding of token ``indices[j]``): one row ``√count · e_j`` per listed token seen."""

    def __init__(self, indices) -> None:
        self.indices = tuple(int(index) for index in indices)

    @property
    def key(self) -> tuple:
        return ("positions", self.indices)

    def __call__(self, inputs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        ids = _token_ids(inputs, mask)
        listed = torch.tensor(self.indices, device=ids.device)
        counts = (ids.unsqueeze(1) == listed).sum(0).to(torch.float64)
        seen = counts.nonzero().squeeze(1)
        rows = counts.new_zeros(len(seen), len(self.indices))
        rows[torch.arange(len(seen), device=rows.device), seen] = counts[seen].sqrt()
        return rows


class EmbeddingLookup(FeatureRows):
    """What ``lora_embedding_B`` reads: the columns ``A[:, id]`` of ``lora_embedding_A`` at the token ids seen."""

    def __init__(self, lora_a: nn.Parameter) -> None:
        self.lora_a = lora_a

    @property
    def key(self) -> tuple:
        return ("lookup", id(self.lora_a))

    def __call__(self, inputs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return F.embedding(_token_ids(inputs, mask), self.lora_a.detach().T)


def embedding_blocks(vocabulary: int) -> list[tuple[int, int]]:
    return [(start, min(start + EMBEDDING_BLOCK, vocabulary)) for start in range(0, vocabulary, EMBEDDING_BLOCK)]


class NoFeatures(FeatureSource):
    """For a group that is kept fixed from the second task on (no basis needed): no features."""

    def attach(self, emit):
        return Handles([])


MHA_ARGUMENTS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
                 "is_causal")  # fmt: skip


def attention_values(mha: nn.MultiheadAttention, call: dict) -> torch.Tensor:
    """The attention's output before ``out_proj`` for the call ``call``, with the (merged) weights it holds now."""
    query, key, value = call["query"], call["key"], call["value"]
    if mha.batch_first and query.dim() == 3:
        query, key, value = (tensor.transpose(0, 1) for tensor in (query, key, value))
    eye = torch.eye(mha.embed_dim, dtype=query.dtype, device=query.device)
    values, _ = F.multi_head_attention_forward(
        query, key, value, mha.embed_dim, mha.num_heads, mha.in_proj_weight, mha.in_proj_bias, mha.bias_k,
        mha.bias_v, mha.add_zero_attn, 0.0, eye, None, training=False, key_padding_mask=call.get("key_padding_mask"),
        need_weights=False, attn_mask=call.get("attn_mask"), is_causal=bool(call.get("is_causal", False)),
    )  # fmt: skip
    return values


class AttentionInputs(FeatureSource):
    """Features of the LoRA factors of PEFT's ``MultiheadAttention`` layer, read while the attention runs.

    ``part``: ``"in"`` (the packed input projection's ``lora_A``: every query, key and value row), ``"out"`` (the
    output projection's ``lora_A``: the attention's values before ``out_proj``); with ``lora_a``, the rows that
    factor's ``lora_B`` reads (``lora_A`` applied to them).
    """

    def __init__(self, mha: nn.MultiheadAttention, part: str, lora_a: nn.Linear | None = None) -> None:
        self.mha, self.part, self.lora_a = mha, part, lora_a

    def rows(self, call: dict) -> list[torch.Tensor]:
        if self.part == "out":
            found = [attention_values(self.mha, call)]
        else:
            found = []
            for name in ("query", "key", "value"):  # self-attention passes one tensor three times: count it once
                if not any(call[name] is seen for seen in found):
                    found.append(call[name])
        if self.lora_a is not None:
            found = [F.linear(rows.to(self.lora_a.weight.dtype), self.lora_a.weight) for rows in found]
        return found

    def attach(self, emit):
        def hook(module, args, kwargs, output):
            call = {**dict(zip(MHA_ARGUMENTS, args)), **kwargs}
            with torch.no_grad():
                for rows in self.rows(call):
                    emit(rows.detach(), False)

        return Handles([self.mha.register_forward_hook(hook, with_kwargs=True)])
