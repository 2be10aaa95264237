"""Load and check everything a run names before any training: the task stream, its encoding, the model, PEFT."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence

import torch
from torch import nn

from .config import RunConfig, RunConfigError
from .encoding import encode_tasks
from .heads import check_head
from .paradigms import build_peft_model, make_peft_config
from .sources import load_pretrained, load_source, resolve_model
from .splits import class_incremental_split
from .tasks import Task, dataset_sequence, num_labels

GP_FIELDS = ("gp_threshold", "gp_threshold_increment", "gp_projection", "gp_memory_samples", "gp_modules_to_save")


def build_stream(config: RunConfig) -> list[Task]:
    """The raw task stream (before tokenization) the config names."""
    sources = config.dataset if isinstance(config.dataset, list) else [config.dataset]
    common = dict(seed=config.seed, train_per_class=config.train_per_class, test_per_class=config.test_per_class,
                  test_size=config.test_size)  # fmt: skip
    if len(sources) == 1:
        if config.scenario == "domain":
            raise RunConfigError("scenario 'domain' needs a list of datasets (one per domain) in 'dataset'.")
        if config.scenario == "task" and config.n_tasks is None and config.classes_per_task is None:
            raise RunConfigError("A task-incremental split of one dataset needs n_tasks or classes_per_task.")
        return class_incremental_split(
            load_source(sources[0], config.seed, config.test_size),
            config.n_tasks,
            label_column=config.label_column,
            classes_per_task=config.classes_per_task,
            class_order=config.class_order,
            classes=config.classes,
            **common,
        )
    loaded = [load_source(name, config.seed, config.test_size) for name in sources]
    return dataset_sequence(loaded, [str(s) for s in sources], config.scenario, config.label_column, **common)


def _is_image(tasks: Sequence[Task], config: RunConfig) -> bool:
    columns = tasks[0].train.column_names
    return "pixel_values" in columns or (config.image_column in columns and config.text_column not in columns)


def load_processor(config: RunConfig, image: bool):
    """The tokenizer (text) or image processor (images) of ``config.model``; ``None`` when it has none."""
    from transformers import AutoImageProcessor, AutoTokenizer

    if config.model is None:
        if not image:
            raise RunConfigError("Text data needs a tokenizer: set 'model' to a folder or Hub id that has one.")
        return None  # a model built from its config: images are scaled to [0, 1]
    path, extra = resolve_model(config.model)
    try:
        if image:
            return AutoImageProcessor.from_pretrained(path, **extra)
        tokenizer = AutoTokenizer.from_pretrained(path, **extra)
    except (OSError, ValueError) as error:
        raise RunConfigError(
            f"Cannot load the {'image processor' if image else 'tokenizer'} of {config.model!r}: {error}. Offline, "
            "use a local folder or the built-in 'minilm'."
        ) from error
    if tokenizer.pad_token is None:  # decoders (GPT-2, Llama) have none: pad with the end-of-sequence token
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(config: RunConfig, labels: int, image: bool, processor=None) -> nn.Module:
    """The base classification model with a head of ``labels`` outputs (random head, seeded by ``config.seed``)."""
    from transformers import AutoConfig, AutoModelForImageClassification, AutoModelForSequenceClassification

    auto = AutoModelForImageClassification if image else AutoModelForSequenceClassification
    kind = "image-classification" if image else "sequence-classification"
    torch.manual_seed(config.seed)  # the new head's initialisation
    try:
        if config.model_config is not None:
            options = dict(config.model_config)
            model_config = AutoConfig.for_model(options.pop("model_type"), num_labels=labels, **options)
            model = auto.from_config(model_config)
        else:
            model = load_pretrained(auto, config.model, num_labels=labels)
    except ValueError as error:
        if "Unrecognized configuration class" in str(error):
            raise RunConfigError(
                f"{config.model!r} has no {kind} head in transformers ({auto.__name__} does not support it): pick a "
                f"model with one, or another scenario/dataset."
            ) from error
        raise RunConfigError(f"Cannot load model {config.model!r}: {error}") from error
    except OSError as error:
        raise RunConfigError(
            f"Cannot load model {config.model!r}: {error}. Offline, use a local folder or the built-in 'minilm'."
        ) from error
    if processor is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = getattr(processor, "pad_token_id", None)
    return model


def _task_type(tasks: Sequence[Task]) -> str | None:
    # PEFT's SEQ_CLS task type keeps the text classifier trainable; image models name their head in modules_to_save.
    return None if "pixel_values" in tasks[0].train.column_names else "SEQ_CLS"


UP_PROJECTIONS = {"lora": "lora_B", "adapter": "gp_adapter_up"}  # the groups whose input space is a few dims wide


def gp_settings_of(config: RunConfig) -> dict:
    """The ``gp_*`` config fields of a run's GP method: its head policy resolved, the optional ones when set, and
    the up-projections kept whole when a statistics head is the main result (``up_projections_whole``)."""
    settings = {name: getattr(config, name) for name in GP_FIELDS}
    settings["gp_modules_to_save"] = config.modules_to_save_policy
    optional = {"gp_importance_scale": config.gp_importance_scale, "gp_task_slices": config.gp_task_slices}
    settings |= {name: value for name, value in optional.items() if value is not None} | config.gp_kwargs
    if up_projections_whole(config):  # it checks that gp_kwargs sets no pattern of its own
        settings["gp_threshold_pattern"] = {UP_PROJECTIONS[config.paradigm]: 1.0}
    return settings


def up_projections_whole(config: RunConfig) -> bool:
    """Whether the run keeps the up-projections' bases whole (LoRA's ``lora_B``, the adapter's ``gp_adapter_up``):
    when the main head is built from class statistics, no ``gp_threshold_pattern`` is given and there are no task
    slices. Their inputs live in r (bottleneck + 1) dimensions, and the default threshold leaves the weakest of them
    free, through which old classes' features drift enough to make their stored statistics stale; kept whole, the
    statistics heads gained 7 (LoRA) and 15 (adapter) points on Fortunes-20 and 3 on BBC News, for a few points of
    the trained head's task-incremental accuracy (benchmarks/README.md, "Why GP falls short")."""
    heads = config.heads or []
    return (config.paradigm in UP_PROJECTIONS and bool(heads) and heads[0] != "trained"
            and config.gp_task_slices is None and "gp_threshold_pattern" not in config.gp_kwargs)  # fmt: skip


def peft_config_for(config: RunConfig, tasks: Sequence[Task], base_model: nn.Module, gp: bool):
    """The PEFT config of the run's paradigm for this model (GP settings only when ``gp``)."""
    head = check_head(base_model, num_labels(tasks))
    task_type = _task_type(tasks)
    options = dict(config.paradigm_kwargs)
    if task_type is None and "modules_to_save" not in options:
        options["modules_to_save"] = [head]  # PEFT adds the head itself only for SEQ_CLS
    gp_settings = {**gp_settings_of(config), "gp_class_statistics": bool(config.statistics_heads)} if gp else None
    if task_type is None and config.paradigm in ("prefix", "prompt"):  # PEFT builds these per task type
        task_type = "SEQ_CLS"
        if gp_settings is None and config.paradigm == "prompt":
            gp_settings = {}  # PEFT's own prompt tuning has no vision route: the baseline is peft_gp's, unprojected
    return make_peft_config(config.paradigm, options, gp_settings, task_type)


@contextlib.contextmanager
def quiet_loading():
    """No per-split ``Map`` bars and no "newly initialised head" report: the new head is the point of the run."""
    import datasets
    import transformers

    bars_were_off = datasets.is_progress_bar_enabled() is False
    verbosity = transformers.logging.get_verbosity()
    weight_bars = transformers.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if weight_bars:
            transformers.logging.enable_progress_bar()
        if not bars_were_off:
            datasets.enable_progress_bars()


def prepare(config: RunConfig, tasks: Sequence[Task] | None = None, model: nn.Module | None = None, processor=None):
    """Load and check everything ``config`` names: ``(encoded tasks, base model)``. Fails before any training."""
    raw = list(tasks) if tasks is not None else build_stream(config)
    if not raw:
        raise RunConfigError("The task stream is empty.")
    for position, task in enumerate(raw):
        task.task_id = position
        for split, data in (("train", task.train), ("test", task.test)):
            if len(data) == 0:
                raise RunConfigError(f"Task {position} ({task.name}) has no {split} examples: give every task some.")
    image = _is_image(raw, config)
    needs_processor = not any(c in raw[0].train.column_names for c in ("input_ids", "pixel_values"))
    if processor is None and needs_processor:
        processor = load_processor(config, image)
    with quiet_loading():
        encoded = encode_tasks(raw, processor, label_column=config.label_column, text_column=config.text_column,
                               image_column=config.image_column, max_length=config.max_length)  # fmt: skip
        labels = num_labels(encoded)
        if model is None:
            model = load_model(config, labels, image, processor)
    for gp in {config.gp, not config.gp} if config.compare_baseline else {config.gp}:
        check_peft_config(peft_config_for(config, encoded, model, gp), model)  # before any training
    return encoded, model


def check_peft_config(peft_config, model: nn.Module) -> None:
    """Build the PEFT model once on a copy, so that wrong target modules fail before training, with a hint."""
    try:
        build_peft_model(copy.deepcopy(model), peft_config)
    except ValueError as error:
        names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise RunConfigError(
            f"The {type(peft_config).__name__} does not fit {type(model).__name__}: {error} Set "
            f"paradigm_kwargs.target_modules to some of this model's linear layers: {names}."
        ) from error
