"""PEFT tuners that PEFT itself does not have (registered into PEFT's mappings when peft_gp is imported)."""

from .bottleneck import BottleneckConfig, BottleneckLayer, BottleneckModel, GPPeftType

__all__ = ["BottleneckConfig", "BottleneckLayer", "BottleneckModel", "GPPeftType"]
