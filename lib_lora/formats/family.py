"""Which base model a LoRA was made for (lora-formats.md §5): metadata, verified against key names and shapes.

Metadata is trusted only as far as the keys allow: files are often re-saved with stale metadata, so when the keys
clearly say another family the keys win (and the evidence says so). Families we don't support (SD3, Flux,
Cascade, other DiTs, the SDXL refiner) are reported in `refused`.
"""
import os
import re
from dataclasses import dataclass

from torch import nn

from .keymap import FAMILIES, FOREIGN_PREFIXES, FOREIGN_UNET_ROOTS, PREFIXES, label, map_module_key_with_reason, \
    split_key

SUPPORTED_TEXT = "this extension supports SD1.x, SD2.x and SDXL only"

# ss_base_model_version values (kohya, ai-toolkit). Exact values first, then prefixes. None = no claim.
BASE_VERSION_EXACT = {
    "sd_v1": "sd1", "sd_v1_v": "sd1", "sd_1.5": "sd1", "sd_1.4": "sd1",
    "sd_v2": "sd2", "sd_v2_v": "sd2", "sd_2.0": "sd2", "sd_2.1": "sd2",
    "sdxl_base_v1-0": "sdxl", "sdxl_1.0": "sdxl",
}
BASE_VERSION_PREFIX = (("sdxl_", "sdxl"), ("sd_v1", "sd1"), ("sd_1", "sd1"), ("sd_v2", "sd2"), ("sd_2", "sd2"))
BASE_VERSION_REFUSED = {
    "medium": "SD3", "large": "SD3", "5-large": "SD3", "5-medium": "SD3", "3-medium": "SD3",
    "flux1": "Flux", "chroma": "Flux (Chroma)", "lumina2": "Lumina 2", "hunyuan-image-2.1": "HunyuanImage 2.1",
}
BASE_VERSION_REFUSED_PREFIX = (("sd3", "SD3"), ("flux", "Flux"), ("stable_cascade", "Stable Cascade"),
                               ("hunyuan", "Hunyuan"), ("lumina", "Lumina"), ("wan", "Wan"), ("qwen", "Qwen-Image"))

# modelspec.architecture, part before '/': prefix -> family, or ('refuse', name). First match wins.
MODELSPEC_ARCH = (
    ("stable-diffusion-xl-v1-refiner", ("refuse", "SDXL refiner")),
    ("stable-diffusion-xl", "sdxl"),
    ("stable-diffusion-v1", "sd1"),
    ("stable-diffusion-v2", "sd2"),
    ("stable-diffusion-3", ("refuse", "SD3")),
    ("stable-cascade", ("refuse", "Stable Cascade")),
    ("flux", ("refuse", "Flux")),
    ("chroma", ("refuse", "Flux (Chroma)")),
    ("lumina", ("refuse", "Lumina 2")),
    ("hunyuan", ("refuse", "Hunyuan")),
    ("anima", ("refuse", "Anima")),
    ("pixart", ("refuse", "PixArt")),
    ("auraflow", ("refuse", "AuraFlow")),
    ("wan", ("refuse", "Wan")),
    ("qwen", ("refuse", "Qwen-Image")),
)

# Key fragments of other architectures (§5.2 "Refuse" rows). Checked on the whole file key.
FOREIGN_KEY_PATTERNS = (
    (re.compile(r"double_blocks|single_blocks|single_transformer_blocks|img_attn|txt_attn|img_mlp|txt_mlp"),
     "Flux"),
    (re.compile(r"(?:^|[._])linear[12](?:[._]|$)|modulation"), "Flux"),
    (re.compile(r"joint_blocks|x_block|context_block|add_q_proj|add_k_proj|context_embedder"), "SD3"),
    (re.compile(r"img_mod|txt_mod"), "Qwen-Image"),
    (re.compile(r"(?:^|[._])blocks[._]\d+[._](?:self_attn|cross_attn)[._]"), "Wan"),
    (re.compile(r"layers[._]\d+[._]attention[._]qkv"), "Lumina 2"),
)

# Context width of attn2 to_k/to_v (the in-features of the LoRA's down matrix) -> family (§3, §5.2).
CONTEXT_DIM = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
REFINER_CONTEXT_DIM = 1280
# Text-encoder hidden width -> families whose (first) text encoder has it.
TE_WIDTH = {768: ("sd1", "sdxl"), 1024: ("sd2",), 1280: ("sdxl",)}

# Suffixes whose tensor is (rank, in_features) for a Linear target.
DOWN_SUFFIXES = ("lora_down.weight", "lora_A.weight", "lora_A.default.weight", "lora_A", "lora.down.weight",
                 "lora_linear_layer.down.weight", "_lora.down.weight", "hada_w1_b", "hada_w2_b")
FULL_SUFFIXES = ("diff",)  # (out, in)

# Prefixes that are by themselves SDXL evidence (a second text encoder exists only in SDXL).
SDXL_ONLY_PREFIXES = ("lora_te1_", "lora_te2_", "text_encoder_2.", "text_encoders.clip_g.")

_ATTN2_KV = re.compile(r"attn2[._](?:processor[._])?to_[kv]$")
_TE_WIDTH_TAIL = re.compile(r"(?:mlp[._]fc1|self_attn[._](?:q_proj|k_proj|v_proj|to_q|to_k|to_v))$")


@dataclass
class FamilyInfo:
    family: str | None              # 'sd1' | 'sd2' | 'sdxl' | None (ambiguous or refused)
    evidence: str                   # human-readable: what was looked at and what it said
    refused: str | None = None      # e.g. 'Flux', 'SD3': a family this extension does not support
    metadata_family: str | None = None
    key_candidates: tuple = ()      # families the keys/shapes allow

    def refusal_message(self, filename):
        return (f"'{os.path.basename(str(filename))}' is a {self.refused} LoRA (detected from {self.evidence}); "
                f"{SUPPORTED_TEXT}.")


def family_from_metadata(metadata):
    """(family | None, refused | None, evidence text) from ss_base_model_version / ss_v2 / modelspec.architecture."""
    metadata = metadata or {}
    base = (metadata.get("ss_base_model_version") or "").strip()
    if base:
        fam = BASE_VERSION_EXACT.get(base)
        if fam is None:
            fam = next((f for p, f in BASE_VERSION_PREFIX if base.startswith(p)), None)
        if fam:
            return fam, None, f"metadata ss_base_model_version={base}"
        ref = BASE_VERSION_REFUSED.get(base) or next(
            (n for p, n in BASE_VERSION_REFUSED_PREFIX if base.lower().startswith(p)), None)
        if ref:
            return None, ref, f"metadata ss_base_model_version={base}"
    arch = (metadata.get("modelspec.architecture") or "").strip()
    if arch:
        head = arch.split("/")[0].lower()
        for prefix, result in MODELSPEC_ARCH:
            if head.startswith(prefix):
                if isinstance(result, tuple):
                    return None, result[1], f"metadata modelspec.architecture={arch}"
                return result, None, f"metadata modelspec.architecture={arch}"
    v2 = metadata.get("ss_v2")
    if v2 == "True":
        return "sd2", None, "metadata ss_v2=True"
    if v2 == "False" and not base and not arch:
        return "sd1", None, "metadata ss_v2=False (old kohya file without ss_base_model_version)"
    if base:
        return None, None, f"metadata ss_base_model_version={base} (unknown value)"
    return None, None, ""


def _foreign(file_key):
    for prefix, fam in FOREIGN_PREFIXES:
        if file_key.startswith(prefix):
            return fam, f"key prefix '{prefix}' ({file_key})"
    module_key, _ = split_key(file_key)
    for prefix, code, _dotted in PREFIXES:
        if code == "unet" and module_key.startswith(prefix):
            rest = module_key[len(prefix):].replace(".", "_")
            for root, fam in FOREIGN_UNET_ROOTS:
                if rest.startswith(root):
                    return fam, f"key {file_key}"
    for rx, fam in FOREIGN_KEY_PATTERNS:
        if rx.search(module_key):
            return fam, f"key {file_key}"
    return None


def _in_features(suffix, shape):
    if len(shape) != 2:
        return None
    if suffix in DOWN_SUFFIXES or suffix in FULL_SUFFIXES:
        return int(shape[1])
    return None


def _short(fams):
    return "/".join(label(f) for f in FAMILIES if f in fams)


def families_from_keys(shapes):
    """(refused | None, candidate families (tuple), list of evidence strings) from key names and shapes."""
    evidence = []
    for k in shapes:
        hit = _foreign(k)
        if hit:
            return hit[0], (), [hit[1]]
    candidates = set(FAMILIES)
    seen_struct = {}

    for file_key, shape in shapes.items():
        module_key, suffix = split_key(file_key)
        if module_key.startswith(SDXL_ONLY_PREFIXES) and "sdxl-prefix" not in seen_struct:
            seen_struct["sdxl-prefix"] = True
            candidates &= {"sdxl"}
            evidence.append(f"'{module_key.split('.')[0][:40]}…' keys exist only in SDXL files (two text encoders)")
        valid = frozenset(f for f in FAMILIES if map_module_key_with_reason(module_key, f)[0] is not None)
        if valid and valid != frozenset(FAMILIES):
            if valid not in seen_struct:
                seen_struct[valid] = module_key
                evidence.append(f"'{module_key}' exists only in {_short(valid)}")
            candidates &= valid
        width = _in_features(suffix, shape)
        if width is None:
            continue
        if _ATTN2_KV.search(module_key):
            if width == REFINER_CONTEXT_DIM:
                return "SDXL refiner", (), [f"cross-attention width 1280 ({module_key})"]
            fam = CONTEXT_DIM.get(width)
            tag = ("ctx", width)
            if fam and tag not in seen_struct:
                seen_struct[tag] = module_key
                evidence.append(f"cross-attention width {width} ({label(fam)})")
            if fam:
                candidates &= {fam}
        elif _TE_WIDTH_TAIL.search(module_key):
            fams = TE_WIDTH.get(width)
            if fams and module_key.startswith(("lora_te_", "text_encoder.", "text_encoders.clip_h.")):
                tag = ("te", width)
                if tag not in seen_struct:
                    seen_struct[tag] = module_key
                    evidence.append(f"text-encoder width {width} ({_short(fams)})")
                candidates &= set(fams)
    return None, tuple(f for f in FAMILIES if f in candidates), evidence


def detect_family(shapes, metadata):
    """FamilyInfo for a LoRA from its tensor shapes ({key: shape}) and safetensors metadata."""
    shapes = {k: tuple(v) for k, v in shapes.items()}
    meta_fam, meta_refused, meta_ev = family_from_metadata(metadata)
    key_refused, cands, key_ev = families_from_keys(shapes)
    keys_text = "; ".join(key_ev)

    def ev(*parts):
        return "; ".join(p for p in parts if p)

    if key_refused:
        return FamilyInfo(None, ev(keys_text, meta_ev), key_refused, meta_fam, ())
    if not cands:
        return FamilyInfo(None, ev("keys contradict each other: " + keys_text, meta_ev), None, meta_fam, ())
    if meta_refused:
        if len(cands) == 1:
            return FamilyInfo(cands[0], ev(f"{meta_ev} says {meta_refused}, but the keys are {label(cands[0])}: "
                                           f"{keys_text}; using the keys"), None, None, cands)
        return FamilyInfo(None, ev(meta_ev, keys_text), meta_refused, None, cands)
    if len(cands) == 1:
        fam = cands[0]
        if meta_fam and meta_fam != fam:
            return FamilyInfo(fam, ev(f"{meta_ev} says {label(meta_fam)} but the keys say {label(fam)} "
                                      f"({keys_text}); metadata is often stale after re-saving, using the keys"),
                              None, meta_fam, cands)
        return FamilyInfo(fam, ev(meta_ev, keys_text), None, meta_fam, cands)
    if meta_fam in cands:
        return FamilyInfo(meta_fam, ev(meta_ev, keys_text or "keys consistent with it"), None, meta_fam, cands)
    if meta_fam:
        return FamilyInfo(None, ev(f"{meta_ev} says {label(meta_fam)} but the keys only fit {_short(cands)}",
                                   keys_text), None, meta_fam, cands)
    why = (f"the keys fit {_short(cands)}" + (f" ({keys_text})" if keys_text else "")
           + ("; no family metadata" if not meta_ev else f"; {meta_ev}"))
    if set(cands) >= {"sd1", "sd2"}:
        why += "; SD1 and SD2 LoRAs without text-encoder or cross-attention keys have identical shapes"
    return FamilyInfo(None, why, None, meta_fam, cands)


# ---- the family of a loaded model object (ldm/sgm module tree), shared by apply and the hosts ----------------

def _context_dim(sd_model) -> int | None:
    """in_features of the first cross-attention to_k: 768 SD1, 1024 SD2, 2048 SDXL."""
    unet = getattr(getattr(sd_model, "model", None), "diffusion_model", None)
    if unet is None:
        return None
    for name, module in unet.named_modules():
        if name.endswith("attn2.to_k") and isinstance(module, nn.Linear):
            return module.in_features
    return None


def model_family(sd_model) -> str:
    """'sd1' | 'sd2' | 'sdxl'. A1111's flags (``is_sdxl``/``is_sd2``/``is_sd1``) win; else the structure decides."""
    if getattr(sd_model, "is_sdxl", False):
        return "sdxl"
    if getattr(sd_model, "is_sd2", False):
        return "sd2"
    if getattr(sd_model, "is_sd1", False):
        return "sd1"
    if hasattr(sd_model, "conditioner"):
        return "sdxl"
    cond = getattr(sd_model, "cond_stage_model", None)
    if cond is not None:
        inner = getattr(cond, "wrapped", cond)
        # open_clip (SD2) keeps `model.transformer.resblocks`; ldm FrozenCLIPEmbedder (SD1) has an HF `transformer`.
        if hasattr(getattr(getattr(inner, "model", None), "transformer", None), "resblocks"):
            return "sd2"
        if hasattr(inner, "transformer"):
            return "sd1"
    ctx = _context_dim(sd_model)
    if ctx == 1024:
        return "sd2"
    if ctx == 2048:
        return "sdxl"
    if ctx == 768:
        return "sd1"
    raise ValueError("could not tell the model family (no A1111 flags, no known text encoder, no cross-attention)")
