"""Norm-layer deltas (LyCORIS norms.py): w_norm, optional b_norm, for LayerNorm/GroupNorm. §2.8"""
from __future__ import annotations

from .base import LoraError, ModuleContext, NetworkModule, f32, fit_shape


class Norm(NetworkModule):
    kind = "norm"
    suffixes = frozenset({"w_norm", "b_norm"})

    def __init__(self, ctx, w_norm, b_norm):
        super().__init__(ctx)
        self.w_norm, self.b_norm = w_norm, b_norm

    @classmethod
    def from_tensors(cls, t: dict, ctx: ModuleContext) -> "Norm | None":
        if "w_norm" not in t:
            if "b_norm" in t:
                raise LoraError(f"module '{ctx.module_key}': norm module has b_norm but no w_norm")
            return None
        return cls(ctx, t["w_norm"], t.get("b_norm"))

    def delta(self, weight, multiplier, dyn=None, bias=None):
        self._ignore_dyn(dyn)
        dw = fit_shape(f32(self.w_norm, weight.device) * multiplier, weight.shape, self.ctx)
        db = None if self.b_norm is None else f32(self.b_norm, weight.device).flatten() * multiplier
        return dw, db

    def describe(self) -> str:
        return "norm (w_norm" + (" + b_norm)" if self.b_norm is not None else ")")
