"""OFT family (§2.6): LyCORIS diag-OFT (3-D oft_blocks), kohya OFT, old LyCORIS oft_diag (R itself), BOFT (4-D).

R = (I + Q)(I - Q)^-1 with Q = B - B^T (Cayley, fp32). Norm constraint c = alpha * O over all blocks together:
LyCORIS applies it only when alpha > 0; kohya always clamps (alpha 0 => Q ~ 0 => no-op).
Diag-OFT rotates blocks of output rows by R^T (einsum 'k n m, k n ... -> k m ...'); BOFT applies R_i (not R_i^T)
per butterfly factor. Multiplier: OFT linear (R_eff = m R + (1-m) I); BOFT per factor (LyCORIS). 'rescale'
multiplies the rotated weight per output row, as LyCORIS does (so with rescale, m=0 leaves rescale * W).
"""
from __future__ import annotations

import torch

from .base import LoraError, ModuleContext, NetworkModule, f32, read_float


def _is_kohya(ctx: ModuleContext) -> bool:
    return ctx.writer == "kohya" or ctx.module_key.startswith("oft_unet")


def inverse(a: torch.Tensor) -> torch.Tensor:
    """The inverse of each (b, b) matrix of ``a`` (..., b, b), with no error check (a host sync that a CUDA-graph
    capture refuses; I - Q is invertible for every skew-symmetric Q). On the CPU, oneMKL's batched LU fails for
    blocks of about 150 rows and more with several threads (torch 2.13: "Pivots given to lu_solve must all be
    greater or equal to 1"), as kohya OFT's blocks are: there large blocks are inverted one at a time."""
    if a.device.type == "cpu" and a.dim() > 2 and a.shape[-1] >= 64 and a.numel() > a.shape[-1] * a.shape[-2]:
        flat = a.reshape(-1, *a.shape[-2:])
        return torch.stack([torch.linalg.inv_ex(m)[0] for m in flat]).reshape(a.shape)
    return torch.linalg.inv_ex(a)[0]


def cayley(blocks: torch.Tensor, constraint: float, kohya: bool) -> torch.Tensor:
    """R for every block of `blocks` (..., b, b), computed in fp32."""
    q = blocks - blocks.transpose(-1, -2)
    if kohya:
        # sd-scripts OFTModule.get_weight: always clamped, epsilon on both sides
        norm = torch.norm(q.flatten())
        q = q * ((torch.clamp(norm, max=constraint) + 1e-8) / (norm + 1e-8))
    elif constraint > 0:
        # LyCORIS get_r
        norm = torch.norm(q) + 1e-8
        if norm > constraint:
            q = q * (constraint / norm)
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype)
    return (eye + q) @ inverse(eye - q)


class OFT(NetworkModule):
    kind = "oft"
    suffixes = frozenset({"oft_blocks", "oft_diag", "rescale"})

    def linear_in_multiplier(self) -> bool:
        return self.rescale is None  # with rescale, m=0 still leaves rescale * W

    def __init__(self, ctx, blocks, is_r: bool, alpha: float, rescale):
        super().__init__(ctx)
        self.blocks, self.is_r, self.alpha, self.rescale = blocks, is_r, alpha, rescale
        self.kohya = _is_kohya(ctx) and not is_r

    @classmethod
    def from_tensors(cls, t: dict, ctx: ModuleContext) -> "OFT | None":
        if "oft_diag" in t:
            b = t["oft_diag"]
            if b.dim() != 3 or b.shape[1] != b.shape[2]:
                raise LoraError(f"module '{ctx.module_key}': oft_diag should be (n_blocks, b, b), got "
                                f"{tuple(b.shape)}")
            return cls(ctx, b, True, 0.0, t.get("rescale"))
        if "oft_blocks" not in t or t["oft_blocks"].dim() != 3:
            return None
        b = t["oft_blocks"]
        if b.shape[1] != b.shape[2]:
            raise LoraError(f"module '{ctx.module_key}': oft_blocks should be (n_blocks, b, b), got {tuple(b.shape)}")
        alpha = read_float(t["alpha"], "alpha", ctx) if "alpha" in t else 0.0
        self = cls(ctx, b, False, alpha, t.get("rescale"))
        if "alpha" not in t and self.kohya:
            self._warn("kohya OFT without alpha: constraint 0 makes it a no-op")
        return self

    def _check(self, weight):
        n, bs = self.blocks.shape[0], self.blocks.shape[1]
        if weight.shape[0] != n * bs:
            raise LoraError(f"module '{self.ctx.module_key}': OFT has {n} blocks of {bs} = {n * bs} rows but the "
                            f"layer has {weight.shape[0]} output channels")
        return n, bs

    def rotation(self, out_dim: int, device) -> torch.Tensor:
        blocks = f32(self.blocks, device)
        if self.is_r:
            return blocks
        return cayley(blocks, self.alpha * out_dim, self.kohya)

    def delta(self, weight, multiplier, dyn=None, bias=None):
        self._ignore_dyn(dyn)
        n, bs = self._check(weight)
        W = weight.detach().float()
        R = self.rotation(W.shape[0], W.device)
        eye = torch.eye(bs, device=W.device)
        R = multiplier * R + (1 - multiplier) * eye  # linear in m (A1/LY/kohya agree)
        new = torch.einsum("k n m, k n ... -> k m ...", R, W.reshape(n, bs, *W.shape[1:])).reshape(W.shape)
        if self.rescale is not None:
            new = f32(self.rescale, W.device).reshape(W.shape[0], *[1] * (W.dim() - 1)) * new
        return new - W, None

    def describe(self) -> str:
        n, bs = self.blocks.shape[0], self.blocks.shape[1]
        what = "old oft_diag" if self.is_r else ("kohya" if self.kohya else "lycoris diag")
        extra = ", rescale" if self.rescale is not None else ""
        return f"oft ({what}, {n} blocks of {bs}{extra})"


class BOFT(NetworkModule):
    kind = "boft"

    def linear_in_multiplier(self) -> bool:
        return False  # LyCORIS applies m to every butterfly factor
    suffixes = frozenset({"oft_blocks", "rescale"})

    def __init__(self, ctx, blocks, alpha: float, rescale):
        super().__init__(ctx)
        self.blocks, self.alpha, self.rescale = blocks, alpha, rescale

    @classmethod
    def from_tensors(cls, t: dict, ctx: ModuleContext) -> "BOFT | None":
        if "oft_blocks" not in t or t["oft_blocks"].dim() != 4:
            return None
        b = t["oft_blocks"]
        if b.shape[2] != b.shape[3] or b.shape[2] % 2:
            raise LoraError(f"module '{ctx.module_key}': BOFT oft_blocks should be (factors, n_blocks, b, b) with "
                            f"even b, got {tuple(b.shape)}")
        alpha = read_float(t["alpha"], "alpha", ctx) if "alpha" in t else 0.0
        return cls(ctx, b, alpha, t.get("rescale"))

    def delta(self, weight, multiplier, dyn=None, bias=None):
        self._ignore_dyn(dyn)
        m_f, n, b, _ = self.blocks.shape
        W = weight.detach().float()
        out = W.shape[0]
        if out != n * b:
            raise LoraError(f"module '{self.ctx.module_key}': BOFT has {n} blocks of {b} = {n * b} rows but the "
                            f"layer has {out} output channels")
        R = cayley(f32(self.blocks, W.device), self.alpha * out, kohya=False)
        eye = torch.eye(b, device=W.device)
        x = W
        for i in range(m_f):
            Ri = multiplier * R[i] + (1 - multiplier) * eye  # per factor, as LyCORIS
            k = (2 ** i) * (b // 2)
            if out % (2 * k):
                raise LoraError(f"module '{self.ctx.module_key}': BOFT factor {i} needs rows divisible by {2 * k}")
            # rows (c g k) -> (c k g), blocks of b, rotate by R_i, then back
            x = x.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
            x = torch.einsum("d i j, d j ... -> d i ...", Ri, x)
            x = x.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
        if self.rescale is not None:
            x = f32(self.rescale, W.device).reshape(out, *[1] * (W.dim() - 1)) * x
        return x - W, None

    def describe(self) -> str:
        m_f, n, b, _ = self.blocks.shape
        return f"boft ({m_f} factors, {n} blocks of {b}" + (", rescale)" if self.rescale is not None else ")")
