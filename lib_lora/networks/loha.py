"""LoHa (LyCORIS hada_*), incl. Tucker hada_t1/hada_t2. §2.2 — scale applied once (LyCORIS forward, A1, CU)."""
from __future__ import annotations

import torch

from .base import LoraError, ModuleContext, NetworkModule, compute_scale, f32, fit_shape, require

KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    # F[o,i,...] = sum_pq t[p,q,...] wa[p,o] wb[q,i]   (wa stored transposed: (r, O))
    return torch.einsum("p q ..., p o, q i -> o i ...", t, wa, wb)


class LoHa(NetworkModule):
    kind = "loha"
    suffixes = frozenset(KEYS + ("hada_t1", "hada_t2"))

    def __init__(self, ctx, w, t1, t2):
        super().__init__(ctx)
        self.w, self.t1, self.t2 = w, t1, t2
        self.scale = 1.0

    @classmethod
    def from_tensors(cls, t: dict, ctx: ModuleContext) -> "LoHa | None":
        if not any(k in t for k in KEYS):
            return None
        require(t, KEYS, "LoHa", ctx)
        t1, t2 = t.get("hada_t1"), t.get("hada_t2")
        if (t1 is None) != (t2 is None):
            raise LoraError(f"module '{ctx.module_key}': LoHa has only one of hada_t1/hada_t2")
        self = cls(ctx, [t[k] for k in KEYS], t1, t2)
        self.scale = compute_scale(t, self.rank(), ctx, self.warnings)
        return self

    def rank(self) -> int:
        return int(self.w[1].shape[0])  # hada_w1_b.shape[0] (A1/CU/LY)

    def delta(self, weight, multiplier, dyn=None, bias=None):
        self._ignore_dyn(dyn)
        w1a, w1b, w2a, w2b = (f32(x, weight.device) for x in self.w)
        if self.t1 is not None:
            d = _tucker(f32(self.t1, weight.device), w1a, w1b) * _tucker(f32(self.t2, weight.device), w2a, w2b)
        else:
            d = (w1a @ w1b) * (w2a @ w2b)
        return fit_shape(d * (self.scale * multiplier), weight.shape, self.ctx), None

    def describe(self) -> str:
        return f"loha rank {self.rank()}" + (" (tucker)" if self.t1 is not None else "")
