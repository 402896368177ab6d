"""LoRA / LoCon (kohya, LyCORIS incl. lora_mid Tucker, PEFT lora_A/B incl. lora_B.bias, diffusers forms). §2.1"""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import (LoraError, ModuleContext, NetworkModule, compute_scale, f32, first_key, fit_shape, require)

# Aliases in the order tried; split_key may hand us any of the historical forms (§2.1 table).
UP_KEYS = ("lora_up.weight", "lora_B.weight", "lora.up.weight", "lora_linear_layer.up.weight",
           "_lora.up.weight", "lora_B", "lora_B.default.weight")
DOWN_KEYS = ("lora_down.weight", "lora_A.weight", "lora.down.weight", "lora_linear_layer.down.weight",
             "_lora.down.weight", "lora_A", "lora_A.default.weight")
MID_KEY = "lora_mid.weight"
BIAS_KEYS = ("lora_B.bias", "lora_B.default.bias")


class LoRA(NetworkModule):
    kind = "lora"
    suffixes = frozenset(UP_KEYS + DOWN_KEYS + (MID_KEY,) + BIAS_KEYS)

    def __init__(self, ctx, up, down, mid, up_bias, scale, peft_style):
        super().__init__(ctx)
        self.up, self.down, self.mid, self.up_bias = up, down, mid, up_bias
        self.scale = scale
        self.peft_style = peft_style
        self.kind = "locon" if (down.dim() == 4 and (mid is not None or down.shape[2:] != (1, 1))) else "lora"

    @classmethod
    def from_tensors(cls, t: dict, ctx: ModuleContext) -> "LoRA | None":
        up_k, down_k = first_key(t, UP_KEYS), first_key(t, DOWN_KEYS)
        if up_k is None and down_k is None:
            return None
        require(t, [up_k or "lora_up.weight", down_k or "lora_down.weight"], "LoRA", ctx)
        up, down, mid = t[up_k], t[down_k], t.get(MID_KEY)
        if up.dim() < 2 or down.dim() < 2:
            raise LoraError(f"module '{ctx.module_key}': LoRA up/down must be at least 2-D, got "
                            f"{tuple(up.shape)} / {tuple(down.shape)}")
        rank = down.shape[0]
        if up.shape[1] != rank or (mid is not None and tuple(mid.shape[:2]) != (rank, rank)):
            raise LoraError(f"module '{ctx.module_key}': LoRA rank mismatch: up {tuple(up.shape)}, "
                            f"down {tuple(down.shape)}" + (f", mid {tuple(mid.shape)}" if mid is not None else ""))
        bias_k = first_key(t, BIAS_KEYS)
        self = cls(ctx, up, down, mid, t[bias_k] if bias_k else None, 1.0, up_k.startswith("lora_B"))
        self.scale = compute_scale(t, rank, ctx, self.warnings)
        return self

    def rank(self) -> int:
        return int(self.down.shape[0])

    def _product(self, device, dyn: int | None) -> torch.Tensor:
        up, down = f32(self.up, device), f32(self.down, device)
        if self.mid is not None:
            if dyn is not None:
                self._ignore_dyn(dyn)
            mid = f32(self.mid, device)
            # W[o,i,...] = sum_ab up[o,a] mid[a,b,...] down[b,i]  (conv chain down -> mid -> up)
            return torch.einsum("o a, a b ..., b i -> o i ...", up.flatten(1), mid, down.flatten(1))
        if dyn is not None and 0 < dyn < down.shape[0]:
            # A1 rebuild_conventional: slice before the product; the scale stays alpha / full rank.
            up, down = up[:, :dyn], down[:dyn]
        prod = up.flatten(1) @ down.flatten(1)
        return prod.reshape(up.shape[0], *down.shape[1:]) if down.dim() > 2 else prod

    def delta(self, weight, multiplier, dyn=None, bias=None):
        dw = self._product(weight.device, dyn) * (self.scale * multiplier)
        dw = fit_shape(dw, weight.shape, self.ctx)
        db = None
        if self.up_bias is not None:
            db = f32(self.up_bias, weight.device) * (self.scale * multiplier)
        return dw, db

    def describe(self) -> str:
        parts = []
        if self.down.dim() == 4:
            k = self.mid.shape[2:] if self.mid is not None else self.down.shape[2:]
            parts.append(f"conv {'x'.join(str(int(v)) for v in k)}")
        if self.mid is not None:
            parts.append("tucker")
        if self.peft_style:
            parts.append("peft")
        if self.up_bias is not None:
            parts.append("bias")
        return f"{self.kind} rank {self.rank()}" + (f" ({', '.join(parts)})" if parts else "")

    @classmethod
    def trainable_twin(cls, layer: nn.Module, rank: int, alpha: float | None = None) -> "LoRATrainable":
        return LoRATrainable(layer, rank, alpha)


class LoRATrainable(nn.Module):
    """kohya LoRAModule-shaped trainable pair (lora_down/lora_up/alpha), kohya init: down kaiming, up zeros.

    ``forward(x)`` returns only the LoRA branch ``up(down(x)) * scale * multiplier``; the caller adds it to the
    frozen layer's output. ``state_dict()`` has exactly the kohya keys.
    """

    def __init__(self, layer: nn.Module, rank: int, alpha: float | None = None):
        super().__init__()
        if isinstance(layer, nn.Conv2d):
            self.lora_down = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding,
                                       bias=False)
            self.lora_up = nn.Conv2d(rank, layer.out_channels, (1, 1), (1, 1), bias=False)
        elif isinstance(layer, nn.Linear):
            self.lora_down = nn.Linear(layer.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, layer.out_features, bias=False)
        else:
            raise LoraError(f"LoRA training supports Linear and Conv2d layers, not {type(layer).__name__}")
        alpha = float(rank) if alpha is None or alpha == 0 else float(alpha)  # kohya: 0/None -> rank
        self.register_buffer("alpha", torch.tensor(alpha))
        self.scale = alpha / rank
        self.multiplier = 1.0
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_up(self.lora_down(x)) * (self.scale * self.multiplier)
