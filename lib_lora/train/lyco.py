"""LyCORIS networks trained the way ``network_module = "lycoris.kohya"`` trains them in sd-scripts.

``algo=lora``/``locon`` is a kohya LoRA on LyCORIS' wider layer set; ``algo=loha`` (Hadamard product of two
low-rank pairs) and ``algo=lokr`` (Kronecker product) have their own modules here. Shapes, initialisation, scale
and saved keys follow LyCORIS' LohaModule / LokrModule (Tucker cores for kxk convs on request; no DoRA, no scalar),
so LyCORIS, A1111's built-in Lora, ComfyUI and our own ``<lora:>`` load the files (lora-formats.md). The layer sets are LyCORIS'
presets as they land on sd-scripts' UNets (tests/data/lycoris_targets_reference.json).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

ALGOS = ("lora", "locon", "loha", "lokr")
PRESETS = ("full", "full-lin", "attn-mlp", "attn-only", "unet-only", "unet-transformer-only", "unet-convblock-only")
# network_args LyCORIS reads that we honour (conv_dim/alpha and the dropouts are shared with networks.lora)
KEYS = {"algo", "preset", "factor", "decompose_both", "full_matrix", "unbalanced_factorization", "dropout",
        "use_tucker", "use_cp", "use_conv_cp", "disable_conv_cp", "use_scalar", "dora_wd", "rs_lora", "train_norm",
        "bypass_mode", "rank_dropout_scale"}
TUCKER_KEYS = ("use_tucker", "use_cp", "use_conv_cp")
# switches that change the module and that this trainer does not build yet: refused, never silently dropped
_NOT_YET = {
    "use_scalar": "the trained scalar",
    "dora_wd": "weight decomposition (DoRA)", "rs_lora": "rank-stabilised scaling", "train_norm": "trained norm layers",
    "rank_dropout_scale": "rescaled rank dropout",
}


def _bool(v) -> bool:
    return str(v).strip().lower() in ("1", "true", "yes", "on")


@dataclass
class LycoSettings:
    algo: str = "lora"
    preset: str = "full"
    factor: int = -1
    decompose_both: bool = False
    full_matrix: bool = False
    unbalanced: bool = False
    tucker: bool = False  # kxk convs as a Tucker core with 1x1 factors (use_tucker / use_cp)

    @property
    def weight_path(self) -> bool:
        """LoHa/LoKr add a rebuilt weight delta instead of LoRA's activation path."""
        return self.algo in ("loha", "lokr")


def lyco_settings(module: str | None, nargs: dict, notes: list[str]) -> LycoSettings | None:
    """The LyCORIS settings of a config (None for networks.lora); ValueError says what to change."""
    if (module or "networks.lora") == "networks.lora":
        return None
    if module != "lycoris.kohya":
        raise ValueError(f"network_module = {module!r} cannot be trained here; use networks.lora (LoRA, LoCon through "
                         "conv_dim) or lycoris.kohya with network_args algo=lora/locon/loha/lokr")
    algo = nargs.get("algo", "lora").strip().lower()
    if algo not in ALGOS:
        raise ValueError(f"network_args algo={algo}: LoRA Studio trains algo={', '.join(ALGOS)} (other LyCORIS types "
                         "such as ia3, dylora, glora, oft, boft, full can be applied with <lora:> but not trained yet)")
    preset = nargs.get("preset", "full").strip()
    if preset not in PRESETS:
        raise ValueError(f"network_args preset={preset}: use one of {', '.join(PRESETS)} (preset files are not read "
                         "here)")
    for key, what in _NOT_YET.items():
        if key in nargs and _bool(nargs[key]):
            raise ValueError(f"network_args {key}={nargs[key]}: {what} cannot be trained here yet; remove the entry "
                             f"(or set it to False) to train a plain {algo}")
    # LyCORIS: use_tucker = not disable_conv_cp (default True) or use_conv_cp or use_cp or use_tucker
    tucker = (("disable_conv_cp" in nargs and not _bool(nargs["disable_conv_cp"]))
              or any(_bool(nargs.get(k, False)) for k in TUCKER_KEYS))
    if "bypass_mode" in nargs and _bool(nargs["bypass_mode"]):
        notes.append("network_args bypass_mode: the network always runs beside the frozen weights here, so the "
                     "switch changes nothing")
    try:
        factor = int(nargs.get("factor", -1))
    except ValueError:
        raise ValueError(f"network_args factor={nargs['factor']}: not a whole number (LoKr's Kronecker factor; "
                         "-1 = as square as possible)") from None
    if factor == 0 or factor < -1:
        raise ValueError(f"network_args factor={factor}: use -1 (as square as possible) or a positive whole number")
    s = LycoSettings(algo, preset, factor, _bool(nargs.get("decompose_both", False)),
                     _bool(nargs.get("full_matrix", False)), _bool(nargs.get("unbalanced_factorization", False)),
                     tucker)
    if s.algo != "lokr" and any(k in nargs for k in ("factor", "decompose_both", "full_matrix",
                                                       "unbalanced_factorization")):
        notes.append(f"network_args factor / decompose_both / full_matrix / unbalanced_factorization shape LoKr "
                     f"modules only; with algo={algo} they change nothing (as in LyCORIS)")
    return s


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS' split of ``dimension`` into (m, n), m <= n, m as close to ``factor`` (or to the square root) as
    the divisors allow."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


class PairBase(nn.Module):
    """What every trained module (kohya LoRA, LoHa, LoKr) shares: the alpha buffer and scale, its file tensors
    (``tensors``: suffix -> tensor, alpha added by the caller) and loading them back by parameter name (the file's
    suffixes are the parameter names)."""

    def _set_alpha(self, alpha, dim):
        alpha = dim if alpha is None or alpha == 0 else float(alpha)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.dim = dim
        self.scale = float(alpha) / dim

    def tensors(self, save_4d: bool = False) -> dict:
        raise NotImplementedError

    def load_tensors(self, sd: dict, name: str, missing: list):
        with torch.no_grad():
            for key, p in self.named_parameters():
                full = f"{name}.{key}"
                if full not in sd:
                    missing.append(full)
                    continue
                p.copy_(sd[full].reshape(p.shape).to(p.dtype))
            if f"{name}.alpha" in sd:
                self.alpha.copy_(sd[f"{name}.alpha"].float())
                self.scale = float(self.alpha) / self.dim


class _WeightPair(PairBase):
    """A module whose contribution is a rebuilt weight delta (``delta_weight``), added with the host layer's own
    op (F.linear / F.conv2d with its stride and padding)."""

    shape: tuple  # the host weight's shape (out, in[, kh, kw])

    def rebuild(self) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self, rank_dropout: float = 0.0) -> torch.Tensor:
        w = self.rebuild().reshape(self.shape) * self.scale
        if rank_dropout:
            # LyCORIS' rank dropout on these types: whole output rows of the delta, no rescaling
            keep = (torch.rand(w.shape[0], device=w.device) > rank_dropout).to(w.dtype)
            w = w * keep.view(-1, *[1] * (w.dim() - 1))
        return w


def _rebuild_tucker(t, wa, wb):
    """LyCORIS' rebuild_tucker: core t (r, r, kh, kw) with factors wa (r, out), wb (r, in) -> (out, in, kh, kw)."""
    return torch.einsum("i j ..., i p, j r -> p r ...", t, wa, wb)


def _tucker_conv(shape: tuple, s: LycoSettings) -> bool:
    return s.tucker and len(shape) > 2 and any(k != 1 for k in shape[2:])


class LohaPair(_WeightPair):
    """ΔW = (w1_a·w1_b) ⊙ (w2_a·w2_b) · alpha/dim; conv weights as (out, in·kh·kw), or with Tucker cores
    (hada_t1/t2; then w*_a is (r, out) and w*_b (r, in))."""

    kind = "loha"

    def __init__(self, shape: tuple, dim: int, alpha, s: LycoSettings | None = None):
        super().__init__()
        self.shape = tuple(shape)
        self.tucker = s is not None and _tucker_conv(self.shape, s)
        if self.tucker:
            out_dim, in_dim, k = shape[0], shape[1], tuple(shape[2:])
            self.hada_t1 = nn.Parameter(torch.empty(dim, dim, *k))
            self.hada_w1_a = nn.Parameter(torch.empty(dim, out_dim))
            self.hada_w1_b = nn.Parameter(torch.empty(dim, in_dim))
            self.hada_t2 = nn.Parameter(torch.empty(dim, dim, *k))
            self.hada_w2_a = nn.Parameter(torch.empty(dim, out_dim))
            self.hada_w2_b = nn.Parameter(torch.empty(dim, in_dim))
        else:
            out_dim, in_dim = shape[0], math.prod(shape[1:])
            self.hada_w1_a = nn.Parameter(torch.empty(out_dim, dim))
            self.hada_w1_b = nn.Parameter(torch.empty(dim, in_dim))
            self.hada_w2_a = nn.Parameter(torch.empty(out_dim, dim))
            self.hada_w2_b = nn.Parameter(torch.empty(dim, in_dim))
        self._set_alpha(alpha, dim)
        self.reset_parameters()

    def reset_parameters(self):
        # LyCORIS' init (order included): w2_a = 0 makes the start an exact no-op
        if self.tucker:
            nn.init.normal_(self.hada_t1, std=0.1)
            nn.init.normal_(self.hada_t2, std=0.1)
        nn.init.normal_(self.hada_w1_b, std=1)
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w2_b, std=1)
        nn.init.constant_(self.hada_w2_a, 0)

    def rebuild(self):
        if self.tucker:
            return (_rebuild_tucker(self.hada_t1, self.hada_w1_a, self.hada_w1_b)
                    * _rebuild_tucker(self.hada_t2, self.hada_w2_a, self.hada_w2_b))
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)

    def tensors(self, save_4d: bool = False) -> dict:
        keys = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b") + (("hada_t1", "hada_t2") if self.tucker else ())
        return {k: getattr(self, k) for k in keys}


class LokrPair(_WeightPair):
    """ΔW = w1 ⊗ w2 · alpha/dim with w1 (a, c) or w1_a·w1_b, w2 (b, d[, kh, kw]) or w2_a·w2_b (LokrModule)."""

    kind = "lokr"

    def __init__(self, shape: tuple, dim: int, alpha, s: LycoSettings):
        super().__init__()
        self.shape = tuple(shape)
        out_dim, in_dim, k = shape[0], shape[1], tuple(shape[2:])
        in_m, in_n = factorization(in_dim, s.factor)
        out_l, out_k = factorization(out_dim, s.factor)
        if s.unbalanced:
            out_l, out_k = out_k, out_l
        self.use_w1 = not (s.decompose_both and dim < max(out_l, in_m) / 2 and not s.full_matrix)
        if self.use_w1:
            self.lokr_w1 = nn.Parameter(torch.empty(out_l, in_m))
        else:
            self.lokr_w1_a = nn.Parameter(torch.empty(out_l, dim))
            self.lokr_w1_b = nn.Parameter(torch.empty(dim, in_m))
        self.use_w2 = dim >= max(out_k, in_n) / 2 or s.full_matrix
        self.tucker = not self.use_w2 and _tucker_conv(self.shape, s)
        if self.use_w2:
            self.lokr_w2 = nn.Parameter(torch.empty(out_k, in_n, *k))
        elif self.tucker:
            self.lokr_t2 = nn.Parameter(torch.empty(dim, dim, *k))
            self.lokr_w2_a = nn.Parameter(torch.empty(dim, out_k))
            self.lokr_w2_b = nn.Parameter(torch.empty(dim, in_n))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(out_k, dim))
            self.lokr_w2_b = nn.Parameter(torch.empty(dim, in_n * math.prod(k)))
        self._w2_shape = (out_k, in_n, *k)
        # both factors whole matrices: LyCORIS fixes the scale at 1 (alpha = dim)
        self._set_alpha(dim if self.use_w1 and self.use_w2 else alpha, dim)
        self.reset_parameters()

    def reset_parameters(self):
        if self.use_w2:
            nn.init.constant_(self.lokr_w2, 0)
        else:
            if self.tucker:
                nn.init.kaiming_uniform_(self.lokr_t2, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
            nn.init.constant_(self.lokr_w2_b, 0)
        if self.use_w1:
            nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
        else:
            nn.init.kaiming_uniform_(self.lokr_w1_a, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lokr_w1_b, a=math.sqrt(5))

    def rebuild(self):
        w1 = self.lokr_w1 if self.use_w1 else self.lokr_w1_a @ self.lokr_w1_b
        if self.use_w2:
            w2 = self.lokr_w2
        elif self.tucker:
            w2 = _rebuild_tucker(self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        else:
            w2 = (self.lokr_w2_a @ self.lokr_w2_b).reshape(self._w2_shape)
        for _ in range(w2.dim() - w1.dim()):
            w1 = w1.unsqueeze(-1)
        return torch.kron(w1, w2.contiguous())

    def tensors(self, save_4d: bool = False) -> dict:
        out = {k: getattr(self, k) for k in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a",
                                             "lokr_w2_b", "lokr_t2") if hasattr(self, k)}
        if save_4d and "lokr_w2" in out and out["lokr_w2"].dim() == 2:
            out["lokr_w2"] = out["lokr_w2"][:, :, None, None]  # the host trains this layer as a 1x1 conv
        return out


def make_pair(s: LycoSettings, shape: tuple, dim: int, alpha) -> _WeightPair:
    return LohaPair(shape, dim, alpha, s) if s.algo == "loha" else LokrPair(shape, dim, alpha, s)
