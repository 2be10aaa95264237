"""A save's files belong together: the memory, the task record and the adapter weights beside them.

The memory's metadata and ``gp_tasks.json`` record the SHA-256 of the adapter weights saved with them and the number
of tasks stored; a folder whose files come from different saves (a save cut off, files copied over) is refused.
"""

from __future__ import annotations

from peft.utils import SAFETENSORS_WEIGHTS_NAME

from ..core.files import sha256_file
from .memory import GP_MEMORY_NAME, GPMemory
from .memory_file import GPMemoryError
from .task_record import GP_TASKS_NAME, GPTaskState


def check_saved_together(memory: GPMemory, tasks: GPTaskState | None, weights: str | None, where: str) -> None:
    """Refuse a memory, task record and adapter weights that come from different saves (hashes, task counts)."""
    saved_hash = memory.info.get("adapter_sha256")
    actual = sha256_file(weights) if weights and (saved_hash or (tasks and tasks.adapter_sha256)) else None
    fix = "Restore the adapter, its memory and gp_tasks.json from one save (a save cut off, or files mixed up)."
    if saved_hash and actual and saved_hash != actual:
        raise GPMemoryError(
            f"{GP_MEMORY_NAME} in {where} was saved with other adapter weights than {SAFETENSORS_WEIGHTS_NAME} beside "
            f"it (SHA-256 {saved_hash[:12]}... vs {actual[:12]}...). {fix}"
        )
    if tasks is not None and tasks.adapter_sha256 and actual and tasks.adapter_sha256 != actual:
        raise GPMemoryError(
            f"{GP_TASKS_NAME} in {where} was saved with other adapter weights than {SAFETENSORS_WEIGHTS_NAME} beside "
            f"it. {fix}"
        )
    if tasks is not None and tasks.tasks_seen != memory.tasks_seen:
        raise GPMemoryError(
            f"{GP_MEMORY_NAME} in {where} stores {memory.tasks_seen} task(s) but {GP_TASKS_NAME} records "
            f"{tasks.tasks_seen}. {fix}"
        )
