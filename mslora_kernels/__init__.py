"""mslora-kernels: fused GPU kernels for MSLoRA, Serial LoRA and MSPLoRA adapters."""

from .backends import available_backends
from .config import MSLoRAOptions, mslora_param_count
from .lora import MSPLoRAConfig, SerialLoRAConfig, loraplus_param_groups, merge, unmerge
from .modules import MSLoRA

__version__ = "0.1.0"

__all__ = ["MSLoRA", "MSLoRAOptions", "available_backends", "mslora_param_count"]
__all__ += ["MSPLoRAConfig", "SerialLoRAConfig", "loraplus_param_groups", "merge", "unmerge"]
