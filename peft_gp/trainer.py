"""``GPTrainer``: a ``transformers.Trainer`` whose ``train()`` is one task of a continual-learning sequence."""

from __future__ import annotations

import os
import time
import warnings
from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .collect import summarize_report, update_memory
from .hub import TaskPush, push_task_to_hub, task_branch
from .loading import load_memory, load_task_state
from .memory import GP_MEMORY_NAME, GPMemory, GPMemoryError
from .memory_data import longest_first, task_classes
from .paradigms.base import gp_config_of, unwrap_peft_model
from .projector import GPProjector, raw_optimizer
from .state import get_memory
from .task_state import get_task_state

TRAINER_STATE_NAME = "trainer_state.json"  # transformers.trainer's own name for it


class GPTrainer(Trainer):
    """Trains one task per ``train()`` call with gradient projection against the memory of the earlier tasks.

    On top of ``Trainer`` it only: attaches the projection to the optimizer it creates (``create_optimizer``), starts
    every task with fresh optimizer state (``train``), stores the finished task in the memory when ``train()`` ends,
    reloads the memory with a checkpoint (``_load_from_checkpoint``), and adds GP statistics to the logs (``log``).
    Checkpoints and ``save_model`` write ``gp_memory.safetensors`` beside the adapter weights.

    Args:
        *args, **kwargs: as for ``transformers.Trainer``; ``model`` must be a PEFT model built from a GP config.
        gp_update_memory: store the task in the memory at the end of ``train()`` (from ``train_dataset``). Set it to
            ``False`` to call ``update_memory(dataset)`` yourself, e.g. with another sample of the task.
        gp_adapter_name: the adapter to train and protect (default: the active one).
        gp_log_per_layer: log each layer's basis size (``gp_basis/<layer>``) after a memory update, besides the
            summary (``gp_capacity_mean``, ``gp_capacity_max``, ``gp_captured_energy_mean``).
        gp_task_name: name of the task this ``train()`` call trains (model card, ``gp_tasks.json``, commit message);
            set ``trainer.gp_task_name`` again before the next task. Default: ``task-01``, ``task-02``, ...
        gp_push_to_hub: after each task (``train()`` and the memory update), push it with
            ``peft_gp.hub.push_task_to_hub`` to this repo id (``True``: ``args.hub_model_id``) as one commit with the
            branch ``task-XX``. It is saved first to ``<output_dir>/task-XX``; a failed push raises
            ``peft_gp.hub.GPHubError`` after that save. ``args.hub_private_repo`` and ``args.hub_token`` apply.
        gp_push_kwargs: more arguments for ``push_task_to_hub`` (``create_pr``, ``subfolder_per_task``,
            ``accuracy_matrix``, ``plot_path``, ``extra_files``, ...).
    """

    _tag_names = ["peft", "peft-gp", "continual-learning"]

    def __init__(
        self,
        *args: Any,
        gp_update_memory: bool = True,
        gp_adapter_name: str | None = None,
        gp_log_per_layer: bool = True,
        gp_task_name: str | None = None,
        gp_push_to_hub: str | bool = False,
        gp_push_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if gp_push_to_hub and getattr(training_args, "push_to_hub", False):  # refused before Trainer creates the repo
            raise ValueError(
                "Both TrainingArguments(push_to_hub=True) and gp_push_to_hub are set: the Trainer would also push the "
                "whole output_dir (task folders included) to main at every save. Keep gp_push_to_hub (one commit and "
                "branch per task) and set push_to_hub=False (hub_model_id, hub_token, hub_private_repo still apply)."
            )
        super().__init__(*args, **kwargs)
        if gp_push_to_hub is True:
            gp_push_to_hub = self.args.hub_model_id
            if not gp_push_to_hub:
                raise ValueError(
                    "gp_push_to_hub=True takes the repo id from TrainingArguments.hub_model_id, which is not set. "
                    "Pass gp_push_to_hub='user/repo' or set hub_model_id."
                )
        reserved = {"model", "repo_id", "task_id", "task_name", "local_dir"} & set(gp_push_kwargs or {})
        if reserved:
            raise ValueError(f"gp_push_kwargs may not set {sorted(reserved)}: GPTrainer sets them for each task.")
        self.gp_task_name = gp_task_name
        self.gp_push_to_hub = gp_push_to_hub or None
        self.gp_push_kwargs = dict(gp_push_kwargs or {})
        self.gp_last_push: TaskPush | None = None
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or self.args.fsdp or self.args.deepspeed:
            raise NotImplementedError(
                "GPTrainer does not support FSDP or DeepSpeed yet: they shard the adapter parameters and their "
                "gradients, and peft_gp does not project sharded tensors yet. Use DDP (torchrun or accelerate launch "
                "--multi_gpu): PEFT adapters are small enough to replicate."
            )
        peft_model = unwrap_peft_model(self.model)
        self.gp_adapter_name = gp_adapter_name or peft_model.active_adapter
        self.gp_config = gp_config_of(peft_model, self.gp_adapter_name)
        self.gp_update_memory = gp_update_memory
        self.gp_memory_seconds = 0.0  # duration of the last memory update
        self.gp_log_per_layer = gp_log_per_layer
        self.gp_projector = GPProjector(peft_model, self.gp_adapter_name)
        self._gp_owns_optimizer = self.optimizer is None
        if self.optimizer is not None:
            self.gp_projector.attach(self.optimizer)

    @property
    def gp_memory(self) -> GPMemory:
        """The memory of the trained adapter (grows at the end of every task)."""
        return get_memory(self.model, self.gp_adapter_name)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        self.gp_projector.attach(optimizer)
        return optimizer

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """Train one task (projecting from the second task on), then store it in the memory."""
        if resume_from_checkpoint in (None, False):
            self._fresh_optimizer_state()
        elif resume_from_checkpoint is True:
            resume_from_checkpoint = self._last_complete_checkpoint()
        self.gp_projector.reset_stats()
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        if self.gp_update_memory:
            self.update_memory()
            if self.gp_push_to_hub:
                self.push_task_to_hub()
        return output

    def push_task_to_hub(self, **overrides: Any) -> TaskPush | None:
        """Push the last stored task to ``gp_push_to_hub`` (saved first to ``<output_dir>/task-XX``).

        Called by ``train()`` when ``gp_push_to_hub`` is set; call it yourself after ``update_memory`` otherwise.
        ``overrides`` update ``gp_push_kwargs`` for this push. Only the main process pushes (others return ``None``).
        """
        repo_id = overrides.pop("repo_id", None) or self.gp_push_to_hub
        if not repo_id:
            raise ValueError("No repo to push to: pass repo_id=, or build the trainer with gp_push_to_hub='org/repo'.")
        if not self.args.should_save:
            return None
        task_id = self.gp_memory.tasks_seen - 1
        options = {"private": bool(self.args.hub_private_repo), "token": self.args.hub_token}
        options.update(self.gp_push_kwargs)
        options.update(overrides)
        self.gp_last_push = push_task_to_hub(
            self.model,
            repo_id,
            task_id,
            get_task_state(self.model, self.gp_adapter_name).task_names[task_id],
            local_dir=os.path.join(self.args.output_dir, task_branch(task_id)),
            adapter_name=self.gp_adapter_name,
            **options,
        )
        return self.gp_last_push

    def _last_complete_checkpoint(self) -> str:
        # Trainer writes a checkpoint folder file by file; a run killed mid-save leaves a partial last folder.
        # Resume from the newest folder that holds everything (trainer state is written last).
        folder = self.args.output_dir
        numbered = []
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            if name.startswith(PREFIX_CHECKPOINT_DIR + "-") and name.split("-")[-1].isdigit():
                numbered.append((int(name.split("-")[-1]), os.path.join(folder, name)))
        adapter_folder = "" if self.gp_adapter_name == "default" else self.gp_adapter_name
        skipped = []
        for _, path in sorted(numbered, reverse=True):
            needed = [TRAINER_STATE_NAME, os.path.join(adapter_folder, GP_MEMORY_NAME)]
            if all(os.path.isfile(os.path.join(path, name)) for name in needed):
                if skipped:
                    warnings.warn(f"Skipping incomplete checkpoint(s) {skipped}; resuming from {path}.", stacklevel=3)
                return path
            skipped.append(path)
        raise ValueError(
            f"No complete checkpoint in {folder} (one holds {TRAINER_STATE_NAME} and {GP_MEMORY_NAME}); "
            f"found {sorted(p for _, p in numbered)}. Pass resume_from_checkpoint=None to start the task afresh."
        )

    def _fresh_optimizer_state(self) -> None:
        # Each task starts from zero moments: Adam state of the previous task points into the protected space.
        if self.optimizer is None:
            return
        if self._gp_owns_optimizer:
            self.optimizer, self.lr_scheduler = None, None
        else:
            raw_optimizer(self.optimizer).state.clear()

    def update_memory(self, dataset=None) -> dict[str, dict[str, float]]:
        """Store a finished task: grow the bases from ``gp_memory_samples`` examples of ``dataset``.

        ``dataset`` defaults to ``train_dataset``; it goes through this trainer's collator and column removal, as in
        evaluation. Shows a progress bar over its batches (unless ``args.disable_tqdm``), keeps its duration in
        ``gp_memory_seconds``, and returns the per-layer growth report; logs basis sizes and captured energy.
        """
        start = time.perf_counter()
        dataset = self.train_dataset if dataset is None else dataset
        if dataset is None:
            raise ValueError("update_memory needs a dataset: pass one, or give the trainer a train_dataset.")
        classes = task_classes(dataset)
        size = len(dataset)
        if size == 0:
            raise GPMemoryError(
                "update_memory got an empty dataset: pass the finished task's data. Nothing was stored."
            )
        samples = min(self.gp_config.gp_memory_samples, size)
        if samples < size:
            generator = torch.Generator().manual_seed(self.args.seed)
            indices = sorted(torch.randperm(size, generator=generator)[:samples].tolist())
            dataset = dataset.select(indices) if hasattr(dataset, "select") else Subset(dataset, indices)
        batches = self._memory_dataloader(dataset)
        if not self.args.disable_tqdm and self.is_local_process_zero():
            batches = tqdm(batches, desc="GP memory update", leave=False)
        report = update_memory(
            self.model,
            batches,
            adapter_name=self.gp_adapter_name,
            max_samples=samples,
            stacklevel=3,
            task_name=self.gp_task_name,
            classes=classes,
        )
        self.gp_memory_seconds = time.perf_counter() - start
        logs = {
            "gp_tasks_seen": float(self.gp_memory.tasks_seen),
            "gp_memory_seconds": self.gp_memory_seconds,
            **summarize_report(report),
        }
        if self.gp_log_per_layer:
            logs.update({f"gp_basis/{name}": float(entry["basis_size"]) for name, entry in report.items()})
        self.log(logs)
        return report

    def _memory_dataloader(self, dataset) -> DataLoader:
        # Each process takes every world_size-th example: no padding or duplicates (unlike evaluation loaders), so
        # the summed Gram matrices equal those of one process over the whole sample.
        # Longest first, so that a collator that pads to the batch's longest text pads little: padding never enters
        # the memory, so the order changes only the cost (the Gram matrices are sums over examples).
        dataset = longest_first(dataset)
        world_size, rank = self.args.world_size, self.args.process_index
        if world_size > 1:
            indices = list(range(rank, len(dataset), world_size))
            dataset = dataset.select(indices) if hasattr(dataset, "select") else Subset(dataset, indices)
        collator = self.data_collator
        if isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="memory")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="memory")
        return DataLoader(dataset, batch_size=self.args.eval_batch_size, collate_fn=collator)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        subfolder = None if self.gp_adapter_name == "default" else self.gp_adapter_name
        try:
            load_memory(self.model, resume_from_checkpoint, adapter_name=self.gp_adapter_name, subfolder=subfolder)
        except GPMemoryError as error:
            raise GPMemoryError(
                f"Cannot resume from {resume_from_checkpoint}: {error} Training without it would not protect the "
                "earlier tasks."
            ) from error
        load_task_state(self.model, resume_from_checkpoint, adapter_name=self.gp_adapter_name, subfolder=subfolder)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:
            logs.update(self.gp_projector.pop_stats())
        super().log(logs, *args, **kwargs)
