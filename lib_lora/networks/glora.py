"""GLoRA (LyCORIS glora), old and new layouts detected as ComfyUI does; scale alpha/r; bm.weight Tucker. §2.7

new (LyCORIS >= 2024-05): a1 (I,r) a2 (r,I) b1 (O,r) b2 (r,I[,k,k]);  dW = s*(b1 b2 + W a1 a2)
old (A1's formula):      a1 (r,I) a2 (I,r) b1 (r,I) b2 (O,r);        dW = s*(b2 b1 + W a2 a1)
"""
from __future__ import annotations

import torch

from .base import LoraError, ModuleContext, NetworkModule, compute_scale, f32, fit_shape, require

KEYS = ("a1.weight", "a2.weight", "b1.weight", "b2.weight")


class GLoRA(NetworkModule):
    kind = "glora"
    suffixes = frozenset(KEYS + ("bm.weight",))

    def __init__(self, ctx, a1, a2, b1, b2, bm):
        super().__init__(ctx)
        self.a1, self.a2, self.b1, self.b2, self.bm = a1, a2, b1, b2, bm
        self.old = False
        self.ambiguous = False
        self.scales = {}

    @classmethod
    def from_tensors(cls, t: dict, ctx: ModuleContext) -> "GLoRA | None":
        if not any(k in t for k in KEYS):
            return None
        require(t, KEYS, "GLoRA", ctx)
        self = cls(ctx, *(t[k] for k in KEYS), t.get("bm.weight"))
        a1, a2, b1, b2 = self.a1.shape, self.a2.shape, self.b1.shape, self.b2.shape
        old_test = b2[1] == b1[0] == a1[0] == a2[1]
        new_test = b2[0] == b1[1] == a1[1] == a2[0]
        if not (old_test or new_test):
            raise LoraError(f"module '{ctx.module_key}': GLoRA shapes fit neither layout: a1 {tuple(a1)}, "
                            f"a2 {tuple(a2)}, b1 {tuple(b1)}, b2 {tuple(b2)}")
        self.old = old_test and not new_test
        self.ambiguous = old_test and new_test  # square layer: settled by the weight shape in delta()
        for old in ({True, False} if self.ambiguous else {self.old}):
            self.scales[old] = compute_scale(t, int(a1[0] if old else a2[0]), ctx, self.warnings)
        return self

    def _layout_old(self, weight_shape) -> bool:
        if not self.ambiguous:
            return self.old
        # CU calculate_weight: old only if a2 is (I, r) with I == O
        return self.a2.shape[0] == weight_shape[0] and weight_shape[0] == weight_shape[1]

    def rank(self) -> int:
        return int(self.a1.shape[0] if self.old else self.a2.shape[0])

    def delta(self, weight, multiplier, dyn=None, bias=None):
        self._ignore_dyn(dyn)
        dev = weight.device
        self.old = self._layout_old(weight.shape)
        scale = self.scales[self.old]
        a1, a2, b1, b2 = (f32(x, dev) for x in (self.a1, self.a2, self.b1, self.b2))
        if self.old:
            # rename to the new layout's roles: W@a1n@a2n + b1n@b2n
            a1, a2, b1, b2 = a2, a1, b2, b1
        W = weight.detach().float()
        if self.bm is not None:
            # Tucker B: b[o,i,...] = sum_mn bm[m,n,...] b1[o,m] b2[n,i]
            wb = torch.einsum("m n ..., o m, n i -> o i ...", f32(self.bm, dev), b1.flatten(1), b2.flatten(1))
        else:
            wb = b1.flatten(1) @ b2.flatten(1)
        wb = fit_shape(wb, W.shape, self.ctx)
        # W a1 a2 contracts the in-channel axis (dim 1) for Linear and conv alike
        wa = torch.einsum("o i ..., i j -> o j ...", W, a1.flatten(1) @ a2.flatten(1))
        return (wb + wa) * (scale * multiplier), None

    def describe(self) -> str:
        return (f"glora rank {self.rank()} ({'old' if self.old else 'new'} layout"
                + (", tucker)" if self.bm is not None else ")"))
