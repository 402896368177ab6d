"""DoRA wrapper (§2.5): weight decomposition on top of any base type.

- `dora_scale` (LyCORIS/kohya files): V = W + dW(m=1); n = ||V|| on the axis read from dora_scale's shape
  ((O,1,..) per output row, (1,I,..) per input channel) + eps; W' = V * (1 + m (d/n - 1)).
  (LyCORIS interpolates the scale factor, so m=0 gives V, not W.)
- `lora_magnitude_vector` (PEFT, shape (O,)): V = W + m*dW (m folded into scaling); W' = d/||V||_row * V.
Returns W' - W (and the base type's bias delta).
"""
from __future__ import annotations

import torch

from .base import LoraError, ModuleContext, NetworkModule, f32

PEFT_KEYS = ("lora_magnitude_vector", "lora_magnitude_vector.weight", "lora_magnitude_vector.default.weight")


class DoRA(NetworkModule):
    kind = "dora"

    def linear_in_multiplier(self) -> bool:
        return False  # both DoRA formulas renormalise with m inside
    is_dora = True

    def __init__(self, ctx, base: NetworkModule, magnitude: torch.Tensor, formula: str):
        super().__init__(ctx)
        self.base, self.magnitude, self.formula = base, magnitude, formula
        self.warnings = base.warnings  # one list for the module

    @classmethod
    def wrap(cls, base: NetworkModule, t: dict, ctx: ModuleContext) -> NetworkModule:
        if "dora_scale" in t:
            return cls(ctx, base, t["dora_scale"], "lycoris")
        for k in PEFT_KEYS:
            if k in t:
                return cls(ctx, base, t[k], "peft")
        return base

    @classmethod
    def from_tensors(cls, t, ctx):  # DoRA never stands alone; registry wraps a base type
        return None

    def rank(self):
        return self.base.rank()

    def _axis(self, shape) -> int:
        """0: per output row, 1: per input channel; from dora_scale's shape (CU/LY) — not A1's fixed input axis."""
        d = self.magnitude
        O, I = shape[0], shape[1]
        if self.formula == "peft":
            if d.numel() != O:
                raise LoraError(f"module '{self.ctx.module_key}': lora_magnitude_vector has {d.numel()} values, "
                                f"the layer has {O} output rows")
            return 0
        if d.numel() == O and d.shape[0] == O:
            return 0
        if d.numel() == I and (d.dim() == 1 or d.shape[0] == 1):
            return 1
        raise LoraError(f"module '{self.ctx.module_key}': dora_scale shape {tuple(d.shape)} fits neither the "
                        f"output ({O}) nor the input ({I}) channels of weight {tuple(shape)}")

    def delta(self, weight, multiplier, dyn=None, bias=None):
        if weight.dim() < 2:
            raise LoraError(f"module '{self.ctx.module_key}': DoRA needs a Linear/Conv weight, got "
                            f"{tuple(weight.shape)}")
        W = weight.detach().float()
        axis = self._axis(W.shape)
        m = multiplier
        base_m = m if self.formula == "peft" else 1.0
        dw, db = self.base.delta(W, base_m, dyn=dyn, bias=bias)
        V = W + dw
        view = [1] * W.dim()
        view[axis] = W.shape[axis]
        if axis == 0:
            norm = V.reshape(V.shape[0], -1).norm(dim=1)
        else:
            norm = V.transpose(0, 1).reshape(V.shape[1], -1).norm(dim=1)
        norm = norm.view(view)
        d = f32(self.magnitude, W.device).reshape(view)
        if self.formula == "peft":
            new = (d / norm) * V
        else:
            factor = d / (norm + torch.finfo(torch.float32).eps)
            if m != 1:
                factor = m * (factor - 1) + 1
            new = V * factor
            if db is not None:
                db = db * m  # base bias delta was taken at m=1
        return new - W, db

    def describe(self) -> str:
        if self.formula == "peft":
            how = "peft"
        else:
            d = self.magnitude
            how = "lycoris, per-" + ("input" if d.dim() > 1 and d.shape[0] == 1 and d.numel() > 1 else "output")
        return f"dora ({how}) over {self.base.describe()}"
