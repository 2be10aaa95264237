"""Resuming a task: the newest complete checkpoint of the task a model trains next, and, for a plain ``Trainer``
that does not tell its callbacks where it resumed from, the checkpoint whose weights the model now holds."""

from __future__ import annotations

import os
import warnings

import torch
from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from ..core.peft_utils import adapter_directory, unwrap_peft_model
from ..wiring import checkpoints
from ..wiring.state import get_memory


def last_checkpoint(output_dir: str, model: nn.Module, adapter_name: str | None = None) -> str:
    """The newest complete checkpoint, under ``output_dir``, of the task ``model`` trains next.

    That task is the one after those its memory stores (task 1 for a new model). Pass the result to
    ``trainer.train(resume_from_checkpoint=...)``; ``GPTrainer.train(resume_from_checkpoint=True)`` does this itself.
    """
    peft_model = unwrap_peft_model(model)
    adapter_name = adapter_name or peft_model.active_adapter
    task_id = get_memory(peft_model, adapter_name).tasks_seen
    path, skipped = checkpoints.last_checkpoint(output_dir, task_id, adapter_name)
    if path is None:
        raise checkpoints.GPCheckpointError(
            f"No complete checkpoint of task {task_id + 1} (task_id={task_id}) in "
            f"{checkpoints.task_folder(output_dir, task_id)}; found {skipped or 'none'}. The model's memory stores "
            f"{task_id} task(s), so that is the task it trains next. Start it afresh (resume_from_checkpoint=None)."
        )
    if skipped:
        warnings.warn(f"Skipping incomplete checkpoint(s) {skipped}; resuming from {path}.", stacklevel=2)
    return path


def find_resumed(output_dir: str, step: int, model: nn.Module, adapter_name: str) -> str:
    """The complete checkpoint of ``step`` under ``output_dir``'s task folders whose weights are the model's now."""
    # A plain Trainer resumed from a path it does not tell callbacks: find the complete checkpoint of that step
    # (its weights are the model's now) among the task folders.
    tasks = sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []
    folders = [os.path.join(output_dir, task) for task in tasks if checkpoints.TASK_FOLDER_PATTERN.match(task)]
    paths = [os.path.join(folder, f"checkpoint-{step}") for folder in folders]
    candidates = [path for path in paths if checkpoints.is_complete(path, adapter_name)]
    matching = [path for path in candidates if _holds_weights_of(path, model, adapter_name)]
    if len(matching) != 1:
        raise checkpoints.GPCheckpointError(
            f"GPCallback cannot tell which checkpoint this run resumed from (step {step}; candidates under "
            f"{output_dir}: {candidates or 'none'}), so it cannot load its memory. Resume with "
            "trainer.train(resume_from_checkpoint=peft_gp.last_checkpoint(args.output_dir, model)), or set "
            "gp_callback.resume_from to the checkpoint's path before train()."
        )
    return matching[0]


def _holds_weights_of(checkpoint: str, model: nn.Module, adapter_name: str) -> bool:
    """Whether the checkpoint's adapter weights are the model's current ones (the checkpoint just loaded)."""
    path = os.path.join(adapter_directory(checkpoint, adapter_name), SAFETENSORS_WEIGHTS_NAME)
    if not os.path.isfile(path):
        return False
    saved = load_file(path)
    current = get_peft_model_state_dict(unwrap_peft_model(model), adapter_name=adapter_name)
    return all(name in saved and torch.equal(saved[name], value.detach().cpu()) for name, value in current.items())
