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
from ..hub.card import task_branch
from ..hub.push import push_task_to_hub
from ..training.trainer import GPTrainer
from ..wiring.memory_data import example_lengths
from ..wiring.state import get_memory
from .config import RunConfig
from .evaluation import collate_batch, evaluate_views
from .heads import MaskedCrossEntropy, prediction_classes, training_classes
from .loading import peft_config_for
from .paradigms import build_peft_model
from .results import MethodResult
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
    peft_config = peft_config_for(config, tasks, base_model, gp)
    torch.manual_seed(config.seed)  # same adapter initialisation for every method
    model = build_peft_model(copy.deepcopy(base_model), peft_config)
    initial, loss, label = _trainable_state(model), MaskedCrossEntropy(), _method_label(config, gp)
    matrix: list[list[float | None]] = []
    task_il_matrix: list[list[float | None]] = []
    records, began = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        for task in tasks:
            loss.allowed = training_classes(tasks, task.task_id, config.masking)
            trainer = task_trainer(model, task, config, gp, loss, scratch)
            start = time.perf_counter()
            output = trainer.train()
            seconds = time.perf_counter() - start
            views = [evaluate_views(model, tasks[k].test, [prediction_classes(tasks, task.task_id, k, config.scenario),
                                                            tasks[k].classes], config.eval_batch_size)
                     for k in range(task.task_id + 1)]  # fmt: skip
            padding = [None] * (len(tasks) - task.task_id - 1)
            row = [scenario_view for scenario_view, _ in views]
            matrix.append(row + padding)
            task_il_matrix.append([own for _, own in views] + padding)
            record: dict[str, Any] = {"task_id": task.task_id, "name": task.name, "train_examples": len(task.train),
                                      "train_seconds": round(seconds, 2), "train_loss": round(output.training_loss, 4),
                                      "accuracy": [round(v, 4) for v in row]}  # fmt: skip
            record.update(gp_record(trainer, model) if gp else {})
            if gp and config.push_to_hub:
                record["hub_revision"] = push_task(model, task, config, matrix)
            records.append(record)
            say(_progress_line(label, tasks, task, record, row))
    result = MethodResult(method="gp" if gp else "baseline", label=label, accuracy_matrix=matrix,
                          metrics=accuracy_matrix_summary(matrix), tasks=records,
                          seconds=round(time.perf_counter() - began, 2), model=model,
                          task_il_matrix=task_il_matrix)  # fmt: skip
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
