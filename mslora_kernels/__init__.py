"""mslora-kernels: fused GPU kernels for MSLoRA, Serial LoRA and MSPLoRA adapters."""

from .backends import available_backends
from .config import MSLoRAOptions, mslora_param_count
from .inject import inject, load_adapter, save_adapter, trainable_parameters
from .lora import MSPLoRAConfig, SerialLoRAConfig, loraplus_param_groups, merge, unmerge
from .modules import MSLoRA
from .placement import MSLoRAConfig

__version__ = "0.1.0"

__all__ = [
    "MSLoRA", "MSLoRAOptions", "available_backends", "mslora_param_count",
    "MSLoRAConfig", "inject", "trainable_parameters", "save_adapter", "load_adapter",
    "SerialLoRAConfig", "MSPLoRAConfig", "merge", "unmerge", "loraplus_param_groups",
]
