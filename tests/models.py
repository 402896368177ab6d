"""Tiny, deterministic SD1 / SD2 / SDXL models for tests: real module trees, nothing downloaded.

- make_sd1 / make_sd2: real ldm `LatentDiffusion` (stable-diffusion-sdkit) from tiny configs
  (test-environment.md §3.3/§3.4), with A1111's attributes added.
- make_sdxl: sgm-shaped object built by tests/sgm_like.py (names checked against real sgm skeletons).
- make_tokenizer: HF CLIPTokenizer built offline from open_clip's bundled BPE (§5).
- model_state_hash: fingerprint of every parameter and buffer, for "the host model is untouched" tests.

Every builder returns a fresh model (tests may modify it): eval mode, requires_grad False, every parameter
re-initialised from a per-name seeded generator so no tensor is zero (ldm zero-inits output layers, which would
make "did the LoRA change anything" checks pass trivially).
"""
import atexit
import functools
import gzip
import hashlib
import json
import math
import os
import shutil
import tempfile
import types
import zlib
from contextlib import contextmanager
from unittest import mock

import torch
from torch import nn

SD1_CONTEXT = 768
SD2_CONTEXT = 1024
SDXL_CONTEXT = 2048
SDXL_ADM = 2816
TEXT_LAYERS = 2

_SD2_TEXT_ARCH = "lora-studio-tiny-sd2-text"    # ViT-H-14 text tower, 2 layers
_SDXL_TEXT_ARCH = "lora-studio-tiny-sdxl-bigg"  # ViT-bigG-14 text tower, 2 layers


# ----------------------------------------------------------------------------------------------- tokenizer

@functools.lru_cache(maxsize=None)
def tokenizer_dir() -> str:
    """A temp dir holding vocab.json + merges.txt (+ HF config files) built from open_clip's BPE; removed at exit.

    `CLIPTokenizer.from_pretrained(tokenizer_dir())` and `CLIPTokenizerFast.from_pretrained(...)` both work.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    with gzip.open(default_bpe()) as f:
        merges = f.read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != 49408:
        raise RuntimeError(f"open_clip BPE gave {len(tokens)} tokens, expected 49408; open-clip-torch pin changed?")

    path = tempfile.mkdtemp(prefix="lora-studio-tokenizer-")
    atexit.register(shutil.rmtree, path, True)
    with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
    with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"),
                        pad_token="<|endoftext|>", model_max_length=77)
    tok.save_pretrained(path)
    return path


@functools.lru_cache(maxsize=None)
def make_tokenizer():
    """Shared HF `CLIPTokenizer` equal to openai/clip-vit-large-patch14's (ids 49406 BOS, 49407 EOS/pad).

    Cached: do not mutate it (add_tokens etc.); load your own from tokenizer_dir() if you need to.
    """
    from transformers import CLIPTokenizer
    d = tokenizer_dir()
    return CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"),
                         pad_token="<|endoftext|>", model_max_length=77)


# ----------------------------------------------------------------------------------------------- weights

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter from a generator seeded by (seed, parameter name): deterministic, never zero.

    Norm weights ~ 1 + 0.1·N, embeddings ~ 0.02·N, other matrices/kernels ~ N/sqrt(fan_in) (keeps activations
    O(1) through the residual stacks), other vectors/scalars ~ 0.02·N.
    """
    for mod_name, mod in module.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63))
            if isinstance(mod, _NORMS) and p_name == "weight":
                p.normal_(1.0, 0.1, generator=g)
            elif isinstance(mod, nn.Embedding):
                p.normal_(0.0, 0.02, generator=g)
            elif p.ndim >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=g)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return module


@contextmanager
def _skip_default_init():
    """Skip torch/HF/open_clip default initialisation while building: every parameter is overwritten by
    randomize_ right after, and default init of ~150 M text-encoder parameters would double the build time."""
    from open_clip.transformer import TextTransformer
    from transformers.modeling_utils import PreTrainedModel
    noop = lambda *a, **k: None  # noqa: E731
    with mock.patch.object(nn.Linear, "reset_parameters", noop), \
            mock.patch.object(nn.modules.conv._ConvNd, "reset_parameters", noop), \
            mock.patch.object(nn.Embedding, "reset_parameters", noop), \
            mock.patch.object(nn.MultiheadAttention, "_reset_parameters", noop), \
            mock.patch.object(PreTrainedModel, "post_init", noop), \
            mock.patch.object(TextTransformer, "init_parameters", noop):
        yield


def _finish(model: nn.Module, seed: int) -> nn.Module:
    randomize_(model, seed)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


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
    model.is_sd1 = family == "sd1"
    model.is_sd2 = family == "sd2"
    model.is_sdxl = family == "sdxl"
    model.is_ssd = False
    model.is_sd3 = False
    model.is_sdxl_inpaint = False
    model.latent_channels = 4
    model.lowvram = False
    info = _checkpoint_info(family, seed)
    model.sd_checkpoint_info = info
    model.sd_model_checkpoint = info.filename
    model.sd_model_hash = info.shorthash
    return model


# ----------------------------------------------------------------------------------------------- configs

def _clip_text_config(layers: int):
    from transformers import CLIPTextConfig
    # CLIP-L widths (hidden 768, mlp 3072) so TE LoRA shapes match real SD1/SDXL files; only depth is cut.
    return CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=layers,
                          num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                          projection_dim=768)


def _register_open_clip(name: str, width: int, heads: int, embed_dim: int, layers: int):
    from open_clip import factory
    factory._MODEL_CONFIGS[name] = {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": width, "heads": heads, "layers": layers},
    }


def _vae_config():
    return {"target": "ldm.models.autoencoder.AutoencoderKL",
            "params": {"embed_dim": 4, "monitor": "val/rec_loss",
                       "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3,
                                    "out_ch": 3, "ch": 32, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 1,
                                    "attn_resolutions": [], "dropout": 0.0},
                       "lossconfig": {"target": "torch.nn.Identity"}}}


def _ldm_config(unet_extra: dict, cond_stage_config: dict, extra: dict):
    unet = {"image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32,
            "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
            "use_spatial_transformer": True, "transformer_depth": 1, "use_checkpoint": False, "legacy": False}
    unet.update(unet_extra)
    params = {"linear_start": 0.00085, "linear_end": 0.012, "num_timesteps_cond": 1, "log_every_t": 200,
              "timesteps": 1000, "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": 8,
              "channels": 4, "cond_stage_trainable": False, "conditioning_key": "crossattn",
              "monitor": "val/loss_simple_ema", "scale_factor": 0.18215, "use_ema": False,
              "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
              "first_stage_config": _vae_config(), "cond_stage_config": cond_stage_config}
    params.update(extra)
    return {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}


def _instantiate(cfg: dict):
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf
    with _skip_default_init():
        return instantiate_from_config(OmegaConf.create(cfg))


@contextmanager
def _offline_clip(text_layers: int):
    """FrozenCLIPEmbedder calls from_pretrained; hand it a random tiny text model and the offline tokenizer
    (what A1111's sd_disable_initialization does too)."""
    from transformers import CLIPTextModel, CLIPTokenizer
    text_cfg = _clip_text_config(text_layers)
    with mock.patch.object(CLIPTextModel, "from_pretrained", classmethod(lambda cls, *a, **k: cls(text_cfg))), \
            mock.patch.object(CLIPTokenizer, "from_pretrained", classmethod(lambda cls, *a, **k: make_tokenizer())):
        yield


# ----------------------------------------------------------------------------------------------- builders

def make_sd1(seed: int = 0, text_layers: int = TEXT_LAYERS):
    """Tiny SD1.5-shaped ldm LatentDiffusion (eps). Module names as SD1.5: input_blocks 1..11, output_blocks
    0..11, 1x1-conv proj_in/out, context 768; CLIP-L text model (hidden 768, mlp 3072) with `text_layers` layers.
    `cond_stage_model` is the bare ldm FrozenCLIPEmbedder (A1111 would wrap it; no `.wrapped` here)."""
    cond = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
            "params": {"device": "cpu", "freeze": True, "layer": "last"}}
    cfg = _ldm_config({"num_heads": 8, "context_dim": SD1_CONTEXT}, cond, {})
    with _offline_clip(text_layers):
        model = _instantiate(cfg)
    return _set_a1111_attrs(_finish(model, seed), "sd1", seed)


def make_sd2(seed: int = 0, text_layers: int = TEXT_LAYERS):
    """Tiny SD2.x-768-v-shaped ldm LatentDiffusion (parameterization 'v', Linear proj_in/out, context 1024).
    Text: ldm FrozenOpenCLIPEmbedder (layer penultimate) around a ViT-H-14-wide open_clip text tower
    (width 1024, 16 heads, `text_layers` layers); its attention is nn.MultiheadAttention (in_proj_weight)."""
    _register_open_clip(_SD2_TEXT_ARCH, width=1024, heads=16, embed_dim=1024, layers=text_layers)
    cond = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
            "params": {"arch": _SD2_TEXT_ARCH, "version": None, "layer": "penultimate", "freeze": True,
                       "device": "cpu"}}
    # num_head_channels 8 (SD2 uses 64): 64 > model_channels would give 0 heads.
    cfg = _ldm_config({"num_head_channels": 8, "use_linear_in_transformer": True, "context_dim": SD2_CONTEXT},
                      cond, {"parameterization": "v"})
    model = _instantiate(cfg)
    return _set_a1111_attrs(_finish(model, seed), "sd2", seed)


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


def _build_sdxl():
    import sgm_like
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf

    unet = sgm_like.UNetModel(**sgm_like.TINY_SDXL_UNET_CONFIG)
    # sgm FrozenCLIPEmbedder(layer="hidden", layer_idx=11 of 12) = penultimate; here 1 of 2.
    with _offline_clip(TEXT_LAYERS):
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
    vae = instantiate_from_config(OmegaConf.create(_vae_config()))
    return _a1111_sdxl_cls()(unet, conditioner, vae)


def _sdxl_alphas_cumprod():
    # sgm LegacyDDPMDiscretization: "linear" schedule = linspace over sqrt(beta), squared, in float64.
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


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
    with _skip_default_init():
        model = _build_sdxl()
    _finish(model, seed)
    model.cond_stage_model = model.conditioner
    model.conditioner.wrapped = nn.Module().eval()  # extend_sdxl sets this so `cond_stage_model.wrapped` exists
    model.alphas_cumprod = _sdxl_alphas_cumprod()
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
