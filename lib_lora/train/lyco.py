"""LyCORIS networks trained the way ``network_module = "lycoris.kohya"`` trains them in sd-scripts.

``algo=lora``/``locon`` is a kohya LoRA on LyCORIS' wider layer set; ``algo=loha`` (Hadamard product of two
low-rank pairs), ``algo=lokr`` (Kronecker product), ``algo=ia3`` (a learned scale per channel), ``algo=full``
(a whole trained difference per layer, bias included), ``algo=diag-oft`` / ``boft`` (orthogonal rotations of the
output rows), ``algo=glora`` (W·A + B, A and B low-rank) and ``train_norm`` (norm layers) have their own modules
here. Shapes, initialisation, scale and saved keys follow LyCORIS' modules of the same names (Tucker cores for kxk
convs on request; DoRA weight decomposition with ``dora_wd``; ``use_scalar``'s trained scalar), so LyCORIS,
A1111's built-in Lora, ComfyUI and our own ``<lora:>`` load the files (lora-formats.md; the job's notes say where
one of those tools cannot). The layer sets are LyCORIS' presets as they land on sd-scripts' UNets
(tests/data/lycoris_targets_reference.json).
"""

from __future__ import annotations

import dataclasses

import difflib
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..networks.oft import inverse
from .lyco_preset import CustomPreset, read_preset

ALGOS = ("lora", "locon", "loha", "lokr", "ia3", "full", "diag-oft", "boft", "glora")
PRESETS = ("full", "full-lin", "attn-mlp", "attn-only", "unet-only", "unet-transformer-only", "unet-convblock-only",
           "ia3")
# modules whose whole delta is their parameter(s): no rank, alpha, factors or Tucker cores
NO_RANK = ("ia3", "full")
# ... and those that ignore DoRA, Tucker cores and rs_lora too (OFT: its "rank" is the block size)
OFT = ("diag-oft", "boft")
NO_SCALE = NO_RANK + OFT
# LyCORIS' modules without rank dropout (GLoRA's is in bypass mode only, which sd-scripts does not use)
NO_RANK_DROPOUT = ("ia3", "boft", "glora")
NO_MAX_NORM = ("ia3", "full", "glora")  # ... and those whose apply_max_norm does nothing
# network_args LyCORIS reads that we honour (conv_dim/alpha and the dropouts are shared with networks.lora)
KEYS = {"algo", "preset", "factor", "decompose_both", "full_matrix", "unbalanced_factorization", "dropout",
        "use_tucker", "use_cp", "use_conv_cp", "disable_conv_cp", "use_scalar", "dora_wd", "rs_lora", "train_norm",
        "bypass_mode", "rank_dropout_scale", "wd_on_output", "train_on_input", "constraint", "rescaled"}
TUCKER_KEYS = ("use_tucker", "use_cp", "use_conv_cp")


BOOL_KEYS = ("decompose_both", "full_matrix", "unbalanced_factorization", "use_tucker", "use_cp", "use_conv_cp",
             "disable_conv_cp", "use_scalar", "dora_wd", "wd_on_output", "rs_lora", "train_norm", "bypass_mode",
             "rank_dropout_scale", "rescaled")


_TRUE = ("1", "true", "yes", "on")


def _bool(v) -> bool:
    return str(v).strip().lower() in _TRUE


def _flag_problems(nargs: dict) -> list[str]:
    """LyCORIS reads every value but "false" as True (utils.str_bool): "0", "no" or a typo switch a feature on
    there. Such values are refused rather than read one way here and the other way in sd-scripts."""
    out = []
    for key in BOOL_KEYS:
        v = str(nargs.get(key, "true")).strip().lower()
        if v not in _TRUE + ("false",):
            out.append(f"network_args {key}={nargs[key]}: write True or False (LyCORIS reads every value except "
                       f"'false' as True, so sd-scripts would switch {key} on)")
    return out


@dataclass
class LycoSettings:
    algo: str = "lora"
    preset: str = "full"
    factor: int = -1
    decompose_both: bool = False
    full_matrix: bool = False
    unbalanced: bool = False
    tucker: bool = False  # kxk convs as a Tucker core with 1x1 factors (use_tucker / use_cp)
    dora: bool = False  # dora_wd: weight decomposition with a trained magnitude per channel
    wd_on_output: bool = True  # DoRA's magnitude per output row (LyCORIS' default since 2025-04) or per input column
    rs_lora: bool = False  # rank-stabilised scale alpha/sqrt(dim)
    train_norm: bool = False  # the UNet's GroupNorm/LayerNorm layers in the preset's blocks get norm modules
    constraint: float = 0.0  # OFT: the Cayley generator's norm capped at constraint·out_dim (0: no cap)
    rescaled: bool = False  # OFT: a trained scale per output row
    rank_dropout_scale: bool = False  # rank dropout's kept rows scaled by 1/(share kept), as LyCORIS does
    use_scalar: bool = False  # a trained scalar (0 at the start) times the delta; the zero factor starts random
    custom: CustomPreset | None = None  # a preset file's layer rules (preset then holds its path as given)

    @property
    def algos(self) -> set:
        """Every algorithm the network trains: its own and those a preset file's maps give some layers."""
        return {self.algo} | (self.custom.algos() if self.custom is not None else set())

    @property
    def weight_path(self) -> bool:
        """LoHa/LoKr/IA3/full/OFT modules (their own tensors) instead of kohya's lora_up/lora_down."""
        return self.algo in ("loha", "lokr", "glora") + NO_SCALE

    @property
    def weight_forward(self) -> bool:
        """The layer runs with a rebuilt weight delta (LoHa/LoKr, and every type with DoRA, as in LyCORIS)
        instead of LoRA's activation path."""
        return self.weight_path or self.dora

    @property
    def kind(self) -> str:
        """What the job's start line and notes call it: "LoHa", "LoRA + DoRA (per output)"."""
        name = {"loha": "LoHa", "lokr": "LoKr", "ia3": "IA3", "full": "Full fine-tune",
                "diag-oft": "Diag-OFT", "boft": "BOFT", "glora": "GLoRA"}.get(self.algo, "LoRA")
        if self.dora:
            name += " + DoRA (per " + ("output" if self.wd_on_output else "input") + ")"
        return name


def lyco_settings(module: str | None, nargs: dict, notes: list[str], resolve=None) -> LycoSettings | None:
    """The LyCORIS settings of a config (None for networks.lora); ValueError says what to change. ``resolve``
    makes a preset file's path absolute (None: preset files are refused)."""
    if (module or "networks.lora") in ("networks.lora", "networks.lora_fa", "networks.dylora", "networks.oft"):
        return None
    if module in ("networks.loha", "networks.lokr"):  # (the kohya_ss GUI's Kohya LoHa / Kohya LoKr types)
        algo = module.split(".")[1]
        name = "LoHa" if algo == "loha" else "LoKr"
        raise ValueError(f"network_module = {module!r} (sd-scripts' own {name}, SDXL only and not in its main "
                         "branch yet) is not trained here; use network_module = lycoris.kohya with "
                         f"network_args algo={algo}: LyCORIS' module of that type, whose file every LoRA loader reads")
    if module != "lycoris.kohya":
        raise ValueError(f"network_module = {module!r} cannot be trained here; use networks.lora (LoRA, LoCon through "
                         "conv_dim), networks.lora_fa (LoRA-FA), networks.dylora (DyLoRA), networks.oft (OFT) or "
                         "lycoris.kohya with network_args algo=" + "/".join(ALGOS))
    algo = nargs.get("algo", "lora").strip().lower()
    if algo == "dylora":
        raise ValueError(f"network_args algo=dylora: LyCORIS' DyLoRA is not trained here (its module trains at the "
                         "scale alpha/(blocks used) while its file applies alpha/dim, a block_size times weaker); use "
                         f"network_module = networks.dylora with network_args unit={nargs.get('block_size', 4)}, "
                         "sd-scripts' DyLoRA (the same idea, a plain LoRA file); LoRA Studio trains algo="
                         + ", ".join(ALGOS))
    if algo not in ALGOS:
        raise ValueError(f"network_args algo={algo}: LoRA Studio trains algo={', '.join(ALGOS)} (other LyCORIS types "
                         "can be applied with <lora:> but not trained here)")
    preset = nargs.get("preset", "full").strip().strip("\"'")
    custom = None
    if preset not in PRESETS:
        path = resolve(preset) if resolve is not None else None
        if path is None or not path.is_file() and "." not in preset and "/" not in preset and os.sep not in preset:
            close = difflib.get_close_matches(preset.lower().replace("_", "-"), PRESETS, 1)
            raise ValueError(f"network_args preset={preset}: "
                             + (f"did you mean {close[0]}? " if close else "")
                             + f"use one of {', '.join(PRESETS)} or the path of a LyCORIS preset file (.toml)")
        custom = read_preset(path, preset)
        notes += custom.notes
    problems = _flag_problems(nargs)
    if problems:
        raise ValueError("; ".join(problems))
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
                     tucker, _bool(nargs.get("dora_wd", False)), _bool(nargs.get("wd_on_output", True)),
                     _bool(nargs.get("rs_lora", False)), _bool(nargs.get("train_norm", False)))
    s.custom = custom
    if custom is not None:
        same = {"lora", "locon"} if algo in ("lora", "locon") else {algo}
        other = sorted(custom.algos() - same)
        unknown = [a for a in other if a not in ALGOS]
        if unknown:
            raise ValueError(f"preset file {os.path.basename(preset)} maps layers to algo={', '.join(unknown)}: "
                             f"use one of {', '.join(ALGOS)} in its maps" + (
                                 " (LyCORIS' DyLoRA is not trained here: use network_module = networks.dylora for "
                                 "a whole DyLoRA network)" if "dylora" in unknown else ""))
        if other:
            notes.append(f"preset file {os.path.basename(preset)}: the layers its maps give "
                         f"algo={', '.join(other)} train as that algorithm, the others as algo={algo}; the network's "
                         "switches apply to each as its LyCORIS module takes them (as LyCORIS builds such a "
                         "network)")
        lokr_keys = sorted({k for o in custom.entries() for k in o
                            if k in ("factor", "decompose_both", "full_matrix", "unbalanced_factorization")})
        if lokr_keys and algo != "lokr" and "lokr" not in other:
            notes.append(f"preset file {os.path.basename(preset)}: {', '.join(lokr_keys)} in its maps shape LoKr "
                         f"modules only; with algo={algo} they change nothing (as in LyCORIS)")
    s.rank_dropout_scale = _bool(nargs.get("rank_dropout_scale", False))
    s.use_scalar = _bool(nargs.get("use_scalar", False))
    if s.use_scalar and algo in NO_SCALE:
        notes.append(f"network_args use_scalar changes nothing with algo={algo} (as in LyCORIS)")
        s.use_scalar = False
    if s.rank_dropout_scale and not s.weight_forward:
        notes.append(f"network_args rank_dropout_scale with algo={algo}: the kohya-style rank dropout used here "
                     "already scales the kept channels by 1/(1 - rank_dropout)")
    elif s.rank_dropout_scale and s.algo in NO_RANK_DROPOUT + ("diag-oft",):
        notes.append(f"network_args rank_dropout_scale changes nothing with algo={algo} (as in LyCORIS: its rank "
                     "dropout is none, or an element dropout that scales itself)")
    if "train_on_input" in nargs:  # (the kohya_ss GUI writes it for its iA3 type)
        notes.append("network_args train_on_input changes nothing: LyCORIS' sd-scripts wrapper does not pass it on; "
                     "IA3 scales the input channels of the ia3 preset's feed-forward output layers and the output "
                     "channels everywhere else (as under sd-scripts)")
    try:
        s.constraint = float(nargs.get("constraint", 0) or 0)
    except ValueError:
        raise ValueError(f"network_args constraint={nargs['constraint']}: not a number (diag-OFT's norm cap per "
                         "output channel; 0 = none)") from None
    if s.constraint < 0:
        raise ValueError(f"network_args constraint={s.constraint:g}: use 0 (no cap) or a positive number")
    s.rescaled = _bool(nargs.get("rescaled", False))
    if s.algo not in OFT and any(k in nargs for k in ("constraint", "rescaled")):
        notes.append(f"network_args constraint / rescaled shape diag-OFT and BOFT modules only; with algo={algo} "
                     "they change nothing (as in LyCORIS)")
    if s.algo in NO_SCALE + ("glora",):
        # (LyCORIS' IA3Module / FullModule / DiagOFTModule take these switches and do nothing with them; its
        # GLoRAModule keeps rs_lora but never builds the Tucker core it asks for, and has no DoRA)
        keys = ("dora_wd", "wd_on_output", *TUCKER_KEYS, "disable_conv_cp") + (("rs_lora",) if algo != "glora"
                                                                                else ())
        given = [k for k in keys if k in nargs]
        if given:
            why = ("its modules have no alpha scale, Tucker factors or DoRA magnitude" if algo != "glora" else
                   "its modules have no DoRA magnitude and no Tucker core")
            notes.append(f"network_args {', '.join(given)} change nothing with algo={algo}: {why} (as in LyCORIS)")
        _drop_unsupported(s)
    elif "wd_on_output" in nargs and not s.dora:
        notes.append("network_args wd_on_output sets the axis of DoRA's magnitude and changes nothing without "
                     "dora_wd=True (as in LyCORIS)")
    if s.algo != "lokr" and any(k in nargs for k in ("factor", "decompose_both", "full_matrix",
                                                       "unbalanced_factorization")):
        notes.append(f"network_args factor / decompose_both / full_matrix / unbalanced_factorization shape LoKr "
                     f"modules only; with algo={algo} they change nothing (as in LyCORIS)")
    return s


def settings_for(s: LycoSettings, algo: str | None) -> LycoSettings:
    """The settings of a layer a preset file maps to another algorithm: the network's, less what that
    algorithm's LyCORIS module does not take (lyco_settings drops the same for the network's own algorithm)."""
    if algo is None or algo == s.algo or {algo, s.algo} <= {"lora", "locon"}:
        return s
    t = dataclasses.replace(s, algo=algo)
    _drop_unsupported(t)
    return t


def _drop_unsupported(s: LycoSettings) -> None:
    """Switches off, in place, what ``s.algo``'s LyCORIS module takes and does nothing with: IA3 / full / OFT
    have no scale, Tucker core, DoRA magnitude or scalar; GLoRA has no Tucker core or DoRA but keeps rs_lora."""
    if s.algo in NO_SCALE + ("glora",):
        s.tucker = s.dora = False
        s.rs_lora = s.rs_lora and s.algo == "glora"
    if s.algo in NO_SCALE:
        s.use_scalar = False


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


def _channel_norm(w: torch.Tensor, on_output: bool) -> torch.Tensor:
    """Norm of each output row (O, 1[, 1, 1]) or of each input column (1, I[, 1, 1]), as LyCORIS lays out
    dora_scale."""
    ones = [1] * (w.dim() - 1)
    if on_output:
        return w.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *ones)
    return w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).reshape(w.shape[1], *ones).transpose(0, 1)


def _keep_rows(n: int, rank_dropout: float, scale: bool, like: torch.Tensor) -> torch.Tensor:
    """LyCORIS' rank-dropout mask over n output rows; with ``scale`` (rank_dropout_scale) divided by its mean,
    the share kept (LyCORIS divides by zero when every row drops; here that step adds nothing)."""
    keep = (torch.rand(n, device=like.device) > rank_dropout).to(like.dtype)
    return keep / keep.mean().clamp_min(torch.finfo(keep.dtype).tiny) if scale else keep


def _drop_rows(w: torch.Tensor, rank_dropout: float, scale: bool = False) -> torch.Tensor:
    """LyCORIS' rank dropout in the weight path: whole output rows of the delta."""
    if not rank_dropout:
        return w
    return w * _keep_rows(w.shape[0], rank_dropout, scale, w).view(-1, *[1] * (w.dim() - 1))


class PairBase(nn.Module):
    """What every trained module (kohya LoRA, LoHa, LoKr) shares: the alpha buffer and scale, DoRA's magnitude,
    its file tensors (``tensors``: suffix -> tensor, alpha added by the caller) and loading them back by parameter
    name (the file's suffixes are the parameter names)."""

    shape: tuple  # the host weight's shape (out, in[, kh, kw])
    rank_dropout_scale = False  # set on the pairs of a LyCORIS network with rank_dropout_scale

    def __init__(self):
        super().__init__()
        self.register_parameter("dora_scale", None)  # DoRA (dora_wd): the trained magnitude, set by init_dora

    def enable_scalar(self):
        """LyCORIS' use_scalar: a trained scalar times the delta, 0 at the start (reset_parameters then starts the
        zero factor at random instead); the file holds it folded into the first factor, so loading one sets it
        to 1."""
        self._buffers.pop("scalar", None)
        self.scalar = nn.Parameter(torch.zeros(()))
        self.use_scalar = True

    use_scalar = False
    fixed_scalar = False  # an untrained scalar buffer times the delta, which LyCORIS' max-norm scales

    def enable_fixed_scalar(self):
        """The buffer LyCORIS' LoCon keeps at 1 and scales in apply_max_norm (scale_weight_norms)."""
        if getattr(self, "scalar", None) is None:
            self.register_buffer("scalar", torch.ones(()), persistent=False)
        self.fixed_scalar = True

    @property
    def scalar_on(self) -> bool:
        """The delta is multiplied by ``scalar`` (trained with use_scalar, or a max-norm buffer)."""
        return self.use_scalar or self.fixed_scalar

    def _reset_scalar(self):
        """use_scalar's trained scalar starts at 0; LoHa's and GLoRA's fixed scalar buffer (max-norm, none) at 1."""
        scalar = getattr(self, "scalar", None)
        if scalar is not None:
            with torch.no_grad():
                scalar.fill_(0.0 if self.use_scalar else 1.0)

    def _set_alpha(self, alpha, dim):
        alpha = dim if alpha is None or alpha == 0 else float(alpha)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.dim = dim
        self.scale = float(alpha) / dim

    def use_rs_scale(self):
        """LyCORIS' rs_lora: scale alpha/sqrt(dim), saved as alpha·dim/sqrt(dim) so that every loader's
        alpha/dim gives the trained scale."""
        alpha, r = float(self.alpha), math.sqrt(self.dim)
        self.alpha.fill_(alpha * (self.dim / r))
        self.scale = alpha / r

    def rebuild(self) -> torch.Tensor:
        """The unscaled delta in the host weight's shape."""
        raise NotImplementedError

    def delta_weight(self, rank_dropout: float = 0.0) -> torch.Tensor:
        return _drop_rows(self.rebuild().reshape(self.shape) * self.scale, rank_dropout, self.rank_dropout_scale)

    def init_dora(self, weight: torch.Tensor, on_output: bool):
        """LyCORIS' start: the magnitude is the host weight's own norm (fp32), so the module starts as a no-op."""
        self.wd_on_output = on_output
        self.dora_scale = nn.Parameter(_channel_norm(weight.detach().float(), on_output))

    def weight_and_bias_delta(self, weight: torch.Tensor, multiplier: float, rank_dropout: float = 0.0):
        """(weight delta, bias delta or None): only full modules train the bias."""
        return self.weight_delta(weight, multiplier, rank_dropout), None

    def weight_delta(self, weight: torch.Tensor, multiplier: float, rank_dropout: float = 0.0) -> torch.Tensor:
        """What this module adds to the host ``weight`` at ``multiplier``: ΔW·m, or with DoRA W' − W where
        V = W + ΔW, W' = V·(m·(d/(‖V‖+ε) − 1) + 1) (LyCORIS' weight_decompose, in fp32; the norm is not
        detached, as in LyCORIS)."""
        if self.dora_scale is None:
            return self.delta_weight(rank_dropout).reshape(weight.shape) * multiplier
        w = weight.detach().float()
        v = w + _drop_rows(self.rebuild().reshape(weight.shape).float() * self.scale, rank_dropout,
                           self.rank_dropout_scale)
        factor = self.dora_scale / (_channel_norm(v, self.wd_on_output) + torch.finfo(torch.float32).eps)
        if multiplier != 1:
            factor = multiplier * (factor - 1) + 1
        return v * factor - w

    def tensors(self, save_4d: bool = False) -> dict:
        raise NotImplementedError

    scalar_factor: tuple = ()  # use_scalar: the parameter(s) the file holds the scalar folded into

    def file_tensors(self, save_4d: bool = False, raw: bool = False) -> dict:
        """Everything the module saves under its name: its factors, DoRA's magnitude, alpha. ``raw`` (the
        resume state): a trained scalar and its factor as they are, not folded together."""
        out = dict(self.tensors(save_4d))
        if raw and self.scalar_on:  # (a max-norm buffer too: a resumed run continues with the same factors)
            for k in self.scalar_factor:
                out[k] = self.get_parameter(k)
            out["scalar"] = self.scalar
        if self.dora_scale is not None:
            d = self.dora_scale
            out["dora_scale"] = d[:, :, None, None] if save_4d and d.dim() == 2 else d
        out["alpha"] = self.alpha
        return out

    def file_shapes(self) -> dict:
        """The tensors a file may hold for this module (its parameter names) and their shapes."""
        return {k: tuple(p.shape) for k, p in self.named_parameters()}

    def load_tensors(self, sd: dict, name: str, missing: list):
        with torch.no_grad():
            for key, p in self.named_parameters():
                full = f"{name}.{key}"
                if key == "scalar" and full not in sd:  # (use_scalar: folded into the saved factors)
                    p.fill_(1.0)
                    continue
                if full not in sd:
                    missing.append(full)
                    continue
                p.copy_(sd[full].reshape(p.shape).to(p.dtype))
            if self.fixed_scalar and not self.use_scalar:  # (a resume state holds it; a file has it folded in)
                v = sd.get(f"{name}.scalar")
                self.scalar.copy_(v.reshape(()).float() if v is not None else torch.ones(()))
            if f"{name}.alpha" in sd:
                self.alpha.copy_(sd[f"{name}.alpha"].float())
                self.scale = float(self.alpha) / self.dim


class LycorisMaxNorm:
    """LyCORIS' apply_max_norm for its LoCon, LoHa and LoKr modules (scale_weight_norms): the delta's norm (scale,
    Tucker core and scalar included; DoRA's magnitude not) capped at max_norm by ``_rescale``, which scales the
    scalar (LoCon, LoHa; folded into the first factor when saved) unless a module says otherwise (LoKr)."""

    @torch.no_grad()
    def apply_max_norm(self, max_norm: float):
        """Device tensors only: (scaled, norm after)."""
        norm = (self.rebuild() * self.scale).norm()
        clamped = torch.clamp(norm, max_norm / 2)
        ratio = torch.clamp(clamped, max=max_norm) / clamped
        self._rescale(ratio)
        return ratio != 1, norm * ratio

    def _rescale(self, ratio: torch.Tensor):
        self.scalar.mul_(ratio.to(self.scalar.dtype))


class _WeightPair(LycorisMaxNorm, PairBase):
    """A module whose contribution is a rebuilt weight delta, added with the host layer's own op (F.linear /
    F.conv2d with its stride and padding)."""


def _rebuild_tucker(t, wa, wb):
    """LyCORIS' rebuild_tucker: core t (r, r, kh, kw) with factors wa (r, out), wb (r, in) -> (out, in, kh, kw)."""
    return torch.einsum("i j ..., i p, j r -> p r ...", t, wa, wb)


def _tucker_conv(shape: tuple, s: LycoSettings) -> bool:
    return s.tucker and len(shape) > 2 and any(k != 1 for k in shape[2:])


class LohaPair(_WeightPair):
    """ΔW = (w1_a·w1_b) ⊙ (w2_a·w2_b) · alpha/dim; conv weights as (out, in·kh·kw), or with Tucker cores
    (hada_t1/t2; then w*_a is (r, out) and w*_b (r, in))."""

    kind = "loha"
    scalar_factor = ("hada_w1_a",)

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
        # LyCORIS' max-norm scale (scale_weight_norms), folded into hada_w1_a when saved; not a trained value
        self.register_buffer("scalar", torch.ones(()), persistent=False)
        self.fixed_scalar = True  # (LyCORIS' LohaModule scales it in apply_max_norm)
        self.reset_parameters()

    def reset_parameters(self):
        self._reset_scalar()
        # LyCORIS' init (order included): w2_a = 0 (or the scalar) makes the start an exact no-op
        if self.tucker:
            nn.init.normal_(self.hada_t1, std=0.1)
            nn.init.normal_(self.hada_t2, std=0.1)
        nn.init.normal_(self.hada_w1_b, std=1)
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w2_b, std=1)
        if self.use_scalar:
            nn.init.normal_(self.hada_w2_a, std=0.1)
        else:
            nn.init.constant_(self.hada_w2_a, 0)

    def rebuild(self):
        if self.tucker:
            w = (_rebuild_tucker(self.hada_t1, self.hada_w1_a, self.hada_w1_b)
                 * _rebuild_tucker(self.hada_t2, self.hada_w2_a, self.hada_w2_b))
        else:
            w = (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)
        return w * self.scalar.to(w.dtype)

    def tensors(self, save_4d: bool = False) -> dict:
        keys = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b") + (("hada_t1", "hada_t2") if self.tucker else ())
        out = {k: getattr(self, k) for k in keys}
        out["hada_w1_a"] = out["hada_w1_a"] * self.scalar.to(out["hada_w1_a"].dtype)
        return out


class LokrPair(_WeightPair):
    """ΔW = w1 ⊗ w2 · alpha/dim with w1 (a, c) or w1_a·w1_b, w2 (b, d[, kh, kw]) or w2_a·w2_b (LokrModule)."""

    kind = "lokr"

    def __init__(self, shape: tuple, dim: int, alpha, s: LycoSettings, layout: dict | None = None):
        """``layout`` (dim_from_weights): a file's own factor shapes and which factors are whole, decomposed or
        Tucker (out_l, in_m, use_w1, use_w2, tucker), instead of those the settings give."""
        super().__init__()
        self.shape = tuple(shape)
        out_dim, in_dim, k = shape[0], shape[1], tuple(shape[2:])
        if layout is not None:
            out_l, in_m = layout["out_l"], layout["in_m"]
            if out_dim % out_l or in_dim % in_m:
                raise ValueError(f"the file's LoKr factor ({out_l}, {in_m}) does not divide this layer's "
                                 f"{out_dim}x{in_dim} weight: the file is for another model")
            out_k, in_n = out_dim // out_l, in_dim // in_m
        else:
            in_m, in_n = factorization(in_dim, s.factor)
            out_l, out_k = factorization(out_dim, s.factor)
            if s.unbalanced:
                out_l, out_k = out_k, out_l
        self.use_w1 = not (s.decompose_both and dim < max(out_l, in_m) / 2 and not s.full_matrix)
        if layout is not None:
            self.use_w1 = layout["use_w1"]
        if self.use_w1:
            self.lokr_w1 = nn.Parameter(torch.empty(out_l, in_m))
        else:
            self.lokr_w1_a = nn.Parameter(torch.empty(out_l, dim))
            self.lokr_w1_b = nn.Parameter(torch.empty(dim, in_m))
        self.use_w2 = dim >= max(out_k, in_n) / 2 or s.full_matrix
        self.tucker = not self.use_w2 and _tucker_conv(self.shape, s)
        if layout is not None:
            self.use_w2, self.tucker = layout["use_w2"], layout["tucker"]
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
        self._reset_scalar()
        zero = (lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5))) if self.use_scalar else nn.init.zeros_
        if self.use_w2:
            zero(self.lokr_w2)
        else:
            if self.tucker:
                nn.init.kaiming_uniform_(self.lokr_t2, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
            zero(self.lokr_w2_b)
        if self.use_w1:
            nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
        else:
            nn.init.kaiming_uniform_(self.lokr_w1_a, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lokr_w1_b, a=math.sqrt(5))

    @property
    def scalar_factor(self) -> tuple:
        return ("lokr_w1",) if self.use_w1 else ("lokr_w1_a",)

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
        w = torch.kron(w1, w2.contiguous())
        return w * self.scalar.to(w.dtype) if self.use_scalar else w

    def _rescale(self, ratio):
        # (LyCORIS' LokrModule: every factor times ratio^(1/factors))
        factors = [getattr(self, k) for k in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_t2",
                                              "lokr_w2_a", "lokr_w2_b") if hasattr(self, k)]
        f = ratio ** (1 / len(factors))
        for p in factors:
            p.mul_(f.to(p.dtype))

    def tensors(self, save_4d: bool = False) -> dict:
        out = {k: getattr(self, k) for k in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a",
                                             "lokr_w2_b", "lokr_t2") if hasattr(self, k)}
        if self.use_scalar:  # (LyCORIS folds it into w1)
            first = self.scalar_factor[0]
            out[first] = out[first] * self.scalar.to(out[first].dtype)
        if save_4d and "lokr_w2" in out and out["lokr_w2"].dim() == 2:
            out["lokr_w2"] = out["lokr_w2"][:, :, None, None]  # the host trains this layer as a 1x1 conv
        return out


class _NoRankPair(PairBase):
    """IA3 / full modules: the parameters are the delta itself (no rank, alpha or DoRA); saved without alpha.
    LyCORIS' apply_max_norm does nothing for them, so there is none here either."""

    dim, scale = 1, 1.0

    def file_tensors(self, save_4d: bool = False, raw: bool = False) -> dict:
        return self.tensors(save_4d)

    def use_rs_scale(self):
        pass


def _host_float(weight: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The frozen host weight in the parameters' dtype (fp16/fp8 hosts: fp8 does not promote)."""
    w = weight.detach()
    return w if w.dtype == like.dtype else w.to(like.dtype)


class Ia3Pair(_NoRankPair):
    """LyCORIS' IA3Module: W' = W·(1 + m·w), w one value per output channel, or per input channel with
    ``on_input`` (LyCORIS' ia3 preset on the feed-forward output layers); w starts at 0. Saved as ``weight``
    ((n,) for a Linear, (1, n, 1, 1) for a conv) and ``on_input``."""

    kind = "ia3"

    def __init__(self, shape: tuple, on_input: bool = False):
        super().__init__()
        self.shape = tuple(shape)
        self.on_input = bool(on_input)
        n = self.shape[1 if self.on_input else 0]
        conv = [1, n] + [1] * (len(self.shape) - 2)
        self.weight = nn.Parameter(torch.zeros(n) if len(self.shape) == 2 else torch.zeros(conv))
        self._view = [1] * len(self.shape)
        self._view[1 if self.on_input else 0] = n

    def reset_parameters(self):
        nn.init.constant_(self.weight, 0)

    def weight_delta(self, weight: torch.Tensor, multiplier: float, rank_dropout: float = 0.0) -> torch.Tensor:
        """W·w·m (LyCORIS' IA3 forward has no rank dropout)."""
        return _host_float(weight, self.weight) * (self.weight.reshape(self._view) * multiplier)

    def tensors(self, save_4d: bool = False) -> dict:
        w = self.weight
        if save_4d and w.dim() == 1:
            w = w[None, :, None, None]  # the host trains this layer as a 1x1 conv
        return {"weight": w, "on_input": torch.tensor(int(self.on_input))}


class FullPair(_NoRankPair):
    """LyCORIS' FullModule (native fine-tuning): W' = W + m·diff, b' = b + m·diff_b, both starting at 0. Rank
    dropout drops whole output rows of both, unscaled, as LyCORIS does."""

    kind = "full"

    def __init__(self, shape: tuple, bias: bool):
        super().__init__()
        self.shape = tuple(shape)
        self.diff = nn.Parameter(torch.zeros(self.shape))
        self.diff_b = nn.Parameter(torch.zeros(self.shape[0])) if bias else None

    def reset_parameters(self):
        nn.init.constant_(self.diff, 0)
        if self.diff_b is not None:
            nn.init.constant_(self.diff_b, 0)

    def weight_and_bias_delta(self, weight: torch.Tensor, multiplier: float, rank_dropout: float = 0.0):
        dw, db = self.diff.reshape(weight.shape), self.diff_b
        if rank_dropout:
            keep = _keep_rows(dw.shape[0], rank_dropout, self.rank_dropout_scale, dw)
            dw = dw * keep.view(-1, *[1] * (dw.dim() - 1))
            db = None if db is None else db * keep
        return dw * multiplier, None if db is None else db * multiplier

    def weight_delta(self, weight: torch.Tensor, multiplier: float, rank_dropout: float = 0.0) -> torch.Tensor:
        return self.weight_and_bias_delta(weight, multiplier, rank_dropout)[0]

    def tensors(self, save_4d: bool = False) -> dict:
        d = self.diff
        out = {"diff": d[:, :, None, None] if save_4d and d.dim() == 2 else d}
        if self.diff_b is not None:
            out["diff_b"] = self.diff_b
        return out


class DiagOftPair(PairBase):
    """LyCORIS' DiagOFTModule: the weight's output rows in blocks of b, each block turned by R = (I + Q)(I - Q)^-1
    (Cayley, Q = B - Bᵀ from the trained oft_blocks B, zero at the start: R = I), W' = blockdiag(R)ᵀ·W, times a
    trained scale per row with ``rescaled``; at multiplier m, R·m + I·(1 - m). ``constraint`` caps ‖Q‖ at
    constraint·out_dim (saved as alpha, as LyCORIS does). Rank dropout is LyCORIS' element dropout on m·R."""

    kind = "diag-oft"

    def __init__(self, shape: tuple, dim: int, s: LycoSettings):
        super().__init__()
        self.shape = tuple(shape)
        out_dim = self.shape[0]
        self.oft_blocks = nn.Parameter(torch.zeros(self._blocks_shape(out_dim, dim)))
        rescale = torch.ones(out_dim, *[1] * (len(self.shape) - 1))
        self.rescale = nn.Parameter(rescale) if s.rescaled else None
        self.max_q = s.constraint * out_dim
        self.register_buffer("alpha", torch.tensor(float(s.constraint)))
        self.register_buffer("eye", torch.eye(self.block_size), persistent=False)  # (made once, not per step)
        self.dim, self.scale = dim, 1.0

    def reset_parameters(self):
        nn.init.constant_(self.oft_blocks, 0)
        if self.rescale is not None:
            nn.init.constant_(self.rescale, 1)

    def _blocks_shape(self, out_dim: int, dim: int) -> tuple:
        self.block_size, self.block_num = factorization(out_dim, dim)
        return self.block_num, self.block_size, self.block_size

    def rotation(self) -> torch.Tensor:
        """R per block (fp32). The cap is a factor min(1, c/‖Q‖) rather than LyCORIS' `if`: the same numbers and
        gradients without reading the norm back to the host."""
        b = self.oft_blocks.float()
        q = b - b.transpose(-1, -2)
        if self.max_q > 0:
            q = q * torch.clamp(self.max_q / (torch.norm(q) + 1e-8), max=1.0)
        eye = self.eye
        return (eye + q) @ inverse(eye - q)

    def weight_delta(self, weight: torch.Tensor, multiplier: float, rank_dropout: float = 0.0) -> torch.Tensor:
        with torch.autocast(weight.device.type, enabled=False):  # R and W' in fp32 (autocast would use half)
            return self._delta(weight.detach().float(), multiplier, rank_dropout)

    def _delta(self, w: torch.Tensor, multiplier: float, rank_dropout: float) -> torch.Tensor:
        r = self.rotation() * multiplier
        if rank_dropout:
            r = F.dropout(r, rank_dropout)
        m = r + self.eye * (1 - multiplier)
        rest = w.shape[1:]
        out = torch.einsum("k n m, k n ... -> k m ...", m, w.reshape(self.block_num, self.block_size, *rest))
        out = out.reshape(w.shape)
        if self.rescale is not None:
            out = self.rescale.reshape(-1, *[1] * (w.dim() - 1)) * out
        return out - w

    @torch.no_grad()
    def apply_max_norm(self, max_norm: float):
        """LyCORIS' DiagOFTModule.apply_max_norm: oft_blocks' norm capped (device tensors, no host sync)."""
        norm = self.oft_blocks.norm()
        clamped = torch.clamp(norm, max_norm / 2)
        ratio = torch.clamp(clamped, max=max_norm) / clamped
        self.oft_blocks.mul_(ratio)
        return ratio != 1, norm * ratio

    def load_tensors(self, sd: dict, name: str, missing: list):
        """The file's blocks and scales; its alpha (the constraint) is not taken: this run's network_args set it."""
        super().load_tensors({k: v for k, v in sd.items() if k != f"{name}.alpha"}, name, missing)

    def tensors(self, save_4d: bool = False) -> dict:
        out = {"oft_blocks": self.oft_blocks}
        if self.rescale is not None:
            r = self.rescale
            out["rescale"] = r[:, :, None, None] if save_4d and r.dim() == 2 else r
        return out


class KohyaOftPair(DiagOftPair):
    """sd-scripts' OFTModule (networks.oft): the same rotation of blocks of output rows, but ``dim`` is the number
    of blocks (each out_dim/dim rows), the cap on ‖Q‖ (network_alpha·out_dim, saved as alpha) always applies, as
    (min(‖Q‖, cap) + 1e-8)/(‖Q‖ + 1e-8), and there is no rescale, rank dropout or max-norm."""

    kind = "oft"

    def __init__(self, shape: tuple, num_blocks: int, constraint: float):
        super().__init__(shape, num_blocks, LycoSettings("diag-oft", constraint=float(constraint)))

    def _blocks_shape(self, out_dim: int, dim: int) -> tuple:
        if out_dim % dim:
            raise ValueError(f"networks.oft splits the {out_dim} output channels into network_dim = {dim} blocks of "
                             "equal size, which does not divide evenly; use a divisor of the layer sizes such as 4, "
                             "8 or 16 (SD's 320/640/1280 channels)")
        self.block_size, self.block_num = out_dim // dim, dim
        return self.block_num, self.block_size, self.block_size

    def rotation(self) -> torch.Tensor:
        b = self.oft_blocks.float()
        q = b - b.transpose(-1, -2)
        norm = torch.norm(q)
        q = q * ((torch.clamp(norm, max=self.max_q) + 1e-8) / (norm + 1e-8))
        eye = self.eye
        return (eye + q) @ inverse(eye - q)


def power2factorization(dimension: int, factor: int = -1) -> tuple[int | None, int]:
    """LyCORIS' split of ``dimension`` for BOFT: (even block size b <= factor, as large as possible; a power of
    two n of blocks), n = 0 where there is none."""
    if factor == -1:
        factor = dimension
    m = n = 0
    while m <= factor:
        m += 2
        while dimension % m != 0 and m < dimension:
            m += 2
        if m > factor:
            break
        if bin(dimension // m).count("1") == 1:
            n = dimension // m
    return (None, 0) if n == 0 else (dimension // n, n)


class BoftPair(DiagOftPair):
    """LyCORIS' ButterflyOFTModule: log2(n)+1 butterfly stages of n blocks of b, each a Cayley rotation of its own
    trained blocks (zero start), stage i mixing rows 2^i·b/2 apart; W' = stages(W)·rescale. The multiplier turns
    each stage toward I (LyCORIS). No rank dropout (LyCORIS' BOFT has none)."""

    kind = "boft"

    def _blocks_shape(self, out_dim: int, dim: int) -> tuple:
        b, n = power2factorization(out_dim, dim)
        if not n:
            raise ValueError(f"BOFT cannot split {out_dim} output channels into a power of two of even blocks of at "
                             f"most {dim} (network_dim, or conv_dim for 3x3 convs); try a larger even dim such as 16 "
                             "or 32")
        self.block_size, self.block_num = b, n
        self.boft_m = bin(n - 1).count("1") + 1
        return self.boft_m, n, b, b

    def _delta(self, w: torch.Tensor, multiplier: float, rank_dropout: float) -> torch.Tensor:
        r, eye = self.rotation(), self.eye
        b, half = self.block_size, self.block_size // 2
        x = w
        for i in range(self.boft_m):
            bi = r[i] if multiplier == 1 else r[i] * multiplier + eye * (1 - multiplier)
            k = 2 ** i * half
            x = x.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
            x = torch.einsum("b i j, b j ... -> b i ...", bi, x)
            x = x.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
        if self.rescale is not None:
            x = x * self.rescale.reshape(-1, *[1] * (w.dim() - 1))
        return x - w


class NormPair(_NoRankPair):
    """LyCORIS' NormModule (train_norm): a GroupNorm/LayerNorm's affine weight and bias plus m·w_norm and
    m·b_norm, both starting at 0; the layer adds norm(x; w_norm·m, b_norm·m) to its output, as LyCORIS does."""

    kind = "norm"

    def __init__(self, n: int, bias: bool):
        super().__init__()
        self.shape = (n,)
        self.w_norm = nn.Parameter(torch.zeros(n))
        self.b_norm = nn.Parameter(torch.zeros(n)) if bias else None

    def reset_parameters(self):
        nn.init.constant_(self.w_norm, 0)
        if self.b_norm is not None:
            nn.init.constant_(self.b_norm, 0)

    def weight_and_bias_delta(self, weight, multiplier: float, rank_dropout: float = 0.0):
        return self.w_norm * multiplier, None if self.b_norm is None else self.b_norm * multiplier

    def weight_delta(self, weight, multiplier: float, rank_dropout: float = 0.0) -> torch.Tensor:
        return self.w_norm * multiplier

    def tensors(self, save_4d: bool = False) -> dict:
        return {"w_norm": self.w_norm} | ({} if self.b_norm is None else {"b_norm": self.b_norm})


class _Factor(nn.Module):
    """One GLoRA factor: a ``weight`` like the nn.Linear / 1x1 nn.Conv2d LyCORIS keeps it in (file key
    ``a1.weight``...)."""

    def __init__(self, *shape):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape))


class GloraPair(PairBase):
    """LyCORIS' GLoRAModule: ΔW = (W·a1·a2 + b1·b2) · alpha/dim, W the frozen host weight (for a conv the
    W·a1·a2 term contracts the input-channel axis, kernel kept). a2 and b2 start at 0 (random with use_scalar),
    a1 and b1 at random; saved as a1.weight (in, r), a2.weight (r, in), b1.weight (out, r), b2.weight (r, in[, kh,
    kw]) and alpha. Rank dropout, neuron dropout and a max-norm do not exist for it under sd-scripts (LyCORIS'
    GLoRA drops ranks in bypass mode only)."""

    kind = "glora"
    scalar_factor = ("a2.weight", "b2.weight")

    def __init__(self, shape: tuple, dim: int, alpha):
        super().__init__()
        self.shape = tuple(shape)
        out_dim, in_dim = self.shape[:2]
        k = tuple(self.shape[2:])
        one = (1,) * len(k)
        self.a2, self.a1 = _Factor(dim, in_dim, *one), _Factor(in_dim, dim, *one)
        self.b2, self.b1 = _Factor(dim, in_dim, *k), _Factor(out_dim, dim, *one)
        self._set_alpha(alpha, dim)
        self.register_buffer("scalar", torch.ones(()), persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        self._reset_scalar()
        # LyCORIS' draws in its order: its nn.Linear / nn.Conv2d layers start themselves (a2, a1, b2, b1), then
        # a1 and b1 again, then a2 and b2 with use_scalar
        for f in (self.a2, self.a1, self.b2, self.b1, self.a1, self.b1):
            nn.init.kaiming_uniform_(f.weight, a=math.sqrt(5))
        for f in (self.a2, self.b2):
            if self.use_scalar:
                nn.init.kaiming_uniform_(f.weight, a=math.sqrt(5))
            else:
                nn.init.zeros_(f.weight)

    def weight_delta(self, weight: torch.Tensor, multiplier: float, rank_dropout: float = 0.0) -> torch.Tensor:
        a1, a2 = self.a1.weight.flatten(1), self.a2.weight.flatten(1)
        w = _host_float(weight, a1)
        wb = (self.b1.weight.flatten(1) @ self.b2.weight.flatten(1)).reshape(w.shape)
        if w.dim() > 2:
            wa = torch.einsum("o i ..., i j, j k -> o k ...", w, a1, a2)
        else:
            wa = (w @ a1) @ a2
        return (wb + wa) * (self.scale * multiplier) * self.scalar.to(a1.dtype)

    def tensors(self, save_4d: bool = False) -> dict:
        out = {f"{k}.weight": getattr(self, k).weight for k in ("a1", "a2", "b1", "b2")}
        for k in self.scalar_factor:  # (LyCORIS folds use_scalar's scalar into both)
            out[k] = out[k] * self.scalar.to(out[k].dtype)
        if save_4d:
            out = {k: v[:, :, None, None] if v.dim() == 2 else v for k, v in out.items()}
        return out


def make_pair(s: LycoSettings, shape: tuple, dim: int, alpha, bias: bool = False,
              on_input: bool = False, from_file: dict | None = None) -> PairBase:
    """The module of ``s.algo`` for a host weight of ``shape`` (``bias``: the layer has one, for full;
    ``on_input``: IA3 scales the input channels; ``from_file``: what dim_from_weights read for this module
    beyond its rank: LoKr's ``layout``, OFT's ``constraint`` / ``rescaled``)."""
    from_file = dict(from_file or {})
    layout = from_file.pop("layout", None)
    if from_file:
        s = dataclasses.replace(s, **from_file)
    if s.algo == "ia3":
        return Ia3Pair(shape, on_input)
    if s.algo == "full":
        return FullPair(shape, bias)
    if s.algo == "diag-oft":
        return DiagOftPair(shape, dim, s)
    if s.algo == "boft":
        return BoftPair(shape, dim, s)
    if s.algo == "glora":
        return GloraPair(shape, dim, alpha)
    return LohaPair(shape, dim, alpha, s) if s.algo == "loha" else LokrPair(shape, dim, alpha, s, layout)
