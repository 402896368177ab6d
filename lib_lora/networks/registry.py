"""Type detection: try the types in A1's order (lora-formats.md §2), first match wins; wrap DoRA."""
from __future__ import annotations

from .base import COMMON_SUFFIXES, LoraError, ModuleContext, NetworkModule, check_tensors
from .dora import DoRA
from .full import Full
from .glora import GLoRA
from .ia3 import IA3
from .loha import LoHa
from .lokr import LoKr
from .lora import LoRA
from .norm import Norm
from .oft import BOFT, OFT

# A1 order: lora -> hada -> ia3 -> lokr -> full -> norm -> glora -> oft; BOFT (4-D oft_blocks) after OFT (3-D).
NETWORK_TYPES: list[type[NetworkModule]] = [LoRA, LoHa, IA3, LoKr, Full, Norm, GLoRA, OFT, BOFT]

KNOWN_SUFFIXES = frozenset().union(COMMON_SUFFIXES, *(c.suffixes for c in NETWORK_TYPES))


def build_module(t: dict, ctx: ModuleContext) -> NetworkModule:
    """Network object for the tensors of one module key; LoraError (with the reason) if none fits."""
    if not t:
        raise LoraError(f"module '{ctx.module_key}': no tensors")
    check_tensors(t, ctx)
    for cls in NETWORK_TYPES:
        mod = cls.from_tensors(t, ctx)
        if mod is None:
            continue
        extra = sorted(set(t) - COMMON_SUFFIXES - cls.suffixes)
        if extra:
            mod._warn(f"{mod.kind}: ignored unexpected tensors {', '.join(extra)}")
        return DoRA.wrap(mod, t, ctx)
    unknown = sorted(set(t) - COMMON_SUFFIXES)
    raise LoraError(f"module '{ctx.module_key}': unknown network type; tensor suffixes "
                    f"{', '.join(unknown) or ', '.join(sorted(t))} match none of "
                    f"lora/loha/ia3/lokr/full/norm/glora/oft/boft")


def describe(module: NetworkModule) -> str:
    """One line, e.g. 'lokr rank 8 (w1 full, w2 a/b)'."""
    return module.describe()
