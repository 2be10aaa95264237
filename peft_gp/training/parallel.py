"""Which ways of spreading training over processes the projection supports, decided from the Trainer's settings.

The projection runs in the optimizer step on the adapter's gradients, one row at a time against the basis of the
row's input features (the last axis). It therefore needs each row it projects whole, and the gradients it projects
must be those the optimizer then applies:

* DDP: every rank holds the whole averaged gradient. Supported.
* FSDP2 (``fully_shard``; accelerate's ``fsdp_version=2``, the default in transformers 5): parameters and gradients
  are ``DTensor`` s split along dim 0, so each rank holds whole rows and projects them (``wiring.sharding``).
  Supported; groups that cannot be projected row by row are refused when the projector attaches.
* FSDP1: flattens every parameter of a wrapped module into one buffer cut into equal pieces, which splits rows.
  Refused.
* DeepSpeed ZeRO stage 1, 2 and 3: the optimizer steps flat fp32 partitions, also cut without regard to rows, and
  the model's own ``.grad`` are released once reduced into them, so a step hook sees no whole gradient rows (nor,
  after the step, the update: the model's weights are rewritten from the partitions). Refused, naming FSDP2 (which
  shards along rows) and DDP. DeepSpeed with ZeRO stage 0 in fp32 hands the model's own parameters, with their
  all-reduced gradients, to a plain ``torch.optim`` optimizer, as DDP does: accepted. Its fp16/bf16 optimizers keep
  flat fp32 master weights (the same problem as ZeRO): refused.

DeepSpeed is not a dependency: the decision reads its config (``TrainingArguments.deepspeed``, a dict or a JSON file,
or the one accelerate holds) without importing it. Checked by hand with DeepSpeed 0.19.8 on CPU (docs/distributed.md).
"""

from __future__ import annotations

import json
import os

FSDP1_MESSAGE = (
    "peft_gp does not support FSDP1: it flattens each wrapped module's parameters into one buffer cut into equal "
    "pieces, which splits the rows the projection works on. Use FSDP2, which shards whole rows: "
    "TrainingArguments(fsdp=True, fsdp_config={'version': 2}) (the default in transformers 5), accelerate's "
    "fsdp_version: 2, or torch.distributed.fsdp.fully_shard; or DDP (PEFT adapters are small enough to replicate)."
)
ALTERNATIVES = (
    "Use FSDP2 to shard (TrainingArguments(fsdp=True, fsdp_config={'version': 2}), accelerate's fsdp_version: 2, or "
    "torch.distributed.fsdp.fully_shard), which splits parameters along whole rows, or DDP (torchrun / accelerate "
    "launch --multi_gpu): PEFT adapters are small enough to replicate."
)


def deepspeed_config(args=None, accelerator=None) -> dict | None:
    """The DeepSpeed config of a run (``None``: DeepSpeed is not used): the one accelerate prepared, else the
    Trainer's processed one, else ``args.deepspeed`` itself (a dict, or the path of a JSON file)."""
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    if plugin is not None and isinstance(getattr(plugin, "deepspeed_config", None), dict):
        return plugin.deepspeed_config
    processed = getattr(args, "hf_deepspeed_config", None)
    if processed is not None and isinstance(getattr(processed, "config", None), dict):
        return processed.config
    raw = getattr(args, "deepspeed", None)
    if not raw:
        return None
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, (str, os.PathLike)) and os.path.isfile(raw):
        with open(raw, encoding="utf-8") as file:
            return json.load(file)
    raise ValueError(f"Cannot read the DeepSpeed config {raw!r}: pass a dict or the path of a JSON file.")


def fsdp_version(args=None, accelerator=None) -> int | None:
    """The FSDP version a run uses (``None``: no FSDP): accelerate's when given (on a CPU-only machine accelerate
    enables no FSDP and trains as DDP), else the one ``args.fsdp`` asks for."""
    if accelerator is not None:
        plugin = getattr(accelerator.state, "fsdp_plugin", None)
        return None if plugin is None else int(getattr(plugin, "fsdp_version", 1))
    if not getattr(args, "fsdp", None):
        return None
    return int((getattr(args, "fsdp_config", None) or {}).get("version", 2))


def _enabled(section, fallback: bool) -> bool:
    value = section.get("enabled", False) if isinstance(section, dict) else False
    return fallback if value == "auto" else bool(value)


def deepspeed_problem(config: dict, args=None) -> str | None:
    """Why the projection cannot run under this DeepSpeed config (``None``: it can, ZeRO stage 0 in fp32)."""
    stage = (config.get("zero_optimization") or {}).get("stage", 0)
    if stage == "auto" or int(stage) > 0:
        return (
            f"DeepSpeed ZeRO stage {stage} is not supported: its optimizer steps flat partitions of all the "
            "parameters, cut without regard to rows, and releases each parameter's gradient once it is reduced into "
            "them, so the projection would see no whole gradient row (ZeRO-3 also partitions the parameters "
            "themselves)"
        )
    for name, flag in (("fp16", "fp16"), ("bf16", "bf16")):
        if _enabled(config.get(name), bool(getattr(args, flag, False))):
            return (
                f"DeepSpeed's {name} optimizer is not supported: it steps flat fp32 master copies of the parameters, "
                "not the parameters the projection watches (ZeRO stage 0 in fp32 is)"
            )
    return None


def check_parallelism(args, accelerator=None, owner: str = "GPTrainer") -> None:
    """Refuse, before training, FSDP1 and the DeepSpeed settings under which the projection cannot see whole
    gradient rows (module docstring); FSDP2, DDP and DeepSpeed ZeRO-0 in fp32 pass. ``accelerator``: the Trainer's,
    whose state says what really runs (``args.fsdp`` on a CPU-only machine trains as DDP and passes)."""
    if fsdp_version(args, accelerator) == 1:
        raise NotImplementedError(f"{owner}: {FSDP1_MESSAGE}")
    config = deepspeed_config(args, accelerator)
    if config is None:
        return
    problem = deepspeed_problem(config, args)
    if problem is not None:
        raise NotImplementedError(f"{owner}: {problem}. {ALTERNATIVES}")
