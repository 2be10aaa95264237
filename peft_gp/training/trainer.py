"""``GPTrainer``: a ``transformers.Trainer`` whose ``train()`` is one task of a continual-learning sequence."""

from __future__ import annotations

import os
from typing import Any

from transformers import Trainer

from ..hub.checks import check_repo_id
from ..hub.manifest import task_branch
from ..hub.push import TaskPush, push_task_to_hub
from ..wiring.memory import GPMemory
from ..wiring.persistence import save_gp_files
from ..wiring.projector import GPProjector
from ..wiring.sharding import fsdp_modules
from ..wiring.state import get_memory, get_task_state
from .callback import GPCallback
from .parallel import check_parallelism
from .resume import last_checkpoint


class GPTrainer(Trainer):
    """``Trainer`` + ``GPCallback`` + per-task pushes: one ``train()`` call trains and stores one task.

    The callback does all of the gradient projection (see ``peft_gp.GPCallback``): projected steps from the second
    task on, the memory update when ``train()`` ends, the memory in every checkpoint (under ``<output_dir>/task-XX``).
    This class only adds its arguments, ``resume_from_checkpoint=True`` meaning the newest complete checkpoint of the
    task being trained (checked before anything is loaded), and the push of each finished task.

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
            branch ``task-XX``. It is saved first to ``<output_dir>/hub/task-XX``; a failed push raises
            ``peft_gp.hub.GPHubError`` after that save. ``args.hub_private_repo`` and ``args.hub_token`` apply.
        gp_push_kwargs: more arguments for ``push_task_to_hub`` (``create_pr``, ``subfolder_per_task``,
            ``accuracy_matrix``, ``plot_path``, ``extra_files``, ...).
        gp_statistics_head: ``"ncm"``, ``"lda"`` or ``"aligned"``: after each task, write the head built from the
            class statistics into the model's head (``GPCallback(statistics_head=...)``; needs
            ``gp_class_statistics=True``).
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
        gp_statistics_head: str | None = None,
        **kwargs: Any,
    ):
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if gp_push_to_hub and getattr(training_args, "push_to_hub", False):  # refused before Trainer creates the repo
            raise ValueError(
                "Both TrainingArguments(push_to_hub=True) and gp_push_to_hub are set: the Trainer would also push the "
                "whole output_dir (task folders included) to main at every save. Keep gp_push_to_hub (one commit and "
                "branch per task) and set push_to_hub=False (hub_model_id, hub_token, hub_private_repo still apply)."
            )
        reserved = {"model", "repo_id", "task_id", "task_name", "local_dir"} & set(gp_push_kwargs or {})
        if reserved:
            raise ValueError(f"gp_push_kwargs may not set {sorted(reserved)}: GPTrainer sets them for each task.")
        super().__init__(*args, **kwargs)
        if gp_push_to_hub is True:
            gp_push_to_hub = self.args.hub_model_id
            if not gp_push_to_hub:
                raise ValueError(
                    "gp_push_to_hub=True takes the repo id from TrainingArguments.hub_model_id, which is not set. "
                    "Pass gp_push_to_hub='user/repo' or set hub_model_id."
                )
        if gp_push_to_hub:
            check_repo_id(gp_push_to_hub)  # before any training: a bad id would fail only after the first task
        check_parallelism(self.args, self.accelerator)  # FSDP1 and DeepSpeed ZeRO refused, FSDP2 and DDP pass
        self.gp_push_to_hub = gp_push_to_hub or None
        self.gp_push_kwargs = dict(gp_push_kwargs or {})
        self.gp_last_push: TaskPush | None = None
        self.gp_callback = GPCallback(
            adapter_name=gp_adapter_name,
            task_name=gp_task_name,
            update_memory=gp_update_memory,
            log_per_layer=gp_log_per_layer,
            statistics_head=gp_statistics_head,
        )
        self.gp_callback.bind(self.model, trainer=self)
        self.callback_handler.callbacks.insert(0, self.gp_callback)  # first: its log entries reach every reporter

    # ---- the callback's state, under the names of GPTrainer's arguments ----------------------------------------

    @property
    def gp_task_name(self) -> str | None:
        return self.gp_callback.task_name

    @gp_task_name.setter
    def gp_task_name(self, name: str | None) -> None:
        self.gp_callback.task_name = name

    @property
    def gp_adapter_name(self) -> str:
        return self.gp_callback.adapter_name

    @property
    def gp_update_memory(self) -> bool:
        return self.gp_callback.update_memory_at_end

    @gp_update_memory.setter
    def gp_update_memory(self, value: bool) -> None:
        self.gp_callback.update_memory_at_end = value

    @property
    def gp_log_per_layer(self) -> bool:
        return self.gp_callback.log_per_layer

    @gp_log_per_layer.setter
    def gp_log_per_layer(self, value: bool) -> None:
        self.gp_callback.log_per_layer = value

    @property
    def gp_projector(self) -> GPProjector:
        return self.gp_callback.projector

    @property
    def gp_config(self):
        return self.gp_projector.config

    @property
    def gp_memory(self) -> GPMemory:
        """The memory of the trained adapter (grows at the end of every task)."""
        return get_memory(self.model, self.gp_adapter_name)

    @property
    def gp_memory_seconds(self) -> float:
        """Duration of the last memory update."""
        return self.gp_callback.memory_seconds

    # ---- one task ----------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """Train one task (projecting from the second task on), then store it in the memory and push it.

        ``resume_from_checkpoint=True`` resumes from the newest complete checkpoint of the task the model trains next
        (``peft_gp.last_checkpoint``); any checkpoint is checked to belong to that task before it is loaded.
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_checkpoint(self.args.output_dir, self.model, self.gp_adapter_name)
        if resume_from_checkpoint:
            resume_from_checkpoint = os.fspath(resume_from_checkpoint)
            self.gp_callback.check_resume(resume_from_checkpoint, self.model)
            self.gp_callback.resume_from = resume_from_checkpoint
        if self.is_fsdp_enabled and fsdp_modules(self.model):
            # a previous task's trainer sharded the model already: accelerate would look for the layer classes to wrap,
            # renamed by fully_shard, before it sees that there is nothing left to wrap
            self.accelerator.state.fsdp_plugin.auto_wrap_policy = None
        tasks_before = self.gp_memory.tasks_seen
        output = super().train(resume_from_checkpoint or None, *args, **kwargs)
        if self.gp_push_to_hub and self.gp_memory.tasks_seen > tasks_before:
            self.push_task_to_hub()
        return output

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model``, plus the memory and task record beside the adapter (checkpoints get them from the
        callback's ``on_save``)."""
        super().save_model(output_dir, _internal_call)
        if not _internal_call and self.args.should_save:
            save_gp_files(self.model, output_dir or self.args.output_dir, self.gp_adapter_name)

    def update_memory(self, dataset=None) -> dict[str, dict[str, float]]:
        """Store a finished task from ``dataset`` (default: ``train_dataset``); see ``GPCallback.update_memory``."""
        dataset = self.train_dataset if dataset is None else dataset
        return self.gp_callback.update_memory(self.model, self.args, self.state, dataset=dataset)

    def push_task_to_hub(self, **overrides: Any) -> TaskPush | None:
        """Push the last stored task to ``gp_push_to_hub`` (saved first to ``<output_dir>/hub/task-XX``).

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
            local_dir=os.path.join(self.args.output_dir, "hub", task_branch(task_id)),
            adapter_name=self.gp_adapter_name,
            **options,
        )
        return self.gp_last_push
