"""Where ``peft-gp plan`` gets its model: a config read from a file, a folder or the Hub, the model built on the meta
device with the GP adapter wired as for training, which groups read the same inputs (a dry forward pass through the
memory update's own hooks), and the size of a safetensors file from shapes alone."""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from contextlib import contextmanager

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PretrainedConfig,
)
from transformers.models.auto import modeling_auto

from .continual.paradigms import build_peft_model
from .wiring.grams import GramCollector

MODEL_CLASSES = {"CAUSAL_LM": AutoModelForCausalLM, "SEQ_CLS": AutoModelForSequenceClassification,
                 "TOKEN_CLS": AutoModelForTokenClassification, "SEQ_2_SEQ_LM": AutoModelForSeq2SeqLM, None: AutoModel}
# PEFT task type -> the head classes transformers registers for it (SEQ_CLS: also image classification, as in runs)
HEADS = {
    "CAUSAL_LM": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",),
    "SEQ_2_SEQ_LM": ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",),
    "SEQ_CLS": ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    "TOKEN_CLS": ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",),
}
# class-name endings of heads transformers has not registered (older names, remote code); "LM": by is_encoder_decoder
SUFFIXES = (("ForCausalLM", "LM"), ("LMHeadModel", "LM"), ("WithLMHead", "LM"), ("ForConditionalGeneration", "LM"),
            ("ForSequenceClassification", "SEQ_CLS"), ("ForImageClassification", "SEQ_CLS"),
            ("ForTokenClassification", "TOKEN_CLS"))  # fmt: skip
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


class PlanError(ValueError):
    """Input ``peft-gp plan`` cannot cost; the message names what was wrong and how to fix it."""


def load_model_config(source: str) -> PretrainedConfig:
    """A model config from a ``config.json`` file, a folder holding one, or a Hub model id (needs the Hub)."""
    if os.path.isdir(source):
        path = os.path.join(source, "config.json")
        if not os.path.isfile(path):
            raise PlanError(f"{source} has no config.json: pass a model folder holding config.json, or the file.")
        source = path
    if os.path.isfile(source):
        try:
            with open(source, encoding="utf-8") as handle:
                raw = json.load(handle)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise PlanError(f"Cannot read {source} as a model config.json ({error}).") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
            raise PlanError(f"{source} has no 'model_type': it is not a transformers config.json (add e.g. "
                            '"model_type": "llama").')  # fmt: skip
        try:
            return AutoConfig.for_model(raw.pop("model_type"), **raw)
        except (ValueError, KeyError) as error:
            raise PlanError(f"{source}: transformers cannot build this config ({error}).") from None
    if source.endswith(".json") or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source):
        raise PlanError(f"No such file or folder: {source}. Pass a config.json, a folder holding one, or a Hub id.")
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise PlanError(
            f"Could not get the config of the Hub model {source!r} ({first}). Offline, or no access? Download its "
            f"config.json where the Hub is reachable (hf download {source} config.json) and pass the file's path."
        ) from None


def _class_names(*tables: str) -> set[str]:
    """The model class names of transformers' auto mappings ``tables`` (``MODEL_MAPPING_NAMES``, ...)."""
    names: set[str] = set()
    for table in tables:
        for value in getattr(modeling_auto, table, {}).values():
            names.update(value if isinstance(value, (tuple, list)) else [value])
    return names


def infer_task_type(config: PretrainedConfig) -> str | None:
    """The PEFT task type of the config's ``architectures``: a head transformers registers (``GPT2LMHeadModel``:
    ``CAUSAL_LM``, ``T5ForConditionalGeneration``: ``SEQ_2_SEQ_LM``, ``ViTForImageClassification``: ``SEQ_CLS``, ...),
    else by the class name's ending; ``None`` (the bare model) when no name says, with a warning if there are names."""
    architectures = list(getattr(config, "architectures", None) or [])
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    for name in architectures:
        known = [task for task in HEADS if name in _class_names(*HEADS[task])]
        if known:
            return "SEQ_2_SEQ_LM" if seq2seq and "SEQ_2_SEQ_LM" in known else known[0]
        for suffix, task in SUFFIXES:
            if name.endswith(suffix):
                return ("SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM") if task == "LM" else task
    if architectures and not set(architectures) <= _class_names("MODEL_MAPPING_NAMES"):  # BertModel: bare, as named
        warnings.warn(f"peft-gp plan cannot tell a PEFT task type from the config's architectures {architectures}: "
                      "the plan is of the bare model (no head). Pass --task-type (CAUSAL_LM, SEQ_CLS, TOKEN_CLS, "
                      "SEQ_2_SEQ_LM) to plan it with a head.", stacklevel=3)  # fmt: skip
    return None


def model_class(config: PretrainedConfig, task_type: str | None):
    """The auto class that builds ``config``'s model for ``task_type`` (``SEQ_CLS``: sequence, else image
    classification); a ``PlanError`` naming ``--task-type`` where transformers has none."""
    classes = [MODEL_CLASSES[task_type]] + ([AutoModelForImageClassification] if task_type == "SEQ_CLS" else [])
    for auto in classes:
        if type(config) in auto._model_mapping:
            return auto
    raise PlanError(f"transformers has no {task_type} model for model_type {config.model_type!r}: pass the "
                    "--task-type its architecture has (CAUSAL_LM, SEQ_CLS, TOKEN_CLS, SEQ_2_SEQ_LM, or none: the "
                    "bare model).")  # fmt: skip


def meta_peft_model(config: PretrainedConfig, peft_config, task_type: str | None):
    """The base model of ``config`` on the meta device (no memory, no weights) with the GP adapter wired on it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        with torch.device("meta"):
            model = model_class(config, task_type).from_config(config)
            return build_peft_model(model, peft_config)


def safetensors_bytes(tensors: Mapping[str, tuple[tuple[int, ...], torch.dtype]], metadata: dict | None) -> int:
    """The size of the safetensors file of ``tensors`` (name -> shape, dtype): 8 + header (padded to 8) + data."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in sorted(tensors):
        shape, dtype = tensors[name]
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES.get(dtype, str(dtype)), "shape": list(shape),
                        "data_offsets": [offset, offset + size]}  # fmt: skip
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    return 8 + len(text) + (-len(text)) % 8 + offset


@contextmanager
def float32_on_meta(model):
    """A model on the meta device computes in float32 meanwhile (free: meta tensors hold no data). In a bf16 model
    PEFT casts each layer's input to a float32 adapter's dtype, one copy per layer: a real memory update matches those
    copies by content (``wiring.shared_grams``), which meta tensors do not have, so the dry pass runs without casts."""
    changed = [(tensor, tensor.dtype) for tensor in [*model.parameters(), *model.buffers()]
               if tensor.is_meta and tensor.is_floating_point() and tensor.dtype != torch.float32]  # fmt: skip
    for tensor, _ in changed:
        tensor.data = tensor.data.to(torch.float32)
    try:
        yield
    finally:
        for tensor, dtype in changed:
            tensor.data = tensor.data.to(dtype)


def shared_inputs(model, groups) -> list[list[str]]:
    """The groups that read the same inputs, as the memory update finds them (``wiring.shared_grams``): one forward
    pass of two tokens through the update's hooks (on the meta device: shapes only, in float32). Groups with features
    of their own (prefix, prompt, heads) stand alone. A model this pass cannot run (inputs other than token ids) is
    planned with one basis per group, with a warning: an upper bound."""
    collector = GramCollector(model, groups)
    device = collector.device
    batch = {"input_ids": torch.zeros(1, 2, dtype=torch.long, device=device)}
    if getattr(getattr(collector.base_model, "config", None), "is_encoder_decoder", False):
        batch["decoder_input_ids"] = batch["input_ids"]
    try:
        with torch.no_grad(), float32_on_meta(collector.peft_model):
            collector.run([batch], None)
    except Exception as error:  # noqa: BLE001 - any failure only loses the sharing, said in the warning
        warnings.warn(f"peft-gp plan could not run a forward pass to see which layers read the same inputs "
                      f"({type(error).__name__}: {error}); every group is costed with a basis of its own.",
                      stacklevel=3)  # fmt: skip
        return [[group.name] for group in groups]
    collector.shared.fill(collector.dims, device)  # groups no input reached: as the update groups them
    classes = [members for members, _ in collector.shared.classes]
    return classes + [[group.name] for group in groups if group.source is not None]
