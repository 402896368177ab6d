"""Full difference (LyCORIS full): diff, optional diff_b. §2.8"""
from __future__ import annotations

from .base import ModuleContext, NetworkModule, f32, fit_shape


class Full(NetworkModule):
    kind = "full"
    suffixes = frozenset({"diff", "diff_b"})

    def __init__(self, ctx, diff, diff_b):
        super().__init__(ctx)
        self.diff, self.diff_b = diff, diff_b

    @classmethod
    def from_tensors(cls, t: dict, ctx: ModuleContext) -> "Full | None":
        if "diff" not in t:
            return None
        return cls(ctx, t["diff"], t.get("diff_b"))

    def delta(self, weight, multiplier, dyn=None, bias=None):
        self._ignore_dyn(dyn)
        dw = fit_shape(f32(self.diff, weight.device) * multiplier, weight.shape, self.ctx)
        db = None if self.diff_b is None else f32(self.diff_b, weight.device).flatten() * multiplier
        return dw, db

    def describe(self) -> str:
        return "full (diff" + (" + diff_b)" if self.diff_b is not None else ")")
