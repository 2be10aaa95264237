"""The task loop: ``run_sequence(config)`` trains a task stream one task at a time and evaluates after each task.

Everything the config names is loaded and checked first (data, classes, tokenizer or image processor, the model and
its head), so a bad input fails before any training. Then, for the GP run and (with ``compare_baseline``) the plain
run, from the same initial weights:

1. each task trains with ``GPTrainer`` (projected from the second task on; memory stored when ``train()`` ends) or,
   for the baseline, ``transformers.Trainer`` on the same sequence, with the head's logits masked per task;
2. after each task, the model is evaluated on the test sets of all tasks seen so far -> accuracy matrix ``R[t][k]``;
3. the run writes ``result.json``, ``summary.md`` and the plots to the output folder.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments, default_data_collator
from transformers.trainer_callback import PrinterCallback, ProgressCallback

import peft_gp

from ..core.metrics import accuracy_matrix_summary
from ..hub import push_task_to_hub, task_branch
from ..wiring.memory_data import example_lengths, longest_first
from .config import RunConfig, RunConfigError
from .heads import MaskedCrossEntropy, check_head, masked_predictions, prediction_classes, training_classes
from .paradigms import build_peft_model, make_peft_config
from .sources import load_source, resolve_model
from .tasks import Task, class_incremental_split, dataset_sequence, encode_tasks, num_labels

GP_FIELDS = ("gp_threshold", "gp_threshold_increment", "gp_projection", "gp_memory_samples", "gp_modules_to_save")
FULL_LAYER_WARNING = "The memory (now )?fills the whole feature space"
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values")


@dataclass
class MethodResult:
    """One method's run over the stream: the accuracy matrix (fractions), its metrics, per-task records.

    ``task_il_matrix`` is the same evaluation with the task id given (the argmax over each task's own classes), from
    the same forward passes; in the task-incremental scenario it equals ``accuracy_matrix``.

    Each task record holds ``train_seconds`` (``train()``, including GP's memory update), ``memory_update_seconds``,
    the training loss, the accuracy row and GP statistics. ``model`` is the trained PEFT model (not serialised).
    """

    method: str
    label: str
    accuracy_matrix: list[list[float | None]]
    metrics: dict[str, float]
    tasks: list[dict[str, Any]]
    seconds: float
    model: nn.Module | None = field(default=None, repr=False, compare=False)
    task_il_matrix: list[list[float | None]] | None = None

    @property
    def task_il_metrics(self) -> dict[str, float] | None:
        """The metrics of ``task_il_matrix`` (``None`` when it was not recorded)."""
        return accuracy_matrix_summary(self.task_il_matrix) if self.task_il_matrix else None

    def to_dict(self) -> dict[str, Any]:
        record = {
            "method": self.method,
            "label": self.label,
            "accuracy_matrix": self.accuracy_matrix,
            "metrics": self.metrics,
            "tasks": self.tasks,
            "seconds": self.seconds,
        }
        if self.task_il_matrix is not None:
            record["task_il_matrix"] = self.task_il_matrix
            record["task_il_metrics"] = self.task_il_metrics
        return record


@dataclass
class RunResult:
    """What ``run_sequence`` returns: the config, the stream, each method's results and the files written."""

    config: RunConfig
    stream: list[dict[str, Any]]
    results: dict[str, MethodResult]
    paths: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def main(self) -> MethodResult:
        return next(iter(self.results.values()))

    @property
    def accuracy_matrix(self) -> list[list[float | None]]:
        return self.main.accuracy_matrix

    @property
    def metrics(self) -> dict[str, float]:
        return self.main.metrics

    @property
    def baseline(self) -> MethodResult | None:
        return self.results.get("baseline")

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "stream": self.stream,
            "results": {name: result.to_dict() for name, result in self.results.items()},
            "paths": self.paths,
            **self.info,
        }


# ---- loading and checking ---------------------------------------------------------------------------------------


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
            path, extra = resolve_model(config.model)
            if "gguf_file" in extra:
                extra["dtype"] = torch.float32
            model = auto.from_pretrained(path, num_labels=labels, **extra)
            if "gguf_file" in extra:
                model = _without_quantizer(model, auto)
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


def _without_quantizer(model: nn.Module, auto) -> nn.Module:
    """GGUF weights are dequantised on load, but the model stays marked as quantized and ``Trainer`` refuses it:
    rebuild a plain model from its config and copy the (float32) weights over."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = auto.from_config(config)
    plain.load_state_dict(model.state_dict())
    return plain


def _task_type(tasks: Sequence[Task]) -> str | None:
    # PEFT's SEQ_CLS task type keeps the text classifier trainable; image models name their head in modules_to_save.
    return None if "pixel_values" in tasks[0].train.column_names else "SEQ_CLS"


# ---- training and evaluation --------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_task(model: nn.Module, dataset, allowed: Sequence[int], batch_size: int = 64) -> float:
    """Accuracy on ``dataset`` with the prediction restricted to the ``allowed`` label ids."""
    return evaluate_views(model, dataset, [allowed], batch_size)[0]


def collate_batch(features: Sequence[dict]) -> dict[str, torch.Tensor]:
    """``default_data_collator`` over the model inputs and ``labels``, with the trailing padding columns that no
    example of the batch uses cut off: a batch of short texts costs its longest text, not ``max_length``. (Only
    right padding is cut, so positions never move.)"""
    keep = (*INPUT_KEYS, "labels")
    batch = default_data_collator([{k: v for k, v in f.items() if k in keep} for f in features])
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] > 0:
        used = mask.bool().any(0).nonzero()
        width = int(used.max()) + 1 if used.numel() else mask.shape[1]
        if width < mask.shape[1]:
            for key in ("input_ids", "attention_mask", "token_type_ids"):
                if key in batch and tuple(batch[key].shape) == tuple(mask.shape):
                    batch[key] = batch[key][:, :width]
    return batch


@torch.no_grad()
def evaluate_views(model: nn.Module, dataset, views: Sequence[Sequence[int]], batch_size: int = 64) -> list[float]:
    """Accuracies on ``dataset`` for several restrictions of the prediction (one forward pass): e.g. the classes seen
    so far (class-incremental) and the task's own classes (task-incremental)."""
    model.eval()
    device = next(model.parameters()).device
    correct = [0] * len(views)
    total = 0
    dataset = longest_first(dataset)  # batches of similar length, cut by collate_batch (same accuracies)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_batch)
    for batch in loader:
        inputs = {k: v.to(device) for k, v in batch.items() if k in INPUT_KEYS}
        logits = model(**inputs).logits
        for i, allowed in enumerate(views):
            correct[i] += (masked_predictions(logits, allowed).cpu() == batch["labels"]).sum().item()
        total += batch["labels"].shape[0]
    return [c / total for c in correct]


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _method_label(config: RunConfig, gp: bool) -> str:
    name = {"lora": "LoRA", "adapter": "Adapter", "prefix": "Prefix", "prompt": "Prompt"}.get(
        config.paradigm, config.paradigm
    )
    return f"GP-{name}" if gp else f"{name} (no GP)"


def peft_config_for(config: RunConfig, tasks: Sequence[Task], base_model: nn.Module, gp: bool):
    """The PEFT config of the run's paradigm for this model (GP settings only when ``gp``)."""
    head = check_head(base_model, num_labels(tasks))
    task_type = _task_type(tasks)
    options = dict(config.paradigm_kwargs)
    if task_type is None and "modules_to_save" not in options:
        options["modules_to_save"] = [head]  # PEFT adds the head itself only for SEQ_CLS
    gp_settings = {name: getattr(config, name) for name in GP_FIELDS} if gp else None
    if gp_settings is not None:
        gp_settings["gp_modules_to_save"] = config.modules_to_save_policy
    return make_peft_config(config.paradigm, options, gp_settings, task_type)


def train_stream(
    base_model: nn.Module, tasks: Sequence[Task], config: RunConfig, gp: bool, say=print
) -> tuple[MethodResult, dict[str, torch.Tensor]]:
    """Train ``tasks`` in order on a copy of ``base_model``; evaluate after each. Returns the result and the initial
    trainable weights (to check that compared methods start alike)."""
    peft_config = peft_config_for(config, tasks, base_model, gp)
    torch.manual_seed(config.seed)  # same adapter initialisation for every method
    model = build_peft_model(copy.deepcopy(base_model), peft_config)
    initial = _trainable_state(model)
    loss = MaskedCrossEntropy()
    label = _method_label(config, gp)
    matrix: list[list[float | None]] = []
    task_il_matrix: list[list[float | None]] = []
    records = []
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        for task in tasks:
            task_id = task.task_id
            grouped = config.group_by_length and "attention_mask" in task.train.column_names
            loss.allowed = training_classes(tasks, task_id, config.masking)
            args = TrainingArguments(
                output_dir=scratch,
                per_device_train_batch_size=config.batch_size,
                per_device_eval_batch_size=config.eval_batch_size,
                num_train_epochs=config.epochs,
                learning_rate=config.learning_rate,
                weight_decay=config.weight_decay,
                logging_strategy="epoch",
                save_strategy="no",
                report_to="none",
                seed=config.seed,
                disable_tqdm=not config.progress,
                dataloader_num_workers=0,
                dataloader_pin_memory=torch.cuda.is_available(),
                remove_unused_columns=not grouped,  # collate_batch drops the extra columns (grouping: "length")
            )
            train = task.train.add_column("length", example_lengths(task.train)) if grouped else task.train
            kwargs = dict(model=model, args=args, train_dataset=train, compute_loss_func=loss,
                          data_collator=collate_batch)  # fmt: skip
            trainer_class = _trainer_class(gp, grouped)
            trainer = trainer_class(**kwargs, gp_log_per_layer=False) if gp else trainer_class(**kwargs)
            trainer.remove_callback(PrinterCallback)
            if config.progress:  # the bar, without a printed dict of logs per epoch
                trainer.remove_callback(ProgressCallback)
                trainer.add_callback(_QuietProgress)
            start = time.perf_counter()
            output = trainer.train()
            seconds = time.perf_counter() - start
            both = [
                evaluate_views(model, tasks[k].test, [prediction_classes(tasks, task_id, k, config.scenario),
                                                      tasks[k].classes], config.eval_batch_size)
                for k in range(task_id + 1)
            ]  # fmt: skip
            row = [scenario_view for scenario_view, _ in both]
            matrix.append(row + [None] * (len(tasks) - task_id - 1))
            task_il_matrix.append([own for _, own in both] + [None] * (len(tasks) - task_id - 1))
            record: dict[str, Any] = {
                "task_id": task_id,
                "name": task.name,
                "train_examples": len(task.train),
                "train_seconds": round(seconds, 2),
                "train_loss": round(float(output.training_loss), 4),
                "accuracy": [round(v, 4) for v in row],
            }
            if gp:
                memory = peft_gp.get_memory(model)
                removed = [e["gp_grad_removed"] for e in trainer.state.log_history if "gp_grad_removed" in e]
                record["memory_update_seconds"] = round(trainer.gp_memory_seconds, 2)
                record["gp_grad_removed_last_epoch"] = round(removed[-1], 4) if removed else None
                capacity = memory.capacity()
                record["gp_capacity_mean"] = round(sum(capacity.values()) / max(len(capacity), 1), 4)
                record["gp_full_groups"] = len(memory.full_groups())
                record["gp_groups"] = len(capacity)
            if gp and config.push_to_hub:

                push = push_task_to_hub(
                    model,
                    config.push_to_hub,
                    task_id=task_id,
                    task_name=task.name,
                    local_dir=str(config.run_dir / "hub" / task_branch(task_id)),
                    private=config.hub_private,
                    classes=list(task.classes),
                    accuracy_matrix=[r[: k + 1] for k, r in enumerate(matrix)],
                )
                record["hub_revision"] = push.revision
            records.append(record)
            extra = ""
            if gp:
                extra = (f"; memory {100 * record['gp_capacity_mean']:.0f}% of feature dims (mean), "
                         f"{record['gp_full_groups']}/{record['gp_groups']} layers full")  # fmt: skip
            say(
                f"  [{label}] task {task_id + 1}/{len(tasks)} {task.name}: {len(task.train)} examples, "
                f"{seconds:.0f}s, "
                f"loss {record['train_loss']:.3f}, accuracy so far {[round(100 * v, 1) for v in row]}{extra}"
            )
    result = MethodResult(
        method="gp" if gp else "baseline",
        label=label,
        accuracy_matrix=matrix,
        metrics=accuracy_matrix_summary(matrix),
        tasks=records,
        seconds=round(time.perf_counter() - began, 2),
        model=model,
        task_il_matrix=task_il_matrix,
    )
    return result, initial


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Each epoch: a random permutation cut into groups of up to 4 batches, each group sorted by length, so a batch
    holds texts of similar length (transformers' ``get_length_grouped_indices`` with small mega-batches: its own
    sampler uses mega-batches of 50 batches, one random batch each on a task of a few hundred examples)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, batches_per_group: int = 4):
        self.lengths, self.batch_size, self.batches_per_group = list(lengths), batch_size, batches_per_group
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        from transformers.trainer_pt_utils import get_length_grouped_indices

        return iter(get_length_grouped_indices(self.lengths, self.batch_size, self.batches_per_group, self.generator))


class _LengthGrouped:
    """Trainer mixin: training batches from a ``LengthGroupedSampler`` over the dataset's ``length`` column."""

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return LengthGroupedSampler(dataset["length"], self.args.train_batch_size, self.args.seed)


def _trainer_class(gp: bool, grouped: bool) -> type:
    base = peft_gp.GPTrainer if gp else Trainer
    return type(f"LengthGrouped{base.__name__}", (_LengthGrouped, base), {}) if grouped else base


class _QuietProgress(ProgressCallback):
    """transformers' progress bar without its printed log dicts (the runner prints one line per task)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return None


@contextlib.contextmanager
def _quiet_loading():
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


# ---- the run ----------------------------------------------------------------------------------------------------


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
    with _quiet_loading():
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


def run_sequence(
    config: RunConfig | None = None,
    tasks: Sequence[Task] | None = None,
    model: nn.Module | None = None,
    processor=None,
    say=print,
) -> RunResult:
    """Run the task stream of ``config`` (with GP, and without it when ``compare_baseline``) and write the outputs.

    Args:
        config: The run (``RunConfig()``: the offline BBC News default).
        tasks: A ready task stream (``class_incremental_split``, ``dataset_sequence``) instead of ``config.dataset``.
        model: A base classification model (not a PEFT model) instead of ``config.model``.
        processor: The tokenizer or image processor for raw ``tasks`` (default: ``config.model``'s).
        say: Where progress lines go (``print``; ``lambda *_: None`` for silence).
    Returns:
        The ``RunResult``: accuracy matrices, metrics, per-task timings and the paths of the files written.
    """
    from .report import write_outputs

    config = config or RunConfig()
    if config.scenario == "generative":  # a causal LM on prompt -> answer tasks: its own loading, loop and metrics
        from .generative_runner import run_generative

        return run_generative(config, tasks, model, processor, say)
    began = time.perf_counter()
    encoded, base_model = prepare(config, tasks, model, processor)
    say(
        f"{config.name}: {config.scenario}-incremental, {len(encoded)} tasks "
        f"{[t.name for t in encoded]}, {sum(len(t.train) for t in encoded)} train / "
        f"{sum(len(t.test) for t in encoded)} test examples, head masking '{config.masking}', paradigm "
        f"'{config.paradigm}', {config.epochs:g} epochs per task"
    )
    methods = [config.gp] + ([not config.gp] if config.compare_baseline else [])
    results: dict[str, MethodResult] = {}
    initial_states = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=FULL_LAYER_WARNING, category=UserWarning)  # counted per task
        for gp in methods:
            result, initial = train_stream(base_model, encoded, config, gp, say)
            results[result.method] = result
            initial_states.append(initial)
    same_start = all(
        a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        for a, b in zip(initial_states, initial_states[1:])
    )
    run = RunResult(
        config=config,
        stream=[task.describe() for task in encoded],
        results=results,
        info={
            "peft_gp_version": peft_gp.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "same_initial_weights": same_start if len(methods) > 1 else None,
            "total_seconds": round(time.perf_counter() - began, 2),
        },
    )
    if config.save_adapters:  # adapter weights (and, for GP, gp_memory.safetensors) of each method
        for result in results.values():
            folder = Path(config.run_dir) / f"adapter_{result.method}"
            peft_gp.save_pretrained(result.model, str(folder))
            run.paths[f"adapter_{result.method}"] = str(folder)
    write_outputs(run, Path(config.run_dir))
    return run
