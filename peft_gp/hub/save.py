"""The local save of one task for the Hub: adapter, memory, task record, model card and accuracy-matrix plot."""

from __future__ import annotations

import os
import shutil

from torch import nn

from ..core.peft_utils import adapter_directory, unwrap_peft_model
from ..core.plots import plot_accuracy_matrix
from ..wiring.persistence import save_pretrained
from ..wiring.state import get_state
from ..wiring.task_record import GP_TASKS_NAME, GPTaskState, normalize_matrix
from .card import MODEL_CARD_NAME, PLOT_NAME, model_card


def record_task(
    model: nn.Module,
    task_id: int | None = None,
    task_name: str | None = None,
    classes: list | None = None,
    accuracy_matrix: list[list[float | None]] | None = None,
    adapter_name: str | None = None,
) -> int:
    """Record a finished task in the model's ``gp_tasks.json`` state; returns its ``task_id``.

    ``task_id`` defaults to the last task stored in the memory. It must match the memory: pushing a task whose bases
    are not stored yet would let the next task overwrite it.
    """
    gp_state = get_state(model, adapter_name)
    memory, state = gp_state.memory, gp_state.tasks
    if memory.tasks_seen == 0:
        raise ValueError(
            "The memory is empty: train the task and store it first (GPTrainer does it when train() ends; otherwise "
            "call peft_gp.update_memory). A checkpoint without its task's bases would not protect it."
        )
    if task_id is None:
        task_id = memory.tasks_seen - 1
    if memory.tasks_seen != task_id + 1:
        raise ValueError(
            f"The memory holds {memory.tasks_seen} task(s), but task_id={task_id} is task {task_id + 1}: store the "
            "finished task in the memory first (GPTrainer does it when train() ends; otherwise call "
            "peft_gp.update_memory), or pass the task_id of the last stored task."
        )
    state.record_through(task_id, task_name, classes)
    if accuracy_matrix is not None:
        state.accuracy_matrix = normalize_matrix(accuracy_matrix)
    return task_id


def save_task(
    model: nn.Module,
    local_dir: str,
    task_id: int | None = None,
    task_name: str | None = None,
    *,
    classes: list | None = None,
    accuracy_matrix: list[list[float | None]] | None = None,
    plot_path: str | None = None,
    extra_files: list[str] | None = None,
    repo_id: str | None = None,
    adapter_name: str | None = None,
) -> int:
    """Write everything the Hub gets for one task into ``local_dir``; returns the ``task_id``.

    ``local_dir`` receives PEFT's adapter files (weights with the head of ``modules_to_save``, config),
    ``gp_memory.safetensors``, ``gp_tasks.json``, the model card ``README.md``, the accuracy-matrix plot (the given
    ``plot_path``, else drawn with matplotlib when installed) and copies of ``extra_files``.
    """
    peft_model = unwrap_peft_model(model)
    adapter_name = adapter_name or peft_model.active_adapter
    task_id = record_task(model, task_id, task_name, classes, accuracy_matrix, adapter_name)
    state = get_state(model, adapter_name).tasks
    os.makedirs(local_dir, exist_ok=True)
    save_pretrained(peft_model, local_dir, selected_adapters=[adapter_name])
    adapter_dir = adapter_directory(local_dir, adapter_name)
    plot_written = _write_plot(state, plot_path, os.path.join(local_dir, PLOT_NAME))
    for path in extra_files or []:
        shutil.copyfile(path, os.path.join(local_dir, os.path.basename(path)))
    card = model_card(peft_model, task_id, repo_id=repo_id, adapter_name=adapter_name, plot=plot_written)
    with open(os.path.join(local_dir, MODEL_CARD_NAME), "w") as handle:
        handle.write(card)
    if adapter_dir != local_dir:  # push_task_folder reads the task record at the top of the folder
        state.save(os.path.join(local_dir, GP_TASKS_NAME))
    return task_id


def _write_plot(state: GPTaskState, plot_path: str | None, path: str) -> bool:
    """The card's accuracy-matrix picture: the given PNG, else drawn with matplotlib when installed."""
    if plot_path is not None:
        shutil.copyfile(plot_path, path)
        return True
    if not state.accuracy_matrix:
        return False
    try:
        plot_accuracy_matrix({"": state.accuracy_matrix}, path, state.task_names)
    except ImportError:
        return False
    return True
