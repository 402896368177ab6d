"""A tiny SD1.5-shaped model built offline: the embedded default for ``quickstart`` (and for tests).

A real ldm ``LatentDiffusion`` with the v1-inference layout cut down (test-environment.md §3.3): UNet with
model_channels 32 (module names as SD1.5: input_blocks 1..11, output_blocks 0..11, 1x1-conv proj_in/out, context
768), a CLIP-L-wide text model with 2 layers (so text-encoder LoRA shapes equal real SD1.5 files), a 32-channel VAE.
Weights are random but deterministic: every parameter is drawn from a generator seeded by (seed, parameter name), so
no tensor is zero (ldm zero-inits output layers, which would make "did the LoRA change anything" checks trivial).
Nothing is downloaded: the CLIP text model is built from its config and the tokenizer from open_clip's BPE.
"""

from __future__ import annotations

import math
import zlib
from contextlib import contextmanager
from unittest import mock

import torch
from torch import nn

SD1_CONTEXT = 768
TEXT_LAYERS = 2


def clip_l_text_config(layers: int = 12, hidden: int = 768, intermediate: int = 3072, heads: int | None = None,
                       max_positions: int = 77):
    """CLIP-L text config (openai/clip-vit-large-patch14's text part); only the depth differs for tiny models."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=intermediate,
                          num_hidden_layers=layers, num_attention_heads=heads or max(1, hidden // 64),
                          max_position_embeddings=max_positions, hidden_act="quick_gelu", projection_dim=768)


@contextmanager
def offline_clip(text_config):
    """ldm/sgm FrozenCLIPEmbedder call ``from_pretrained``: hand them a model built from ``text_config`` (weights
    come from the checkpoint afterwards) and the offline tokenizer, as A1111's sd_disable_initialization does."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from .tokenizer import clip_tokenizer

    # the tokenizer is shared (read-only use: ldm and our TextEncoder only encode with it)
    with mock.patch.object(CLIPTextModel, "from_pretrained", classmethod(lambda cls, *a, **k: cls(text_config))), \
            mock.patch.object(CLIPTokenizer, "from_pretrained", classmethod(lambda cls, *a, **k: clip_tokenizer())):
        yield


_NOISY = r"[\\/](torchvision|timm|lightning_fabric|pytorch_lightning|lightning|xformers|bitsandbytes|accelerate|" \
         r"pkg_resources)[\\/]"


@contextmanager
def quiet_third_party():
    """For the command line: the import-time chatter of ldm and the packages it pulls in (deprecation notices,
    torchvision's image extension, bitsandbytes' CPU kernels, ldm's prints) is kept off the terminal while a model is
    built; the prints are shown if building fails. LORA_STUDIO_VERBOSE=1 shows everything."""
    import io
    import logging
    import os
    import re
    import sys
    import warnings
    from contextlib import redirect_stdout

    if os.environ.get("LORA_STUDIO_VERBOSE", "") not in ("", "0"):
        yield
        return
    chatter = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("bitsandbytes", "sgm", "xformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)

    def show(message, category, filename, lineno, file=None, line=None, _orig=warnings.showwarning):
        # (a hook, not filters: packages such as pytorch_lightning add their own filters while importing)
        if issubclass(category, (FutureWarning, DeprecationWarning)) or re.search(_NOISY, str(filename)):
            return
        _orig(message, category, filename, lineno, file, line)

    try:
        with warnings.catch_warnings(), redirect_stdout(chatter):
            warnings.showwarning = show
            yield
    except BaseException:
        sys.stdout.write(chatter.getvalue())
        raise
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextmanager
def skip_default_init():
    """Skip torch/HF/open_clip default initialisation while building: the weights are overwritten right after
    (from a checkpoint or ``randomize_``), and initialising ~1 G parameters would take most of the load time."""
    noop = lambda *a, **k: None  # noqa: E731
    patches = [mock.patch.object(nn.Linear, "reset_parameters", noop),
               mock.patch.object(nn.modules.conv._ConvNd, "reset_parameters", noop),
               mock.patch.object(nn.Embedding, "reset_parameters", noop),
               mock.patch.object(nn.MultiheadAttention, "_reset_parameters", noop)]
    try:
        from transformers.modeling_utils import PreTrainedModel
        patches.append(mock.patch.object(PreTrainedModel, "post_init", noop))
    except ImportError:  # no transformers: nothing of it to skip
        pass
    try:
        from open_clip.transformer import TextTransformer
        patches.append(mock.patch.object(TextTransformer, "init_parameters", noop))
    except (ImportError, AttributeError):  # older/newer open_clip without this class: its init just runs
        pass
    for p in patches:
        p.start()
    try:
        yield
    finally:
        for p in reversed(patches):
            p.stop()


_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter from a generator seeded by (seed, parameter name): deterministic, never zero.

    Norm weights ~ 1 + 0.1·N, embeddings ~ 0.02·N, other matrices/kernels ~ N/sqrt(fan_in) (keeps activations
    O(1) through the residual stacks), other vectors/scalars ~ 0.02·N."""
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


def freeze_(model: nn.Module) -> nn.Module:
    """Eval mode and ``requires_grad`` False everywhere: how host models are handed out (A1111 never trains them)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def vae_config(ch: int = 32, ch_mult=(1, 2, 4, 4), num_res_blocks: int = 1, resolution: int = 64,
               attn_resolutions=(), target: str = "ldm.models.autoencoder.AutoencoderKL") -> dict:
    return {"target": target,
            "params": {"embed_dim": 4, "monitor": "val/rec_loss",
                       "ddconfig": {"double_z": True, "z_channels": 4, "resolution": resolution, "in_channels": 3,
                                    "out_ch": 3, "ch": ch, "ch_mult": list(ch_mult),
                                    "num_res_blocks": num_res_blocks, "attn_resolutions": list(attn_resolutions),
                                    "dropout": 0.0},
                       "lossconfig": {"target": "torch.nn.Identity"}}}


def tiny_sd15_config() -> dict:
    """The v1-inference layout (as a dict) with tiny widths."""
    unet = {"image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32,
            "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
            "use_spatial_transformer": True, "transformer_depth": 1, "use_checkpoint": False, "legacy": False,
            "num_heads": 8, "context_dim": SD1_CONTEXT}
    return {"target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": {"linear_start": 0.00085, "linear_end": 0.012, "num_timesteps_cond": 1, "log_every_t": 200,
                       "timesteps": 1000, "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": 8,
                       "channels": 4, "cond_stage_trainable": False, "conditioning_key": "crossattn",
                       "monitor": "val/loss_simple_ema", "scale_factor": 0.18215, "use_ema": False,
                       "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                                       "params": unet},
                       "first_stage_config": vae_config(),
                       "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                                             "params": {"device": "cpu", "freeze": True, "layer": "last"}}}}


def set_family_flags(model, family: str):
    """The flags A1111's sd_models.set_model_type sets (our engine reads them first)."""
    model.is_sd1 = family == "sd1"
    model.is_sd2 = family == "sd2"
    model.is_sdxl = family == "sdxl"
    model.is_ssd = False
    model.is_sd3 = False
    model.is_sdxl_inpaint = False
    model.latent_channels = 4
    model.lowvram = False
    return model


def make_tiny_sd15(seed: int = 0, text_layers: int = TEXT_LAYERS):
    """Tiny SD1.5-shaped ldm LatentDiffusion (eps): eval mode, requires_grad False, deterministic weights.

    ``cond_stage_model`` is the bare ldm FrozenCLIPEmbedder (no A1111 ``.wrapped``). 675 state-dict keys named
    as in a real SD1.5 file, so ``model.state_dict()`` saved as .safetensors is a loadable tiny checkpoint."""
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf

    with offline_clip(clip_l_text_config(layers=text_layers)), skip_default_init():
        model = instantiate_from_config(OmegaConf.create(tiny_sd15_config()))
    return set_family_flags(freeze_(randomize_(model, seed)), "sd1")
