"""(IA)^3 (LyCORIS ia3): W' = W * (1 + m*w) along the output (on_input=0) or input (on_input=1) axis. §2.4

Detected by 'on_input', not by a bare 'weight' (A1's test misfiles any '<module>.weight').
The bias is left alone, as LyCORIS' merge does. Conv with on_input=0 is broadcast over (O,1,1,1), not A1's
(O,1) which fails.
"""
from __future__ import annotations

from .base import LoraError, ModuleContext, NetworkModule, f32, read_float


class IA3(NetworkModule):
    kind = "ia3"
    suffixes = frozenset({"weight", "on_input"})

    def __init__(self, ctx, w, on_input: bool):
        super().__init__(ctx)
        self.w, self.on_input = w, on_input

    @classmethod
    def from_tensors(cls, t: dict, ctx: ModuleContext) -> "IA3 | None":
        if "on_input" not in t:
            return None
        if "weight" not in t:
            raise LoraError(f"module '{ctx.module_key}': IA3 has 'on_input' but no 'weight'")
        return cls(ctx, t["weight"], bool(read_float(t["on_input"], "on_input", ctx)))

    def delta(self, weight, multiplier, dyn=None, bias=None):
        self._ignore_dyn(dyn)
        axis = 1 if self.on_input else 0
        if weight.dim() < 2:
            raise LoraError(f"module '{self.ctx.module_key}': IA3 needs a Linear/Conv weight, got shape "
                            f"{tuple(weight.shape)}")
        n = weight.shape[axis]
        w = f32(self.w, weight.device).flatten()
        if w.numel() != n:
            raise LoraError(f"module '{self.ctx.module_key}': IA3 vector has {w.numel()} values but the layer has "
                            f"{n} {'input' if self.on_input else 'output'} channels")
        view = [1] * weight.dim()
        view[axis] = n
        return weight.detach().float() * w.view(view) * multiplier, None

    def describe(self) -> str:
        return "ia3 (" + ("on input" if self.on_input else "on output") + ")"
