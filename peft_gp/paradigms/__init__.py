"""Per-paradigm handlers: which parameters are projected and which activations feed each basis."""

from .base import FeatureSource, ProjectedGroup, resolve_groups

__all__ = ["FeatureSource", "ProjectedGroup", "resolve_groups"]

from . import adapter, lora, prefix, prompt  # noqa: E402,F401  (register the handlers)
