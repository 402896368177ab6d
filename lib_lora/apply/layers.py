"""A1111 layer names for a loaded model, and its family.

Mirrors ``extensions-builtin/Lora/networks.py: assign_network_names_to_compvis_modules``:

- SDXL: every ``sd_model.conditioner.embedders[i]`` that has ``.wrapped`` contributes
  ``f"{i}_{name.replace('.', '_')}"`` for each of ``embedder.wrapped.named_modules()``;
- SD1/SD2: ``getattr(cond_stage_model, 'wrapped', cond_stage_model).named_modules()`` with ``.`` → ``_``;
- all families: ``sd_model.model.named_modules()`` (so UNet names start with ``diffusion_model_``).

Later entries overwrite earlier ones exactly as in A1111 (only the root names ``''``/``'{i}_'`` can collide).
Unlike A1111 this does not set ``module.network_layer_name`` and does not read ``shared.sd_model``: it names the
model it is given.
"""

from __future__ import annotations

from torch import nn

from ..formats.family import model_family  # noqa: F401  (re-exported: apply's public name)
from ..formats.keymap import hf_clip_name

FAMILIES = ("sd1", "sd2", "sdxl")


def _is_sdxl(sd_model) -> bool:
    flag = getattr(sd_model, "is_sdxl", None)
    if flag is not None:
        return bool(flag)
    return hasattr(sd_model, "conditioner")


def _text_embedders(sd_model):
    """(index, module) of the SDXL text encoders, as A1111 enumerates them (those with ``.wrapped``)."""
    embedders = list(getattr(sd_model.conditioner, "embedders", []))
    found = [(i, e.wrapped) for i, e in enumerate(embedders) if hasattr(e, "wrapped")]
    if found:
        return found
    # Bare sgm (no WebUI hijack wrappers): the text embedders are the ones holding a transformer.
    return [(i, e) for i, e in enumerate(embedders)
            if hasattr(e, "transformer") or hasattr(getattr(e, "model", None), "transformer")]


def _te_name(name: str) -> str:
    """HF CLIP under ``.transformer``: the 4.x layout's names whatever the installed transformers."""
    if name.startswith("transformer."):
        return "transformer." + hf_clip_name(name[len("transformer."):])
    return name


def layer_mapping(sd_model) -> dict[str, nn.Module]:
    mapping: dict[str, nn.Module] = {}
    if _is_sdxl(sd_model):
        for i, wrapped in _text_embedders(sd_model):
            for name, module in wrapped.named_modules():
                mapping[f"{i}_{_te_name(name).replace('.', '_')}"] = module
    else:
        cond = getattr(sd_model, "cond_stage_model", None)
        if cond is not None:
            cond = getattr(cond, "wrapped", cond)
            for name, module in cond.named_modules():
                mapping[_te_name(name).replace(".", "_")] = module
    unet_root = getattr(sd_model, "model", None)
    if unet_root is None:
        raise ValueError("the model has no `.model` (DiffusionWrapper/OpenAIWrapper): not an SD1/SD2/SDXL model")
    for name, module in unet_root.named_modules():
        mapping[name.replace(".", "_")] = module
    return mapping
