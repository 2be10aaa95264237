"""What every paradigm handler produces: projected groups, and where their features come from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


def token_rows(inputs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Feature rows of a tensor with the feature axis last; with ``mask`` (the batch's ``(batch, sequence)`` padding
    mask) and inputs laid out as ``(batch, sequence, ...)``, only the real tokens' rows."""
    if mask is not None and inputs.dim() >= 3 and tuple(inputs.shape[:2]) == tuple(mask.shape):
        inputs = inputs[mask]
    return inputs.reshape(-1, inputs.shape[-1])


class FeatureRows:
    """How a feature module's input becomes a group's feature rows when they are not its last axis (convolution
    patches, token ids, a block of channels). ``key``: groups whose keys are equal get the same rows from one input
    tensor, so their Gram matrix is computed once."""

    key: tuple = ("rows",)

    def __call__(self, inputs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class StepRule:
    """A parameter whose value after each projected optimizer step is a function of the others' (DoRA's magnitude):
    ``before()`` runs before the step and returns what ``after(state)`` needs once the step is done."""

    def before(self):  # pragma: no cover - interface
        raise NotImplementedError

    def after(self, state) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class FeatureSource:
    """Where a group's features come from when they are not a module's first input (queries, attention weights).

    ``attach(emit)`` starts calling ``emit(features, masked)`` during forward passes and returns a handle with
    ``remove()``; ``features`` has the feature axis last, and with ``masked=True`` its first two axes are laid out as
    the batch's ``(batch, sequence)`` so that padding can be left out.
    """

    def attach(self, emit: Callable[[torch.Tensor, bool], None]):  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(eq=False)
class TaskSlices:
    """How a group of a ``gp_task_slices`` adapter splits into per-task blocks (``wiring.slices`` acts on them).

    Attributes:
        count: the number of slices, the most tasks the adapter can learn.
        width: rank-1 components (bottleneck units) per slice: slice ``t`` is ``t·width .. (t+1)·width``.
        axis: ``"rows"`` for the input side (``lora_A``, ``W_down`` with its bias): the training task's rows are kept
            in the complement of the stored basis; ``"columns"`` for the output side (``lora_B``, ``W_up``): the
            training task's columns train freely, and its bias, shared by every slice, with the first task only.
        output_side: for the input side, the output-side group of the same layer.
    """

    count: int
    width: int
    axis: str
    output_side: ProjectedGroup | None = field(default=None, repr=False)

    def block(self, task_id: int) -> slice:
        """Slice ``task_id``'s block along ``axis``."""
        return slice(task_id * self.width, (task_id + 1) * self.width)


@dataclass(eq=False)
class ProjectedGroup:
    """Parameters whose update is projected against one basis, and where the features of that basis come from.

    ``weight`` has the input-feature axis last (``(out, d_in)``, as ``nn.Linear``; with ``rows``, a convolution kernel
    ``(out, in, *kernel)`` is read as ``(out, in · kernel)``). With a ``bias`` the basis lives in ``d_in + 1``
    dimensions: the bias is the weight of a constant-1 feature, so ``[W | b]`` is projected as one matrix and the
    protection stays exact for every old input. A group may also own a block of a larger parameter (``index``, e.g. one
    head's slice of a prefix, one group of a grouped convolution, with ``bias_index`` for its bias) and project it
    along its first axis (``transpose``).

    Attributes:
        name: key of the basis in the memory (module path inside the base model, adapter name left out).
        weight: the parameter holding the projected block.
        bias: the projected bias, if any.
        feature_module: the module whose first positional input holds the features of this basis.
        frozen: from the second task on, the group is kept fixed instead of projected.
        index: basic index of the block inside ``weight`` (``None``: all of it).
        transpose: project the block along its first axis (the features index its rows).
        source: the features come from this source instead of ``feature_module``'s input.
        output_side: the group whose features are this group's outputs (``lora_B`` for ``lora_A``), when they are
            exactly ``view(weight) @ x``: while that group's weight is zero, the memory keeps this group's rows out of
            the stored space instead of protecting the output side (``collect.update_memory``).
        rows: how ``feature_module``'s input becomes feature rows (``None``: its last axis, padding left out).
        bias_index: basic index of the group's block of ``bias`` (``None``: all of it).
        rule: the group is set by this rule after every projected step instead of being projected.
        slices: per-task slices (``gp_task_slices``): only the training task's block trains, the rest is kept fixed.
    """

    name: str
    weight: nn.Parameter
    bias: nn.Parameter | None
    feature_module: nn.Module | None
    frozen: bool = False
    index: tuple | None = None
    transpose: bool = False
    source: FeatureSource | None = None
    output_side: ProjectedGroup | None = None
    rows: FeatureRows | None = None
    bias_index: tuple | slice | None = None
    rule: StepRule | None = None
    slices: TaskSlices | None = None

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """The projected block of ``tensor`` (the weight, its gradient or update), feature axis last; a view."""
        block = tensor if self.index is None else tensor[self.index]
        if self.transpose:
            return block.T
        if self.rows is None or block.dim() <= 2:
            return block
        return block.view(block.shape[0], -1)  # a kernel (out, in, *k) read as (out, in · k); raises rather than copy

    def bias_view(self, tensor: torch.Tensor) -> torch.Tensor:
        """The group's block of ``tensor`` (the bias, its gradient or update); a view."""
        return tensor if self.bias_index is None else tensor[self.bias_index]

    @property
    def dim(self) -> int:
        return self.view(self.weight).shape[-1] + (1 if self.bias is not None else 0)

    @property
    def parameters(self) -> list[nn.Parameter]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    @property
    def feature_key(self) -> tuple:
        """Groups with equal keys get equal feature rows from one input tensor (their Gram is computed once)."""
        return (self.rows.key if self.rows is not None else ("rows",), self.bias is not None)

    def features(self, inputs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Feature rows of this basis from the feature module's input (constant-1 column appended with a bias);
        ``mask``: the batch's padding mask, whose padded positions are left out where the input follows its layout."""
        rows = token_rows(inputs, mask) if self.rows is None else self.rows(inputs, mask)
        if self.bias is not None:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        return rows


class Handles:
    """Several hook handles removed as one (what ``FeatureSource.attach`` returns when it registers more than one)."""

    def __init__(self, handles: list) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class PooledHeadFeatures(FeatureSource):
    """The input of a decoder classifier head (Llama, GPT-2 ``*ForSequenceClassification``) at the pooled position.

    Such a head scores every position and the model keeps one per example: the rightmost token that is not the pad
    token (the last position with no pad token id, or when the model gets ``inputs_embeds``, as prompt tuning passes).
    Only those rows reach the loss, so only they belong in the head's memory: all tokens' features would fill it and
    keep the head from learning later tasks. A head that gets pooled ``(batch, d)`` input (BERT) passes through.
    """

    def __init__(self, model: nn.Module, head: nn.Module) -> None:
        self.model, self.head = model, head
        config = getattr(model, "config", None)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.pad_token_id = getattr(text_config, "pad_token_id", None)

    def positions(self, length: int, input_ids: torch.Tensor | None) -> torch.Tensor | int:
        """Per example, the position the model pools (as transformers' sequence classifiers pick it)."""
        if self.pad_token_id is None or input_ids is None or input_ids.shape[-1] != length:
            return length - 1
        non_pad = (input_ids != self.pad_token_id).to(torch.int32)
        return (torch.arange(length, device=input_ids.device, dtype=torch.int32) * non_pad).argmax(-1)

    def attach(self, emit):
        batch: dict = {}

        def pre_hook(module, args, kwargs):
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            no_ids = kwargs.get("inputs_embeds") is not None or not isinstance(input_ids, torch.Tensor)
            batch["input_ids"] = None if no_ids else input_ids

        def hook(module, args, output):
            inputs = args[0] if args else None
            if not isinstance(inputs, torch.Tensor):
                return
            if inputs.dim() != 3:
                emit(inputs, True)
                return
            index = self.positions(inputs.shape[1], batch.get("input_ids"))
            if isinstance(index, torch.Tensor):
                index = index.to(inputs.device)
            emit(inputs[torch.arange(inputs.shape[0], device=inputs.device), index], False)

        return Handles(
            [
                self.model.register_forward_pre_hook(pre_hook, with_kwargs=True),
                self.head.register_forward_hook(hook),
            ]
        )
