"""Per-paradigm handlers: which parameters are projected and which activations feed each basis."""

from .base import ProjectedGroup, resolve_groups

__all__ = ["ProjectedGroup", "resolve_groups"]

from . import adapter, lora  # noqa: E402,F401  (registers the handlers)
