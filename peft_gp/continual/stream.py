"""One method over a task stream: train each task (``GPTrainer`` or plain ``Trainer``), evaluate all tasks seen."""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_pt_utils import get_length_grouped_indices

from ..core.metrics import accuracy_matrix_summary
from ..hub.manifest import task_branch
from ..hub.push import push_task_to_hub
from ..training.trainer import GPTrainer
from ..wiring.class_stats import ClassStatistics, head_module
from ..wiring.memory_data import example_lengths
from ..wiring.state import get_memory, get_state
from .config import RunConfig, RunConfigError
from .evaluation import collate_batch
from .heads import MaskedCrossEntropy, default_heads, prediction_classes, training_classes
from .loading import peft_config_for
from .paradigms import build_peft_model
from .results import HEAD_LABELS, MethodResult
from .stat_heads import build_heads, evaluate_heads, take_statistics
from .tasks import Task


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _method_label(config: RunConfig, gp: bool) -> str:
    name = {"lora": "LoRA", "adapter": "Adapter", "prefix": "Prefix", "prompt": "Prompt"}.get(
        config.paradigm, config.paradigm
    )
    return f"GP-{name}" if gp else f"{name} (no GP)"


def task_arguments(config: RunConfig, output_dir: str, grouped: bool) -> TrainingArguments:
    """The ``TrainingArguments`` of one task of a run (no checkpoints, no reporting)."""
    return TrainingArguments(
        output_dir=output_dir,
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


def task_trainer(model: nn.Module, task: Task, config: RunConfig, gp: bool, loss, output_dir: str) -> Trainer:
    """``GPTrainer`` (GP) or plain ``Trainer`` for one task, length-grouped if asked, with a quiet progress bar."""
    grouped = config.group_by_length and "attention_mask" in task.train.column_names
    train = task.train.add_column("length", example_lengths(task.train)) if grouped else task.train
    kwargs = dict(model=model, args=task_arguments(config, output_dir, grouped), train_dataset=train,
                  compute_loss_func=loss, data_collator=collate_batch)  # fmt: skip
    trainer_class = _trainer_class(gp, grouped)
    trainer = trainer_class(**kwargs, gp_log_per_layer=False) if gp else trainer_class(**kwargs)
    trainer.remove_callback(PrinterCallback)
    if config.progress:  # the bar, without a printed dict of logs per epoch
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_QuietProgress)
    return trainer


def gp_record(trainer: GPTrainer, model: nn.Module) -> dict[str, Any]:
    """The GP statistics of a finished task: memory-update time, gradient share removed, capacity used."""
    memory = get_memory(model)
    removed = [e["gp_grad_removed"] for e in trainer.state.log_history if "gp_grad_removed" in e]
    capacity = memory.capacity()
    return {
        "memory_update_seconds": round(trainer.gp_memory_seconds, 2),
        "gp_grad_removed_last_epoch": round(removed[-1], 4) if removed else None,
        "gp_capacity_mean": round(sum(capacity.values()) / max(len(capacity), 1), 4),
        "gp_full_groups": len(memory.full_groups()),
        "gp_groups": len(capacity),
    }


def push_task(model: nn.Module, task: Task, config: RunConfig, matrix: list) -> str:
    """Push the finished task with the accuracy matrix so far; returns its Hub revision."""
    push = push_task_to_hub(
        model,
        config.push_to_hub,
        task_id=task.task_id,
        task_name=task.name,
        local_dir=str(config.run_dir / "hub" / task_branch(task.task_id)),
        private=config.hub_private,
        classes=list(task.classes),
        accuracy_matrix=[row[: k + 1] for k, row in enumerate(matrix)],
    )
    return push.revision


def _progress_line(label: str, tasks: Sequence[Task], task: Task, record: dict[str, Any], row: list) -> str:
    extra = ""
    if "gp_capacity_mean" in record:
        extra = (f"; memory {100 * record['gp_capacity_mean']:.0f}% of feature dims (mean), "
                 f"{record['gp_full_groups']}/{record['gp_groups']} layers full")  # fmt: skip
    return (
        f"  [{label}] task {task.task_id + 1}/{len(tasks)} {task.name}: {len(task.train)} examples, "
        f"{record['train_seconds']:.0f}s, loss {record['train_loss']:.3f}, accuracy so far "
        f"{[round(100 * v, 1) for v in row]}{extra}"
    )


def train_stream(
    base_model: nn.Module, tasks: Sequence[Task], config: RunConfig, gp: bool, say=print
) -> tuple[MethodResult, dict[str, torch.Tensor]]:
    """Train ``tasks`` in order on a copy of ``base_model``; evaluate after each. Returns the result and the initial
    trainable weights (to check that compared methods start alike)."""
    config = config.replace(heads=default_heads(config, base_model))
    peft_config = peft_config_for(config, tasks, base_model, gp)
    torch.manual_seed(config.seed)  # same adapter initialisation for every method
    model = build_peft_model(copy.deepcopy(base_model), peft_config)
    check_statistics_heads(model, config)
    initial, loss, label = _trainable_state(model), MaskedCrossEntropy(), _method_label(config, gp)
    matrices = HeadMatrices(config.heads)
    records, began, stats = [], time.perf_counter(), None
    with tempfile.TemporaryDirectory() as scratch:
        for task in tasks:
            loss.allowed = training_classes(tasks, task.task_id, config.masking)
            trainer = task_trainer(model, task, config, gp, loss, scratch)
            start = time.perf_counter()
            output = trainer.train()
            seconds = time.perf_counter() - start
            stats = task_statistics(model, task, config, gp, stats)
            row = matrices.add(evaluate_seen(model, tasks, task.task_id, config, stats), len(tasks))
            record: dict[str, Any] = {"task_id": task.task_id, "name": task.name, "train_examples": len(task.train),
                                      "train_seconds": round(seconds, 2), "train_loss": round(output.training_loss, 4),
                                      "accuracy": [round(v, 4) for v in row]}  # fmt: skip
            record.update(gp_record(trainer, model) if gp else {})
            if gp and config.push_to_hub:
                record["hub_revision"] = push_task(model, task, config, matrices.main("class"))
            records.append(record)
            say(_progress_line(label, tasks, task, record, row))
    result = MethodResult(method="gp" if gp else "baseline", label=label, accuracy_matrix=matrices.main("class"),
                          metrics=accuracy_matrix_summary(matrices.main("class")), tasks=records,
                          seconds=round(time.perf_counter() - began, 2), model=model,
                          task_il_matrix=matrices.main("task"), head_matrices=matrices.others(),
                          head=config.heads[0])  # fmt: skip
    return result, initial


def check_statistics_heads(model: nn.Module, config: RunConfig) -> None:
    """Statistics heads need a linear classification head (their weights replace its rows): refuse before training."""
    if config.statistics_heads:
        try:
            head_module(model)
        except ValueError as error:
            raise RunConfigError(f"heads {config.statistics_heads}: {error} Use heads: [trained].") from None


def task_statistics(
    model: nn.Module, task: Task, config: RunConfig, gp: bool, stats: ClassStatistics | None
) -> ClassStatistics | None:
    """The class statistics of every task so far, when the run compares statistics heads: GP's own (taken in its
    memory update), else taken now over the same memory sample and merged into ``stats``."""
    if not config.statistics_heads:
        return None
    if gp:
        return get_state(model).class_stats
    taken = take_statistics(model, task.train, config.gp_memory_samples, config.seed, config.eval_batch_size)
    if stats is None:
        return taken
    stats.merge(taken)
    return stats


def evaluate_seen(
    model: nn.Module, tasks: Sequence[Task], trained_task: int, config: RunConfig, stats: ClassStatistics | None,
    trained: bool = True,
) -> list[dict[str, list[float]]]:  # fmt: skip
    """Per task seen so far: ``head -> [scenario view, task view]`` accuracies, every head from one pass."""
    heads = build_heads(stats, config.heads, head_module(model), config.seed) if config.statistics_heads else {}
    return [evaluate_heads(model, tasks[k].test, [prediction_classes(tasks, trained_task, k, config.scenario),
                                                 tasks[k].classes], heads, config.eval_batch_size, trained)
            for k in range(trained_task + 1)]  # fmt: skip


def frozen_stream(base_model: nn.Module, tasks: Sequence[Task], config: RunConfig, say=print) -> MethodResult:
    """The frozen encoder with each statistics head: no training, the statistics of each task taken when it arrives
    (a LoRA model with ``lora_B = 0`` computes exactly the base model's features)."""
    config = config.replace(heads=default_heads(config, base_model))
    frozen = config.replace(heads=config.statistics_heads, paradigm="lora",
                            paradigm_kwargs=config.paradigm_kwargs if config.paradigm == "lora" else {})  # fmt: skip
    torch.manual_seed(config.seed)
    model = build_peft_model(copy.deepcopy(base_model), peft_config_for(frozen, tasks, base_model, gp=False))
    matrices, stats, began = HeadMatrices(frozen.heads), None, time.perf_counter()
    label = f"Frozen encoder + {HEAD_LABELS[frozen.heads[0]]}"
    for task in tasks:
        stats = task_statistics(model, task, frozen, False, stats)
        row = matrices.add(evaluate_seen(model, tasks, task.task_id, frozen, stats, trained=False), len(tasks))
        say(f"  [{label}] task {task.task_id + 1}/{len(tasks)} {task.name}: accuracy so far "
            f"{[round(100 * v, 1) for v in row]}")  # fmt: skip
    main = matrices.main("class")
    return MethodResult(method="frozen", label="Frozen encoder", head=frozen.heads[0], accuracy_matrix=main,
                        metrics=accuracy_matrix_summary(main), tasks=[],
                        seconds=round(time.perf_counter() - began, 2), model=None,
                        task_il_matrix=matrices.main("task"), head_matrices=matrices.others())  # fmt: skip


class HeadMatrices:
    """Accuracy matrices per head and view (``class``: the scenario's view; ``task``: the task id given). The first
    of ``heads`` is the method's main matrix."""

    def __init__(self, heads: Sequence[str]) -> None:
        self.heads = list(heads)
        self.matrices: dict[str, dict[str, list]] = {head: {"class": [], "task": []} for head in self.heads}

    def add(self, per_task: list[dict[str, list[float]]], n_tasks: int) -> list[float]:
        """Add one row (after a task) from ``evaluate_seen``; returns the main head's scenario row."""
        padding = [None] * (n_tasks - len(per_task))
        for head in self.heads:
            for index, view in enumerate(("class", "task")):
                self.matrices[head][view].append([task[head][index] for task in per_task] + padding)
        return [task[self.heads[0]][0] for task in per_task]

    def main(self, view: str) -> list:
        return self.matrices[self.heads[0]][view]

    def others(self) -> dict[str, dict[str, list]] | None:
        return {head: self.matrices[head] for head in self.heads[1:]} or None


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
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, self.batches_per_group, self.generator))


class _LengthGrouped:
    """Trainer mixin: training batches from a ``LengthGroupedSampler`` over the dataset's ``length`` column."""

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return LengthGroupedSampler(dataset["length"], self.args.train_batch_size, self.args.seed)


def _trainer_class(gp: bool, grouped: bool) -> type:
    base = GPTrainer if gp else Trainer
    return type(f"LengthGrouped{base.__name__}", (_LengthGrouped, base), {}) if grouped else base


class _QuietProgress(ProgressCallback):
    """transformers' progress bar without its printed log dicts (the runner prints one line per task)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return None
