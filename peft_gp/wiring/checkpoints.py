"""Trainer checkpoints of a task sequence: one folder per task, a record of the task in each, safe resumption.

``Trainer`` numbers checkpoints by step and restarts at step 0 with every ``train()`` call, so tasks trained into one
``output_dir`` would overwrite each other's ``checkpoint-N``. ``GPCallback`` therefore saves task ``task_id``'s
checkpoints under ``<output_dir>/task-XX/`` (1-based, as the Hub branches) and writes ``gp_checkpoint.json`` into each
one, last: the task it belongs to and its step. A checkpoint is *complete* when it holds the trainer state, the memory
and that record. Whether its memory already stores its task (the final checkpoint, rewritten after the memory update)
is read from the memory itself: it does once the memory holds more than ``task_id`` tasks.
"""

from __future__ import annotations

import json
import os
import re

from peft.utils import SAFETENSORS_WEIGHTS_NAME

from ..core.files import atomic_write_bytes, read_json
from ..core.peft_utils import adapter_directory
from .consistency import check_saved_together
from .memory import GP_MEMORY_NAME, GPMemory, GPMemoryError
from .task_record import GP_TASKS_NAME, GPTaskState

GP_CHECKPOINT_NAME = "gp_checkpoint.json"
TRAINER_STATE_NAME = "trainer_state.json"  # transformers.trainer's own name for it
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TASK_FOLDER_PATTERN = re.compile(r"^task-(\d+)$")


class GPCheckpointError(GPMemoryError):
    """A checkpoint that belongs to another task than the one being trained, or that cannot be resumed."""


def task_folder(output_dir: str, task_id: int) -> str:
    """Where task ``task_id`` (0-based) keeps its checkpoints: ``<output_dir>/task-XX`` (1-based, two digits)."""
    return os.path.join(output_dir, f"task-{task_id + 1:02d}")


def write_record(checkpoint: str, task_id: int, task_name: str | None, global_step: int, adapter_name: str) -> None:
    """Write ``gp_checkpoint.json``: the task this checkpoint belongs to (written last, it marks it complete)."""
    record = {"gp_format_version": 1, "task_id": task_id, "task_name": task_name, "global_step": global_step}
    path = os.path.join(adapter_directory(checkpoint, adapter_name), GP_CHECKPOINT_NAME)
    atomic_write_bytes(path, (json.dumps(record, indent=2) + "\n").encode())


def read_record(checkpoint: str, adapter_name: str = "default") -> dict | None:
    """The ``gp_checkpoint.json`` of a checkpoint (``None`` if absent or unreadable: an incomplete save)."""
    path = os.path.join(adapter_directory(checkpoint, adapter_name), GP_CHECKPOINT_NAME)
    try:
        record = read_json(path, "")
        if not isinstance(record, dict):
            return None
        for key in ("task_id", "global_step"):
            if isinstance(record.get(key), bool) or not isinstance(record.get(key), int) or record[key] < 0:
                return None
    except ValueError:
        return None
    return record


def problem(checkpoint: str, adapter_name: str = "default") -> str | None:
    """Why the checkpoint cannot be resumed (``None`` when it can): it must hold a trainer state that parses, its
    ``gp_checkpoint.json``, and a memory, task record and adapter weights that load and come from one save."""
    folder = adapter_directory(checkpoint, adapter_name)
    try:
        read_json(os.path.join(checkpoint, TRAINER_STATE_NAME), "")
        if read_record(checkpoint, adapter_name) is None:
            return f"no readable {GP_CHECKPOINT_NAME}"
        memory = GPMemory.load(os.path.join(folder, GP_MEMORY_NAME))
        tasks_path = os.path.join(folder, GP_TASKS_NAME)
        tasks = GPTaskState.load(tasks_path) if os.path.isfile(tasks_path) else None
        weights = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
        check_saved_together(memory, tasks, weights if os.path.isfile(weights) else None, checkpoint)
    except ValueError as error:  # GPMemoryError, GPTaskStateError, unreadable JSON
        return str(error).split(". ")[0]
    return None


def is_complete(checkpoint: str, adapter_name: str = "default") -> bool:
    """The checkpoint can be resumed (see ``problem``)."""
    return problem(checkpoint, adapter_name) is None


def _checkpoints_in(folder: str) -> list[tuple[int, str]]:
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        match = CHECKPOINT_PATTERN.match(name)
        if match and os.path.isdir(os.path.join(folder, name)):
            found.append((int(match.group(1)), os.path.join(folder, name)))
    return sorted(found)


def task_checkpoints(output_dir: str, task_id: int) -> list[str]:
    """The checkpoint folders of task ``task_id`` under ``output_dir``, oldest step first (complete or not)."""
    return [path for _, path in _checkpoints_in(task_folder(output_dir, task_id))]


def last_checkpoint(output_dir: str, task_id: int, adapter_name: str = "default") -> tuple[str | None, list[str]]:
    """The newest complete checkpoint of task ``task_id`` and the newer incomplete ones that were skipped.

    Trainer writes a checkpoint file by file, so a run killed mid-save leaves a partial last folder: it is skipped.
    """
    skipped = []
    for path in reversed(task_checkpoints(output_dir, task_id)):
        reason = problem(path, adapter_name)
        if reason is None and int(read_record(path, adapter_name)["task_id"]) == task_id:
            return path, skipped
        skipped.append(f"{path} ({reason or 'another task'})")
    return None, skipped


def checkpoint_memory_tasks(checkpoint: str, adapter_name: str = "default") -> int:
    """How many tasks the checkpoint's memory stores (its metadata only)."""
    path = os.path.join(adapter_directory(checkpoint, adapter_name), GP_MEMORY_NAME)
    return GPMemory.load(path).tasks_seen


def check_resumable(checkpoint: str, tasks_stored: int, adapter_name: str = "default") -> dict:
    """The checkpoint's record, after checking that it may continue a model whose memory stores ``tasks_stored``.

    A model with stored tasks trains task ``tasks_stored`` next, so only that task's checkpoints fit it; a model with
    an empty memory (a new process) may resume any task's checkpoint, whose memory then comes with it.
    """
    record = read_record(checkpoint, adapter_name)
    if record is None:
        raise GPCheckpointError(
            f"{checkpoint} has no readable {GP_CHECKPOINT_NAME}: it was not written by GPCallback/GPTrainer, or its "
            "save was cut off. Resume from a complete checkpoint (GPTrainer.train(resume_from_checkpoint=True) picks "
            "the newest one of the current task), or start the task afresh."
        )
    task_id = int(record["task_id"])
    if tasks_stored and task_id != tasks_stored:
        name = record.get("task_name") or f"task-{task_id + 1:02d}"
        raise GPCheckpointError(
            f"{checkpoint} belongs to task {task_id + 1} ({name!r}, task_id={task_id}), but the model's memory "
            f"stores {tasks_stored} task(s), so it is training task {tasks_stored + 1} (task_id={tasks_stored}). "
            f"Resume from a checkpoint of that task (under {task_folder('<output_dir>', tasks_stored)}), or start it "
            "afresh with resume_from_checkpoint=None."
        )
    return record
