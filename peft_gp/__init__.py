"""peft_gp: gradient projection (PEGP) for parameter-efficient continual learning on the Hugging Face stack."""

from .attention import install_prefix_forward
from .callback import GPCallback, last_checkpoint
from .checkpoints import GPCheckpointError
from .collect import update_memory
from .config import GPAdapterConfig, GPConfigMixin, GPLoraConfig, GPPrefixTuningConfig, GPPromptTuningConfig
from .guard import UnprotectedTrainingWarning
from .hub import GPHubError, push_task_to_hub
from .loading import from_pretrained, install_save_hook, load_memory, load_task_state, save_memory
from .memory import GP_MEMORY_NAME, GPMemory, GPMemoryError
from .projector import GPProjector
from .state import get_memory
from .task_state import GP_TASKS_NAME, GPTaskState, get_task_state
from .trainer import GPTrainer

__version__ = "0.1.0"

install_save_hook()
install_prefix_forward()

__all__ = [
    "GP_MEMORY_NAME",
    "GP_TASKS_NAME",
    "GPAdapterConfig",
    "GPCallback",
    "GPCheckpointError",
    "GPConfigMixin",
    "GPHubError",
    "GPLoraConfig",
    "GPMemory",
    "GPMemoryError",
    "GPPrefixTuningConfig",
    "GPPromptTuningConfig",
    "GPProjector",
    "GPTaskState",
    "GPTrainer",
    "from_pretrained",
    "get_memory",
    "get_task_state",
    "last_checkpoint",
    "load_memory",
    "load_task_state",
    "push_task_to_hub",
    "save_memory",
    "update_memory",
    "UnprotectedTrainingWarning",
]
