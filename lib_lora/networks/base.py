"""Shared pieces of the network types: context, scale rules (lora-formats.md §1), shape fitting, fp32 helpers.

Every type turns the tensors of ONE module key (suffix -> tensor) into an object whose ``delta()`` gives the weight
(and bias) change in float32 for a given target weight and multiplier.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Iterable

import torch

from ..formats.errors import LoraError

log = logging.getLogger("lora_studio.networks")

# Writers that treat alpha == 0 (or missing) as alpha = rank, i.e. scale 1 (§1.1).
ALPHA0_IS_RANK_WRITERS = ("kohya", "lycoris")

# Suffixes every type may carry besides its own tensors.
COMMON_SUFFIXES = frozenset({"alpha", "scale", "dora_scale", "lora_magnitude_vector",
                             "lora_magnitude_vector.weight", "lora_magnitude_vector.default.weight"})


@dataclass
class ModuleContext:
    writer: str = "unknown"            # 'kohya' | 'lycoris' | 'peft' | 'unknown'
    adapter_config: dict | None = None  # diffusers lora_adapter_metadata (LoraConfig fields)
    module_key: str = ""


def f32(t: torch.Tensor, device) -> torch.Tensor:
    return t.detach().to(device=device, dtype=torch.float32)


def read_float(value, what: str, ctx: ModuleContext) -> float:
    """alpha/scale as float from a 0-d or 1-element tensor of any dtype, or a Python number (old .pt files)."""
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise LoraError(f"module '{ctx.module_key}': '{what}' should hold one number but has shape "
                            f"{tuple(value.shape)}; the file is malformed")
        # float() first: bf16/fp16 .item() is fine, but division must happen in fp32/python float
        return float(value.detach().float().item())
    raise LoraError(f"module '{ctx.module_key}': '{what}' has unsupported type {type(value).__name__}")


def check_tensors(t: dict, ctx: ModuleContext) -> None:
    """Zero-size tensors crash A1 (ZeroDivisionError); refuse them with a reason instead (§6.5)."""
    for k, v in t.items():
        if isinstance(v, torch.Tensor) and v.numel() == 0:
            raise LoraError(f"module '{ctx.module_key}': tensor '{k}' is empty (shape {tuple(v.shape)}); "
                            f"the module is skipped")


def first_key(t: dict, names: Iterable[str]) -> str | None:
    for n in names:
        if n in t:
            return n
    return None


def _component_config(cfg: dict, module_key: str) -> dict:
    """Accept a plain LoraConfig dict or diffusers' flattened '<component>.<field>' form."""
    if "r" in cfg or "lora_alpha" in cfg:
        return cfg
    comp = module_key.split(".", 1)[0] if "." in module_key else ""
    prefix = comp + "."
    sub = {k[len(prefix):]: v for k, v in cfg.items() if comp and k.startswith(prefix)}
    if sub:
        return sub
    if comp and isinstance(cfg.get(comp), dict):  # nested {"unet": {...}}
        return cfg[comp]
    return {}


def _pattern_get(pattern: dict | None, module_key: str):
    """PEFT's rule: a pattern key matches the module name exactly or as a dotted suffix (regex allowed)."""
    if not pattern:
        return None
    names = [module_key]
    if "." in module_key:
        names.append(module_key.split(".", 1)[1])  # without the 'unet.' / 'text_encoder.' component
    for key, val in pattern.items():
        for name in names:
            if name == key or re.match(rf".*\.{key}$", name):
                return val
    return None


def compute_scale(t: dict, rank: int | None, ctx: ModuleContext, warnings: list[str]) -> float:
    """alpha/rank with the conventions of lora-formats.md §1.1.

    Order: per-module 'scale' key (A1 calc_scale) > 'alpha' key > diffusers adapter metadata > 1.
    """
    if "scale" in t:
        return read_float(t["scale"], "scale", ctx)
    if rank is None:
        return 1.0
    if "alpha" in t:
        alpha = read_float(t["alpha"], "alpha", ctx)
        if alpha == 0:
            if ctx.writer in ALPHA0_IS_RANK_WRITERS:
                return 1.0  # kohya/LyCORIS: alpha 0 means alpha = rank
            msg = (f"module '{ctx.module_key}': alpha is 0, so this module has no effect "
                   f"(writer '{ctx.writer}'; kohya/LyCORIS would read it as alpha = rank)")
            warnings.append(msg)
            log.warning(msg)
            return 0.0
        return alpha / rank
    if ctx.adapter_config:
        cfg = _component_config(ctx.adapter_config, ctx.module_key)
        if cfg:
            r_cfg = _pattern_get(cfg.get("rank_pattern"), ctx.module_key)
            r_cfg = cfg.get("r", rank) if r_cfg is None else r_cfg
            alpha = _pattern_get(cfg.get("alpha_pattern"), ctx.module_key)
            alpha = cfg.get("lora_alpha", r_cfg) if alpha is None else alpha
            if int(r_cfg) != rank:
                msg = (f"module '{ctx.module_key}': adapter metadata says r={r_cfg} but the tensors have rank "
                       f"{rank}; using the tensor rank")
                warnings.append(msg)
                log.warning(msg)
                r_cfg = rank
            if cfg.get("use_rslora"):
                return float(alpha) / math.sqrt(r_cfg)
            return float(alpha) / r_cfg
    return 1.0


def fit_shape(delta: torch.Tensor, shape: torch.Size, ctx: ModuleContext) -> torch.Tensor:
    """Bring a delta to the target weight's shape as A1's finalize_updown does.

    - same element count: reshape (Linear <-> 1x1 conv, e.g. SD2/SDXL proj_in/out written as conv by kohya);
    - conv with fewer input channels (inpainting conv_in 4 -> 9): zero-pad the extra input channels.
    """
    shape = torch.Size(shape)
    if delta.shape == shape:
        return delta
    if delta.numel() == math.prod(shape):
        return delta.reshape(shape)
    if (delta.dim() == 4 and len(shape) == 4 and delta.shape[0] == shape[0] and delta.shape[2:] == shape[2:]
            and delta.shape[1] < shape[1]):
        return torch.nn.functional.pad(delta, (0, 0, 0, 0, 0, shape[1] - delta.shape[1]))
    raise LoraError(f"module '{ctx.module_key}': network delta of shape {tuple(delta.shape)} does not fit the "
                    f"layer weight of shape {tuple(shape)}; the LoRA was probably made for another model")


class NetworkModule:
    """One network module (one module key). Subclasses implement from_tensors / delta."""

    kind: str = "base"
    suffixes: frozenset = frozenset()  # suffixes this type consumes (besides COMMON_SUFFIXES)
    is_dora: bool = False

    def __init__(self, ctx: ModuleContext):
        self.ctx = ctx
        self.warnings: list[str] = []

    @classmethod
    def from_tensors(cls, t: dict, ctx: ModuleContext) -> "NetworkModule | None":
        raise NotImplementedError

    def rank(self) -> int | None:
        return None

    def linear_in_multiplier(self) -> bool:
        """True when delta(m) == m * delta(1): the patcher then caches one delta for every multiplier."""
        return True

    def delta(self, weight: torch.Tensor, multiplier: float, dyn: int | None = None,
              bias: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        raise NotImplementedError

    def describe(self) -> str:
        r = self.rank()
        return f"{self.kind}" + (f" rank {r}" if r is not None else "")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.ctx.module_key!r}: {self.describe()}>"

    # helpers for subclasses
    def _warn(self, msg: str) -> None:
        full = f"module '{self.ctx.module_key}': {msg}"
        self.warnings.append(full)
        log.warning(full)

    def _ignore_dyn(self, dyn: int | None) -> None:
        if dyn is not None and not getattr(self, "_dyn_warned", False):
            self._dyn_warned = True
            self._warn(f"dyn={dyn} applies only to plain LoRA without lora_mid (as in A1111); ignored for "
                       f"{self.kind}")


def require(t: dict, keys: Iterable[str], kind: str, ctx: ModuleContext) -> None:
    missing = [k for k in keys if k not in t]
    if missing:
        raise LoraError(f"module '{ctx.module_key}': {kind} tensors incomplete, missing {', '.join(missing)} "
                        f"(has {', '.join(sorted(t))}); the file is damaged or uses an unknown layout")
