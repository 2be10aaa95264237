"""The local save of one task for the Hub: adapter, memory, task record, model card and accuracy-matrix plot."""

from __future__ import annotations

import os
import shutil

from torch import nn

from ..core.files import replace_directory, sibling_temporary_folder
from ..core.peft_utils import adapter_directory, unwrap_peft_model
from ..core.plots import plot_accuracy_matrix
from ..wiring.persistence import save_pretrained
from ..wiring.state import get_state
from ..wiring.task_record import GP_TASKS_NAME, GPTaskState, normalize_matrix
from .card import model_card
from .checks import check_accuracy_matrix, check_repo_id
from .manifest import MODEL_CARD_NAME, PLOT_NAME, check_extra_files, check_save_folder, write_manifest


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
    ``plot_path``, else drawn with matplotlib when installed), copies of ``extra_files``, and last
    ``gp_push_files.json``, the list of these files: the only ones ``push_task_folder`` uploads.

    Everything is checked before anything is written: ``repo_id``, ``accuracy_matrix`` (accuracies in [0, 1]),
    ``extra_files`` (no name of the save's own files, no torch.save files, hidden files or keys), and ``local_dir``,
    which must be new, empty, or an earlier task save (a folder holding other files is refused, naming them). The
    files are written to a temporary folder beside ``local_dir`` that then takes its place.
    """
    if repo_id is not None:
        check_repo_id(repo_id)
    extras = check_extra_files(extra_files)
    if plot_path is not None and not os.path.isfile(plot_path):
        raise ValueError(f"plot_path={plot_path!r} is not a file. Nothing was written.")
    peft_model = unwrap_peft_model(model)
    adapter_name = adapter_name or peft_model.active_adapter
    state = get_state(model, adapter_name).tasks
    check_accuracy_matrix(accuracy_matrix if accuracy_matrix is not None else state.accuracy_matrix)
    check_save_folder(local_dir)
    task_id = record_task(model, task_id, task_name, classes, accuracy_matrix, adapter_name)
    stage = sibling_temporary_folder(local_dir)
    try:
        _write_task(peft_model, stage, task_id, adapter_name, plot_path, extras, repo_id)
        write_manifest(stage)  # last: a folder without it is not pushed
        replace_directory(stage, local_dir, carry_over=False)  # one step: the old save or the new one
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return task_id


def _write_task(peft_model, folder: str, task_id: int, adapter_name: str, plot_path, extras, repo_id) -> None:
    state = get_state(peft_model, adapter_name).tasks
    save_pretrained(peft_model, folder, selected_adapters=[adapter_name])
    plot_written = _write_plot(state, plot_path, os.path.join(folder, PLOT_NAME))
    for path in extras:
        shutil.copyfile(path, os.path.join(folder, os.path.basename(path)))
    card = model_card(peft_model, task_id, repo_id=repo_id, adapter_name=adapter_name, plot=plot_written)
    with open(os.path.join(folder, MODEL_CARD_NAME), "w", encoding="utf-8") as handle:
        handle.write(card)
    if adapter_directory(folder, adapter_name) != folder:  # push_task_folder reads the task record at the top
        state.save(os.path.join(folder, GP_TASKS_NAME))


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
