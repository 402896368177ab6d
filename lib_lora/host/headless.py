"""Load an SD1.x / SD2.x / SDXL single-file checkpoint without the WebUI, into the same ldm/sgm module tree the
WebUI builds, so training and LoRA application run headless exactly as inside A1111.

- SD1/SD2: ldm from the ``ldm`` package (stable-diffusion-sdkit) or, with ``webui=``, from
  ``<webui>/repositories/stable-diffusion-stability-ai``. SDXL: sgm from ``<webui>/repositories/generative-models``
  (no package ships sgm).
- Config: ``config=`` (yaml path or dict) > ``<checkpoint>.yaml`` beside the file (A1111's rule) > the WebUI's
  yaml (with ``webui=``) > an embedded copy of v1-inference / v2-inference / v2-inference-v. The default configs are
  then fitted to the file's tensor shapes (channels, depths, text-encoder layers), so pruned or tiny checkpoints of
  the same layout load too. Attention head counts are not stored in weights: they stay as the config says.
- Nothing is downloaded: the CLIP text model is built from a config and the tokenizer from open_clip's BPE (as
  A1111's sd_disable_initialization patches ``from_pretrained``); open_clip towers are built text-only.
- The file's tensors are loaded with ``load_state_dict``; missing weights stop the load with a list, unexpected
  keys (EMA copies, extra heads) are reported in the load notes.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import logging
import os
import re
import sys
import time
from contextlib import ExitStack, contextmanager, redirect_stdout
from dataclasses import dataclass, field
from unittest import mock

import torch

from ..formats.errors import LoraError, LoraFileError, UnsupportedFamilyError
from .base import ModelHost
from .tiny import clip_l_text_config, freeze_, offline_clip, set_family_flags, skip_default_init, vae_config


class CheckpointError(LoraError):
    """A checkpoint that cannot be loaded headless; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------------------------
# embedded default configs (the `model:` part of the yaml files A1111 uses; training-only parts left out)

def _ldm(unet: dict, cond: dict, extra: dict | None = None) -> dict:
    params = {"linear_start": 0.00085, "linear_end": 0.0120, "num_timesteps_cond": 1, "log_every_t": 200,
              "timesteps": 1000, "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": 64,
              "channels": 4, "cond_stage_trainable": False, "conditioning_key": "crossattn",
              "monitor": "val/loss_simple_ema", "scale_factor": 0.18215, "use_ema": False,
              "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
              "first_stage_config": vae_config(ch=128, num_res_blocks=2, resolution=256),
              "cond_stage_config": cond}
    params.update(extra or {})
    return {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}


def v1_inference() -> dict:
    """configs/v1-inference.yaml (A1111's default config)."""
    return _ldm({"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
                 "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
                 "num_heads": 8, "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 768,
                 "use_checkpoint": True, "legacy": False},
                {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"})


def v2_inference(v: bool = False) -> dict:
    """stable-diffusion-stability-ai configs/stable-diffusion/v2-inference.yaml (``v``: v2-inference-v.yaml)."""
    return _ldm({"use_checkpoint": True, "use_fp16": True, "image_size": 32, "in_channels": 4, "out_channels": 4,
                 "model_channels": 320, "attention_resolutions": [4, 2, 1], "num_res_blocks": 2,
                 "channel_mult": [1, 2, 4, 4], "num_head_channels": 64, "use_spatial_transformer": True,
                 "use_linear_in_transformer": True, "transformer_depth": 1, "context_dim": 1024, "legacy": False},
                {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                 "params": {"freeze": True, "layer": "penultimate"}},
                {"parameterization": "v"} if v else None)


def sd_xl_base() -> dict:
    """generative-models configs/inference/sd_xl_base.yaml (used when sgm is importable without a WebUI folder)."""
    emb = "sgm.modules.encoders.modules."
    return {"target": "sgm.models.diffusion.DiffusionEngine",
            "params": {"scale_factor": 0.13025, "disable_first_stage_autocast": True,
                       "denoiser_config": {
                           "target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser",
                           "params": {"num_idx": 1000,
                                      "scaling_config": {"target": "sgm.modules.diffusionmodules.denoiser_scaling."
                                                                   "EpsScaling"},
                                      "discretization_config": {"target": "sgm.modules.diffusionmodules."
                                                                          "discretizer.LegacyDDPMDiscretization"}}},
                       "network_config": {
                           "target": "sgm.modules.diffusionmodules.openaimodel.UNetModel",
                           "params": {"adm_in_channels": 2816, "num_classes": "sequential", "use_checkpoint": True,
                                      "in_channels": 4, "out_channels": 4, "model_channels": 320,
                                      "attention_resolutions": [4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 4],
                                      "num_head_channels": 64, "use_linear_in_transformer": True,
                                      "transformer_depth": [1, 2, 10], "context_dim": 2048,
                                      "spatial_transformer_attn_type": "softmax-xformers"}},
                       "conditioner_config": {
                           "target": "sgm.modules.GeneralConditioner",
                           "params": {"emb_models": [
                               {"is_trainable": False, "input_key": "txt", "target": emb + "FrozenCLIPEmbedder",
                                "params": {"layer": "hidden", "layer_idx": 11}},
                               {"is_trainable": False, "input_key": "txt", "target": emb + "FrozenOpenCLIPEmbedder2",
                                "params": {"arch": "ViT-bigG-14", "version": "laion2b_s39b_b160k", "freeze": True,
                                           "layer": "penultimate", "always_return_pooled": True, "legacy": False}},
                               *({"is_trainable": False, "input_key": key, "target": emb + "ConcatTimestepEmbedderND",
                                  "params": {"outdim": 256}}
                                 for key in ("original_size_as_tuple", "crop_coords_top_left",
                                             "target_size_as_tuple"))]}},
                       "first_stage_config": {
                           "target": "sgm.models.autoencoder.AutoencoderKL",
                           "params": {"embed_dim": 4, "monitor": "val/rec_loss",
                                      "ddconfig": {"attn_type": "vanilla-xformers", "double_z": True, "z_channels": 4,
                                                   "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                                                   "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                                                   "attn_resolutions": [], "dropout": 0.0},
                                      "lossconfig": {"target": "torch.nn.Identity"}}}}}


# where A1111 v1.10.1 keeps the same files (modules/sd_models_config.py)
_WEBUI_CONFIGS = {
    "sd1": ("configs", "v1-inference.yaml"),
    "sd2": ("repositories", "stable-diffusion-stability-ai", "configs", "stable-diffusion", "v2-inference.yaml"),
    "sd2v": ("repositories", "stable-diffusion-stability-ai", "configs", "stable-diffusion", "v2-inference-v.yaml"),
    "sdxl": ("repositories", "generative-models", "configs", "inference", "sd_xl_base.yaml"),
}
_WEBUI_REPOS = {"ldm": ("repositories", "stable-diffusion-stability-ai"),
                "sgm": ("repositories", "generative-models")}

SDXL_NEEDS_WEBUI = (
    "this is an SDXL checkpoint; building SDXL needs Stability's `sgm` code, which no package ships. Pass the "
    "folder of an AUTOMATIC1111 WebUI install (--webui PATH): its repositories/generative-models holds sgm and "
    "configs/inference/sd_xl_base.yaml. Or use the LoRA Studio tab inside the WebUI.")


# ---------------------------------------------------------------------------------------------------------------
# results

@dataclass
class LoadReport:
    path: str
    family: str
    parameterization: str
    config_source: str
    missing: list[str] = field(default_factory=list)       # weights the file lacks (load fails if any)
    unexpected: list[str] = field(default_factory=list)    # file keys the model has no place for (ignored)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        label = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}.get(self.family, self.family)
        s = (f"{os.path.basename(self.path)}: {label} ({self.parameterization}-prediction), config "
             f"{self.config_source}, loaded in {self.seconds:.1f} s")
        if self.unexpected:
            s += f"; {len(self.unexpected)} unused key(s) ignored"
        return s


class HeadlessHost(ModelHost):
    """A ModelHost over a checkpoint loaded from a file: the sha256 is computed on first use (and cached by path,
    size and mtime), the legacy 8-hex hash right away (it reads 64 KiB)."""

    def __init__(self, sd_model, name, path, device, report: LoadReport):
        self._sha256 = None
        from ..formats.hashes import legacy_model_hash
        super().__init__(sd_model, name=name, path=path, device=device, sha256=None,
                         legacy_hash=legacy_model_hash(path))
        self.family = report.family
        self.load_report = report
        self.notes = list(report.notes)

    @property
    def model_sha256(self):
        if self._sha256 is None and self.model_path:
            self._sha256 = cached_sha256(self.model_path)
        return self._sha256

    @model_sha256.setter
    def model_sha256(self, value):
        self._sha256 = value

    @property
    def model_id(self) -> str:
        """Identifies the weights for cache validation; an external VAE changes the latents, so it counts."""
        base = super().model_id
        vae = getattr(self, "vae_path", None)
        return f"{base}|vae:{cached_sha256(vae)[:16]}" if vae else base

    def load_vae(self, path) -> str:
        """Replace the VAE weights with an external VAE file (ldm layout, as the WebUI's VAE files), like
        sd-scripts' ``--vae``. Returns a one-line description."""
        path = os.fspath(path)
        sd, _ = read_state_dict(path)
        sd = {(k[len("first_stage_model."):] if k.startswith("first_stage_model.") else k): v for k, v in sd.items()
              if not k.startswith(("loss.", "model_ema."))}
        vae = self.sd_model.first_stage_model
        own = vae.state_dict()
        if not any(k in own for k in sd):
            hint = " (it looks like a diffusers-format VAE)" if any(k.startswith(("encoder.down_blocks.",
                                                                                "decoder.up_blocks.")) for k in sd) else ""
            raise CheckpointError(f"{os.path.basename(path)} has no VAE weights in the ldm layout the WebUI uses "
                                  f"(encoder.*, decoder.*, quant_conv.*){hint}", path)
        wrong = [k for k, v in sd.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
        if wrong:
            raise CheckpointError(f"{os.path.basename(path)} does not fit this model's VAE (e.g. {wrong[0]}: file "
                                  f"{tuple(sd[wrong[0]].shape)}, model {tuple(own[wrong[0]].shape)}); an SDXL VAE on "
                                  f"an SD1/SD2 model or the other way round?", path)
        missing = [k for k in own if k not in sd]
        if missing:
            raise CheckpointError(f"{os.path.basename(path)} lacks {len(missing)} VAE weight(s), e.g. {missing[0]}",
                                  path)
        vae.load_state_dict(sd, strict=True)
        self.vae_path = path
        return f"VAE replaced by {os.path.basename(path)} ({len(sd)} tensors)"


def cached_sha256(path: str) -> str:
    """sha256 of a big file, remembered in the user cache by (real path, size, mtime): checkpoints are GBs."""
    from ..formats.hashes import sha256_file
    from .tokenizer import cache_root

    real = os.path.realpath(path)
    st = os.stat(real)
    key = f"{real}|{st.st_size}|{st.st_mtime_ns}"
    db_path = os.path.join(cache_root(), "checkpoint-hashes.json")
    try:
        with open(db_path, encoding="utf-8") as f:
            db = json.load(f)
    except (OSError, ValueError):
        db = {}
    if isinstance(db.get(key), str):
        return db[key]
    h = sha256_file(real)
    db[key] = h
    try:
        os.makedirs(os.path.dirname(db_path), exist_ok=True)
        tmp = db_path + f".{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(db, f)
        os.replace(tmp, db_path)
    except OSError:  # read-only cache: the hash is still right, just not remembered
        pass
    return h


# ---------------------------------------------------------------------------------------------------------------
# reading the file

_CKPT_EXT = (".ckpt", ".pt", ".pth", ".bin")

# checkpoints written before transformers 4.x lack the `text_model.` level (A1111 renames them on load)
_SD1_TE_RENAMES = {
    "cond_stage_model.transformer.embeddings.": "cond_stage_model.transformer.text_model.embeddings.",
    "cond_stage_model.transformer.encoder.": "cond_stage_model.transformer.text_model.encoder.",
    "cond_stage_model.transformer.final_layer_norm.": "cond_stage_model.transformer.text_model.final_layer_norm.",
}


def read_state_dict(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata). .ckpt/.pt are read with ``torch.load(weights_only=True)``, which loads
    tensors only and refuses pickled code; a file that needs more is refused with how to convert it."""
    from ..formats.safetensors_io import load_tensors, read_metadata

    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}", path)
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder; pass the checkpoint file itself (a diffusers folder is not "
                              "supported: use a single-file .safetensors checkpoint)", path)
    ext = os.path.splitext(path)[1].lower()
    if ext in _CKPT_EXT:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - unpickling errors come in many types; all mean the same here
            raise CheckpointError(
                f"cannot read {os.path.basename(path)} safely: it is a pickle that holds more than tensors "
                f"({type(e).__name__}: {str(e).splitlines()[0][:200]}). Loading it fully could run code hidden "
                f"in it. Convert it to .safetensors with a tool you trust (e.g. the WebUI's checkpoint merger "
                f"with 'safetensors' format), or download the .safetensors version.", path) from None
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise CheckpointError(f"{os.path.basename(path)} holds a {type(obj).__name__}, not a state dict", path)
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, {}
    if ext != ".safetensors":
        raise CheckpointError(f"{os.path.basename(path)}: unknown checkpoint type '{ext}'; expected .safetensors "
                              "(or .ckpt)", path)
    try:
        return load_tensors(path), read_metadata(path)
    except LoraFileError as e:
        raise CheckpointError(str(e).replace("LoRA", "checkpoint"), path) from None


def _fix_keys(sd: dict[str, torch.Tensor], notes: list[str]) -> dict[str, torch.Tensor]:
    if any(k.startswith(tuple(_SD1_TE_RENAMES)) for k in sd):
        out = {}
        for k, v in sd.items():
            for old, new in _SD1_TE_RENAMES.items():
                if k.startswith(old):
                    k = new + k[len(old):]
                    break
            out[k] = v
        sd = out
        notes.append("old-style SD1 text-encoder keys renamed (as A1111 does)")
    # SD2-turbo-style files keep the SD2 text encoder under conditioner.embedders.0 (A1111 renames it too)
    if any(k.startswith("conditioner.embedders.0.model.") for k in sd) and \
            not any(k.startswith("conditioner.embedders.1.") for k in sd) and _context_width(sd) == 1024:
        sd = {("cond_stage_model." + k[len("conditioner.embedders.0."):] if k.startswith("conditioner.embedders.0.")
               else k): v for k, v in sd.items()}
        notes.append("SD2 text encoder found under conditioner.embedders.0 (SD2-turbo layout) and renamed")
    return sd


def _context_width(sd) -> int | None:
    """Cross-attention width (768 SD1, 1024 SD2, 2048 SDXL) from tensors or shape tuples."""
    for k, v in sd.items():
        shape = tuple(v.shape) if hasattr(v, "shape") else tuple(v)
        if k.startswith("model.diffusion_model.") and k.endswith("attn2.to_k.weight") and len(shape) == 2:
            return int(shape[1])
    return None


# ---------------------------------------------------------------------------------------------------------------
# fitting a default config to the file's shapes

def _count(sd, prefix: str) -> int:
    """Number of consecutive numbered children ``prefix{i}.`` present in the keys."""
    n = 0
    while any(k.startswith(f"{prefix}{n}.") for k in sd):
        n += 1
    return n


def _unet_shape(sd, p="model.diffusion_model.") -> dict:
    w = sd[p + "input_blocks.0.0.weight"]
    mc = int(w.shape[0])
    levels: list[list[tuple[int, int]]] = [[]]
    i = 1
    while any(k.startswith(f"{p}input_blocks.{i}.") for k in sd):
        if f"{p}input_blocks.{i}.0.op.weight" in sd:
            levels.append([])
        else:
            out = int(sd[f"{p}input_blocks.{i}.0.out_layers.3.weight"].shape[0])
            depth = _count(sd, f"{p}input_blocks.{i}.1.transformer_blocks.")
            levels[-1].append((out, depth))
        i += 1
    if not levels[0]:
        raise CheckpointError("the UNet has no resblocks after input_blocks.0: not an SD UNet layout")
    depths = [max(d for _, d in lvl) for lvl in levels]
    proj = sd.get(f"{p}middle_block.1.proj_in.weight")
    info = {"model_channels": mc, "in_channels": int(w.shape[1]),
            "out_channels": int(sd[p + "out.2.weight"].shape[0]),
            "num_res_blocks": len(levels[0]), "channel_mult": [lvl[0][0] // mc for lvl in levels],
            "depths": depths, "attention_resolutions": [2 ** i for i, d in enumerate(depths) if d > 0],
            "middle_depth": _count(sd, f"{p}middle_block.1.transformer_blocks."),
            "context_dim": _context_width(sd),
            "linear": proj is not None and proj.ndim == 2}
    if f"{p}label_emb.0.0.weight" in sd:
        info["adm_in_channels"] = int(sd[f"{p}label_emb.0.0.weight"].shape[1])
    return info


def _fit_unet(params: dict, sd: dict, sgm: bool, notes: list[str]) -> None:
    s = _unet_shape(sd)
    if s["in_channels"] != 4:
        kind = {9: "an inpainting", 8: "an instruct-pix2pix"}.get(s["in_channels"], "a non-standard")
        raise CheckpointError(f"{kind} checkpoint (UNet takes {s['in_channels']} input channels): LoRA training "
                              "here supports the base text-to-image models only")
    params.update({k: s[k] for k in ("model_channels", "in_channels", "out_channels", "num_res_blocks",
                                     "channel_mult", "attention_resolutions", "context_dim")})
    params["use_linear_in_transformer"] = s["linear"]
    used = [d for d in s["depths"] if d > 0]
    if sgm:
        old = params.get("transformer_depth", 1)
        old = old if isinstance(old, (list, tuple)) else [old] * len(s["depths"])
        params["transformer_depth"] = [d if d > 0 else (old[i] if i < len(old) else 1)
                                       for i, d in enumerate(s["depths"])]
        if s["middle_depth"] != params["transformer_depth"][-1]:
            params["transformer_depth_middle"] = s["middle_depth"]  # only newer sgm takes it: checked at build
        if "adm_in_channels" in s:
            params["adm_in_channels"] = s["adm_in_channels"]
    else:
        if len(set(used)) > 1:
            raise CheckpointError(f"the UNet has different transformer depths per level ({s['depths']}); ldm "
                                  "supports one depth: this is not an SD1/SD2 layout")
        params["transformer_depth"] = used[0] if used else 1
    # heads are not stored in the weights; a width below the config's head size would give 0 heads
    hc = params.get("num_head_channels", -1)
    if hc and hc > 0 and s["model_channels"] < hc:
        params["num_head_channels"] = max(1, s["model_channels"] // 4)
        notes.append(f"UNet narrower than one {hc}-channel head: using {params['num_head_channels']}-channel heads "
                     "(head counts are not stored in weights; put a .yaml beside the checkpoint to set them)")


def _fit_vae(params: dict, sd: dict, prefix="first_stage_model.") -> None:
    dd = params["ddconfig"]
    conv_in = sd.get(prefix + "encoder.conv_in.weight")
    if conv_in is None:
        conv_in = sd.get(prefix + "decoder.conv_out.weight")  # [3, ch, 3, 3]
        if conv_in is None:
            return  # no VAE in the file: reported as missing weights after the load
        ch = int(conv_in.shape[1])
    else:
        ch = int(conv_in.shape[0])
    dd["ch"] = ch
    side = "encoder.down." if _count(sd, prefix + "encoder.down.") else "decoder.up."
    n_levels = _count(sd, prefix + side)
    if side == "encoder.down.":
        mult = [int(sd[f"{prefix}encoder.down.{lvl}.block.0.conv1.weight"].shape[0]) // ch for lvl in range(n_levels)]
        dd["num_res_blocks"] = _count(sd, prefix + "encoder.down.0.block.")
        dd["attn_resolutions"] = [dd.get("resolution", 256) // 2 ** lvl for lvl in range(n_levels)
                                  if f"{prefix}encoder.down.{lvl}.attn.0.norm.weight" in sd]
    else:  # decoder level l has the channels of ch_mult[l]; it holds num_res_blocks + 1 blocks
        mult = [int(sd[f"{prefix}decoder.up.{lvl}.block.0.conv2.weight"].shape[0]) // ch for lvl in range(n_levels)]
        dd["num_res_blocks"] = _count(sd, prefix + "decoder.up.0.block.") - 1
    dd["ch_mult"] = mult
    if prefix + "decoder.conv_in.weight" in sd:
        dd["z_channels"] = int(sd[prefix + "decoder.conv_in.weight"].shape[1])
    elif prefix + "encoder.conv_out.weight" in sd:
        dd["z_channels"] = int(sd[prefix + "encoder.conv_out.weight"].shape[0]) // (2 if dd.get("double_z") else 1)
    if prefix + "post_quant_conv.weight" in sd:
        params["embed_dim"] = int(sd[prefix + "post_quant_conv.weight"].shape[0])
    elif prefix + "quant_conv.weight" in sd:
        params["embed_dim"] = int(sd[prefix + "quant_conv.weight"].shape[0]) // 2


def _hf_clip_config(sd: dict, p: str):
    """CLIP text config from an HF CLIPTextModel's tensors under ``p`` (``...transformer.``)."""
    tok = sd.get(p + "text_model.embeddings.token_embedding.weight")
    if tok is None:
        return None
    cfg = clip_l_text_config(
        layers=_count(sd, p + "text_model.encoder.layers."), hidden=int(tok.shape[1]),
        intermediate=int(sd[p + "text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        max_positions=int(sd[p + "text_model.embeddings.position_embedding.weight"].shape[0]))
    cfg.vocab_size = int(tok.shape[0])
    return cfg


def _open_clip_arch(sd: dict, p: str) -> str | None:
    """Register a text-only open_clip config matching the tensors under ``p`` (``...model.``); return its name.

    The stock ViT-H-14 / ViT-bigG-14 configs also build the image tower (0.6 / 1.8 G parameters) that the
    embedder deletes right away; a 1-layer stand-in keeps loading fast and small."""
    from open_clip import factory

    tok = sd.get(p + "token_embedding.weight")
    if tok is None:
        return None
    width = int(tok.shape[1])
    layers = _count(sd, p + "transformer.resblocks.")
    proj = sd.get(p + "text_projection")
    embed = int(proj.shape[1]) if proj is not None else width
    ctx = int(sd[p + "positional_embedding"].shape[0])
    mlp = int(sd[p + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
    if mlp != 4 * width:  # open_clip 2.20's text config has no mlp_ratio: every CLIP text tower uses 4
        raise CheckpointError(f"the OpenCLIP text encoder has an MLP width of {mlp} for width {width} (expected "
                              f"{4 * width}): not an SD2/SDXL text encoder")
    name = f"lora-studio-text-w{width}-l{layers}-e{embed}-c{ctx}"
    factory._MODEL_CONFIGS[name] = {
        "embed_dim": embed,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": ctx, "vocab_size": int(tok.shape[0]), "width": width,
                     "heads": max(1, width // 64), "layers": layers},
    }
    return name


# ---------------------------------------------------------------------------------------------------------------
# config choice

def _load_yaml(path: str) -> dict:
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:  # noqa: BLE001 - yaml/omegaconf errors vary; the user needs the file and the reason
        raise CheckpointError(f"cannot read the model config {path}: {e}", path) from None
    if isinstance(cfg, dict) and "model" in cfg:
        cfg = cfg["model"]
    if not isinstance(cfg, dict) or "target" not in cfg:
        raise CheckpointError(f"{path} is not a model config (no model.target)", path)
    return cfg


def _choose_config(path, family, config, webui, v, notes) -> tuple[dict, str, bool]:
    """(config dict, where it came from, whether it may be fitted to the shapes)."""
    if isinstance(config, dict):
        cfg = copy.deepcopy(config)
        return (cfg.get("model", cfg), "given as a dict", False)
    if config:
        return _load_yaml(os.fspath(config)), os.fspath(config), False
    beside = os.path.splitext(path)[0] + ".yaml"
    if os.path.isfile(beside):
        return _load_yaml(beside), beside, False
    key = "sd2v" if family == "sd2" and v else family
    if webui:
        wp = os.path.join(webui, *_WEBUI_CONFIGS[key])
        if os.path.isfile(wp):
            return _load_yaml(wp), wp, True
        if family == "sdxl":
            raise CheckpointError(f"{wp} not found: is {webui} an AUTOMATIC1111 WebUI folder that has started once "
                                  "(it clones repositories/generative-models on first start)?")
        notes.append(f"{wp} not found; using the embedded copy of {_WEBUI_CONFIGS[key][-1]}")
    default = {"sd1": v1_inference, "sd2": lambda: v2_inference(v), "sdxl": sd_xl_base}[family]()
    return default, f"embedded {_WEBUI_CONFIGS[key][-1]}", True


# ---------------------------------------------------------------------------------------------------------------
# building

@contextmanager
def _code_paths(webui: str | None, family: str, notes: list[str]):
    """Put the WebUI's ldm/sgm checkouts first on sys.path while building (they win over a pip ``ldm``)."""
    added = []
    if webui:
        if not os.path.isdir(webui):
            raise CheckpointError(f"--webui {webui}: no such folder")
        names = ["sgm"] if family == "sdxl" else ["ldm"]
        for name in names:
            repo = os.path.join(webui, *_WEBUI_REPOS[name])
            if not os.path.isdir(os.path.join(repo, name)):
                if name == "sgm":
                    raise CheckpointError(f"{repo}/sgm not found: is {webui} an AUTOMATIC1111 WebUI folder that has "
                                          "started once (it clones repositories/generative-models on first start)?")
                notes.append(f"{repo}/ldm not found; using the installed ldm package")
                continue
            loaded = sys.modules.get(name)
            if loaded is not None and not os.path.realpath(getattr(loaded, "__file__", "") or "").startswith(
                    os.path.realpath(repo)):
                notes.append(f"`{name}` was already imported from {os.path.dirname(loaded.__file__)}; using that copy")
                continue
            if repo not in sys.path:
                sys.path.insert(0, repo)
                added.append(repo)
    try:
        yield
    finally:
        # the imported modules stay cached in sys.modules; the path entry is not needed afterwards
        for repo in added:
            if repo in sys.path:
                sys.path.remove(repo)


def _import_ldm():
    try:
        from ldm.util import instantiate_from_config
    except ImportError as e:
        raise CheckpointError(
            f"cannot import ldm ({e}). Install stable-diffusion-sdkit==2.1.5 with --no-deps (plus omegaconf, "
            "pytorch_lightning 1.9.x, open-clip-torch 2.20.0), or pass --webui PATH to use the WebUI's copy") from None
    return instantiate_from_config


def _set_embedder_devices(model, device):
    """ldm/sgm text embedders send token ids to their ``.device`` attribute, not to where their weights are."""
    for m in model.modules():
        if hasattr(m, "tokenizer") or type(m).__name__.startswith("FrozenOpenCLIP"):
            if hasattr(m, "device") and not isinstance(getattr(type(m), "device", None), property):
                try:
                    m.device = torch.device(device)
                except AttributeError:  # a read-only property on some classes: they follow their weights
                    pass


def _fit(fn, part: str, notes: list[str]) -> None:
    """Fit one part; a part whose tensors are missing keeps the config's sizes (the load then lists them)."""
    try:
        fn()
    except KeyError as e:
        notes.append(f"{part} sizes not read from the file ({e.args[0]} is missing); using the config's")


def _prepare_ldm_config(cfg: dict, sd: dict, fit: bool, family: str, v: bool | None, dtype, notes) -> dict:
    params = cfg.setdefault("params", {})
    unet = params["unet_config"].setdefault("params", {})
    if fit:
        _fit(lambda: _fit_unet(unet, sd, sgm=False, notes=notes), "UNet", notes)
        _fit(lambda: _fit_vae(params["first_stage_config"]["params"], sd), "VAE", notes)
    unet["use_checkpoint"] = False  # A1111's repair_config; the trainer checkpoints itself
    unet["use_fp16"] = False  # its input cast follows `unet.dtype`, set to the weights' dtype after loading
    if v is not None:
        params["parameterization"] = "v" if v else "eps"
    cond = params["cond_stage_config"]
    cp = cond.setdefault("params", {})
    cp["device"] = "cpu"
    if family == "sd2":
        arch = _open_clip_arch(sd, "cond_stage_model.model.")
        if arch:
            cp["arch"] = arch
        cp["version"] = None  # no pretrained download: the weights come from the file
    return cfg


def _prepare_sgm_config(cfg: dict, sd: dict, fit: bool, v: bool | None, notes) -> dict:
    params = cfg.setdefault("params", {})
    net = params["network_config"].setdefault("params", {})
    if fit:
        _fit(lambda: _fit_unet(net, sd, sgm=True, notes=notes), "UNet", notes)
        _fit(lambda: _fit_vae(params["first_stage_config"]["params"], sd), "VAE", notes)
    net["use_checkpoint"] = False
    if "transformer_depth_middle" in net and not _accepts(params["network_config"]["target"],
                                                          "transformer_depth_middle"):
        raise CheckpointError(f"the UNet's middle block has {net['transformer_depth_middle']} transformer blocks "
                              f"but its last level {net['transformer_depth'][-1]}; this sgm version cannot build that")
    net["spatial_transformer_attn_type"] = "softmax"  # xformers is optional; sgm's default needs it
    params["first_stage_config"]["params"].setdefault("ddconfig", {})["attn_type"] = "vanilla"
    for k in ("loss_fn_config", "sampler_config", "ckpt_path"):
        params.pop(k, None)
    if v is not None:
        den = params.setdefault("denoiser_config", {}).setdefault("params", {})
        den["scaling_config"] = {"target": "sgm.modules.diffusionmodules.denoiser_scaling."
                                           + ("VScaling" if v else "EpsScaling")}
    for i, emb in enumerate(params.get("conditioner_config", {}).get("params", {}).get("emb_models", [])):
        t = emb.get("target", "")
        ep = emb.setdefault("params", {})
        if t.endswith("FrozenCLIPEmbedder"):
            n = _count(sd, f"conditioner.embedders.{i}.transformer.text_model.encoder.layers.")
            if n and ep.get("layer") == "hidden" and ep.get("layer_idx", 0) >= n:
                ep["layer_idx"] = n - 1
        elif t.endswith("FrozenOpenCLIPEmbedder2") or t.endswith("FrozenOpenCLIPEmbedder"):
            arch = _open_clip_arch(sd, f"conditioner.embedders.{i}.model.")
            if arch:
                ep["arch"] = arch
            ep["version"] = None
    return cfg


def _accepts(target: str, name: str) -> bool:
    import inspect

    from sgm.util import get_obj_from_str
    try:
        return name in inspect.signature(get_obj_from_str(target).__init__).parameters
    except (ImportError, AttributeError, ValueError):
        return False


def sdxl_alphas_cumprod() -> torch.Tensor:
    # sgm LegacyDDPMDiscretization ("linear": linspace over sqrt(beta), squared), as A1111's extend_sdxl uses
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


def _build(cfg: dict, sd: dict, family: str):
    import open_clip

    te_prefix = "conditioner.embedders.0.transformer." if family == "sdxl" else "cond_stage_model.transformer."
    text_cfg = _hf_clip_config(sd, te_prefix)
    if text_cfg is None:
        text_cfg = clip_l_text_config()
    original = open_clip.create_model_and_transforms

    def no_pretrained(*args, pretrained=None, **kwargs):
        return original(*args, pretrained=None, **kwargs)

    with ExitStack() as stack:
        stack.enter_context(offline_clip(text_cfg))
        stack.enter_context(skip_default_init())
        stack.enter_context(mock.patch.object(open_clip, "create_model_and_transforms", no_pretrained))
        if family == "sdxl":
            from sgm.util import instantiate_from_config
        else:
            instantiate_from_config = _import_ldm()
        from omegaconf import OmegaConf
        # ldm/sgm print progress chatter ("Running in eps-prediction mode", ...) while building: keep it off the
        # CLI's output, show it only if building fails
        chatter = io.StringIO()
        sgm_log = logging.getLogger("sgm")
        level = sgm_log.level
        sgm_log.setLevel(logging.ERROR)  # sgm logs a warning per transformer block about context dims
        try:
            with redirect_stdout(chatter):
                return instantiate_from_config(OmegaConf.create(cfg))
        except Exception:
            sys.stdout.write(chatter.getvalue())
            raise
        finally:
            sgm_log.setLevel(level)


_IGNORED_MISSING = re.compile(r"(^|\.)position_ids$|^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|"
                              r"sqrt_one_minus_alphas_cumprod|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|"
                              r"sqrt_recipm1_alphas_cumprod|posterior_variance|posterior_log_variance_clipped|"
                              r"posterior_mean_coef1|posterior_mean_coef2|logvar|lvlb_weights|model_ema\..*|"
                              r"denoiser\..*|scale_factor)$")


def _load_weights(model, sd: dict, report: LoadReport) -> None:
    # position_ids: a buffer transformers builds itself; some files carry broken float copies (A1111 fixes them too)
    sd = {k: v for k, v in sd.items() if not k.endswith("embeddings.position_ids")}
    own = model.state_dict()
    # transformers 5 builds CLIPTextModel without its `text_model` level; the files keep it
    sd = {(k.replace(".transformer.text_model.", ".transformer.", 1)
           if ".transformer.text_model." in k and k not in own
           and k.replace(".transformer.text_model.", ".transformer.", 1) in own else k): v for k, v in sd.items()}
    wrong = [k for k, v in sd.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if wrong:
        k = wrong[0]
        raise CheckpointError(
            f"{len(wrong)} tensor(s) in the file have other shapes than the model built from "
            f"{report.config_source} (e.g. {k}: file {tuple(sd[k].shape)}, model {tuple(own[k].shape)}). The "
            f"file's layout differs from the config: put the matching .yaml beside the checkpoint.", report.path)
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not _IGNORED_MISSING.search(k)]
    unexpected = list(result.unexpected_keys)
    report.missing, report.unexpected = missing, unexpected
    if missing:
        parts = {}
        for k in missing:
            part = ("UNet" if k.startswith("model.") else "VAE" if k.startswith("first_stage_model.")
                    else "text encoder" if k.startswith(("cond_stage_model.", "conditioner.")) else "other")
            parts.setdefault(part, []).append(k)
        detail = "; ".join(f"{p}: {len(ks)} (e.g. {ks[0]})" for p, ks in parts.items())
        raise CheckpointError(
            f"{len(missing)} weight(s) the model needs are not in the file ({detail}). It is not a complete "
            f"single-file SD checkpoint (a UNet-only, VAE-less or pruned file?), or its layout differs from the "
            f"config ({report.config_source}); put the right .yaml beside it.", report.path)
    if unexpected:
        ema = [k for k in unexpected if k.startswith("model_ema.")]
        other = [k for k in unexpected if not k.startswith("model_ema.")]
        if ema:
            report.notes.append(f"{len(ema)} EMA tensors in the file ignored (the non-EMA weights are used, as in "
                                "the WebUI)")
        if other:
            report.notes.append(f"{len(other)} key(s) in the file have no place in the model and were ignored, e.g. "
                                + ", ".join(other[:3]))


def _v_test(model, family) -> bool:
    """A1111's is_using_v_parameterization_for_sd2: v-models push a constant input far down at t=999."""
    unet = model.model.diffusion_model
    p = next(unet.parameters())
    ctx = _unet_context(model)
    with torch.no_grad():
        x = torch.ones((1, 4, 8, 8), device=p.device, dtype=torch.float32) * 0.5
        c = torch.ones((1, 2, ctx), device=p.device, dtype=torch.float32) * 0.5
        with _fp32(unet):
            out = (unet(x, torch.asarray([999], device=p.device), context=c) - x).mean().item()
    return out < -1


def _unet_context(model) -> int:
    for name, m in model.model.diffusion_model.named_modules():
        if name.endswith("attn2.to_k"):
            return m.in_features
    return 768


@contextmanager
def _fp32(module):
    """Run a module in fp32 for one check, then put its dtype back."""
    dtype = next(module.parameters()).dtype
    if dtype != torch.float32:
        module.float()
    try:
        yield
    finally:
        if dtype != torch.float32:
            module.to(dtype)


def load_checkpoint(path, *, config=None, v_parameterization: bool | None = None, webui: str | None = None,
                    device="cpu", dtype=torch.float32, vae_dtype=None, log=None) -> HeadlessHost:
    """Build an SD1.x/SD2.x/SDXL checkpoint as the WebUI would and return a ModelHost over it.

    ``config``: yaml path or dict (else ``<checkpoint>.yaml``, the WebUI's yaml, or the embedded default).
    ``v_parameterization``: True/False forces it (SD2 768-v / eps); None reads the config, else (SD2 with a
    default config) runs A1111's test on the UNet. ``dtype``: weights of the UNet and text encoder(s);
    ``vae_dtype`` defaults to ``dtype``. The noise schedule stays fp32.
    ``log``: a callable for progress lines (e.g. print).
    """
    t0 = time.time()
    path = os.fspath(path)
    say = log or (lambda *_: None)
    notes: list[str] = []
    sd, metadata = read_state_dict(path)
    sd = _fix_keys(sd, notes)
    from ..apply.checkpoint import detect_checkpoint_family
    try:
        family = detect_checkpoint_family({k: tuple(v.shape) for k, v in sd.items()})
    except UnsupportedFamilyError as e:
        raise CheckpointError(str(e), path) from None
    if family == "sdxl" and not webui and importlib.util.find_spec("sgm") is None:
        raise CheckpointError(SDXL_NEEDS_WEBUI, path)
    cfg, source, fit = _choose_config(path, family, config, webui, bool(v_parameterization), notes)
    say(f"building {family.upper()} model ({source})")
    with _code_paths(webui, family, notes):
        if family == "sdxl":
            cfg = _prepare_sgm_config(cfg, sd, fit, v_parameterization, notes)
        else:
            cfg = _prepare_ldm_config(cfg, sd, fit, family, v_parameterization, dtype, notes)
        try:
            model = _build(cfg, sd, family)
        except CheckpointError:
            raise
        except ImportError as e:
            raise CheckpointError(f"building the model needs a module that cannot be imported: {e}", path) from None
        except Exception as e:  # noqa: BLE001 - config/shape errors from ldm/sgm: say which file and config
            raise CheckpointError(f"could not build the model from {source}: {type(e).__name__}: {e}", path) from e
    report = LoadReport(path=path, family=family, parameterization="eps", config_source=source, notes=notes)
    say(f"loading {len(sd)} tensors")
    _load_weights(model, sd, report)
    del sd
    freeze_(model)

    if family == "sdxl":
        model.alphas_cumprod = sdxl_alphas_cumprod()
        scaling = str(cfg["params"].get("denoiser_config", {}).get("params", {}).get("scaling_config", {})
                      .get("target", ""))
        model.parameterization = "v" if scaling.endswith("VScaling") else "eps"
    elif family == "sd2" and v_parameterization is None and fit:
        if _v_test(model, family):
            model.parameterization = "v"
            notes.append("v-prediction detected (A1111's test on the UNet); set v_parameterization to override")
        else:
            notes.append("eps-prediction detected (A1111's test on the UNet); set v_parameterization to override")
    report.parameterization = getattr(model, "parameterization", "eps")

    set_family_flags(model, family)
    dev = torch.device(device)
    vae_dtype = vae_dtype or dtype
    if dev.type == "cpu" and (dtype != torch.float32 or vae_dtype != torch.float32):
        # ldm's GroupNorm32 runs fp32 activations against the weights: CPU kernels refuse mixed dtypes
        notes.append("half-precision weights are for CUDA; on the CPU the model is kept in float32 (as the "
                     "WebUI's --no-half does)")
        dtype = vae_dtype = torch.float32
    model.to(dev)
    parts = [model.model, model.conditioner if family == "sdxl" else model.cond_stage_model]
    for part in parts:
        part.to(dtype)
    unet = model.model.diffusion_model
    if isinstance(getattr(unet, "dtype", None), torch.dtype):
        unet.dtype = dtype  # ldm's UNet casts its input to this plain attribute (fp16/bf16 weights need it)
    model.first_stage_model.to(vae_dtype)
    _set_embedder_devices(model, dev)
    if metadata:
        model.checkpoint_metadata = metadata
    report.seconds = time.time() - t0
    name = os.path.splitext(os.path.basename(path))[0]
    return HeadlessHost(model, name=name, path=path, device=dev, report=report)


def checkpoint_family(path) -> str:
    """'sd1' | 'sd2' | 'sdxl' from the file's header only (no tensors read); .ckpt files are read fully."""
    from ..apply.checkpoint import detect_checkpoint_family
    from ..formats.safetensors_io import read_header

    path = os.fspath(path)
    if os.path.splitext(path)[1].lower() == ".safetensors" and os.path.isfile(path):
        try:
            header = read_header(path)
        except LoraFileError as e:
            raise CheckpointError(str(e).replace("LoRA", "checkpoint"), path) from None
        shapes = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    else:
        sd, _ = read_state_dict(path)
        shapes = {k: tuple(v.shape) for k, v in sd.items()}
    shapes = _fix_keys(shapes, [])
    try:
        return detect_checkpoint_family(shapes)
    except UnsupportedFamilyError as e:
        raise CheckpointError(str(e), path) from None
