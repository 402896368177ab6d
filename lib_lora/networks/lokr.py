"""LoKr (LyCORIS lokr_*): w1 or w1_a/w1_b, w2 or w2_a/w2_b, optional Tucker lokr_t2. §2.3"""
from __future__ import annotations

import torch

from .base import LoraError, ModuleContext, NetworkModule, compute_scale, f32, fit_shape

ALL = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


class LoKr(NetworkModule):
    kind = "lokr"
    suffixes = frozenset(ALL + ("lokr_t1",))

    def __init__(self, ctx, t):
        super().__init__(ctx)
        self.t = {k: t[k] for k in ALL if k in t}
        self.scale = 1.0

    @classmethod
    def from_tensors(cls, t: dict, ctx: ModuleContext) -> "LoKr | None":
        if not any(k in t for k in ALL):
            return None
        has_w1 = "lokr_w1" in t or ("lokr_w1_a" in t and "lokr_w1_b" in t)
        has_w2 = "lokr_w2" in t or ("lokr_w2_a" in t and "lokr_w2_b" in t)
        if not (has_w1 and has_w2):
            raise LoraError(f"module '{ctx.module_key}': LoKr needs lokr_w1 (or lokr_w1_a+lokr_w1_b) and lokr_w2 "
                            f"(or lokr_w2_a+lokr_w2_b); has {', '.join(sorted(t))}")
        if "lokr_t2" in t and "lokr_w2" in t:
            raise LoraError(f"module '{ctx.module_key}': LoKr has lokr_t2 together with a full lokr_w2")
        self = cls(ctx, t)
        # full-matrix halves (no rank) mean scale 1 whatever alpha says (A1, CU, LY).
        self.scale = compute_scale(t, self.rank(), ctx, self.warnings)
        return self

    def rank(self) -> int | None:
        if "lokr_w2_b" in self.t:
            return int(self.t["lokr_w2_b"].shape[0])
        if "lokr_w1_b" in self.t:
            return int(self.t["lokr_w1_b"].shape[0])
        return None

    def _halves(self, device):
        g = {k: f32(v, device) for k, v in self.t.items()}
        w1 = g["lokr_w1"] if "lokr_w1" in g else g["lokr_w1_a"] @ g["lokr_w1_b"]
        if "lokr_w2" in g:
            w2 = g["lokr_w2"]
        elif "lokr_t2" in g:
            # w2[p,q,...] = sum_ij t2[i,j,...] w2_a[i,p] w2_b[j,q]   (w2_a stored transposed: (r, b))
            w2 = torch.einsum("i j ..., i p, j q -> p q ...", g["lokr_t2"], g["lokr_w2_a"], g["lokr_w2_b"])
        else:
            # conv non-Tucker: w2_b is (r, d*kh*kw); the 2-D kron reshaped to W has the 4-D kron's layout
            w2 = g["lokr_w2_a"] @ g["lokr_w2_b"].flatten(1)
        return w1, w2

    def delta(self, weight, multiplier, dyn=None, bias=None):
        self._ignore_dyn(dyn)
        w1, w2 = self._halves(weight.device)
        while w1.dim() < w2.dim():
            w1 = w1.unsqueeze(-1)
        d = torch.kron(w1, w2.contiguous())
        return fit_shape(d * (self.scale * multiplier), weight.shape, self.ctx), None

    def describe(self) -> str:
        w1 = "w1 full" if "lokr_w1" in self.t else "w1 a/b"
        w2 = "w2 full" if "lokr_w2" in self.t else ("w2 tucker" if "lokr_t2" in self.t else "w2 a/b")
        r = self.rank()
        return f"lokr {'rank ' + str(r) if r is not None else 'full-matrix'} ({w1}, {w2})"
