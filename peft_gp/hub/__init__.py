"""Per-task pushes to the Hugging Face Hub (one commit and branch per task) and their model cards."""

from ..core.hub_errors import GPHubError, explain_hub_error, hub_errors
from .card import MODEL_CARD_NAME, PLOT_NAME, model_card, task_branch
from .push import TaskPush, push_task_folder, push_task_to_hub
from .save import record_task, save_task

__all__ = [
    "MODEL_CARD_NAME",
    "PLOT_NAME",
    "GPHubError",
    "TaskPush",
    "explain_hub_error",
    "hub_errors",
    "model_card",
    "push_task_folder",
    "push_task_to_hub",
    "record_task",
    "save_task",
    "task_branch",
]
