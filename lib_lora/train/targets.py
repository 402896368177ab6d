"""Which host modules a kohya-style LoRA trains, and the kohya key each one is saved under.

kohya's ``networks/lora.py`` wraps every Linear / 1x1 Conv2d inside the UNet's transformer blocks (plus, with
``conv_dim``, the convolutions of resnets and down/up-samplers) and the text encoders' attention and MLP layers.
We train on the WebUI's own ldm/sgm modules, so we find the same layers there and emit kohya's names: the
diffusers-tree names for SD1/SD2 UNets and the sgm names for SDXL (training-anchors §3.1-3.2).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch.nn as nn

from ..formats.keymap import hf_clip_name

# ldm resnet child names -> diffusers names (kohya SD1/SD2 keys use the diffusers tree).
_RESNET_TAIL = {
    "in_layers_0": "norm1",
    "in_layers_2": "conv1",
    "out_layers_0": "norm2",
    "out_layers_3": "conv2",
    "emb_layers_1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}

# open_clip text tower child names -> HF CLIP names (kohya keys for SD2 TE and SDXL TE2).
_OPENCLIP_TAIL = {
    "attn_out_proj": "self_attn_out_proj",
    "mlp_c_fc": "mlp_fc1",
    "mlp_c_proj": "mlp_fc2",
}

_TRANSFORMER_CLASSES = ("SpatialTransformer", "SpatialVideoTransformer")
NORMS = (nn.GroupNorm, nn.LayerNorm)
_CONV_BLOCK_CLASSES = ("ResBlock", "Downsample", "Upsample")


@dataclass
class TrainTarget:
    kohya_name: str          # e.g. lora_unet_down_blocks_0_attentions_0_proj_in
    host_name: str           # A1111 network_layer_name, e.g. diffusion_model_input_blocks_1_1_proj_in
    module: nn.Module        # Linear, Conv2d or MultiheadAttention
    component: str           # unet | te1 | te2
    kind: str                # linear | conv1x1 | conv | mha | norm (LyCORIS train_norm)
    save_4d: bool = False    # kohya trains SD2 proj_in/out as 1x1 convs: save 4-D so kohya tools load it
    parts: tuple = ("q", "k", "v", "out")  # an MHA's projections trained (LyCORIS' ia3 preset: k and v)
    override: dict | None = None  # a LyCORIS preset file's map entry for this layer (dim, alpha, LoKr factors)


def _sd_unet_kohya(name: str, cls_path: list[str]) -> str | None:
    """ldm UNet module name (underscored, without 'diffusion_model_') -> kohya SD1/SD2 diffusers-tree name."""
    m = re.match(r"input_blocks_(\d+)_(\d+)_(.+)$", name)
    if m:
        n, sub, tail = int(m.group(1)), int(m.group(2)), m.group(3)
        blk, j = (n - 1) // 3, (n - 1) % 3
        if j == 2:  # downsampler
            return f"down_blocks_{blk}_downsamplers_0_conv" if tail == "op" else None
        if sub == 1:
            return f"down_blocks_{blk}_attentions_{j}_{tail}"
        return f"down_blocks_{blk}_resnets_{j}_{_RESNET_TAIL.get(tail, tail)}"
    m = re.match(r"middle_block_(\d+)_(.+)$", name)
    if m:
        k, tail = int(m.group(1)), m.group(2)
        if k == 1:
            return f"mid_block_attentions_0_{tail}"
        return f"mid_block_resnets_{k // 2}_{_RESNET_TAIL.get(tail, tail)}"
    m = re.match(r"output_blocks_(\d+)_(\d+)_(.+)$", name)
    if m:
        n, sub, tail = int(m.group(1)), int(m.group(2)), m.group(3)
        blk, j = n // 3, n % 3
        if "Upsample" in cls_path:
            return f"up_blocks_{blk}_upsamplers_0_conv"
        if sub == 0:
            return f"up_blocks_{blk}_resnets_{j}_{_RESNET_TAIL.get(tail, tail)}"
        return f"up_blocks_{blk}_attentions_{j}_{tail}"
    return None


def _walk(root: nn.Module, prefix: str = "", classes: tuple = ()):
    """Yield (dotted name, module, class names of ancestors)."""
    stack = [(prefix, root, list(classes))]
    while stack:
        name, mod, anc = stack.pop()
        yield name, mod, anc
        here = anc + [type(mod).__name__]
        for child_name, child in reversed(list(mod.named_children())):
            stack.append((f"{name}.{child_name}" if name else child_name, child, here))


def _unet_target(dotted: str, mod: nn.Module, anc: list[str], family: str) -> TrainTarget | None:
    """The TrainTarget (kohya name, kind) of one UNet Linear/Conv2d/norm; None where kohya's tree has no name for
    it."""
    under = dotted.replace(".", "_")
    if family == "sdxl":
        kohya = "lora_unet_" + under
    else:
        tail = _SD_UNET_EXTRA.get(under) or _sd_unet_kohya(under, anc + [type(mod).__name__])
        if tail is None:
            return None
        kohya = "lora_unet_" + tail
    return unet_target_named(kohya, dotted, mod, family)


def unet_target_named(kohya: str, dotted: str, mod: nn.Module, family: str) -> TrainTarget:
    """The TrainTarget of a UNet Linear/Conv2d/norm at host path ``dotted`` saved as ``kohya``."""
    under = dotted.replace(".", "_")
    host_name = "diffusion_model_" + under
    if isinstance(mod, NORMS):
        return TrainTarget(kohya, host_name, mod, "unet", "norm")
    is_1x1 = isinstance(mod, nn.Linear) or mod.kernel_size == (1, 1)
    kind = "linear" if isinstance(mod, nn.Linear) else ("conv1x1" if is_1x1 else "conv")
    save_4d = family == "sd2" and isinstance(mod, nn.Linear) and re.search(r"_proj_(in|out)$", under) is not None
    return TrainTarget(kohya, host_name, mod, "unet", kind, save_4d)


# SD1/SD2 UNet layers outside the blocks -> their names in sd-scripts' (diffusers-tree) UNet
_SD_UNET_EXTRA = {"input_blocks_0_0": "conv_in", "out_2": "conv_out", "time_embed_0": "time_embedding_linear_1",
                  "time_embed_2": "time_embedding_linear_2"}


def unet_targets(diffusion_model: nn.Module, family: str, conv: bool = False) -> list[TrainTarget]:
    out: list[TrainTarget] = []
    for dotted, mod, anc in _walk(diffusion_model):
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        in_transformer = any(c in _TRANSFORMER_CLASSES for c in anc)
        in_conv_block = any(c in _CONV_BLOCK_CLASSES for c in anc) and not in_transformer
        is_1x1 = isinstance(mod, nn.Linear) or mod.kernel_size == (1, 1)
        if not (in_transformer or (conv and in_conv_block)):
            continue
        # inside transformers kohya wraps Linear and 1x1 conv only
        if in_transformer and not is_1x1:
            continue
        t = _unet_target(dotted, mod, anc, family)
        if t is not None:
            out.append(t)
    return out


# ldm's and sgm's attention classes (sd-scripts' UNets call theirs CrossAttention)
_ATTENTION_CLASSES = ("CrossAttention", "MemoryEfficientCrossAttention")


def kohya_oft_targets(diffusion_model: nn.Module, family: str, all_linear: bool, conv: bool) -> list[TrainTarget]:
    """sd-scripts' OFTNetwork (networks.oft): the Linear layers of the attention modules, or with ``all_linear``
    every Linear and 1x1 conv of the transformer blocks; with ``conv`` every Linear and conv of the resnets and
    down/upsamplers too. Named oft_unet_*, as sd-scripts names them."""
    out: list[TrainTarget] = []
    for t in unet_targets(diffusion_model, family, conv=conv):
        if t.kohya_name.startswith("lora_unet_"):
            t = dataclasses.replace(t, kohya_name="oft_unet_" + t.kohya_name[len("lora_unet_"):])
        out.append(t)
    if all_linear:
        return out
    # transformer layers outside the attention modules are left out
    left_out = {id(m) for _, m, anc in _walk(diffusion_model)
                if any(c in _TRANSFORMER_CLASSES for c in anc) and not any(c in _ATTENTION_CLASSES for c in anc)}
    return [t for t in out if id(t.module) not in left_out]


# LyCORIS presets as they land on sd-scripts' UNets: (block kinds wrapped, the four named layers outside the
# blocks (conv_in/conv_out/time embedding; SD1/SD2 only: sd-scripts' SDXL UNet has sgm names), 3x3 convs on)
_LYCO_PRESETS = {
    "full": ({"transformer", "resnet", "sampler"}, ("conv_in", "conv_out", "time"), True),
    "unet-only": ({"transformer", "resnet", "sampler"}, ("conv_in", "conv_out", "time"), True),
    "full-lin": ({"transformer", "resnet"}, ("time",), False),
    "attn-mlp": ({"transformer"}, (), False),
    "unet-transformer-only": ({"transformer"}, (), False),
    "attn-only": ({"attention"}, (), False),
    "unet-convblock-only": ({"resnet", "sampler"}, ("conv_in", "conv_out"), True),
    # LyCORIS' ia3 preset names to_k, to_v and ff.net.2 (IA3 on its input): LyCORIS 4 matches the names from the
    # start of the module path, which finds none of them, so the layers are those the preset names
    "ia3": ({"ia3"}, (), False),
}
LYCO_TE = {"full": "all", "full-lin": "all", "attn-mlp": "all", "attn-only": "attention", "ia3": "ia3"}
# (other presets: no text encoder)
IA3_ON_INPUT = ("_ff_net_2", "_mlp_fc2")  # the ia3 preset's layers whose input channels IA3 scales


def lyco_preset_convs(preset: str) -> bool:
    return _LYCO_PRESETS[preset][2]


def lycoris_unet_targets(diffusion_model: nn.Module, family: str, preset: str, conv: bool,
                         norms: bool = False) -> list[TrainTarget]:
    """LyCORIS' layer choice (lycoris.kohya on sd-scripts): every Linear and 1x1 conv in the preset's blocks,
    3x3 convs too when ``conv`` (conv_dim > 0 and the preset allows convs), their GroupNorm/LayerNorm layers too
    with ``norms`` (train_norm)."""
    kinds, names, _ = _LYCO_PRESETS[preset]
    out: list[TrainTarget] = []
    for dotted, mod, anc in _walk(diffusion_model):
        is_norm = isinstance(mod, NORMS)
        if not (isinstance(mod, (nn.Linear, nn.Conv2d)) or is_norm and norms):
            continue
        under = dotted.replace(".", "_")
        in_transformer = any(c in _TRANSFORMER_CLASSES for c in anc)
        if family != "sdxl" and under in _SD_UNET_EXTRA:
            extra = _SD_UNET_EXTRA[under]  # the preset names the two time-embedding layers together
            wanted = ("time" if extra.startswith("time_") else extra) in names
        elif in_transformer:
            wanted = ("transformer" in kinds or ("attention" in kinds and re.search(r"\.attn[12]\.", dotted))
                      or ("ia3" in kinds and re.search(r"\.(attn[12]\.to_[kv]|ff\.net\.2)$", dotted)))
        elif any(c == "ResBlock" for c in anc):
            wanted = "resnet" in kinds
        elif any(c in ("Downsample", "Upsample") for c in anc):
            wanted = "sampler" in kinds
        else:
            wanted = False
        is_1x1 = is_norm or isinstance(mod, nn.Linear) or mod.kernel_size == (1, 1)
        if not wanted or (not is_1x1 and not conv):
            continue
        t = _unet_target(dotted, mod, anc, family)
        if t is not None:
            out.append(t)
    return out


def _hf_clip_targets(transformer: nn.Module, host_prefix: str, kohya_prefix: str, component: str,
                     layers: str = "all") -> list[TrainTarget]:
    """HF CLIPTextModel (SD1 TE, SDXL TE1): q/k/v/out_proj and fc1/fc2 of every encoder layer (``layers``:
    "attention" without the MLP, "ia3": k_proj, v_proj and fc2)."""
    out = []
    for dotted, mod in transformer.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if not re.search(r"encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$", dotted):
            continue
        if (layers == "attention" and ".mlp." in dotted
                or layers == "ia3" and not re.search(r"(self_attn\.[kv]_proj|mlp\.fc2)$", dotted)):
            continue
        under = hf_clip_name(dotted).replace(".", "_")
        out.append(TrainTarget(kohya_prefix + under, host_prefix + "transformer_" + under, mod, component, "linear"))
    return out


def _open_clip_targets(model: nn.Module, host_prefix: str, kohya_prefix: str, component: str,
                       n_layers_used: int, layers: str = "all") -> list[TrainTarget]:
    """open_clip text tower (SD2 TE, SDXL TE2): the MHA (q/k/v + out_proj) and c_fc/c_proj of each resblock
    (``layers`` as in _hf_clip_targets)."""
    out = []
    for i, block in enumerate(model.transformer.resblocks):
        if i >= n_layers_used:
            break
        base = f"{host_prefix}model_transformer_resblocks_{i}_"
        kbase = f"{kohya_prefix}text_model_encoder_layers_{i}_"
        out.append(TrainTarget(kbase + "self_attn", base + "attn", block.attn, component, "mha",
                               parts=("k", "v") if layers == "ia3" else ("q", "k", "v", "out")))
        if layers == "attention":
            continue
        for child, tail in (("c_fc", "mlp_c_fc"), ("c_proj", "mlp_c_proj")):
            if layers == "ia3" and child == "c_fc":
                continue
            out.append(TrainTarget(kbase + _OPENCLIP_TAIL[tail], base + tail, getattr(block.mlp, child), component, "linear"))
    return out


def text_encoder_targets(sd_model, family: str, layers: str = "all") -> list[TrainTarget]:
    """kohya's text-encoder layers (attention and MLP); ``layers``: "all", "attention" (LyCORIS' attn-only
    preset) or "ia3" (LyCORIS' ia3 preset: k, v and fc2)."""
    a = layers
    if family == "sdxl":
        emb = sd_model.conditioner.embedders
        te1 = getattr(emb[0], "wrapped", emb[0])
        te2 = getattr(emb[1], "wrapped", emb[1])
        # TE2 feeds both the penultimate hidden state and the pooled (last-layer) output, so every layer trains.
        return (_hf_clip_targets(te1.transformer, "0_", "lora_te1_", "te1", a)
                + _open_clip_targets(te2.model, "1_", "lora_te2_", "te2", len(te2.model.transformer.resblocks), a))
    cond = getattr(sd_model.cond_stage_model, "wrapped", sd_model.cond_stage_model)
    if family == "sd2":
        n = len(cond.model.transformer.resblocks) - getattr(cond, "layer_idx", 1)
        # Layers past the one SD2 reads never see a gradient; kohya leaves them out (23 of 24).
        return _open_clip_targets(cond.model, "", "lora_te_", "te1", n, a)
    return _hf_clip_targets(cond.transformer, "", "lora_te_", "te1", a)
