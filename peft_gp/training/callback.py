"""``GPCallback``: the whole gradient-projection lifecycle of one task, for any ``transformers.Trainer``.

A ``TrainerCallback`` is the integration point every ``Trainer`` subclass honours (``Seq2SeqTrainer``, TRL's
``SFTTrainer``, ...), so ``callbacks=[GPCallback()]`` is all a trainer needs. One ``train()`` call is one task:

* ``on_train_begin``: attach the projection to the trainer's optimizer (the raw one inside accelerate's wrapper);
  start the task with fresh optimizer moments (they point into the protected space); send the task's checkpoints to
  ``<output_dir>/task-XX`` (``peft_gp.checkpoints``); on resume, load the checkpoint's memory after checking that the
  checkpoint belongs to the task being trained.
* ``on_save``: write the memory, the task record and ``gp_checkpoint.json`` into each checkpoint.
* ``on_log``: add the share of the gradient removed by the projection (``gp_grad_removed``).
* ``on_train_end``: detach, store the finished task in the memory from a seeded sample of its training data (every
  non-padding token of every example feeds it, prompt and answer alike), and rewrite the memory into the task's final
  checkpoint, so that resuming from it does not store the task twice.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import datasets
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm
from transformers import TrainerCallback

from ..core.peft_utils import unwrap_peft_model
from ..wiring import checkpoints
from ..wiring.class_stats import head_module
from ..wiring.collect import summarize_report, update_memory
from ..wiring.config import gp_config_of
from ..wiring.memory_data import memory_sample, task_classes
from ..wiring.persistence import load_gp_files, save_gp_files
from ..wiring.projector import GPProjector, raw_optimizer
from ..wiring.stat_heads import HEAD_KINDS, apply_statistics_head, restore_trained_head
from ..wiring.state import get_memory
from .parallel import check_parallelism
from .resume import find_resumed

logger = logging.getLogger(__name__)


class GPCallback(TrainerCallback):
    """Gradient projection for any ``Trainer``: projected steps, the memory update, checkpoints that carry it.

    Args:
        adapter_name: the adapter to train and protect (default: the model's active one).
        task_name: name of the task the next ``train()`` trains (task record, model card); set it again before each
            task. Default: ``task-01``, ``task-02``, ...
        update_memory: store the task in the memory when ``train()`` ends. ``False`` to call ``update_memory``
            yourself (with another sample, say).
        memory_dataset: the examples that feed the memory, in the training data's processed form (default: the
            trainer's training data); ``gp_memory_samples`` of them are drawn with ``args.seed``.
        log_per_layer: also log each layer's basis size (``gp_basis/<layer>``) after a memory update.
        per_task_checkpoints: save task ``task_id``'s checkpoints under ``<output_dir>/task-XX`` (1-based), so that
            tasks trained into one ``output_dir`` never overwrite each other's.
        statistics_head: after each task's memory update, write a head built from the class statistics (``"ncm"``,
            ``"lda"`` or ``"aligned"``; see ``peft_gp.statistics_head``) into the model's classification head. Needs
            ``gp_class_statistics=True`` in the GP config. The next task trains from the head as it was trained (kept
            with the class statistics, saved with them, put back when training begins).
    """

    def __init__(
        self,
        adapter_name: str | None = None,
        task_name: str | None = None,
        update_memory: bool = True,
        memory_dataset=None,
        log_per_layer: bool = True,
        per_task_checkpoints: bool = True,
        statistics_head: str | None = None,
    ) -> None:
        self.adapter_name = adapter_name
        self.task_name = task_name
        self.update_memory_at_end = update_memory
        self.memory_dataset = memory_dataset
        self.log_per_layer = log_per_layer
        self.per_task_checkpoints = per_task_checkpoints
        if statistics_head is not None and statistics_head not in HEAD_KINDS:
            raise ValueError(f"statistics_head must be one of {HEAD_KINDS} (or None), got {statistics_head!r}.")
        self.statistics_head = statistics_head
        self.projector: GPProjector | None = None
        self.trainer = None  # set by GPTrainer: memory statistics then reach every reporter through Trainer.log
        self.resume_from: str | None = None  # set by GPTrainer.train with the checkpoint it resumes from
        self.last_report: dict[str, dict[str, float]] | None = None
        self.memory_seconds = 0.0
        self._task_id: int | None = None
        self._output_dir: tuple[Any, str] | None = None  # (args, the output_dir to restore)
        self._last_save: str | None = None

    # ---- setup -------------------------------------------------------------------------------------------------

    def bind(self, model: nn.Module, trainer=None) -> GPProjector:
        """Resolve the adapter and its projector for ``model`` (done at ``on_train_begin`` when not called before)."""
        peft_model = unwrap_peft_model(model)
        self.adapter_name = self.adapter_name or peft_model.active_adapter
        config = gp_config_of(peft_model, self.adapter_name)  # a clear error for a model without a GP config
        if self.statistics_head and not config.gp_class_statistics:
            raise ValueError(
                f"statistics_head={self.statistics_head!r} needs class statistics: build the adapter's GP config with "
                "gp_class_statistics=True."
            )
        if config.gp_class_statistics:
            head = head_module(peft_model, self.adapter_name)  # a clear error before training: no linear head
            if self.statistics_head in ("lda", "aligned") and head.bias is None:
                raise ValueError(
                    f"statistics_head={self.statistics_head!r} needs a head with a bias; this model's head has none "
                    "(e.g. LlamaForSequenceClassification's score): use statistics_head='ncm'."
                )
        if self.projector is None or self.projector._model is not peft_model:
            self.projector = GPProjector(peft_model, self.adapter_name)
        self.trainer = trainer if trainer is not None else self.trainer
        return self.projector

    def check_resume(self, checkpoint: str, model: nn.Module) -> dict:
        """Check, before anything is loaded, that ``checkpoint`` continues the task ``model`` trains next."""
        self.bind(model)
        reason = checkpoints.problem(checkpoint, self.adapter_name)
        if reason is not None:
            raise checkpoints.GPCheckpointError(
                f"Cannot resume from {checkpoint}: {reason} (it needs {checkpoints.TRAINER_STATE_NAME}, "
                f"gp_memory.safetensors and {checkpoints.GP_CHECKPOINT_NAME} from one save; a save cut off, or not "
                "written by GPCallback/GPTrainer). Training without its memory would not protect the earlier tasks: "
                "resume from a complete checkpoint, or start the task afresh with resume_from_checkpoint=None."
            )
        tasks_stored = get_memory(model, self.adapter_name).tasks_seen
        return checkpoints.check_resumable(checkpoint, tasks_stored, self.adapter_name)

    # ---- the lifecycle -----------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._restore_output_dir()
        check_parallelism(args, getattr(self.trainer, "accelerator", None), owner="GPCallback")
        projector = self.bind(model)
        if state.global_step > 0:  # resumed: the weights and optimizer state came from a checkpoint
            self._task_id = self._load_resumed(args, state, model)
        else:
            raw_optimizer(optimizer).state.clear()
            self._task_id = get_memory(model, self.adapter_name).tasks_seen
            restore_trained_head(model, self.adapter_name)  # the statistics head was written for predicting
        self.resume_from, self._last_save = None, None
        projector.reset_stats()
        projector.attach(optimizer)  # refuses a task past the last of gp_task_slices, before anything changes
        if self.per_task_checkpoints:
            self._output_dir = (args, args.output_dir)
            args.output_dir = checkpoints.task_folder(args.output_dir, self._task_id)

    def on_save(self, args, state, control, model=None, **kwargs):
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not args.should_save or self._task_id is None or not os.path.isdir(checkpoint):
            return
        save_gp_files(model, checkpoint, self.adapter_name)
        checkpoints.write_record(checkpoint, self._task_id, self.task_name, state.global_step, self.adapter_name)
        self._last_save = checkpoint

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.projector is None or logs is None or "loss" not in logs:
            return
        stats = self.projector.pop_stats()
        logs.update(stats)
        if stats and state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(stats)

    def on_train_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self.projector.detach()
        self._restore_output_dir()
        task_id, self._task_id = self._task_id, None
        if get_memory(model, self.adapter_name).tasks_seen > task_id:
            logger.info("Task %d is already stored in the memory (resumed from its final checkpoint).", task_id + 1)
            return
        if not self.update_memory_at_end:
            return
        self.update_memory(model, args, state, train_dataloader=train_dataloader)
        if self.statistics_head:
            apply_statistics_head(model, self.statistics_head, self.adapter_name, seed=args.seed)
        final = self._last_save
        if final is not None and args.should_save and final.endswith(f"checkpoint-{state.global_step}"):
            save_gp_files(model, final, self.adapter_name)  # resuming from it must not store the task again

    # ---- the memory update -------------------------------------------------------------------------------------

    def update_memory(self, model: nn.Module, args, state=None, dataset=None, train_dataloader=None) -> dict:
        """Store the finished task: grow the bases from ``gp_memory_samples`` examples of its training data.

        ``dataset`` (default: ``memory_dataset``, else the training data) goes through the trainer's collator and
        column removal. Shows a progress bar (unless ``args.disable_tqdm``), keeps the duration in
        ``memory_seconds``, logs basis sizes and captured energy, and returns the per-layer growth report.
        """
        start = time.perf_counter()
        self.bind(model)
        dataset = dataset if dataset is not None else self.memory_dataset
        batches, classes, samples = self._memory_batches(model, args, dataset, train_dataloader)
        if args.local_process_index == 0 and not args.disable_tqdm:
            batches = tqdm(batches, desc="GP memory update", leave=False)
        report = update_memory(
            model,
            batches,
            adapter_name=self.adapter_name,
            max_samples=samples,
            stacklevel=4,
            task_name=self.task_name,
            classes=classes,
        )
        self.last_report, self.memory_seconds = report, time.perf_counter() - start
        logs = {
            "gp_tasks_seen": float(get_memory(model, self.adapter_name).tasks_seen),
            "gp_memory_seconds": self.memory_seconds,
            **summarize_report(report),
        }
        if self.log_per_layer:
            logs.update({f"gp_basis/{name}": float(entry["basis_size"]) for name, entry in report.items()})
        self._log(logs, state)
        return report

    def _memory_batches(self, model, args, dataset, train_dataloader):
        """The memory's batches, the task's classes and the number of examples to use."""
        config = gp_config_of(unwrap_peft_model(model), self.adapter_name)
        collate_fn = getattr(train_dataloader, "collate_fn", None)
        if dataset is None:
            dataset = getattr(train_dataloader, "dataset", None)
        elif self.trainer is not None:  # a raw dataset: the trainer's column removal, as for its training data
            if isinstance(dataset, datasets.Dataset):
                dataset = self.trainer._remove_unused_columns(dataset, description="memory")
            else:
                collate_fn = self.trainer._get_collator_with_removed_columns(self.trainer.data_collator, "memory")
        if collate_fn is None and self.trainer is not None:
            collate_fn = self.trainer.data_collator
        if dataset is None:
            raise ValueError(
                "The memory update needs the task's data: train with a train_dataset, or pass memory_dataset."
            )
        classes = task_classes(dataset)
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            source = train_dataloader if dataset is getattr(train_dataloader, "dataset", None) else dataset
            return source, classes, config.gp_memory_samples
        if len(dataset) == 0:
            raise ValueError("The memory update got an empty dataset: pass the finished task's data.")
        samples = min(config.gp_memory_samples, len(dataset))
        sample = memory_sample(dataset, samples, args.seed, args.process_index, args.world_size)
        return DataLoader(sample, batch_size=args.per_device_eval_batch_size, collate_fn=collate_fn), classes, samples

    def _log(self, logs: dict[str, float], state) -> None:
        if self.trainer is not None:
            self.trainer.log(logs)
            return
        if state is not None:
            state.log_history.append({**logs, "step": state.global_step})
        logger.info("GP memory update: %s", {k: v for k, v in logs.items() if not k.startswith("gp_basis/")})

    # ---- resuming ----------------------------------------------------------------------------------------------

    def _load_resumed(self, args, state, model) -> int:
        """Load the memory of the checkpoint the trainer resumed from; returns the task it belongs to."""
        checkpoint = self.resume_from or find_resumed(args.output_dir, state.global_step, model, self.adapter_name)
        record = self.check_resume(checkpoint, model)
        subfolder = None if self.adapter_name == "default" else self.adapter_name
        load_gp_files(model, checkpoint, self.adapter_name, subfolder=subfolder)
        return int(record["task_id"])

    def _restore_output_dir(self) -> None:
        if self._output_dir is not None:
            args, output_dir = self._output_dir
            args.output_dir, self._output_dir = output_dir, None
