"""The task loop of the generative scenario: a causal LM learns prompt -> answer tasks one after another.

``train_generative(base, tasks, tokenizer, config, method)`` trains the stream with one ``GenerativeMethod`` and
reads, after each task, exact match and answer loss on every task seen so far (``R[t][k]``) and the held-out general
text's perplexity. A method says how it builds its model, wraps each task and trains it: ``PeftMethod`` is GP
(``GPTrainer``; optionally with the general text stored as "task 0" before the first task) or plain PEFT
(``transformers.Trainer``); benchmarks add others (e.g. PEFT's OSF) that run on the same data and steps.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from ..core.metrics import accuracy_matrix_summary
from ..training.trainer import GPTrainer
from ..wiring.collect import update_memory
from ..wiring.memory import GP_MEMORY_NAME
from ..wiring.persistence import save_memory
from ..wiring.state import get_memory
from .config import RunConfig
from .generative import PadCollator, evaluate_generative, perplexity
from .loading import gp_settings_of
from .paradigms import build_peft_model, make_peft_config
from .results import MethodResult

TRAIN_COLUMNS = ["input_ids", "attention_mask", "labels"]


@dataclass
class GenerativeResult(MethodResult):
    """A ``MethodResult`` whose matrix is exact match, plus the answer-loss matrix, the general-text perplexity after
    each task and the size of the method's memory file (``None`` where it keeps none)."""

    loss_matrix: list[list[float | None]] = field(default_factory=list)
    perplexity: list[float] = field(default_factory=list)
    memory_file_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "loss_matrix": self.loss_matrix, "perplexity": self.perplexity,
                "memory_file_bytes": self.memory_file_bytes}  # fmt: skip


class GenerativeMethod:
    """How one method trains a stream. Subclasses override what differs; the defaults keep the model as it is."""

    name = "method"
    label = "method"

    def start(self, base_model: nn.Module) -> nn.Module:
        """The model the first task trains (a copy: the base model is shared by all methods)."""
        return copy.deepcopy(base_model)

    def before_task(self, model: nn.Module, task_id: int, n_tasks: int) -> nn.Module:
        return model

    def trainer(self, model: nn.Module, args: TrainingArguments, train: Dataset, collator, task) -> Trainer:
        return Trainer(model=model, args=args, train_dataset=train, data_collator=collator)

    def after_task(self, model: nn.Module, task_id: int, n_tasks: int) -> nn.Module:
        """Called after the task's evaluation (e.g. to merge and unload an adapter before the next task)."""
        return model

    def task_record(self, trainer: Trainer) -> dict[str, Any]:
        return {}

    def memory_file_bytes(self, model: nn.Module) -> int | None:
        return None


class PeftMethod(GenerativeMethod):
    """A PEFT adapter trained by ``GPTrainer`` (a GP config) or ``transformers.Trainer``; with ``reference``
    (encoded general text), GP first stores it in the memory as the task ``"reference"``."""

    def __init__(self, peft_config, gp: bool, label: str, seed: int, reference: Dataset | None = None,
                 pad_token_id: int = 0, batch_size: int = 16):  # fmt: skip
        self.peft_config, self.gp, self.label, self.seed = peft_config, gp, label, seed
        self.name = ("gp_reference" if reference is not None else "gp") if gp else "baseline"
        self.reference, self.pad_token_id, self.batch_size = reference, pad_token_id, batch_size
        self.reference_seconds: float | None = None
        self.initial: dict[str, torch.Tensor] = {}

    def start(self, base_model: nn.Module) -> nn.Module:
        torch.manual_seed(self.seed)  # the same adapter initialisation for every method
        model = build_peft_model(copy.deepcopy(base_model), self.peft_config)
        self.initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        if self.reference is not None:
            began = time.perf_counter()
            loader = DataLoader(self.reference, batch_size=self.batch_size, collate_fn=PadCollator(self.pad_token_id))
            update_memory(model, loader, max_samples=len(self.reference), task_name="reference")
            self.reference_seconds = round(time.perf_counter() - began, 2)
        return model

    def trainer(self, model: nn.Module, args: TrainingArguments, train: Dataset, collator, task) -> Trainer:
        if not self.gp:
            return super().trainer(model, args, train, collator, task)
        return GPTrainer(model=model, args=args, train_dataset=train, data_collator=collator,
                                 gp_task_name=task.name, gp_log_per_layer=False)  # fmt: skip

    def task_record(self, trainer: Trainer) -> dict[str, Any]:
        if not self.gp:
            return {}
        capacity = get_memory(trainer.model).capacity()
        return {"memory_update_seconds": round(getattr(trainer, "gp_memory_seconds", 0.0) or 0.0, 2),
                "gp_capacity_mean": round(sum(capacity.values()) / max(len(capacity), 1), 4)}  # fmt: skip

    def memory_file_bytes(self, model: nn.Module) -> int | None:
        if not self.gp:
            return None
        with tempfile.TemporaryDirectory() as folder:
            save_memory(model, folder)
            return sum(p.stat().st_size for p in Path(folder).iterdir() if p.name == GP_MEMORY_NAME)


def training_args(config: RunConfig, output_dir: str) -> TrainingArguments:
    """One task's ``TrainingArguments`` (the optimizer starts fresh for every task; nothing is saved)."""
    return TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=config.batch_size, num_train_epochs=config.epochs,
        learning_rate=config.learning_rate, weight_decay=config.weight_decay, logging_strategy="epoch",
        save_strategy="no", report_to="none", seed=config.seed, disable_tqdm=not config.progress,
        dataloader_num_workers=0, dataloader_pin_memory=torch.cuda.is_available(), remove_unused_columns=False,
    )  # fmt: skip


def evaluate_row(model: nn.Module, tokenizer, tasks: Sequence, upto: int, batch_size: int) -> list[dict[str, Any]]:
    """``evaluate_generative`` on the test sets of tasks ``0..upto``."""
    return [evaluate_generative(model, tokenizer, tasks[k].test, batch_size) for k in range(upto + 1)]


def _pad(row: list, total: int) -> list:
    return row + [None] * (total - len(row))


def train_task(method: GenerativeMethod, model: nn.Module, task, config: RunConfig, collator,
               scratch: str) -> tuple[Trainer, float, float]:  # fmt: skip
    """Train one task with ``method``'s trainer: ``(trainer, training loss, seconds)``."""
    train = task.train.select_columns(TRAIN_COLUMNS)
    trainer = method.trainer(model, training_args(config, scratch), train, collator, task)
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    output = trainer.train()
    return trainer, float(output.training_loss), time.perf_counter() - start


def train_generative(base_model: nn.Module, tasks: Sequence, tokenizer, config: RunConfig, method: GenerativeMethod,
                     heldout: Dataset | None = None, say=print) -> GenerativeResult:  # fmt: skip
    """Train ``tasks`` in order with ``method``; after each: exact match and answer loss on the tasks seen so far,
    and the perplexity of ``heldout`` (encoded general text)."""
    began = time.perf_counter()
    model = method.start(base_model)
    collator = PadCollator(tokenizer.pad_token_id)
    matrix, losses, ppl, records = [], [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        for task in tasks:
            t = task.task_id
            model = method.before_task(model, t, len(tasks))
            trainer, loss, seconds = train_task(method, model, task, config, collator, scratch)
            start = time.perf_counter()
            row = evaluate_row(model, tokenizer, tasks, t, config.eval_batch_size)
            matrix.append(_pad([r["exact_match"] for r in row], len(tasks)))
            losses.append(_pad([round(r["answer_loss"], 4) for r in row], len(tasks)))
            if heldout is not None:
                ppl.append(perplexity(model, heldout, tokenizer.pad_token_id, config.eval_batch_size))
            records.append({
                "task_id": t, "name": task.name, "train_examples": len(task.train), "train_seconds": round(seconds, 2),
                "eval_seconds": round(time.perf_counter() - start, 2), "train_loss": round(loss, 4),
                "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "exact_match": matrix[-1][: t + 1], "answer_loss": losses[-1][: t + 1],
                "sample_predictions": row[-1]["predictions"][:5], **method.task_record(trainer)})  # fmt: skip
            say(f"  [{method.label}] task {t + 1}/{len(tasks)} {task.name}: {seconds:.0f}s, loss {loss:.3f}, exact "
                f"match so far {[round(100 * v, 1) for v in matrix[-1][: t + 1]]}"
                + (f", perplexity {ppl[-1]:.2f}" if ppl else ""))  # fmt: skip
            model = method.after_task(model, t, len(tasks))
    return GenerativeResult(
        method=method.name, label=method.label, accuracy_matrix=matrix, metrics=accuracy_matrix_summary(matrix),
        tasks=records, seconds=round(time.perf_counter() - began, 2), model=model, loss_matrix=losses,
        perplexity=ppl, memory_file_bytes=method.memory_file_bytes(model),
    )  # fmt: skip


def peft_methods(config: RunConfig, reference: Dataset | None, pad_token_id: int) -> list[PeftMethod]:
    """The methods a config asks for: GP (with the reference memory if set), then plain PEFT with
    ``compare_baseline`` (or plain alone with ``gp: false``)."""
    gp_settings = gp_settings_of(config)
    name = {"lora": "LoRA", "adapter": "Adapter", "prefix": "Prefix", "prompt": "Prompt"}.get(config.paradigm,
                                                                                              config.paradigm)
    methods = []
    for gp in [config.gp] + ([not config.gp] if config.compare_baseline else []):
        peft_config = make_peft_config(config.paradigm, dict(config.paradigm_kwargs), gp_settings if gp else None,
                                       "CAUSAL_LM")  # fmt: skip
        use_reference = reference if gp and config.reference_memory else None
        label = (f"GP-{name}" + (" + reference" if use_reference is not None else "")) if gp else f"{name} (no GP)"
        methods.append(PeftMethod(peft_config, gp, label, config.seed, use_reference, pad_token_id,
                                  config.eval_batch_size))  # fmt: skip
    return methods
