"""Stream a task's batches through the model with forward hooks and sum each projected group's Gram matrix.

Padding tokens are left out wherever a feature tensor is laid out as the batch's ``(batch, sequence)``: those with
``attention_mask == 0``; in encoder-decoder models the encoder's layers use ``attention_mask``, the decoder's their
own inputs' mask (``decoder_attention_mask``, else the positions that ``labels`` shift in), and the decoder's
cross-attention keys and values (which read the encoder's output) the encoder's mask. Under ``torch.distributed``
each process passes its own shard and the Gram matrices are summed over processes (all-reduce), so every rank gets
the same result. Groups that read the same input (``q/k/v``) share one Gram matrix (``shared_grams``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from ..core import maths
from ..core.peft_utils import unwrap_peft_model
from ..core.sketch import FrequentDirections
from .batches import capped_batches, decoder_mask, same_tensor, to_device
from .groups import ProjectedGroup
from .memory import GPMemoryError
from .shared_grams import ForwardInputs, SharedGrams
from .sketches import SketchSpec, has_features, is_sketch, merge_across_processes

NO_FEATURES_MESSAGE = (
    "No features reached the adapter during the memory update: is the adapter active (model.set_adapter(...)) and "
    "does the batch go through the adapted layers? Nothing was stored."
)


def non_finite_message(name: str) -> str:
    return (
        f"NaN or inf features reached {name!r} while updating the memory: check the inputs and the model's numerics "
        "(a diverged task, fp16 overflow) before storing this task. Nothing was stored."
    )


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class GramCollector:
    """The forward hooks of one memory update and the float64 Gram matrices they fill (each batch's product in
    ``gram_dtype``)."""

    def __init__(
        self, model: nn.Module, groups: list[ProjectedGroup], observers: list | None = None,
        sketches: dict[str, SketchSpec] | None = None, gram_dtype: torch.dtype = torch.float64,
    ) -> None:  # fmt: skip
        self.model, self.groups, self.observers = model, groups, list(observers or [])
        self.gram_dtype = gram_dtype  # of each batch's product (``gp_gram_dtype``); the sums are float64
        self.sketches = dict(sketches or {})  # groups whose input is sketched (``sketches``), not summed in a Gram
        self.peft_model = unwrap_peft_model(model)
        self.base_model = self.peft_model.get_base_model()
        self.encoder_decoder = bool(getattr(getattr(self.base_model, "config", None), "is_encoder_decoder", 0))
        self.device = next(p.device for p in self.peft_model.parameters())
        self.dims = {g.name: g.dim for g in groups}
        # groups read through a hook share one Gram per input they share (shared_grams); sources emit their own
        self.shared = SharedGrams([g.name for g in groups if g.source is None])
        self.grams = {g.name: torch.zeros(g.dim, g.dim, dtype=torch.float64, device=self.device)
                      for g in groups if g.source is not None}  # fmt: skip
        self.exact_grams: dict[str, torch.Tensor] = {}  # features kept whole, apart from the rest (prompt rows)
        self.distributed = _distributed()
        self.non_finite: list[str] = []
        self.mask: torch.Tensor | None = None
        self.masks: dict = {}  # encoder-decoder models: each stack's padding mask and the encoder's output
        self.inputs = ForwardInputs()  # the distinct inputs of the current forward pass
        self.uses: dict[str, list[int]] = {}  # per group, the inputs it received in this pass

    # ---- hooks -------------------------------------------------------------------------------------------------

    def _mask_for(self, inputs: torch.Tensor) -> torch.Tensor | None:
        return self.masks.get("encoder") if same_tensor(inputs, self.masks.get("encoder_output")) else self.mask

    def gram_of(self, group: ProjectedGroup, inputs: torch.Tensor, masked: bool) -> torch.Tensor | None:
        rows = group.features(inputs.detach(), self._mask_for(inputs) if masked else None)  # padding left out
        if rows.is_meta:  # a dry run on the meta device (peft-gp plan): shapes only
            return maths.feature_gram(rows)
        if not torch.isfinite(rows).all():
            if not self.distributed:
                raise GPMemoryError(non_finite_message(group.name))
            self.non_finite.append(group.name)  # raised on every rank after the all-reduce, not here
            return None
        spec = self.sketches.get(group.name)
        if spec is not None:
            return FrequentDirections.of_rows(rows, spec.rows, spec.basis)
        return maths.feature_gram(rows, self.gram_dtype)

    def input_hook(self, group: ProjectedGroup):
        def hook(module, args, output):
            inputs = args[0] if args else None
            if not isinstance(inputs, torch.Tensor):
                return
            # Sibling layers often read the very same tensor (LoRA on q/k/v): one Gram serves them all, and the
            # groups that receive the same inputs in every pass keep one Gram sum and one basis (shared_grams).
            # A sketch holds residual rows: only groups with one old basis may share it (``SketchSpec.key``).
            spec = self.sketches.get(group.name)
            kind = (group.feature_key, id(self._mask_for(inputs)), None if spec is None else (spec.rows, spec.key))
            index = self.inputs.find(inputs, kind)
            if index is None:
                gram = self.gram_of(group, inputs, masked=True)
                if gram is None:
                    return
                index = self.inputs.add(inputs, kind, gram)
            self.uses.setdefault(group.name, []).append(index)

        return hook

    def emitter(self, group: ProjectedGroup):
        def emit(features: torch.Tensor, masked: bool = True, exact: bool = False) -> None:
            gram = self.gram_of(group, features, masked)
            if gram is None:
                return
            if exact:
                self.exact_grams[group.name] = self.exact_grams.get(group.name, 0) + gram.to(torch.float64)
            else:
                self.grams[group.name] += gram

        return emit

    def side_hooks(self) -> list:
        """Switch the padding mask to the encoder's or the decoder's as each stack runs; keep the encoder's output."""
        handles = []
        for side, getter in (("encoder", "get_encoder"), ("decoder", "get_decoder")):
            stack = getattr(self.base_model, getter, lambda: None)()
            if not isinstance(stack, nn.Module):
                continue

            def set_mask(module, args, side=side):
                self.mask = self.masks.get(side)

            handles.append(stack.register_forward_pre_hook(set_mask))
            if side == "encoder":

                def keep_output(module, args, output):
                    hidden = output[0] if isinstance(output, tuple) else getattr(output, "last_hidden_state", None)
                    self.masks["encoder_output"] = hidden

                handles.append(stack.register_forward_hook(keep_output))
        return handles

    def attach(self) -> list:
        handles = self.side_hooks() if self.encoder_decoder else []
        handles += [observer.attach() for observer in self.observers]
        for group in self.groups:
            if group.source is not None:
                handles.append(group.source.attach(self.emitter(group)))
            else:
                handles.append(group.feature_module.register_forward_hook(self.input_hook(group)))
        return handles

    # ---- the pass ----------------------------------------------------------------------------------------------

    def run_batch(self, batch: dict) -> None:
        batch = to_device(batch, self.device)
        mask = batch.get("attention_mask")
        self.mask = mask.bool() if isinstance(mask, torch.Tensor) else None
        if self.encoder_decoder:
            self.masks.update(encoder=self.mask, decoder=decoder_mask(batch))
        self.inputs, self.uses, self.masks["encoder_output"] = ForwardInputs(), {}, None
        self.model(**batch)
        self.shared.add_batch(self.uses, self.inputs.grams)
        self.inputs, self.uses = ForwardInputs(), {}

    def run(self, batches: Iterable[Mapping[str, torch.Tensor]], max_samples: int | None) -> int:
        """Forward every batch (cut at ``max_samples`` examples) with the hooks on; returns the examples seen."""
        handles = self.attach()
        was_training = self.peft_model.training
        self.peft_model.eval()
        seen = 0
        try:
            for batch, size in capped_batches(batches, max_samples):
                self.run_batch(batch)
                seen += size
        finally:
            for handle in handles:
                handle.remove()
            self.peft_model.train(was_training)
        return seen

    def reduce(self, seen: int) -> int:
        """Sum the Gram matrices over processes (every rank saw its own shard); returns the examples seen in all."""
        flags = torch.tensor([float(seen), float(len(self.non_finite))], dtype=torch.float64, device=self.device)
        dist.all_reduce(flags)
        if flags[1].item() > 0:
            where = self.non_finite[0] if self.non_finite else "an adapted layer (another rank)"
            raise GPMemoryError(non_finite_message(where))
        self.shared.agree(lambda leaders: _min_max(leaders.to(self.device)))
        self.shared.fill(self.dims, self.device, self.empty)
        for gram in [*self.shared.distinct(), *self.grams.values(), *self.exact_grams.values()]:
            if is_sketch(gram):
                merge_across_processes(gram)  # sketches merge, they do not add up
            else:
                dist.all_reduce(gram)
        return int(flags[0].item())

    def result(self) -> dict[str, torch.Tensor]:
        """Every group's Gram matrix (or sketch); groups that read the same inputs map to the same tensor."""
        self.shared.fill(self.dims, self.device, self.empty)
        return {**self.shared.by_name(), **self.grams}

    def empty(self, name: str):
        """What a group no input reached holds: a zero Gram matrix, or an empty sketch."""
        spec = self.sketches.get(name)
        if spec is None:
            return torch.zeros(self.dims[name], self.dims[name], dtype=torch.float64, device=self.device)
        return FrequentDirections(self.dims[name], spec.rows, spec.basis)


def _min_max(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    low, high = tensor.clone(), tensor.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return low.cpu(), high.cpu()


@torch.no_grad()
def collect_grams(
    model: nn.Module,
    groups: list[ProjectedGroup],
    batches: Iterable[Mapping[str, torch.Tensor]],
    max_samples: int | None = None,
    exact_grams: dict[str, torch.Tensor] | None = None,
    observers: list | None = None,
    require_features: bool = True,
    sketches: dict[str, SketchSpec] | None = None,
    gram_dtype: torch.dtype = torch.float64,
) -> tuple[dict[str, torch.Tensor], int]:
    """Stream ``batches`` through ``model`` (eval mode, no grad); each group's float64 Gram matrix and the examples
    seen. Groups that received the same inputs in every batch map to one tensor (``shared_grams``). Features a source
    marks ``exact`` (kept whole, e.g. prompt rows) go to ``exact_grams`` when given (added to the rest otherwise).
    ``observers`` (objects whose ``attach()`` returns a handle) watch the same pass (class statistics). Raises
    ``GPMemoryError`` when no example or (with ``require_features``) no feature arrived, or one was not finite.
    ``sketches`` (``sketches.sketch_specs``): groups that get a Frequent Directions sketch instead of a Gram.
    ``gram_dtype``: each batch's Gram product is computed in it (``gp_gram_dtype``) and added to the float64 sums."""
    collector = GramCollector(model, groups, observers, sketches, gram_dtype)
    seen = collector.run(batches, max_samples)
    if collector.distributed:
        seen = collector.reduce(seen)
    if seen == 0:
        raise GPMemoryError(
            "The memory update got no examples: pass the finished task's (non-empty) training data. "
            "Nothing was stored."
        )
    grams = collector.result()
    if require_features and not any(has_features(gram) for gram in grams.values()):
        raise GPMemoryError(NO_FEATURES_MESSAGE)
    if exact_grams is None:
        for name, gram in collector.exact_grams.items():
            grams[name] += gram
    else:
        exact_grams.update(collector.exact_grams)
    return grams, seen
