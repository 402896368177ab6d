"""File keys -> A1111 module names (lora-formats.md §4), driven by data tables.

A file key is `<module key>.<suffix>`. `split_key` finds the suffix (kohya keys have no dots in the module key,
diffusers/PEFT/ComfyUI keys do). `map_module_key` turns a module key into a `Target`: the name A1111's
`assign_network_names_to_compvis_modules` gives the layer (named_modules() path with '.' -> '_'), for the loaded
model's family. Steps: strip a known prefix (which tells the component), dotted -> underscore, then
- UNet: diffusers block names -> ldm/sgm names with the family's block layout (§4.3); compvis names pass through;
  the result is checked against the family's block layout so a wrong-family key gets a reason instead of a miss.
- Text encoders: HF CLIP names stay (SD1, SDXL TE1); for OpenCLIP (SD2, SDXL TE2) q/k/v become rows of the
  `attn` MultiheadAttention and the other tails are renamed (§4.4).
"""
import functools
import re
from dataclasses import dataclass

from .errors import UnsupportedFamilyError

FAMILIES = ("sd1", "sd2", "sdxl")
FAMILY_LABELS = {"sd1": "SD1.5", "sd2": "SD2.x", "sdxl": "SDXL"}


@dataclass(frozen=True)
class Target:
    name: str                 # A1111 layer name, e.g. diffusion_model_input_blocks_1_1_proj_in
    part: str | None = None   # 'q'|'k'|'v': row block of a MultiheadAttention's in_proj_weight; else None
    component: str = "unet"   # 'unet' | 'te1' (SD1/SD2 text encoder, SDXL CLIP-L) | 'te2' (SDXL OpenCLIP bigG)


# ----------------------------------------------------------------------------------------------------------------
# Suffixes (§4.2 + every network type of §2). Matched longest first, always after a '.'.
SUFFIXES = (
    # LoRA / LoCon, kohya & LyCORIS
    "lora_up.weight", "lora_down.weight", "lora_mid.weight",
    # PEFT (also with the adapter name, and without '.weight' as ComfyUI accepts)
    "lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_A.default.weight", "lora_B.default.weight",
    "lora_B.default.bias", "lora_A", "lora_B",
    "lora_magnitude_vector", "lora_magnitude_vector.weight", "lora_magnitude_vector.default.weight",
    # diffusers LoRACompatible era and transformers/diffusers TE
    "lora.up.weight", "lora.down.weight", "lora_linear_layer.up.weight", "lora_linear_layer.down.weight",
    # LoHa
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    # LoKr
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t1", "lokr_t2",
    # OFT / BOFT
    "oft_blocks", "oft_diag", "rescale",
    # GLoRA
    "a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight",
    # full / norm / IA3 / ComfyUI extras / A1 legacy bias
    "diff", "diff_b", "w_norm", "b_norm", "weight", "on_input", "set_weight", "reshape_weight", "bias",
    # shared
    "alpha", "scale", "dora_scale",
)
_SUFFIXES_LONGEST_FIRST = tuple(sorted(SUFFIXES, key=len, reverse=True))

# diffusers <= 0.20 attention-processor form: `...attn1.processor.to_q_lora.up.weight`; the '_lora' is glued to the
# projection name, so these suffixes start with '_' and the module key keeps `processor.to_q`.
PROCESSOR_SUFFIXES = ("_lora.up.weight", "_lora.down.weight")
_PROCESSOR_RE = re.compile(r"^(.*\.(?:processor\.)?to_(?:q|k|v|out))(_lora\.(?:up|down)\.weight)$")

# PEFT keys with a non-default adapter name: `lora_A.<adapter>.weight` -> treated as the `.default.` form.
_PEFT_ADAPTER_RE = re.compile(r"^(.*)\.(lora_[AB]|lora_magnitude_vector)\.(?!default\.)[A-Za-z0-9_\-]+\.(weight|bias)$")

# Module keys with these prefixes never contain dots (kohya/LyCORIS), so an unknown suffix splits at the first dot.
_UNDERSCORE_PREFIXES = ("lora_", "oft_", "lycoris_")


def hf_clip_name(dotted: str) -> str:
    """A module path inside a transformers ``CLIPTextModel`` in the 4.x layout (``text_model.encoder...``), the
    layout every LoRA file and the WebUI's layer names use; transformers 5 dropped the ``text_model`` level."""
    if dotted.startswith(("encoder.", "embeddings.", "final_layer_norm")):
        return "text_model." + dotted
    return dotted


def split_key(file_key):
    """(module_key, suffix) for one file key; suffix '' when the key has no recognisable suffix."""
    m = _PROCESSOR_RE.match(file_key)
    if m:
        return m.group(1), m.group(2)
    m = _PEFT_ADAPTER_RE.match(file_key)
    if m:
        return m.group(1), f"{m.group(2)}.default.{m.group(3)}"
    for suffix in _SUFFIXES_LONGEST_FIRST:
        if file_key.endswith("." + suffix) and len(file_key) > len(suffix) + 1:
            return file_key[: -len(suffix) - 1], suffix
    if "." not in file_key:
        return file_key, ""
    if file_key.startswith(_UNDERSCORE_PREFIXES):
        module_key, suffix = file_key.split(".", 1)
    else:
        module_key, suffix = file_key.rsplit(".", 1)
    return module_key, suffix


def group_modules(keys):
    """{module_key: {suffix: file_key}} for an iterable of file keys."""
    groups = {}
    for k in keys:
        module_key, suffix = split_key(k)
        groups.setdefault(module_key, {})[suffix] = k
    return groups


# ----------------------------------------------------------------------------------------------------------------
# Prefixes: (prefix, component code, dotted?). Component codes: 'unet'; 'te' = "the" text encoder (SD1/SD2, or
# TE1 in an SDXL file: §6.8); 'te1' = CLIP-L; 'te2' = OpenCLIP bigG; 'te_h' = OpenCLIP ViT-H (ComfyUI SD2).
PREFIXES = (
    ("lora_unet_", "unet", False),
    ("oft_unet_", "unet", False),          # kohya OFT; same names as lora_unet_ (A1 only handles the SDXL form)
    ("lycoris_", "unet", False),           # SimpleTuner LyCORIS, diffusers names
    ("lora_te1_", "te1", False),
    ("lora_te2_", "te2", False),
    ("lora_te_", "te", False),
    ("unet.", "unet", True),               # diffusers / PEFT
    ("text_encoder_2.", "te2", True),
    ("text_encoder.", "te", True),
    ("model.diffusion_model.", "unet", True),
    ("diffusion_model.", "unet", True),    # ComfyUI generic, compvis dotted
    ("text_encoders.clip_l.transformer.", "te1", True),   # ComfyUI generic
    ("text_encoders.clip_g.transformer.", "te2", True),
    ("text_encoders.clip_h.transformer.", "te_h", True),
)

# Prefixes of families we do not support; checked before PREFIXES ("lora_prior_unet_" starts with "lora_").
FOREIGN_PREFIXES = (
    ("lora_prior_unet_", "Stable Cascade"),
    ("lora_prior_te_", "Stable Cascade"),
    ("lora_te3_", "SD3"),
    ("lora_transformer_", "a DiT model (SD3, Flux, ...)"),
    ("transformer.", "a DiT model (SD3, Flux, PixArt, ...)"),
    ("base_model.model.", "a DiT model (PEFT on a transformer)"),
    ("text_encoders.t5xxl", "SD3/Flux (T5 text encoder)"),
)

# UNet-position roots that belong to other architectures (kohya writes Flux/SD3 keys with `lora_unet_`).
FOREIGN_UNET_ROOTS = (
    ("double_blocks_", "Flux"), ("single_blocks_", "Flux"), ("single_transformer_blocks_", "Flux"),
    ("joint_blocks_", "SD3"), ("x_block_", "SD3"), ("context_block_", "SD3"), ("context_embedder", "SD3/Flux"),
)

COMPONENT_LABELS = {
    "te": "text encoder", "te1": "CLIP-L text encoder (SDXL TE1)", "te2": "OpenCLIP bigG text encoder (SDXL TE2)",
    "te_h": "OpenCLIP ViT-H text encoder (SD2)",
}

# ----------------------------------------------------------------------------------------------------------------
# Text encoders. (family, component code) -> (Target.component, naming, A1111 name prefix, number of layers)
TE_TARGETS = {
    ("sd1", "te"): ("te1", "clip", "transformer_", 12),
    ("sd1", "te1"): ("te1", "clip", "transformer_", 12),      # A1 falls back lora_te1_ -> transformer_ too
    ("sd2", "te"): ("te1", "openclip", "model_", 24),
    ("sd2", "te_h"): ("te1", "openclip", "model_", 24),
    ("sdxl", "te"): ("te1", "clip", "0_transformer_", 12),    # lora_te_ in an SDXL file is CLIP-L (CU does this)
    ("sdxl", "te1"): ("te1", "clip", "0_transformer_", 12),
    ("sdxl", "te2"): ("te2", "openclip", "1_model_", 32),
}

_TE_LAYER_RE = re.compile(r"^text_model_encoder_layers_(\d+)_(.+)$")

# Per-layer tails in HF CLIP naming (what every writer uses, even for OpenCLIP towers).
CLIP_LAYER_TAILS = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj",
                    "mlp_fc1", "mlp_fc2", "layer_norm1", "layer_norm2")
# Old diffusers attention-processor TE names (`self_attn.to_q_lora.*`).
CLIP_TAIL_ALIASES = {"self_attn_to_q": "self_attn_q_proj", "self_attn_to_k": "self_attn_k_proj",
                     "self_attn_to_v": "self_attn_v_proj", "self_attn_to_out": "self_attn_out_proj"}
# HF tail -> (OpenCLIP tail, MHA part)
OPENCLIP_LAYER_TAILS = {
    "self_attn_q_proj": ("attn", "q"), "self_attn_k_proj": ("attn", "k"), "self_attn_v_proj": ("attn", "v"),
    "self_attn_out_proj": ("attn_out_proj", None),
    "mlp_fc1": ("mlp_c_fc", None), "mlp_fc2": ("mlp_c_proj", None),
    "layer_norm1": ("ln_1", None), "layer_norm2": ("ln_2", None),
}
# Modules outside the layers: HF name -> name per naming (None: not a layer there, with the reason).
TE_TOP_LEVEL = {
    "text_model_final_layer_norm": {"clip": "text_model_final_layer_norm", "openclip": "ln_final"},
    "text_model_embeddings_token_embedding": {"clip": "text_model_embeddings_token_embedding",
                                              "openclip": "token_embedding"},
    "text_model_embeddings_position_embedding": {"clip": "text_model_embeddings_position_embedding",
                                                 "openclip": None},
    "text_projection": {"clip": None, "openclip": None},
}
TE_TOP_LEVEL_WHY_NOT = {
    "text_model_embeddings_position_embedding": "OpenCLIP's positional embedding is a parameter, not a layer",
    "text_projection": "the text projection is not a layer A1111 patches (a parameter in OpenCLIP; "
                       "absent from SD1's CLIP text model)",
}

# ----------------------------------------------------------------------------------------------------------------
# UNet block layouts (§4.3 "Block layouts"). Each block lists its sub-modules in order:
# conv = conv_in, res = ResBlock, attnN = SpatialTransformer with N transformer blocks, down/up = resamplers.
_SD12_LAYOUT = dict(
    input=["conv", "res attn1", "res attn1", "down", "res attn1", "res attn1", "down", "res attn1", "res attn1",
           "down", "res", "res"],
    middle="res attn1 res",
    output=["res", "res", "res up", "res attn1", "res attn1", "res attn1 up", "res attn1", "res attn1",
            "res attn1 up", "res attn1", "res attn1", "res attn1"],
    extras=("time_embed_0", "time_embed_2", "out_0", "out_2"),
)
_SDXL_LAYOUT = dict(
    input=["conv", "res", "res", "down", "res attn2", "res attn2", "down", "res attn10", "res attn10"],
    middle="res attn10 res",
    output=["res attn10", "res attn10", "res attn10 up", "res attn2", "res attn2", "res attn2 up", "res", "res",
            "res"],
    extras=("time_embed_0", "time_embed_2", "out_0", "out_2", "label_emb_0_0", "label_emb_0_2"),
)
UNET_LAYOUTS = {"sd1": _SD12_LAYOUT, "sd2": _SD12_LAYOUT, "sdxl": _SDXL_LAYOUT}

RES_TAILS = ("in_layers_0", "in_layers_2", "emb_layers_1", "out_layers_0", "out_layers_3", "skip_connection")
ATTN_TAILS = ("norm", "proj_in", "proj_out")
TBLOCK_TAILS = tuple(f"{a}_{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out_0")) + (
    "ff_net_0_proj", "ff_net_2", "norm1", "norm2", "norm3")
_TBLOCK_RE = re.compile(r"^transformer_blocks_(\d+)_(.+)$")

# diffusers resnet tails -> ldm (§4.3 table)
RESNET_TAIL_RENAMES = {"norm1": "in_layers_0", "conv1": "in_layers_2", "time_emb_proj": "emb_layers_1",
                       "norm2": "out_layers_0", "conv2": "out_layers_3", "conv_shortcut": "skip_connection"}
# Old attention-processor UNet names (`attn1.processor.to_q_lora`) -> current diffusers tails.
UNET_TAIL_ALIASES = {"processor_to_q": "to_q", "processor_to_k": "to_k", "processor_to_v": "to_v",
                     "processor_to_out": "to_out_0", "processor_to_out_0": "to_out_0"}
_UNET_ALIAS_RE = re.compile(r"(attn[12])_(processor_to_(?:q|k|v|out_0|out))$")

# diffusers layers outside the blocks -> ldm/sgm
DIFFUSERS_FIXED = {
    "conv_in": "input_blocks_0_0", "conv_out": "out_2", "conv_norm_out": "out_0",
    "time_embedding_linear_1": "time_embed_0", "time_embedding_linear_2": "time_embed_2",
    "add_embedding_linear_1": "label_emb_0_0", "add_embedding_linear_2": "label_emb_0_2",
}


def _up_sub(layout, out_index):
    """Sub-index of the upsampler in output block `out_index`: right after the attention if the block has one."""
    if out_index >= len(layout["output"]):
        return 1
    return 2 if any(k.startswith("attn") for k in layout["output"][out_index].split()) else 1


# diffusers block pattern -> (ldm block, tail). `L` is the family layout (needed for the upsampler sub-index).
DIFFUSERS_BLOCK_RULES = (
    (re.compile(r"^down_blocks_(\d+)_resnets_(\d+)_(.+)$"),
     lambda L, i, j, t: (f"input_blocks_{1 + 3 * int(i) + int(j)}_0", RESNET_TAIL_RENAMES.get(t, t))),
    (re.compile(r"^down_blocks_(\d+)_attentions_(\d+)_(.+)$"),
     lambda L, i, j, t: (f"input_blocks_{1 + 3 * int(i) + int(j)}_1", t)),
    (re.compile(r"^down_blocks_(\d+)_downsamplers_0_conv$"),
     lambda L, i: (f"input_blocks_{3 + 3 * int(i)}_0", "op")),
    (re.compile(r"^mid_block_resnets_(\d+)_(.+)$"),
     lambda L, j, t: (f"middle_block_{2 * int(j)}", RESNET_TAIL_RENAMES.get(t, t))),
    (re.compile(r"^mid_block_attentions_0_(.+)$"),
     lambda L, t: ("middle_block_1", t)),
    (re.compile(r"^up_blocks_(\d+)_resnets_(\d+)_(.+)$"),
     lambda L, i, j, t: (f"output_blocks_{3 * int(i) + int(j)}_0", RESNET_TAIL_RENAMES.get(t, t))),
    (re.compile(r"^up_blocks_(\d+)_attentions_(\d+)_(.+)$"),
     lambda L, i, j, t: (f"output_blocks_{3 * int(i) + int(j)}_1", t)),
    (re.compile(r"^up_blocks_(\d+)_upsamplers_0_conv$"),
     lambda L, i: (f"output_blocks_{3 * int(i) + 2}_{_up_sub(L, 3 * int(i) + 2)}", "conv")),
)
DIFFUSERS_ROOTS = ("down_blocks_", "mid_block_", "up_blocks_") + tuple(DIFFUSERS_FIXED)
COMPVIS_ROOTS = ("input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "label_emb_", "out_")

_COMPVIS_RE = (
    re.compile(r"^(input_blocks)_(\d+)_(\d+)(?:_(.+))?$"),
    re.compile(r"^(output_blocks)_(\d+)_(\d+)(?:_(.+))?$"),
    re.compile(r"^(middle_block)_()(\d+)(?:_(.+))?$"),
)


def _check_compvis(name, family):
    """'' if `name` (underscore compvis, no diffusion_model_ prefix) is a layer of `family`'s UNet, else why not."""
    layout = UNET_LAYOUTS[family]
    if name in layout["extras"]:
        return ""
    for rx in _COMPVIS_RE:
        m = rx.match(name)
        if m:
            break
    else:
        return f"'{name}' is not a UNet layer name"
    kind, idx, sub, tail = m.group(1), m.group(2), int(m.group(3)), m.group(4)
    if kind == "middle_block":
        block, where = layout["middle"], "middle_block"
    else:
        blocks = layout["input" if kind == "input_blocks" else "output"]
        if int(idx) >= len(blocks):
            return f"{label(family)} has no {kind}_{idx} (only {len(blocks)})"
        block, where = blocks[int(idx)], f"{kind}_{idx}"
    subs = block.split()
    if sub >= len(subs):
        return f"{label(family)} has no {where}_{sub}"
    sub_kind = subs[sub]
    if sub_kind == "conv":
        return "" if tail is None else f"{where}_{sub} is conv_in; it has no '{tail}'"
    if sub_kind in ("down", "up"):
        want = "op" if sub_kind == "down" else "conv"
        return "" if tail == want else f"{where}_{sub} is a {sub_kind}sampler; its only layer is '{want}'"
    if tail is None:
        return f"{where}_{sub} is a block, not a layer"
    if sub_kind == "res":
        return "" if tail in RES_TAILS else f"{where}_{sub} is a ResBlock in {label(family)}; no layer '{tail}'"
    depth = int(sub_kind[len("attn"):])
    if tail in ATTN_TAILS:
        return ""
    tm = _TBLOCK_RE.match(tail or "")
    if tm and tm.group(2) in TBLOCK_TAILS:
        if int(tm.group(1)) < depth:
            return ""
        return f"{where}_{sub} has {depth} transformer block{'s' if depth > 1 else ''} in {label(family)}"
    return f"{where}_{sub} is a transformer in {label(family)}; no layer '{tail}'"


def label(family):
    return FAMILY_LABELS.get(family, str(family))


def _diffusers_to_compvis(name, family):
    """ldm/sgm name for a diffusers-style UNet name (underscore form), or None if no rule matches."""
    if name in DIFFUSERS_FIXED:
        return DIFFUSERS_FIXED[name]
    layout = UNET_LAYOUTS[family]
    for rx, make in DIFFUSERS_BLOCK_RULES:
        m = rx.match(name)
        if m:
            block, tail = make(layout, *m.groups())
            return f"{block}_{tail}"
    return None


def _unet_compvis_name(rest, family):
    """compvis name (no diffusion_model_ prefix) of an underscore UNet name, or None if no rule knows it."""
    if rest.startswith(COMPVIS_ROOTS):
        return rest
    if rest.startswith(DIFFUSERS_ROOTS):
        return _diffusers_to_compvis(rest, family)
    return None


def _map_unet(rest, family):
    for root, fam in FOREIGN_UNET_ROOTS:
        if rest.startswith(root):
            return None, f"{fam} layer name ('{rest}'); this extension supports SD1.x, SD2.x and SDXL only"
    m = _UNET_ALIAS_RE.search(rest)
    if m:
        rest = rest[: m.start(2)] + UNET_TAIL_ALIASES[m.group(2)]
    name = _unet_compvis_name(rest, family)
    if name is None:
        return None, f"unknown UNet layer name '{rest}'"
    why = _check_compvis(name, family)
    if why:
        others = sorted({label(f) for f in FAMILIES if f != family
                         and (n := _unet_compvis_name(rest, f)) is not None and not _check_compvis(n, f)})
        hint = f"; {'/'.join(others)}-only block" if others else ""
        return None, f"'diffusion_model_{name}' is not a module of {label(family)} ({why}){hint}"
    return Target("diffusion_model_" + name, None, "unet"), ""


def _map_te(code, rest, family, original):
    spec = TE_TARGETS.get((family, code))
    if spec is None:
        return None, f"'{original}' is for the {COMPONENT_LABELS[code]}, which {label(family)} does not have"
    component, naming, prefix, n_layers = spec
    m = _TE_LAYER_RE.match(rest)
    if m:
        layer, tail = int(m.group(1)), m.group(2)
        tail = CLIP_TAIL_ALIASES.get(tail, tail)
        if tail not in CLIP_LAYER_TAILS:
            return None, f"unknown text-encoder layer '{tail}' (expected one of {', '.join(CLIP_LAYER_TAILS)})"
        if layer >= n_layers:
            return None, (f"text encoder layer {layer} does not exist in {label(family)} "
                          f"({n_layers} layers, 0..{n_layers - 1})")
        if naming == "clip":
            return Target(f"{prefix}text_model_encoder_layers_{layer}_{tail}", None, component), ""
        new_tail, part = OPENCLIP_LAYER_TAILS[tail]
        return Target(f"{prefix}transformer_resblocks_{layer}_{new_tail}", part, component), ""
    if rest in TE_TOP_LEVEL:
        new = TE_TOP_LEVEL[rest][naming]
        if new is None:
            return None, TE_TOP_LEVEL_WHY_NOT[rest]
        return Target(prefix + new, None, component), ""
    return None, f"unknown text-encoder layer name '{rest}'"


@functools.lru_cache(maxsize=65536)
def map_module_key_with_reason(module_key, family):
    """(Target, '') for a module key that names a layer of `family`'s model, else (None, human reason)."""
    if family not in FAMILIES:
        raise UnsupportedFamilyError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    for prefix, fam in FOREIGN_PREFIXES:
        if module_key.startswith(prefix):
            return None, f"{fam} key (prefix '{prefix}'); this extension supports SD1.x, SD2.x and SDXL only"
    for prefix, code, dotted in PREFIXES:
        if module_key.startswith(prefix):
            rest = module_key[len(prefix):]
            if dotted:
                rest = rest.replace(".", "_")
            if code == "unet":
                return _map_unet(rest, family)
            return _map_te(code, rest, family, module_key)
    return None, (f"unknown key prefix in '{module_key}' (not a kohya, LyCORIS, diffusers/PEFT or ComfyUI "
                  f"SD1/SD2/SDXL key)")


def map_module_key(module_key, family):
    """Target for a module key, or None when it names no layer of `family`'s model."""
    return map_module_key_with_reason(module_key, family)[0]


def component_of(module_key):
    """'unet', 'te', 'te1', 'te2', 'te_h' from the key prefix alone; None for unknown/foreign prefixes."""
    for prefix, _ in FOREIGN_PREFIXES:
        if module_key.startswith(prefix):
            return None
    for prefix, code, _ in PREFIXES:
        if module_key.startswith(prefix):
            return code
    return None
