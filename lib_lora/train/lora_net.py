"""The trainable LoRA network attached to the host's own modules.

Linear/Conv2d targets get kohya's activation-path LoRA (``org(x) + up(down(x)) * m * alpha/dim``) by replacing the
instance's ``forward`` (the class stays untouched, so the WebUI's attention hijack and other class patches keep
working). LyCORIS LoHa/LoKr/IA3/full/OFT modules (lyco.py) add ``op(x, ΔW·m)`` with the layer's own op instead,
train_norm's norm modules ``norm(x; Δw, Δb)``. An
``nn.MultiheadAttention`` (SD2 TE, SDXL TE2) has no per-projection modules, so its q/k/v/out deltas are added to the
weights it passes to ``F.multi_head_attention_forward``; in training with kohya's neuron or rank dropout, which act on
each LoRA's activations, it is computed projection by projection instead. ``detach()`` removes every trace.
"""

from __future__ import annotations

import dataclasses
import math
import random
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import BlockDims, block_index
from .fp8 import is_fp8
from .lyco import KohyaOftPair, LycorisMaxNorm, LycoSettings, NormPair, PairBase, make_pair, settings_for
from .lyco_preset import custom_targets
from .targets import (IA3_ON_INPUT, LYCO_TE, TrainTarget, kohya_oft_targets, lyco_preset_convs, lycoris_unet_targets,
                      text_encoder_targets, unet_targets)


def autocast_enabled(device_type: str) -> bool:
    """Autocast state for one device type (``torch.is_autocast_enabled()`` alone answers for CUDA only)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no per-device query
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


class LoRAPair(LycorisMaxNorm, PairBase):
    """One kohya LoRA module: lora_down, lora_up and the alpha buffer, saved under kohya's key names. In a LyCORIS
    network with scale_weight_norms its max-norm is LyCORIS' (through the scalar buffer ``enable_fixed_scalar``
    gives it); otherwise the network applies sd-scripts' rule to up and down."""

    scalar_factor = ("lora_up.weight",)

    def __init__(self, in_dim: int, out_dim: int, dim: int, alpha: float, kernel=None, stride=1, padding=0,
                 tucker: bool = False):
        """``tucker`` (LyCORIS use_tucker, kxk convs): 1x1 down, kxk ``lora_mid`` core, 1x1 up."""
        super().__init__()
        self.lora_mid = None
        self.shape = (out_dim, in_dim) if kernel is None else (out_dim, in_dim, *nn.modules.utils._pair(kernel))
        if kernel is None:
            self.lora_down = nn.Linear(in_dim, dim, bias=False)
            self.lora_up = nn.Linear(dim, out_dim, bias=False)
        elif tucker:
            self.lora_down = nn.Conv2d(in_dim, dim, 1, bias=False)
            self.lora_mid = nn.Conv2d(dim, dim, kernel, stride, padding, bias=False)
            self.lora_up = nn.Conv2d(dim, out_dim, 1, 1, bias=False)
        else:
            self.lora_down = nn.Conv2d(in_dim, dim, kernel, stride, padding, bias=False)
            self.lora_up = nn.Conv2d(dim, out_dim, 1, 1, bias=False)
        # kohya init: the network starts as an exact no-op.
        self.reset_parameters()
        self._set_alpha(alpha, dim)

    frozen_down = False  # LoRA-FA (networks.lora_fa): lora_down stays at its random start, only lora_up trains

    def freeze_down(self):
        self.frozen_down = True
        self.lora_down.weight.requires_grad_(False)

    def reset_parameters(self):
        if self.frozen_down:  # (sd-scripts' lora_fa: the paper's normal init; in_dim without the kernel)
            rank = self.lora_down.weight.shape[0]
            nn.init.normal_(self.lora_down.weight, std=math.sqrt(2.0 / (self.shape[1] + rank)))
        else:
            nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        self._reset_scalar()
        if self.use_scalar:  # (LyCORIS: the scalar starts at 0, lora_up at random)
            nn.init.kaiming_uniform_(self.lora_up.weight, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_up.weight)
        if self.lora_mid is not None:  # (LyCORIS' order)
            nn.init.kaiming_uniform_(self.lora_mid.weight, a=math.sqrt(5))

    def tensors(self, save_4d: bool = False) -> dict:
        """kohya's keys; ``save_4d``: a Linear the host trains as a 1x1 conv (SD2 proj_in/out) saved 4-D."""
        up = self.lora_up.weight
        out = {"lora_down.weight": self.lora_down.weight,
               "lora_up.weight": up * self.scalar.to(up.dtype) if self.scalar_on else up}  # (folded, as LyCORIS)
        if save_4d:
            out = {k: v[:, :, None, None] for k, v in out.items()}
        if self.lora_mid is not None:
            out["lora_mid.weight"] = self.lora_mid.weight
        return out

    def rebuild(self) -> torch.Tensor:
        up, down = self.lora_up.weight.flatten(1), self.lora_down.weight.flatten(1)
        if self.scalar_on:
            up = up * self.scalar.to(up.dtype)
        if self.lora_mid is not None:
            return torch.einsum("oa,abhw,bi->oihw", up, self.lora_mid.weight, down)
        return (up @ down).reshape(self.shape)

    def delta_weight(self, rank_dropout: float = 0.0) -> torch.Tensor:
        """up @ down * scale in the host weight's shape (MHA projections, DoRA). ``rank_dropout`` is ignored:
        kohya's LoRA drops rank channels in the activation path only (with DoRA, weight_delta drops rows as
        LyCORIS does)."""
        return self.rebuild() * self.scale


class DyLoraPair(PairBase):
    """sd-scripts' DyLoRAModule (networks.dylora): a kohya LoRA kept as one tensor per rank row (lora_A rows of
    lora_down, lora_B columns of lora_up), so that a row outside the trained block gets no gradient at all and the
    optimizer leaves it and its state alone that step, as there. In training each call uses every row with the
    scale alpha/dim·sqrt(dim/(b+unit)) and trains rows b..b+unit-1 only, b drawn by the network; otherwise (samples,
    validation) it is the plain LoRA the file holds: all rows, alpha/dim."""

    def __init__(self, shape: tuple, dim: int, alpha, unit: int, stride=1, padding=0):
        super().__init__()
        self.shape = tuple(shape)
        self.unit = unit
        self.stride, self.padding = stride, padding
        k = tuple(self.shape[2:])
        self.lora_A = nn.ParameterList([nn.Parameter(torch.zeros(1, self.shape[1], *k)) for _ in range(dim)])
        self.lora_B = nn.ParameterList([nn.Parameter(torch.zeros(self.shape[0], 1, *[1] * len(k)))
                                        for _ in range(dim)])
        self._set_alpha(alpha, dim)
        self.draw = (-1, dim - unit)  # (the network's draw number, the first trained row)

    def reset_parameters(self):
        for a in self.lora_A:  # (sd-scripts' order: row by row)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        for b in self.lora_B:
            nn.init.zeros_(b)

    def factors(self, first: int | None):
        """(down, up, extra scale): every row; with ``first`` (training) rows outside first..first+unit-1
        detached, and sd-scripts' sqrt(dim/(first+unit))."""
        if first is None:
            return torch.cat(tuple(self.lora_A)), torch.cat(tuple(self.lora_B), 1), 1.0
        live = range(first, first + self.unit)
        down = torch.cat([a if i in live else a.detach() for i, a in enumerate(self.lora_A)])
        up = torch.cat([b if i in live else b.detach() for i, b in enumerate(self.lora_B)], 1)
        return down, up, math.sqrt(self.dim / (first + self.unit))

    def rebuild(self) -> torch.Tensor:
        down, up, _ = self.factors(None)
        return (up.flatten(1) @ down.flatten(1)).reshape(self.shape)

    def tensors(self, save_4d: bool = False) -> dict:
        down, up, _ = self.factors(None)
        if save_4d:
            down, up = down[:, :, None, None], up[:, :, None, None]
        return {"lora_down.weight": down, "lora_up.weight": up}

    def file_shapes(self) -> dict:
        k = self.shape[2:]
        return {"lora_down.weight": (self.dim, *self.shape[1:]), "lora_up.weight": (self.shape[0], self.dim,
                                                                                    *[1] * len(k))}

    def load_tensors(self, sd: dict, name: str, missing: list):
        with torch.no_grad():
            for key, rows, axis in (("lora_down.weight", self.lora_A, 0), ("lora_up.weight", self.lora_B, 1)):
                v = sd.get(f"{name}.{key}")
                if v is None:
                    missing.append(f"{name}.{key}")
                    continue
                v = v.reshape(self.dim, *self.lora_A[0].shape[1:]) if axis == 0 else v.reshape(-1, self.dim)
                for i, p in enumerate(rows):
                    p.copy_((v[i:i + 1] if axis == 0 else v[:, i:i + 1]).reshape(p.shape).to(p.dtype))
            if f"{name}.alpha" in sd:
                self.alpha.copy_(sd[f"{name}.alpha"].float())
                self.scale = float(self.alpha) / self.dim


class NetworkShapeError(ValueError):
    """A layer the chosen network type cannot be built on (its size); the message names the layer."""


def lora_out(net, pair: LoRAPair, x):
    """kohya's LoRAModule.forward without the host layer: up(down(x)) · m · alpha/dim, with ``net``'s neuron and
    rank dropouts in training."""
    # under autocast the linear casts x itself; casting it first only adds two copies. The dtype checks
    # in Python skip a no-op .to() dispatch per module (host time per step on a GPU)
    wd = pair.lora_down.weight.dtype
    h = pair.lora_down(x if x.dtype == wd or autocast_enabled(x.device.type) else x.to(wd))
    if pair.lora_mid is not None:
        h = pair.lora_mid(h)
    scale = pair.scale
    if net.training and net.dropout:
        h = F.dropout(h, p=net.dropout)
    if net.training and net.rank_dropout:
        # kohya: whole rank channels dropped per sample, scale compensated
        r = h.shape[1] if h.dim() == 4 else h.shape[-1]
        shape = {4: (h.shape[0], r, 1, 1), 3: (h.shape[0], 1, r)}.get(h.dim(), (h.shape[0], r))
        h = h * (torch.rand(shape, device=h.device) > net.rank_dropout).to(h.dtype)
        scale = scale / (1.0 - net.rank_dropout)
    u = pair.lora_up(h) * (net.multiplier * scale)
    if pair.scalar_on:
        u = u * pair.scalar.to(u.dtype)
    return u


class LoRANetwork(nn.Module):
    def __init__(self, sd_model, family: str, dim: int = 4, alpha: float = 1.0, conv_dim: int | None = None,
                 conv_alpha: float | None = None, train_unet: bool = True, train_text_encoder: bool = True,
                 dropout: float | None = None, rank_dropout: float | None = None, module_dropout: float | None = None,
                 blocks: BlockDims | None = None, module_dims: dict[str, tuple[int, float]] | None = None,
                 lyco: LycoSettings | None = None, lora_fa: bool = False, dylora_unit: int | None = None,
                 kohya_oft: tuple[bool, bool] | None = None, lyco_max_norm: bool = False):
        """``blocks``: per-block ranks (block_dims / block learning rates); ``module_dims``: a rank and alpha per
        kohya module name (a start file with several ranks), and for LyCORIS LoKr / OFT a third item, what else the
        file fixes (make_pair's ``from_file``): a module without one gets no LoRA, as in sd-scripts'
        create_network_from_weights. ``lyco``: a LyCORIS network (lycoris.kohya): its preset's layers, and LoHa /
        LoKr modules for those algorithms. ``lora_fa``: sd-scripts' networks.lora_fa, lora_down frozen at its
        random start. ``dylora_unit``: sd-scripts' networks.dylora with that unit (DyLoraPair modules).
        ``kohya_oft``: sd-scripts' networks.oft, (enable_all_linear, enable_conv): UNet OFT modules of ``dim``
        blocks with the constraint ``alpha``. ``lyco_max_norm``: scale_weight_norms on a LyCORIS network: its
        LoCon modules get the scalar buffer LyCORIS' max-norm scales."""
        super().__init__()
        self.family = family
        self.multiplier = 1.0
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self.lyco = lyco
        self.dylora_unit = dylora_unit
        self._draw_no, self._dylora_rng = 0, random.Random(0)  # (new_draws sets both per micro-batch)
        self.kohya_oft = kohya_oft
        self.notes: list[str] = []  # what the job should say about the layer choice (a preset file's misses)
        targets: list[TrainTarget] = []
        if kohya_oft is not None:  # (sd-scripts' OFT has no text-encoder modules)
            if train_unet:
                targets += kohya_oft_targets(sd_model.model.diffusion_model, family, *kohya_oft)
        elif lyco is not None and lyco.custom is not None:  # a LyCORIS preset file
            targets += custom_targets(sd_model, family, lyco.custom, bool(conv_dim), train_unet, train_text_encoder,
                                      lyco.train_norm, self.notes)
        elif lyco is not None:
            if train_unet:
                conv = lyco_preset_convs(lyco.preset) and bool(conv_dim)
                targets += lycoris_unet_targets(sd_model.model.diffusion_model, family, lyco.preset, conv,
                                                norms=lyco.train_norm)
            if train_text_encoder and lyco.preset in LYCO_TE:
                targets += text_encoder_targets(sd_model, family, layers=LYCO_TE[lyco.preset])
        else:
            if train_unet:
                conv = bool(conv_dim) or (blocks is not None and blocks.conv_dims is not None)
                targets += unet_targets(sd_model.model.diffusion_model, family, conv=conv)
            if train_text_encoder:
                targets += text_encoder_targets(sd_model, family)
        weight_path = lyco is not None and lyco.weight_path
        self.pairs = nn.ModuleDict()
        self.skipped: list[str] = []  # rank 0 from block_dims or a block learning-rate weight of 0
        self._mha: list[tuple[TrainTarget, list[str]]] = []
        self._built_with: dict[str, LycoSettings] = {}  # (a module's own settings: a preset map's or the file's)
        self.targets = []
        for t in targets:
            m = t.module
            if t.kind == "norm":  # (LyCORIS train_norm: no rank, so neither block nor file ranks apply)
                self.targets.append(t)
                self.pairs[t.kohya_name] = NormPair(m.weight.numel(), m.bias is not None)
                continue
            if t.kind == "conv":
                d, a = conv_dim, (1.0 if conv_alpha is None else conv_alpha)
            else:
                d, a = dim, alpha
            if t.override:  # a preset file's map entry (LyCORIS: "dim or lora_dim", "alpha or self.alpha")
                d, a = t.override.get("dim") or d, t.override.get("alpha") or a
            if blocks is not None and t.component == "unet":
                d, a = blocks.for_module(t.kohya_name, family, conv=t.kind == "conv")
            names = [f"{t.kohya_name}_{p}_proj" for p in t.parts] if t.kind == "mha" else None
            if module_dims is not None:
                # an MHA needs all four projections (they share one forward)
                dims = [module_dims.get(n) for n in (names or [t.kohya_name])]
                d, a = (dims[0][:2] if all(dims) else (0, None))
            if not d:
                self.skipped.append(t.kohya_name)
                continue
            try:
                self._add(t, d, a, names, dims if module_dims is not None else None, weight_path)
            except ValueError as e:
                raise NetworkShapeError(f"{t.kohya_name}: {e}") from None
        for name, pair in self.pairs.items():  # the network-wide switches, on every module, as its algorithm takes them
            if lyco is not None:
                ps = self._built_with.get(name, lyco)
                if ps.rs_lora:
                    pair.use_rs_scale()
                pair.rank_dropout_scale = lyco.rank_dropout_scale
                if ps.use_scalar and not isinstance(pair, NormPair):
                    pair.enable_scalar()
                elif lyco_max_norm and isinstance(pair, LoRAPair):
                    pair.enable_fixed_scalar()
            if lora_fa:
                pair.freeze_down()
                pair.reset_parameters()
        del self._built_with  # (needed while building only)
        self._attached = False

    def _add(self, t: TrainTarget, d: int, a, names: list[str] | None, dims: list | None, weight_path: bool):
        """The module(s) of one target (an MHA: one per projection trained)."""
        m, lyco = t.module, self.lyco
        if t.override:  # (a preset file's algorithm and LoKr shape settings for this layer)
            o = t.override
            lyco = dataclasses.replace(settings_for(lyco, o.get("algo")), factor=o.get("factor", lyco.factor),
                                       decompose_both=o.get("decompose_both", lyco.decompose_both),
                                       full_matrix=o.get("full_matrix", lyco.full_matrix),
                                       unbalanced=o.get("unbalanced_factorization", lyco.unbalanced))
            weight_path = lyco.weight_path
        extra = dict(dims[0][2]) if dims is not None and len(dims[0]) > 2 and t.kind != "mha" else {}
        lyco, weight_path = self._file_settings(lyco, weight_path, extra)
        self.targets.append(t)
        on_input = lyco is not None and lyco.preset == "ia3" and t.kohya_name.endswith(IA3_ON_INPUT)
        unit = self.dylora_unit
        if self.kohya_oft is not None:
            self.pairs[t.kohya_name] = KohyaOftPair(tuple(m.weight.shape), d, a)
        elif t.kind == "mha":
            e = m.embed_dim
            has_bias = m.in_proj_bias is not None
            w = dict(zip(("q", "k", "v", "out"), (*m.in_proj_weight.detach().chunk(3), m.out_proj.weight)))
            for n, part, (dn, an, *got) in zip(names, t.parts,
                                               dims if dims is not None else [(d, a)] * len(names)):
                ex = dict(got[0]) if got else {}
                ly, wp = self._file_settings(lyco, weight_path, ex)
                self.pairs[n] = (make_pair(ly, (e, e), dn, an, bias=has_bias, from_file=ex or None) if wp
                                 else DyLoraPair((e, e), dn, an, unit) if unit else LoRAPair(e, e, dn, an))
                self._built_with[n] = ly
                if ly is not None and ly.dora:
                    self.pairs[n].init_dora(w[part], ly.wd_on_output)
            self._mha.append((t, names))
        elif unit:
            self.pairs[t.kohya_name] = DyLoraPair(tuple(m.weight.shape), d, a, unit, getattr(m, "stride", 1),
                                                  getattr(m, "padding", 0))
        elif weight_path:
            self.pairs[t.kohya_name] = make_pair(lyco, tuple(m.weight.shape), d, a, bias=m.bias is not None,
                                                 on_input=on_input, from_file=extra or None)
        elif t.kind == "conv":
            self.pairs[t.kohya_name] = LoRAPair(m.in_channels, m.out_channels, d, a, m.kernel_size, m.stride,
                                                m.padding, tucker=lyco is not None and lyco.tucker)
        elif t.kind == "conv1x1":
            self.pairs[t.kohya_name] = LoRAPair(m.in_channels, m.out_channels, d, a, (1, 1), m.stride, m.padding)
        else:
            self.pairs[t.kohya_name] = LoRAPair(m.in_features, m.out_features, d, a)
        if t.kind != "mha":
            self._built_with[t.kohya_name] = lyco
        if lyco is not None and lyco.dora and t.kind != "mha":  # (norm modules have none: they never come here)
            self.pairs[t.kohya_name].init_dora(m.weight, lyco.wd_on_output)

    @staticmethod
    def _file_settings(lyco, weight_path: bool, extra: dict):
        """dim_from_weights: the settings of a module whose file entry names its own algorithm (``algo``, taken
        out of ``extra``), Tucker core (``tucker``, a LoCon conv) or DoRA magnitude (``dora``, ``wd_on_output``);
        (settings, whether it is a weight-path module)."""
        keys = ("tucker", "dora", "wd_on_output")
        if lyco is None or not ("algo" in extra or any(k in extra for k in keys)):
            return lyco, weight_path
        out = settings_for(lyco, extra.pop("algo", None))
        given = {k: extra.pop(k) for k in keys if k in extra}
        if given:
            out = dataclasses.replace(out, **given)
        return out, out.weight_path

    # ---- counts, parameters -------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.targets:
            out[t.component] = out.get(t.component, 0) + (len(t.parts) if t.kind == "mha" else 1)
        return out

    def param_groups(self, unet_lr: float, te_lr: float, block_lr: list[float] | None = None,
                     loraplus: tuple[float | None, float | None] = (None, None)) -> list[dict]:
        """Optimizer groups as sd-scripts' prepare_optimizer_params forms them: one per part (``unet`` /
        ``text_encoder``), per UNet block with block learning rates (``unet_blockN``), each split in two with LoRA+
        (the lora_up weights, `` plus``, at lr x ratio). ``lr_scale``: the group's LR over its part's base LR. A group
        whose LR is 0 is left out (that part trains nothing)."""
        groups: dict[str, dict] = {}

        def add(key, lr, scale, params):  # (frozen tensors, LoRA-FA's lora_down, are not trained)
            groups.setdefault(key, {"params": [], "lr": lr, "name": key, "lr_scale": scale})["params"].extend(
                p for p in params if p.requires_grad)

        for name, pair in self.pairs.items():
            if name.startswith(("lora_unet_", "oft_unet_")):
                key, base, w, ratio = "unet", unet_lr, 1.0, loraplus[0]
                if block_lr is not None:
                    i = block_index(name, self.family)
                    key, w = f"unet_block{i}", block_lr[i]
            else:
                key, base, w, ratio = "text_encoder", te_lr, 1.0, loraplus[1]
            if ratio is None or not isinstance(pair, (LoRAPair, DyLoraPair)):  # (LyCORIS: LoRA+ moves lora_up only)
                add(key, base * w, w, pair.parameters())
            else:  # (DyLoRA: its lora_B rows are lora_up)
                up = ("lora_up.", "lora_B.")
                add(key, base * w, w, [p for n, p in pair.named_parameters() if not n.startswith(up)])
                add(key + " plus", base * w * ratio, w * ratio,
                    [p for n, p in pair.named_parameters() if n.startswith(up)])
        return [g for g in groups.values() if g["lr"] and g["params"]]

    def trained_prefixes(self, unet_lr: float, te_lr: float):
        """An LR of 0 freezes that part: its LoRA stays at the no-op init and is not saved."""
        return tuple(p for ps, lr in ((("lora_unet_", "oft_unet_"), unet_lr), (("lora_te",), te_lr)) if lr
                     for p in ps)

    # ---- attach / detach ----------------------------------------------------------------------------------
    def _passes_through(self) -> bool:
        """This module adds nothing now: multiplier 0, or dropped for this step (module_dropout)."""
        return self.multiplier == 0 or self._module_dropped()

    def _pair_forward(self, pair: LoRAPair, org_forward):
        net = self

        def forward(x, *args, **kwargs):
            y = org_forward(x, *args, **kwargs)
            if net._passes_through():
                return y
            u = lora_out(net, pair, x)
            return y + (u if u.dtype == y.dtype else u.to(y.dtype))

        return forward

    def _dylora_first(self, pair: DyLoraPair) -> int | None:
        """The first row this micro-batch trains in ``pair`` (sd-scripts: random.randint(0, dim - 1) rounded down
        to a multiple of unit, one draw per module in call order), drawn once per micro-batch so that a
        gradient-checkpointing recompute sees the same rows; None outside training (every row, plain scale)."""
        if not self.training:
            return None
        if pair.draw[0] != self._draw_no:
            r = self._dylora_rng.randint(0, pair.dim - 1)
            pair.draw = (self._draw_no, r - r % pair.unit)
        return pair.draw[1]

    def new_draws(self, seed: int):
        """networks.dylora: the next micro-batch draws its trained rows from ``seed`` (resume-exact: the seed
        comes from the step)."""
        self._draw_no += 1
        self._dylora_rng = random.Random(seed)

    def _dylora_forward(self, pair: DyLoraPair, org_forward):
        """sd-scripts' DyLoRAModule.forward: org(x) + up(down(x))·alpha/dim·sqrt(dim/(b+unit)), every row, rows
        b..b+unit-1 trained (the multiplier applied as in our other modules; sd-scripts trains at 1)."""
        net = self
        conv = len(pair.shape) == 4

        def forward(x, *args, **kwargs):
            y = org_forward(x, *args, **kwargs)
            if net._passes_through():
                return y
            down, up, extra = pair.factors(net._dylora_first(pair))
            if not (x.dtype == down.dtype or autocast_enabled(x.device.type)):
                x = x.to(down.dtype)
            if conv:
                u = F.conv2d(F.conv2d(x, down, None, pair.stride, pair.padding), up)
            else:
                u = F.linear(F.linear(x, down), up)
            u = u * (net.multiplier * pair.scale * extra)
            return y + (u if u.dtype == y.dtype else u.to(y.dtype))

        return forward

    def _weight_forward(self, pair, module: nn.Module, org_forward):
        """LoHa / LoKr / IA3 / full and any type with DoRA: the host layer's own op with the rebuilt delta
        weight, added to its output (LyCORIS' forward: op(x, W' - W) with W' = W + ΔW·m or DoRA's W', without the
        bias twice; a full module's bias delta once)."""
        net = self
        if isinstance(module, nn.Linear):
            def op(x, w, b):
                return F.linear(x, w, b)
        else:
            def op(x, w, b):
                return F.conv2d(x, w, b, module.stride, module.padding, module.dilation, module.groups)

        def forward(x, *args, **kwargs):
            y = org_forward(x, *args, **kwargs)
            if net._passes_through():
                return y
            w, b = pair.weight_and_bias_delta(module.weight, net.multiplier,
                                              net.rank_dropout if net.training else 0.0)
            if not autocast_enabled(x.device.type) and w.dtype != x.dtype:
                w, b = w.to(x.dtype), None if b is None else b.to(x.dtype)
            u = op(x, w, b)
            return y + (u if u.dtype == y.dtype else u.to(y.dtype))

        return forward

    def _norm_forward(self, pair: NormPair, module: nn.Module, org_forward):
        """LyCORIS' NormModule forward: norm(x) with the deltas as its affine weight and bias, added to the
        layer's output; in fp32 as ldm's GroupNorm32 computes."""
        net = self
        if isinstance(module, nn.GroupNorm):
            def op(x, w, b):
                return F.group_norm(x, module.num_groups, w, b, module.eps)
        else:
            def op(x, w, b):
                return F.layer_norm(x, module.normalized_shape, w, b, module.eps)

        def forward(x, *args, **kwargs):
            y = org_forward(x, *args, **kwargs)
            if net._passes_through():
                return y
            w, b = pair.weight_and_bias_delta(None, net.multiplier)
            with torch.autocast(x.device.type, enabled=False):
                u = op(x.float(), w.float(), None if b is None else b.float())
            return y + u.to(y.dtype)

        return forward

    def _mha_forward(self, mha: nn.MultiheadAttention, parts: tuple, names: list[str]):
        """The trained projections' deltas (``parts`` of q/k/v/out; full modules: their biases too) added to the
        weights F.multi_head_attention_forward gets."""
        net = self
        pairs = {p: self.pairs[n] for p, n in zip(parts, names)}

        def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                    average_attn_weights=True, is_causal=False):
            m = net.multiplier
            if m and net._mha_by_activation(mha, pairs):
                return net._mha_activation_forward(mha, pairs, query, key, value, key_padding_mask, need_weights,
                                                   attn_mask, average_attn_weights, is_causal)
            w_in, b_in = mha.in_proj_weight, mha.in_proj_bias
            w_out, b_out = mha.out_proj.weight, mha.out_proj.bias
            if m:
                # (FP8 storage: the delta is added in fp32, never rounded to fp8)
                w_in, w_out = (w.float() if is_fp8(w.dtype) else w for w in (w_in, w_out))
                rd = net.rank_dropout if net.training and net.lyco is not None else 0.0
                ws = list(w_in.chunk(3)) + [w_out]
                bs = [b.float() if b is not None and is_fp8(b.dtype) else b
                      for b in (list(b_in.chunk(3)) if b_in is not None else [None] * 3) + [b_out]]
                bias_changed = False
                for i, part in enumerate(("q", "k", "v", "out")):
                    if part not in pairs or net._module_dropped():
                        continue
                    p = pairs[part]
                    if isinstance(p, DyLoraPair):
                        down, up, extra = p.factors(net._dylora_first(p))
                        dw, db = (up @ down) * (p.scale * extra * m), None
                    else:
                        dw, db = p.weight_and_bias_delta(ws[i], m, rd)
                    ws[i] = ws[i] + dw.to(ws[i].dtype)
                    if db is not None and bs[i] is not None:
                        bs[i], bias_changed = bs[i] + db.to(bs[i].dtype), True
                w_in, w_out = torch.cat(ws[:3], 0), ws[3]
                if bias_changed:
                    b_in = None if b_in is None else torch.cat(bs[:3], 0)
                    b_out = bs[3]
            batch_first = getattr(mha, "batch_first", False)
            if batch_first:
                query, key, value = (x.transpose(0, 1) for x in (query, key, value))
            out, weights = F.multi_head_attention_forward(
                query, key, value, mha.embed_dim, mha.num_heads, w_in, b_in, mha.bias_k, mha.bias_v,
                mha.add_zero_attn, mha.dropout, w_out, b_out, training=mha.training,
                key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
                average_attn_weights=average_attn_weights, is_causal=is_causal)
            if batch_first:
                out = out.transpose(0, 1)
            return out, weights

        return forward

    def _module_dropped(self) -> bool:
        """module_dropout's draw for one module this step (sd-scripts and LyCORIS: one per module)."""
        return bool(self.training and self.module_dropout and torch.rand(()) < self.module_dropout)

    def _mha_by_activation(self, mha: nn.MultiheadAttention, pairs: dict) -> bool:
        """kohya LoRA dropouts act on each projection's LoRA activations (per token, per sample), which a weight
        delta cannot express: in training with them, the attention is computed projection by projection."""
        return bool(self.training and (self.dropout or self.rank_dropout) and self.lyco is None
                    and all(type(p) is LoRAPair for p in pairs.values())
                    and mha.bias_k is None and not mha.add_zero_attn)

    def _mha_activation_forward(self, mha, pairs, query, key, value, key_padding_mask, need_weights, attn_mask,
                                average_attn_weights, is_causal):
        """nn.MultiheadAttention's forward with each of q/k/v/out as host projection + kohya LoRA module (as
        sd-scripts' HF-layout text encoder has them), so that its dropouts apply as they do there."""
        if not getattr(mha, "batch_first", False):
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        w_in, b_in = mha.in_proj_weight, mha.in_proj_bias
        ws = list(w_in.chunk(3)) + [mha.out_proj.weight]
        bs = (list(b_in.chunk(3)) if b_in is not None else [None] * 3) + [mha.out_proj.bias]

        def project(i, part, x):
            w, b = ws[i], bs[i]
            if is_fp8(w.dtype):  # (FP8 storage: computed from fp32, as the weight-delta path does)
                w, b = w.float(), None if b is None else b.float()
            if w.dtype != x.dtype and not autocast_enabled(x.device.type):  # (a half host)
                w, b = w.to(x.dtype), None if b is None else b.to(x.dtype)
            y = F.linear(x, w, b)
            if part in pairs and not self._module_dropped():
                u = lora_out(self, pairs[part], x)
                y = y + (u if u.dtype == y.dtype else u.to(y.dtype))
            return y

        n, lq, e = query.shape
        heads = mha.num_heads
        q, k, v = (project(i, part, x).reshape(n, x.shape[1], heads, e // heads).transpose(1, 2)
                   for i, (part, x) in enumerate((("q", query), ("k", key), ("v", value))))
        scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(e // heads))
        ls = k.shape[2]
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(lq, ls, dtype=torch.bool, device=q.device).triu(1)
        for mask in (attn_mask, None if key_padding_mask is None else key_padding_mask[:, None, None, :]):
            if mask is None:
                continue
            if mask.dim() == 3:  # (N·heads, L, S)
                mask = mask.reshape(n, heads, lq, ls)
            scores = (scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool
                      else scores + mask.to(scores.dtype))
        weights = scores.softmax(-1)
        attn = F.dropout(weights, p=mha.dropout, training=mha.training) if mha.dropout else weights
        out = project(3, "out", (attn @ v).transpose(1, 2).reshape(n, lq, e))
        if not getattr(mha, "batch_first", False):
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, (weights.mean(1) if average_attn_weights else weights)

    def attach(self):
        if self._attached:
            return
        for t in self.targets:
            if "forward" in t.module.__dict__:
                raise RuntimeError(f"{t.host_name} already has an instance-level forward; refusing to stack patches")
        for t in self.targets:
            if t.kind == "mha":
                names = next(n for tt, n in self._mha if tt is t)
                t.module.forward = self._mha_forward(t.module, t.parts, names)
            elif t.kind == "norm":
                org = type(t.module).forward.__get__(t.module)
                t.module.forward = self._norm_forward(self.pairs[t.kohya_name], t.module, org)
            else:
                pair, org = self.pairs[t.kohya_name], type(t.module).forward.__get__(t.module)
                t.module.forward = (self._dylora_forward(pair, org) if isinstance(pair, DyLoraPair)
                                    else self._pair_forward(pair, org)
                                    if isinstance(pair, LoRAPair) and pair.dora_scale is None
                                    else self._weight_forward(pair, t.module, org))
        self._attached = True

    def detach(self):
        for t in self.targets:
            t.module.__dict__.pop("forward", None)
        self._attached = False

    @contextmanager
    def attached(self):
        self.attach()
        try:
            yield self
        finally:
            self.detach()

    # ---- max-norm regularisation (scale_weight_norms) ----------------------------------------------------
    @torch.no_grad()
    def max_norm_regularize(self, max_norm: float, prefixes: tuple | None = None):
        """sd-scripts' apply_max_norm_regularization: each module's ``up·down·scale`` is rescaled to a Frobenius
        norm of at most ``max_norm`` by multiplying up and down by sqrt(ratio). Returns device tensors (keys scaled,
        mean and max of the norms after scaling), read by the loop only when it logs: no host sync here.

        ||U·D||² = Σ (UᵀU) ⊙ (D·Dᵀ) with U = up [out, r] and D = down [r, in·k·k]: r×r products instead of the
        out×in delta (the same number; a 3×3 LoCon down composes with the 1×1 up the same way)."""
        # (IA3 / full modules: LyCORIS' apply_max_norm leaves them alone)
        pairs = [p for n, p in self.pairs.items() if (prefixes is None or n.startswith(prefixes))
                 and (isinstance(p, LoRAPair) or hasattr(p, "apply_max_norm"))]
        # LyCORIS' modules (its LoCon through the scalar buffer lyco_max_norm gave it), LoHa / LoKr: its own
        # per-module rule; kohya's LoRA below
        weight_pairs = [p for p in pairs if not isinstance(p, LoRAPair) or p.scalar_on]
        pairs = [p for p in pairs if isinstance(p, LoRAPair) and not p.scalar_on]
        if pairs and any(p.lora_mid is not None or p.dora_scale is not None for p in pairs):
            raise ValueError("scale_weight_norms: LoCon's Tucker factors and DoRA need LyCORIS' max-norm "
                             "(LoRANetwork(lyco_max_norm=True))")
        if weight_pairs:
            done = [p.apply_max_norm(max_norm) for p in weight_pairs]
            scaled = torch.stack([n for _, n in done])
            return torch.stack([s for s, _ in done]).sum(), scaled.mean(), scaled.max()
        if not pairs:
            z = torch.zeros(())
            return z, z, z
        norms = []
        for p in pairs:
            u = p.lora_up.weight.flatten(1).float()
            d = p.lora_down.weight.flatten(1).float()
            norms.append(((u.t() @ u) * (d @ d.t())).sum().clamp_min(0).sqrt() * p.scale)
        norm = torch.stack(norms)
        clamped = norm.clamp(min=max_norm / 2)
        ratio = clamped.clamp(max=max_norm) / clamped
        sqrt_ratio = ratio.sqrt()
        for i, p in enumerate(pairs):
            f = sqrt_ratio[i]
            p.lora_up.weight.mul_(f.to(p.lora_up.weight.dtype))
            p.lora_down.weight.mul_(f.to(p.lora_down.weight.dtype))
        scaled = norm * ratio
        return (ratio != 1).sum(), scaled.mean(), scaled.max()

    # ---- state dict in kohya format -----------------------------------------------------------------------
    def kohya_state_dict(self, dtype: torch.dtype | None = None, prefixes: tuple | None = None,
                         raw: bool = False) -> dict[str, torch.Tensor]:
        """The file's tensors; ``raw``: for the resume state (use_scalar's scalar kept apart from its factor)."""
        save_4d = {t.kohya_name for t in self.targets if t.save_4d}
        out = {}
        for name, pair in self.pairs.items():
            if prefixes is not None and not name.startswith(prefixes):
                continue
            for k, v in pair.file_tensors(name in save_4d, raw).items():
                v = v.detach() if dtype is None else v.detach().to(dtype)
                # copies: the weights may be views into one flat buffer (fast path), which safetensors refuses to save
                out[f"{name}.{k}"] = v.to("cpu", copy=True).contiguous()
        return out

    def load_kohya_state_dict(self, sd: dict[str, torch.Tensor]):
        """Loads what fits; returns the network's tensor names the file lacks. ValueError when a tensor has
        another size than the network's (another rank, type or model), before anything is copied."""
        wrong = []
        for name, pair in self.pairs.items():
            for key, shape in pair.file_shapes().items():
                v = sd.get(f"{name}.{key}")
                if v is not None and v.numel() != math.prod(shape):
                    wrong.append(f"{name}.{key}: file {tuple(v.shape)}, network {tuple(shape)}")
        if wrong:
            raise ValueError(f"{len(wrong)} tensors of the file have other shapes than this network's (e.g. "
                             f"{'; '.join(wrong[:2])}): it was trained with another network_dim / conv_dim, network "
                             "type or base model. Set the same values, or dim_from_weights = true to take the ranks "
                             "from the file")
        missing: list[str] = []
        for name, pair in self.pairs.items():
            pair.load_tensors(sd, name, missing)
        return missing

    def unused_tensors(self, sd: dict[str, torch.Tensor]) -> list[str]:
        """The file's tensors this network has no place for (another network type or layer set)."""
        known = {f"{name}.{k}" for name, pair in self.pairs.items()
                 for k in [*pair.file_shapes(), "alpha", "on_input"]}
        return sorted(k for k in sd if k not in known)
