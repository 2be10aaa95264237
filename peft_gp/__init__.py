"""peft_gp: gradient projection (PEGP) for parameter-efficient continual learning on the Hugging Face stack.

Three layers, imports pointing down only: ``core`` (pure maths, metrics, files), ``wiring`` (configs, tuners, memory,
projection, persistence) and the orchestration on top (``training``: ``GPCallback``/``GPTrainer``; ``hub``;
``continual``: whole runs; ``cli``). Importing peft_gp registers the bottleneck adapter in PEFT's public type
registries and changes nothing else of PEFT.
"""

from .core.hub_errors import GPHubError
from .hub import push_task_to_hub
from .training.callback import GPCallback
from .training.resume import last_checkpoint
from .training.trainer import GPTrainer
from .wiring.build import get_peft_model
from .wiring.checkpoints import GPCheckpointError
from .wiring.collect import update_memory
from .wiring.config import GPAdapterConfig, GPLoraConfig, GPPrefixTuningConfig, GPPromptTuningConfig
from .wiring.gp_fields import GPConfigMixin
from .wiring.guard import GPCapacityWarning, UnprotectedTrainingWarning
from .wiring.memory import GP_MEMORY_NAME, GPMemory, GPMemoryError
from .wiring.persistence import from_pretrained, load_memory, load_task_state, save_memory, save_pretrained
from .wiring.projector import GPProjector
from .wiring.stat_heads import apply_statistics_head, restore_trained_head, statistics_head
from .wiring.state import get_memory, get_task_state
from .wiring.task_record import GP_TASKS_NAME, GPTaskState

__version__ = "0.1.0"

__all__ = [
    "GP_MEMORY_NAME",
    "GP_TASKS_NAME",
    "GPAdapterConfig",
    "GPCallback",
    "GPCapacityWarning",
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
    "UnprotectedTrainingWarning",
    "apply_statistics_head",
    "restore_trained_head",
    "from_pretrained",
    "get_memory",
    "get_peft_model",
    "get_task_state",
    "last_checkpoint",
    "load_memory",
    "load_task_state",
    "push_task_to_hub",
    "save_memory",
    "save_pretrained",
    "statistics_head",
    "update_memory",
]
