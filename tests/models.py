"""Tiny, deterministic SD1 / SD2 / SDXL models for tests: real module trees, nothing downloaded.

- make_sd1 / make_sd2: real ldm `LatentDiffusion` (stable-diffusion-sdkit) from tiny configs
  (test-environment.md §3.3/§3.4), with A1111's attributes added. make_sd1 is lib_lora.host.tiny.make_tiny_sd15
  (the runtime's embedded tiny model) plus a checkpoint-info stand-in.
- make_sdxl: sgm-shaped object built by tests/sgm_like.py (names checked against real sgm skeletons).
- make_tokenizer: HF CLIPTokenizer built offline from open_clip's bundled BPE (lib_lora.host.tokenizer).
- model_state_hash: fingerprint of every parameter and buffer, for "the host model is untouched" tests.

Every builder returns a fresh model (tests may modify it): eval mode, requires_grad False, every parameter
re-initialised from a per-name seeded generator (lib_lora.host.tiny.randomize_) so no tensor is zero (ldm
zero-inits output layers, which would make "did the LoRA change anything" checks pass trivially).
"""
import atexit
import functools
import hashlib
import os
import shutil
import tempfile
import types

import torch
from torch import nn

# shared with the runtime: the same offline CLIP, init skipping and weight recipe build the embedded tiny model
from lib_lora.host.headless import sdxl_alphas_cumprod
from lib_lora.host.tiny import (SD1_CONTEXT, TEXT_LAYERS, clip_l_text_config, freeze_, make_tiny_sd15,  # noqa: F401
                                offline_clip, randomize_, set_family_flags, skip_default_init, tiny_sd15_config,
                                vae_config)
from lib_lora.host.tokenizer import clip_tokenizer

SD2_CONTEXT = 1024
SDXL_CONTEXT = 2048
SDXL_ADM = 2816

_SD2_TEXT_ARCH = "lora-studio-tiny-sd2-text"    # ViT-H-14 text tower, 2 layers
_SDXL_TEXT_ARCH = "lora-studio-tiny-sdxl-bigg"  # ViT-bigG-14 text tower, 2 layers


# ----------------------------------------------------------------------------------------------- tokenizer

def make_tokenizer():
    """Shared HF `CLIPTokenizer` equal to openai/clip-vit-large-patch14's (ids 49406 BOS, 49407 EOS/pad); the very
    object the tiny models' FrozenCLIPEmbedder holds.

    Cached: do not mutate it (add_tokens etc.); load your own from tokenizer_dir() if you need to.
    """
    return clip_tokenizer()


@functools.lru_cache(maxsize=None)
def tokenizer_dir() -> str:
    """A temp dir holding vocab.json + merges.txt + HF config files (pad = EOS, model_max_length 77); removed at exit.

    `CLIPTokenizer.from_pretrained(tokenizer_dir())` and `CLIPTokenizerFast.from_pretrained(...)` both work.
    """
    # lib_lora's cached folder has only the two vocabulary files; save_pretrained adds the settings
    path = tempfile.mkdtemp(prefix="lora-studio-tokenizer-")
    atexit.register(shutil.rmtree, path, True)
    make_tokenizer().save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------- A1111 attributes

def _checkpoint_info(family: str, seed: int):
    """Stand-in for A1111's CheckpointInfo (the file does not exist)."""
    stem = f"tiny-{family}-s{seed}"
    sha256 = hashlib.sha256(f"lora-studio {stem}".encode()).hexdigest()
    name = f"{stem}.safetensors"
    return types.SimpleNamespace(
        filename=os.path.join(tempfile.gettempdir(), "lora-studio-models", name), name=name,
        name_for_extra=stem, model_name=stem, hash=sha256[-8:], sha256=sha256, shorthash=sha256[:10],
        title=f"{name} [{sha256[:10]}]", metadata={}, is_safetensors=True)


def _set_a1111_attrs(model, family: str, seed: int):
    # As sd_models.set_model_type / load_model set them.
    set_family_flags(model, family)
    info = _checkpoint_info(family, seed)
    model.sd_checkpoint_info = info
    model.sd_model_checkpoint = info.filename
    model.sd_model_hash = info.shorthash
    return model


# ----------------------------------------------------------------------------------------------- configs

def _register_open_clip(name: str, width: int, heads: int, embed_dim: int, layers: int):
    from open_clip import factory
    factory._MODEL_CONFIGS[name] = {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": width, "heads": heads, "layers": layers},
    }


def _tiny_sd2_config() -> dict:
    """The tiny SD1 layout (UNet widths, VAE, schedule) turned into SD2.x-768-v's: v, Linear proj, OpenCLIP-H."""
    cfg = tiny_sd15_config()
    params = cfg["params"]
    unet = params["unet_config"]["params"]
    del unet["num_heads"]
    # num_head_channels 8 (SD2 uses 64): 64 > model_channels would give 0 heads.
    unet.update(num_head_channels=8, use_linear_in_transformer=True, context_dim=SD2_CONTEXT)
    params["cond_stage_config"] = {
        "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
        "params": {"arch": _SD2_TEXT_ARCH, "version": None, "layer": "penultimate", "freeze": True, "device": "cpu"}}
    params["parameterization"] = "v"
    return cfg


# ----------------------------------------------------------------------------------------------- builders

def make_sd1(seed: int = 0, text_layers: int = TEXT_LAYERS):
    """Tiny SD1.5-shaped ldm LatentDiffusion (eps). Module names as SD1.5: input_blocks 1..11, output_blocks
    0..11, 1x1-conv proj_in/out, context 768; CLIP-L text model (hidden 768, mlp 3072) with `text_layers` layers.
    `cond_stage_model` is the bare ldm FrozenCLIPEmbedder (A1111 would wrap it; no `.wrapped` here)."""
    return _set_a1111_attrs(make_tiny_sd15(seed, text_layers), "sd1", seed)


def make_sd2(seed: int = 0, text_layers: int = TEXT_LAYERS):
    """Tiny SD2.x-768-v-shaped ldm LatentDiffusion (parameterization 'v', Linear proj_in/out, context 1024).
    Text: ldm FrozenOpenCLIPEmbedder (layer penultimate) around a ViT-H-14-wide open_clip text tower
    (width 1024, 16 heads, `text_layers` layers); its attention is nn.MultiheadAttention (in_proj_weight)."""
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf

    _register_open_clip(_SD2_TEXT_ARCH, width=1024, heads=16, embed_dim=1024, layers=text_layers)
    with skip_default_init():
        model = instantiate_from_config(OmegaConf.create(_tiny_sd2_config()))
    return _set_a1111_attrs(freeze_(randomize_(model, seed)), "sd2", seed)


class A1111EmbedderWrapper(nn.Module):
    """What A1111's hijack puts in `conditioner.embedders[i]`: the sgm embedder is kept in `.wrapped`."""

    def __init__(self, wrapped):
        super().__init__()
        self.wrapped = wrapped
        self.is_trainable = getattr(wrapped, "is_trainable", False)
        self.input_key = getattr(wrapped, "input_key", "txt")
        self.return_pooled = getattr(wrapped, "return_pooled", False)
        self.legacy_ucg_val = None
        self.ucg_rate = 0.0

    def forward(self, text):
        return self.wrapped(text)


class EmbeddingsWithFixes(nn.Module):
    """A1111 v1.10.1 modules/sd_hijack.py EmbeddingsWithFixes without textual-inversion vectors: the token
    embedding the WebUI's hijack puts in place of each text encoder's own (the original sits in ``.wrapped``, so
    the wrapper has no ``.weight``)."""

    def __init__(self, wrapped):
        super().__init__()
        self.wrapped = wrapped
        self.fixes = None

    def forward(self, input_ids):
        self.fixes = None  # A1111 consumes the pending textual-inversion fixes here
        return self.wrapped(input_ids)


def a1111_embedding_hijack(model, family: str):
    """Wrap the token embeddings as A1111's ``model_hijack.hijack`` does (sd_hijack.py: open_clip towers'
    ``model.token_embedding``, HF CLIP's ``text_model.embeddings.token_embedding``)."""
    def hf(embedder):
        e = embedder.transformer.text_model.embeddings
        e.token_embedding = EmbeddingsWithFixes(e.token_embedding)

    def oc(embedder):
        embedder.model.token_embedding = EmbeddingsWithFixes(embedder.model.token_embedding)

    if family == "sdxl":
        hf(model.conditioner.embedders[0].wrapped)
        oc(model.conditioner.embedders[1].wrapped)
    else:
        cond = getattr(model.cond_stage_model, "wrapped", model.cond_stage_model)
        (oc if family == "sd2" else hf)(cond)
    return model


def _build_sdxl():
    import sgm_like
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf

    unet = sgm_like.UNetModel(**sgm_like.TINY_SDXL_UNET_CONFIG)
    # sgm FrozenCLIPEmbedder(layer="hidden", layer_idx=11 of 12) = penultimate; here 1 of 2.
    with offline_clip(clip_l_text_config(TEXT_LAYERS)):
        clip_l = FrozenCLIPEmbedder(device="cpu", freeze=True, layer="hidden", layer_idx=TEXT_LAYERS - 1)
    _register_open_clip(_SDXL_TEXT_ARCH, width=1280, heads=20, embed_dim=1280, layers=TEXT_LAYERS)
    clip_g = sgm_like.FrozenOpenCLIPEmbedder2(arch=_SDXL_TEXT_ARCH, version=None, device="cpu",
                                              layer="penultimate", always_return_pooled=True)
    embedders = []
    for e in (clip_l, clip_g):
        e.is_trainable, e.input_key, e.ucg_rate = False, "txt", 0.0
        embedders.append(A1111EmbedderWrapper(e))
    embedders += [sgm_like.ConcatTimestepEmbedderND(256, key)
                  for key in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")]
    conditioner = sgm_like.GeneralConditioner(embedders)
    vae = instantiate_from_config(OmegaConf.create(vae_config()))
    return _a1111_sdxl_cls()(unet, conditioner, vae)


class _A1111SDXLMixin:
    """What A1111's sd_models_xl.extend_sdxl adds to sgm's DiffusionEngine."""

    def apply_model(self, x, t, cond):
        return self.model(x, t, cond)

    def get_learned_conditioning(self, batch):
        width = getattr(batch, "width", 1024)
        height = getattr(batch, "height", 1024)
        is_negative_prompt = getattr(batch, "is_negative_prompt", False)
        dev = dict(device=self.device, dtype=self.dtype)
        conds = {
            "txt": batch,
            "original_size_as_tuple": torch.tensor([height, width], **dev).repeat(len(batch), 1),
            "crop_coords_top_left": torch.tensor([0, 0], **dev).repeat(len(batch), 1),
            "target_size_as_tuple": torch.tensor([height, width], **dev).repeat(len(batch), 1),
        }
        force_zero = is_negative_prompt and all(x == "" for x in batch)
        return self.conditioner(conds, force_zero_embeddings=["txt"] if force_zero else [])

    def get_first_stage_encoding(self, x):
        return x


@functools.lru_cache(maxsize=None)
def _a1111_sdxl_cls():
    import sgm_like  # imports ldm; kept lazy so `import models` stays cheap
    return type("A1111SDXL", (_A1111SDXLMixin, sgm_like.DiffusionEngine), {})


def make_sdxl(seed: int = 0):
    """Tiny SDXL-base-shaped object (sgm DiffusionEngine layout, A1111 extensions):

    - `.model` (OpenAIWrapper) `.diffusion_model` = sgm_like.UNetModel(TINY_SDXL_UNET_CONFIG): channels
      32/64/128, transformer depth [-,2,2] + middle 2, context 2048, adm 2816, Linear proj_in/out.
    - `.conditioner.embedders[0].wrapped` = ldm FrozenCLIPEmbedder (HF CLIPTextModel 768 wide, 2 layers,
      layer 'hidden' idx 1 = penultimate); `[1].wrapped` = FrozenOpenCLIPEmbedder2 (open_clip text tower 1280
      wide, 2 layers, penultimate + pooled via text_projection); `[2..4]` size/crop embedders (no params).
      `cond_stage_model` is the conditioner (as A1111 sets it for SDXL base).
    - `.first_stage_model` tiny ldm AutoencoderKL; scale_factor 0.13025.
    - apply_model(x, t, {"crossattn": [B,77,2048], "vector": [B,2816]}), get_learned_conditioning(list[str]) ->
      that dict; alphas_cumprod (fp32, 1000), parameterization 'eps'; A1111 flags and sd_checkpoint_info.
    """
    with skip_default_init():
        model = _build_sdxl()
    freeze_(randomize_(model, seed))
    model.cond_stage_model = model.conditioner
    model.conditioner.wrapped = nn.Module().eval()  # extend_sdxl sets this so `cond_stage_model.wrapped` exists
    model.alphas_cumprod = sdxl_alphas_cumprod()
    model.parameterization = "eps"
    return _set_a1111_attrs(model, "sdxl", seed)


def to_device(model: nn.Module, device, dtype=None) -> nn.Module:
    """model.to(device, dtype) and point the text embedders' `.device` (where they send token ids) at it."""
    from ldm.modules.encoders.modules import AbstractEncoder
    model.to(device=device, dtype=dtype)
    for m in model.modules():
        if isinstance(m, AbstractEncoder):  # ldm CLIP / OpenCLIP embedders and sgm_like's bigG
            m.device = torch.device(device)
    return model


# ----------------------------------------------------------------------------------------------- hashing

def model_state_hash(model: nn.Module, include_requires_grad: bool = True) -> str:
    """sha256 over every parameter and buffer (persistent or not): name, shape, dtype, device, requires_grad
    and raw bytes, sorted by name. Equal hashes mean the model is bit-for-bit the same; meta tensors hash
    their metadata only."""
    h = hashlib.sha256()
    tensors = {f"param:{n}": t for n, t in model.named_parameters()}
    tensors.update({f"buffer:{n}": t for n, t in model.named_buffers()})
    for name in sorted(tensors):
        t = tensors[name]
        rg = bool(t.requires_grad) if include_requires_grad else None
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|{t.device}|{rg}\n".encode())
        if t.device.type != "meta":
            data = t.detach().to("cpu").contiguous().reshape(-1)
            h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()
