"""The checks of a ``RunConfig`` (``check_run_config``), run when it is made, before any data or model is loaded: each
refusal is a ``RunConfigError`` that names the field, the value and how to fix it."""

from __future__ import annotations

import math
import numbers

from ..hub.checks import check_repo_id
from ..wiring.gp_fields import GP_DEFAULTS
from ..wiring.gp_settings import check_gp_kwargs, check_gp_settings

SCENARIOS = ("class", "task", "domain", "generative")
HEAD_MASKING = ("seen", "current", "none")
HEADS = ("trained", "ncm", "lda", "aligned")
NULL_MEANS_DEFAULT = {"gp_modules_to_save": "the scenario's default"}  # GP fields whose null is a setting of its own


class RunConfigError(ValueError):
    """A run configuration (or the data and model it names) that cannot be run; the message says how to fix it."""


def check_run_config(config, field_names: list[str]) -> None:
    """Refuse what ``config`` (a ``RunConfig``, whose fields are ``field_names``) cannot run."""
    if config.scenario not in SCENARIOS:
        raise RunConfigError(f"scenario must be one of {SCENARIOS}, got {config.scenario!r}.")
    if config.head_masking is not None and config.head_masking not in HEAD_MASKING:
        raise RunConfigError(f"head_masking must be one of {HEAD_MASKING} (or null), got {config.head_masking!r}.")
    _check_gp(config, field_names)
    _check_numbers(config)
    _check_sources(config)
    _check_heads(config)


def _check_gp(config, field_names: list[str]) -> None:
    """The ``gp_*`` fields and ``gp_kwargs``, by the GP configs' own checks (one source of truth)."""
    unset = [name for name in GP_DEFAULTS if name in field_names and getattr(config, name) is None
             and GP_DEFAULTS[name] is not None and name not in NULL_MEANS_DEFAULT]  # fmt: skip
    if unset:
        name = unset[0]
        raise RunConfigError(f"{name} is null: give it a value (default {GP_DEFAULTS[name]!r}) or leave it out.")
    settings = {name: getattr(config, name) for name in GP_DEFAULTS if getattr(config, name, None) is not None}
    config.gp_kwargs = {} if config.gp_kwargs is None else config.gp_kwargs  # an empty YAML value
    taken = {name: f"set {name}: ... as a field of its own" for name in field_names}
    taken["gp_class_statistics"] = "the run takes class statistics when heads name a statistics head"
    try:
        settings |= check_gp_kwargs(config.gp_kwargs, set(GP_DEFAULTS), taken)
        check_gp_settings(settings)
    except (TypeError, ValueError) as error:
        hint = " (null gp_modules_to_save: the scenario's default)" if "gp_modules_to_save" in str(error) else ""
        raise RunConfigError(f"{error}{hint}") from error
    slices = config.gp_task_slices
    if slices is not None and (isinstance(slices, bool) or not isinstance(slices, int) or slices < 1):
        raise RunConfigError(f"gp_task_slices must be a positive integer or null, got {slices!r}.")
    if slices is not None and config.paradigm not in ("lora", "adapter"):
        raise RunConfigError(f"gp_task_slices is a LoRA and adapter option; paradigm is {config.paradigm!r}.")


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)


def _whole(config, name: str, least: int, what: str) -> None:
    """``config.name`` as an ``int`` of at least ``least`` (a numpy integer or ``3.0`` too), else refused."""
    value = getattr(config, name)
    if not _is_number(value) or int(value) != value or value < least:
        raise RunConfigError(f"{name} must be {what}, got {value!r}.")
    setattr(config, name, int(value))


def _check_numbers(config) -> None:
    """Counts, sizes and rates: the right type before any comparison, so that a word gets a message, not a crash;
    numpy numbers and whole floats are taken as Python ints and floats."""
    if config.n_tasks is not None:
        _whole(config, "n_tasks", 1, "a whole number of at least 1 (or null)")
    for name in ("train_per_class", "test_per_class"):
        if getattr(config, name) is not None:
            _whole(config, name, 1, "a positive integer or null (all)")
    for name in ("batch_size", "eval_batch_size", "max_length", "general_text_samples"):
        _whole(config, name, 1, "a positive integer")
    _whole(config, "seed", -(2**63), "an integer")
    for name in ("epochs", "learning_rate"):
        value = getattr(config, name)
        if not _is_number(value) or value <= 0:
            raise RunConfigError(f"{name} must be a positive number, got {value!r}.")
        setattr(config, name, float(value))
    if not _is_number(config.weight_decay) or config.weight_decay < 0:
        raise RunConfigError(f"weight_decay must be a number of at least 0, got {config.weight_decay!r}.")
    if not _is_number(config.test_size) or not 0.0 < config.test_size < 1.0:
        raise RunConfigError(f"test_size must be a number in (0, 1), got {config.test_size!r}.")
    config.weight_decay, config.test_size = float(config.weight_decay), float(config.test_size)


def _check_sources(config) -> None:
    """The model, its config, the paradigm's arguments, the general text and the Hub repo."""
    config.paradigm_kwargs = {} if config.paradigm_kwargs is None else config.paradigm_kwargs  # as gp_kwargs
    if not isinstance(config.paradigm_kwargs, dict):
        raise RunConfigError(f"paradigm_kwargs must be a mapping, got {config.paradigm_kwargs!r}.")
    if config.model is None and config.model_config is None:
        raise RunConfigError("Set 'model' (a Hub id, folder or built-in alias) or 'model_config'.")
    if config.model_config is not None and not isinstance(config.model_config, dict):
        raise RunConfigError(
            f"model_config must be a mapping of config fields with a 'model_type' (e.g. {{model_type: vit, "
            f"hidden_size: 64}}), got {config.model_config!r}."
        )
    if config.model_config is not None and "model_type" not in config.model_config:
        raise RunConfigError("model_config needs a 'model_type' (e.g. 'vit' or 'bert'), as AutoConfig.for_model.")
    if config.reference_memory and (config.scenario != "generative" or not config.general_text):
        raise RunConfigError(
            "reference_memory stores the general text as 'task 0': it needs scenario 'generative' and a "
            "general_text (the built-in 'fortunes_general' or a text file)."
        )
    if config.push_to_hub is not None:
        try:
            check_repo_id(config.push_to_hub)
        except ValueError as error:
            raise RunConfigError(f"push_to_hub: {error}") from None


def _check_heads(config) -> None:
    """``heads`` (a name or a list; ``None``: resolved per scenario when the run starts) and ``compare_frozen``."""
    config.heads = [config.heads] if isinstance(config.heads, str) else config.heads
    if config.heads is None:  # resolved per scenario and model when the run starts (continual.heads.default_heads)
        if config.compare_frozen and config.scenario != "class":
            raise RunConfigError("compare_frozen needs statistics heads: set heads, e.g. heads: [trained, lda].")
        return
    heads = config.heads
    if not isinstance(heads, list) or not heads or len(set(map(str, heads))) != len(heads):
        raise RunConfigError(f"heads must be a non-empty list of distinct heads of {HEADS}, got {heads!r}.")
    unknown = [head for head in heads if head not in HEADS]
    if unknown:
        raise RunConfigError(f"Unknown head(s) {unknown} in heads: the heads are {HEADS}.")
    statistics = [head for head in heads if head != "trained"]
    if statistics and config.scenario == "generative":
        raise RunConfigError("Statistics heads need a classification head: scenario 'generative' has none.")
    if config.compare_frozen and not statistics:
        raise RunConfigError(
            "compare_frozen evaluates the frozen encoder with statistics heads: add one to heads, e.g. "
            "heads: [trained, lda]."
        )
