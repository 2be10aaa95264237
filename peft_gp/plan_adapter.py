"""The adapter of ``peft-gp plan``: its PEFT config built as a run builds it, with errors that name the plan's
``--option`` and ``--gp-*`` flags, and what PEFT's ``adapter_model.safetensors`` holds, from shapes alone.

For LoRA and the bottleneck adapter the file holds PEFT's state dict of the adapter. For prefix and prompt tuning it
holds ``prompt_embeddings``, the prompt encoder's output for its virtual tokens (PEFT's
``get_prompt_embedding_to_save``: prompt tuning ``(num_virtual_tokens · num_transformer_submodules, token_dim)``,
prefix tuning ``(num_virtual_tokens, num_layers · 2 · token_dim)``, in the encoder's dtype), and with a head
(``SEQ_CLS``, ``TOKEN_CLS``) the head PEFT trains beside it. PEFT copies that output to the CPU, which a model on the
meta device cannot do: the plan runs the encoder on the meta device instead (shapes and dtype, no data).
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch
from peft import PeftType, get_peft_model_state_dict

from .continual.config import RunConfigError
from .continual.paradigms import make_peft_config
from .plan_sources import PlanError, meta_peft_model

FLAGS = {"gp_threshold": "--gp-threshold", "gp_projection": "--gp-projection", "r": "--r",
         "target_modules": "--target-modules"}  # fmt: skip
PROMPT_LEARNING = ("prefix", "prompt")


def flag(name: str, value=None) -> str:
    """How the plan's command line gives setting ``name``: ``gp_threshold=2.0 (--gp-threshold)``, ``foo=1 (--option
    foo=…)``."""
    given = name if value is None else f"{name}={value!r}"
    return f"{given} ({FLAGS.get(name, f'--option {name}=…')})"


def settings_error(paradigm: str, error: Exception, settings: dict) -> str:
    """The plan's words for a PEFT or GP config that refused its settings (``settings``: every option and ``gp_*``
    value given): the setting and the flag that gave it, when the error names one."""
    unknown = re.search(r"unexpected keyword argument '(\w+)'", str(error))
    if isinstance(error, TypeError) and unknown:
        owner = re.match(r"(\w+)\.__init__", str(error))
        fields = f"peft_gp.{owner.group(1)}'s fields" if owner else "the fields of the paradigm's config class"
        return (f"The {paradigm!r} config has no argument {unknown.group(1)!r}, given as {flag(unknown.group(1))}: "
                f"remove it or fix its name (see {fields}).")  # fmt: skip
    named = [name for name in sorted(settings, key=len, reverse=True)
             if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", str(error))]  # fmt: skip
    if named:
        given = ", ".join(flag(name, settings[name]) for name in named)
        return f"The {paradigm!r} config refused {given}: {error} Give it a value the config accepts."
    given = ", ".join(f"{name}={value!r}" for name, value in settings.items()) or "its defaults"
    return (f"The {paradigm!r} config refused the plan's settings ({given}): {error} Check the values given with "
            "--option KEY=VALUE (read as YAML), --r, --target-modules and the --gp-* flags.")  # fmt: skip


def plan_peft_config(paradigm: str, options: dict, gp: dict, task_type: str | None):
    """``continual.paradigms.make_peft_config`` (the run's own config), with the plan's words when it refuses."""
    if paradigm in PROMPT_LEARNING and task_type is None:
        raise PlanError(f"--paradigm {paradigm} needs a task type (PEFT builds prompt-learning models per task) and "
                        "none was given or could be told from the config's architectures: pass --task-type CAUSAL_LM, "
                        "SEQ_CLS, TOKEN_CLS or SEQ_2_SEQ_LM (task_type=... from Python).")  # fmt: skip
    try:
        config = make_peft_config(paradigm, options, gp, task_type)
    except RunConfigError as error:
        cause = error.__cause__
        if isinstance(cause, (TypeError, ValueError)):  # the config's own refusal, worded for a run: reworded
            raise PlanError(settings_error(paradigm, cause, {**options, **gp})) from None
        raise PlanError(str(error)) from None
    if paradigm in PROMPT_LEARNING and getattr(config, "num_virtual_tokens", None) is None:
        raise PlanError(f"--paradigm {paradigm} needs the prompt's length: pass --option num_virtual_tokens=N (e.g. "
                        "10; num_virtual_tokens=N from Python).")  # fmt: skip
    return config


def wired_model(config, paradigm: str, peft_config, task_type: str | None, settings: dict):
    """The model of ``config`` on the meta device with the adapter of ``peft_config`` wired (``plan_sources``); what
    PEFT or the GP wiring refuse there, in the plan's words."""
    try:
        return meta_peft_model(config, peft_config, task_type)
    except PlanError:
        raise
    except NotImplementedError as error:  # a paradigm the GP wiring does not support on this architecture
        message = f"--paradigm {paradigm} cannot be planned on this {config.model_type} model: {error}"
        raise PlanError(message) from None
    except (ValueError, TypeError) as error:  # PEFT's checks when it wires the adapter (r=0, say)
        raise PlanError(f"Wiring the {paradigm!r} adapter on this {config.model_type} model failed. "
                        f"{settings_error(paradigm, error, settings)}") from None  # fmt: skip


def prompt_embeddings(peft_model, adapter_name: str) -> torch.Tensor:
    """``PeftModel.get_prompt_embedding_to_save`` without its copy to the CPU: the prompt encoder's output for its
    virtual tokens, on the encoder's device (the meta device: shape and dtype alone)."""
    encoder = peft_model.prompt_encoder[adapter_name]
    tokens = peft_model.prompt_tokens[adapter_name].unsqueeze(0).to(encoder.embedding.weight.device)
    if peft_model.peft_config[adapter_name].peft_type == PeftType.PREFIX_TUNING:
        tokens = tokens[:, : peft_model.peft_config[adapter_name].num_virtual_tokens]
    with torch.no_grad():
        return encoder(tokens)[0]


@contextmanager
def _prompt_on_device(peft_model):
    peft_model.get_prompt_embedding_to_save = lambda adapter_name: prompt_embeddings(peft_model, adapter_name)
    try:
        yield
    finally:
        del peft_model.get_prompt_embedding_to_save


def adapter_tensors(peft_model, adapter_name: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of each tensor of the adapter's ``adapter_model.safetensors`` (PEFT's
    ``get_peft_model_state_dict``; the prompt embeddings of prefix and prompt tuning from ``prompt_embeddings``)."""
    if peft_model.peft_config[adapter_name].is_prompt_learning:
        with _prompt_on_device(peft_model):
            state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    else:
        state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    return {name: (tuple(tensor.shape), tensor.dtype) for name, tensor in state.items()}
