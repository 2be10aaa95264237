"""Per-task pushes to the Hugging Face Hub (one commit and branch per task) and their model cards."""

from ..core.hub_errors import GPHubError, explain_hub_error, hub_errors
from .card import markdown_text, model_card
from .checks import check_accuracy_matrix, check_repo_id
from .manifest import (
    MANIFEST_NAME,
    MODEL_CARD_NAME,
    NEVER_PUSHED,
    PLOT_NAME,
    RESERVED_NAMES,
    files_to_push,
    task_branch,
)
from .push import TaskPush, push_task_folder, push_task_to_hub
from .save import record_task, save_task

__all__ = [
    "MANIFEST_NAME",
    "MODEL_CARD_NAME",
    "NEVER_PUSHED",
    "PLOT_NAME",
    "RESERVED_NAMES",
    "GPHubError",
    "TaskPush",
    "check_accuracy_matrix",
    "check_repo_id",
    "explain_hub_error",
    "files_to_push",
    "hub_errors",
    "markdown_text",
    "model_card",
    "push_task_folder",
    "push_task_to_hub",
    "record_task",
    "save_task",
    "task_branch",
]
