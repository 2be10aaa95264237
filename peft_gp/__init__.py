"""peft_gp: gradient projection (PEGP) for parameter-efficient continual learning on the Hugging Face stack."""

from .attention import install_prefix_forward
from .collect import update_memory
from .config import GPConfigMixin, GPLoraConfig, GPPrefixTuningConfig, GPPromptTuningConfig
from .loading import from_pretrained, install_save_hook, load_memory, save_memory
from .memory import GP_MEMORY_NAME, GPMemory, GPMemoryError
from .projector import GPProjector
from .state import get_memory
from .trainer import GPTrainer

__version__ = "0.1.0"

install_save_hook()
install_prefix_forward()

__all__ = [
    "GP_MEMORY_NAME",
    "GPConfigMixin",
    "GPLoraConfig",
    "GPMemory",
    "GPMemoryError",
    "GPPrefixTuningConfig",
    "GPPromptTuningConfig",
    "GPProjector",
    "GPTrainer",
    "from_pretrained",
    "get_memory",
    "load_memory",
    "save_memory",
    "update_memory",
]
