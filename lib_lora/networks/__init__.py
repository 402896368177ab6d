"""Network types (LoRA, LoCon, LoHa, LoKr, IA3, DoRA, OFT/BOFT, GLoRA, full, norm): tensors of one module -> delta."""
from .base import LoraError, ModuleContext, NetworkModule
from .registry import NETWORK_TYPES, build_module, describe

__all__ = ["LoraError", "ModuleContext", "NetworkModule", "NETWORK_TYPES", "build_module", "describe"]
