"""Applying LoRAs to a loaded model: prompt tags, A1111 layer names, loading, in-place merge with exact restore.

    from lib_lora.apply import parse_prompt, layer_mapping, model_family, load_network, Patcher
    text, refs = parse_prompt(prompt)
    mapping, fam = layer_mapping(sd_model), model_family(sd_model)
    nets = [(load_network(path_of(r.name), fam), r.te, r.unet, r.dyn) for r in refs]
    result = patcher.apply(mapping, nets)      # no-op when nothing changed
    patcher.restore()                          # bit-exact originals

The loader (formats + networks) is imported on first use so the parser/patcher work on their own.
"""

from .cache import LRU, DeltaCache
from .layers import layer_mapping, model_family
from .parser import LoraRef, LoraTagError, parse_params, parse_prompt, parse_prompt_lenient
from .patcher import ApplyResult, NetworkApplyStats, Patcher

_LAZY = {"load_network", "LoadedNetwork", "detect_writer", "clear_cache", "DEFAULT_CACHE"}

__all__ = ["LRU", "DeltaCache", "layer_mapping", "model_family", "LoraRef", "LoraTagError", "parse_params",
           "parse_prompt", "parse_prompt_lenient", "ApplyResult", "NetworkApplyStats", "Patcher", *sorted(_LAZY)]


def __getattr__(name):
    if name in _LAZY:
        from . import loader
        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
