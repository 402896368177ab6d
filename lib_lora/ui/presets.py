"""Training parameters as the tab shows them: the field table, the presets, and sd-scripts TOML import/export.

Every field is a ``TrainConfig`` key (sd-scripts' option name) except the few ``ui_*`` ones that only the tab uses
(the sample prompt, the extra keys). Values go UI -> config dict -> ``parse_train_config`` (the engine's own parser
checks them), and TOML -> ``parse_train_config_text`` -> UI, so the tab never has a second, divergent parser.
"""
from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass
from typing import Any

from ..train.config import TrainConfig, TrainConfigError, config_keys, parse_train_config
from ..train.optim import OPTIMIZERS, SCHEDULERS

_UNSET = object()

GROUPS = (
    ("network", "Network"),
    ("length", "Length and saving"),
    ("batch", "Batch and resolution"),
    ("lr", "Learning rates"),
    ("optimizer", "Optimizer"),
    ("precision", "Precision and memory"),
    ("captions", "Captions"),
    ("advanced", "Advanced"),
)


@dataclass(frozen=True)
class Field:
    key: str            # TrainConfig key, or ui_* for tab-only values
    label: str          # plain string: A1111's localization JSON can translate it
    kind: str           # int | float | bool | choice | text | reso | args
    info: str           # the one-line tooltip
    group: str
    choices: tuple = ()
    off: Any = _UNSET   # the UI value that means "not set" (None in the config)
    minimum: float | None = None
    custom: bool = False  # a choice field that also takes a typed value (any sd-scripts optimizer name)


FIELDS: tuple[Field, ...] = (
    # --- network
    Field("network_dim", "Network rank (dim)", "int",
          "Size of the LoRA: 8-32 for a character, more for a style; bigger = larger file, more detail.", "network",
          minimum=1),
    Field("network_alpha", "Network alpha", "float",
          "Scales the LoRA by alpha/dim; dim/2 is common. With alpha 1 a big dim needs a much higher learning rate.",
          "network", minimum=0),
    Field("network_module", "Network type", "choice",
          "networks.lora: LoRA (LoCon via conv_dim); lora_fa: LoRA-FA; dylora: DyLoRA (unit=N); oft: OFT; "
          "lycoris.kohya: algo=loha, lokr, ia3, full, diag-oft, boft...", "network",
          choices=("networks.lora", "networks.lora_fa", "networks.dylora", "networks.oft", "lycoris.kohya"),
          off="networks.lora"),
    # --- length and saving
    Field("max_train_epochs", "Epochs", "int",
          "Passes over the dataset (images x repeats). 0 = stop after 'Max steps' instead.", "length", off=0, minimum=0),
    Field("max_train_steps", "Max steps", "int", "Used only when Epochs is 0.", "length", minimum=1),
    Field("save_every_n_epochs", "Save every N epochs", "int",
          "Also writes name-00000N.safetensors every N epochs so you can pick the best one; 0 = final file only.",
          "length", off=0, minimum=0),
    Field("sample_every_n_epochs", "Sample images every N epochs", "int",
          "Renders the sample prompt with the LoRA trained so far (and at the end); 0 = no samples.", "length",
          off=0, minimum=0),
    Field("ui_sample_prompt", "Sample prompt", "text",
          "Saved as a prompts file; include your trigger word. sd-scripts options work: --n --s --d --w --h --l, "
          "--ss euler_a (default ddim).", "length"),
    # --- batch and resolution
    Field("train_batch_size", "Batch size", "int",
          "Images per step; more needs more VRAM (SD1.5: 1-2 on 8 GB, 4 on 24 GB).", "batch", minimum=1),
    Field("resolution", "Resolution", "reso",
          "Training size: 512 for SD1.5, 768 for SD2-v, 1024 for SDXL; 'width,height' also works.", "batch"),
    Field("enable_bucket", "Aspect-ratio buckets", "bool",
          "Train each image near its own aspect ratio instead of cropping it to the resolution.", "batch"),
    Field("min_bucket_reso", "Smallest bucket side", "int", "Buckets never get a side shorter than this.", "batch",
          minimum=64),
    Field("max_bucket_reso", "Largest bucket side", "int", "Buckets never get a side longer than this.", "batch",
          minimum=64),
    Field("bucket_reso_steps", "Bucket step", "int", "Bucket sides are multiples of this (64; 32 is allowed for SDXL).",
          "batch", minimum=8),
    Field("bucket_no_upscale", "Don't enlarge small images", "bool",
          "Small images get a smaller bucket instead of being scaled up.", "batch"),
    # --- learning rates
    Field("unet_lr", "UNet learning rate", "float", "1e-4 is a common start with AdamW; Prodigy wants 1.", "lr",
          minimum=0),
    Field("text_encoder_lr", "Text encoder learning rate", "float",
          "Usually half the UNet rate (5e-5); 0 trains the UNet only.", "lr", minimum=0),
    Field("learning_rate", "Base learning rate", "float",
          "sd-scripts' learning_rate: the fallback for the two rates above.", "lr", minimum=0),
    Field("lr_scheduler", "Scheduler", "choice", "How the learning rate changes over the run.", "lr",
          choices=SCHEDULERS),
    Field("lr_warmup_steps", "Warm-up steps", "int",
          "Steps of linear warm-up at the start; a few percent of the run.", "lr", minimum=0),
    Field("lr_scheduler_num_cycles", "Scheduler cycles", "int",
          "Restarts for cosine_with_restarts; 1 is plain cosine.", "lr", minimum=1),
    Field("network_train_unet_only", "Train the UNet only", "bool",
          "Leaves the text encoder alone (saves memory; usual for SDXL).", "lr"),
    # --- optimizer
    Field("optimizer_type", "Optimizer", "choice",
          "Or type any sd-scripts name (DAdaptLion, torch.optim.RAdam). 8-bit ones need bitsandbytes; Prodigy and "
          "DAdapt find their own rate.", "optimizer", choices=OPTIMIZERS, custom=True),
    Field("optimizer_args", "Optimizer arguments", "args",
          "Space-separated key=value, e.g. weight_decay=0.01 betas=0.9,0.99", "optimizer"),
    Field("max_grad_norm", "Gradient clipping", "float", "Largest gradient norm; 1.0 is sd-scripts' default, 0 = off.",
          "optimizer", minimum=0),
    # --- precision and memory
    Field("mixed_precision", "Mixed precision", "choice",
          "fp16 for most GPUs, bf16 on RTX 30xx and newer; 'no' is fp32 (slow, more memory).", "precision",
          choices=("no", "fp16", "bf16")),
    Field("save_precision", "Saved file precision", "choice", "fp16 is what everyone shares; float doubles the size.",
          "precision", choices=("fp16", "bf16", "float")),
    Field("gradient_checkpointing", "Gradient checkpointing", "bool",
          "Saves a lot of VRAM for about 20-30% more time; turn it on if you run out of memory.", "precision"),
    Field("fp8_base", "FP8 base weights", "bool",
          "Keeps the model's Linear/Conv weights in 8 bits while training: about half the VRAM of fp16 weights "
          "(SDXL on 8-12 GB).", "precision"),
    Field("cache_latents_to_disk", "Cache latents on disk", "bool",
          "Keeps encoded images next to the output so a rerun or a resume skips the VAE.", "precision"),
    Field("no_half_vae", "Full-precision VAE", "bool", "Encode images in fp32 (SDXL in fp16 can give NaN).",
          "precision"),
    # --- captions
    Field("caption_extension", "Caption file extension", "text", "Captions are read from image-name + this (.txt).",
          "captions"),
    Field("shuffle_caption", "Shuffle caption tags", "bool",
          "Shuffles comma-separated tags every step (for tag-style captions).", "captions"),
    Field("keep_tokens", "Keep first N tags", "int", "Tags at the start never shuffled or dropped (your trigger: 1).",
          "captions", minimum=0),
    Field("caption_dropout_rate", "Caption dropout", "float", "Share of steps trained with an empty caption.",
          "captions", minimum=0),
    Field("caption_tag_dropout_rate", "Tag dropout", "float", "Chance to drop each tag (not the kept ones).",
          "captions", minimum=0),
    Field("caption_prefix", "Caption prefix", "text", "Added before every caption, e.g. your trigger word.",
          "captions", off=""),
    Field("weighted_captions", "Weighted captions", "bool",
          "Reads (word:1.3), (word) and [word] in captions as emphasis, like in prompts.", "captions"),
    Field("flip_aug", "Flip images", "bool", "Random horizontal flips; only for subjects that look the same mirrored.",
          "captions"),
    Field("alpha_mask", "Use transparency as a mask", "bool",
          "Transparent parts of PNG images teach nothing (e.g. a cut-out character without its background).",
          "captions"),
    Field("validation_split", "Hold out for validation", "float",
          "Share of the training images kept out to measure a validation loss each epoch (blue points on the "
          "loss curve): 0.1 = one in ten. 0 = off.", "captions", off=0.0, minimum=0),
    # --- advanced
    Field("seed", "Seed", "int", "Same seed and settings give the same LoRA; -1 = random.", "advanced", off=-1),
    Field("clip_skip", "Clip skip", "int", "2 for anime-based SD1.5 models, else 1.", "advanced", off=1, minimum=1),
    Field("noise_offset", "Noise offset", "float", "0.03-0.1 helps very dark and bright images; 0 = off.", "advanced",
          off=0.0, minimum=0),
    Field("min_snr_gamma", "Min-SNR gamma", "float", "5 is the usual value; steadier training. 0 = off.", "advanced",
          off=0.0, minimum=0),
    Field("prior_loss_weight", "Regularisation loss weight", "float", "Weight of regularisation images' loss (1.0).",
          "advanced", minimum=0),
    Field("gradient_accumulation_steps", "Gradient accumulation", "int",
          "Add up N batches per step: a bigger effective batch without more VRAM.", "advanced", minimum=1),
    Field("network_dropout", "Network dropout", "float", "Dropout inside the LoRA (0.1 is common); 0 = off.",
          "advanced", off=0.0, minimum=0),
    Field("network_args", "Network arguments", "args",
          "Space-separated key=value: conv_dim=8 conv_alpha=4 (LoCon), loraplus_lr_ratio=16, "
          "down_lr_weight=cosine; LyCORIS: algo=loha, dora_wd=True (see README).", "advanced"),
    Field("ui_extra_toml", "Other sd-scripts keys (TOML)", "text",
          "Keys this form has no field for; kept on import and written on export.", "advanced"),
)

FIELD_BY_KEY = {f.key: f for f in FIELDS}
UI_ONLY = {f.key for f in FIELDS if f.key.startswith("ui_")}
# keys the Dataset tab owns (folder fields) and the output fields on the Train tab
PATH_KEYS = ("train_data_dir", "reg_data_dir", "output_dir", "output_name")

# The form's starting point: the seed tutorial's values (training-anchors §8), not sd-scripts' CLI defaults.
BASE = {
    "network_dim": 32, "network_alpha": 16.0, "network_module": None, "max_train_epochs": 10, "max_train_steps": 1600,
    "save_every_n_epochs": 2, "sample_every_n_epochs": 2, "ui_sample_prompt": "",
    "train_batch_size": 2, "resolution": (512, 512), "enable_bucket": True, "min_bucket_reso": 256,
    "max_bucket_reso": 1024, "bucket_reso_steps": 64, "bucket_no_upscale": False,
    "unet_lr": 1e-4, "text_encoder_lr": 5e-5, "learning_rate": 1e-4, "lr_scheduler": "cosine", "lr_warmup_steps": 100,
    "lr_scheduler_num_cycles": 1, "network_train_unet_only": False,
    "optimizer_type": "AdamW8bit", "optimizer_args": None, "max_grad_norm": 1.0,
    "mixed_precision": "fp16", "save_precision": "fp16", "gradient_checkpointing": False,
    "cache_latents_to_disk": False, "no_half_vae": False, "fp8_base": False,
    "caption_extension": ".txt", "shuffle_caption": False, "keep_tokens": 0, "caption_dropout_rate": 0.0,
    "caption_tag_dropout_rate": 0.0, "caption_prefix": None, "weighted_captions": False, "flip_aug": False,
    "alpha_mask": False,
    "validation_split": None,
    "seed": None, "clip_skip": None, "noise_offset": None, "min_snr_gamma": None, "prior_loss_weight": 1.0,
    "gradient_accumulation_steps": 1, "network_dropout": None, "network_args": None, "ui_extra_toml": "",
}

PRESETS: dict[str, dict] = {
    # training-anchors §8 "seed tutorials" row; cosine_with_restarts with 1 cycle is plain cosine, so say cosine
    "SD1.5 character": {},
    # styles: many varied images, tag captions; shuffle keeps the model from tying the style to tag order
    "SD1.5 style": {"text_encoder_lr": 2.5e-5, "shuffle_caption": True, "keep_tokens": 1, "flip_aug": True,
                    "noise_offset": 0.05, "max_train_epochs": 12},
    # training-anchors §8 SDXL counterparts: 1024, buckets 256-2048, bf16 + fp32 VAE, UNet only, min-SNR 5
    "SDXL character": {"resolution": (1024, 1024), "max_bucket_reso": 2048, "train_batch_size": 1,
                       "mixed_precision": "bf16", "no_half_vae": True, "network_train_unet_only": True,
                       "text_encoder_lr": 0.0, "min_snr_gamma": 5.0, "noise_offset": 0.0357,
                       "gradient_checkpointing": True},
    # SD2.x 768-v models were trained at 768: the character preset at their size
    "SD2.x 768-v character": {"resolution": (768, 768), "max_bucket_reso": 1536},
}
PRESET_NOTES = {
    "SD1.5 character": "dim 32 / alpha 16, UNet 1e-4, text encoder 5e-5, AdamW8bit, batch 2, 10 epochs, saves every "
                       "2 epochs, 512 with buckets 256-1024 (the tutorial values).",
    "SD1.5 style": "as the character preset, with a lower text-encoder rate, caption shuffling (first tag kept), "
                   "flips, noise offset 0.05 and 12 epochs.",
    "SDXL character": "1024 with buckets up to 2048, batch 1, bf16 with an fp32 VAE, UNet only, min-SNR 5, "
                      "noise offset 0.0357, gradient checkpointing.",
    "SD2.x 768-v character": "the SD1.5 character values at 768 px (the size SD2.x 768-v models were trained at), "
                             "buckets up to 1536.",
}


def preset_for_family(family: str | None, parameterization: str | None = None) -> str:
    """The preset the form starts from for the loaded model."""
    if family == "sdxl":
        return "SDXL character"
    if family == "sd2" and parameterization == "v":
        return "SD2.x 768-v character"
    return "SD1.5 character"


def preset_values(name: str) -> dict:
    """BASE updated by the preset: every field's config value."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return {**BASE, **PRESETS[name]}


# ---------------------------------------------------------------------------------------------------------------
# config value <-> UI value


def _fmt_reso(v) -> str:
    if v is None:
        return ""
    w, h = v
    return str(w) if w == h else f"{w},{h}"


def to_ui(field: Field, value):
    """The value a component shows for a config value."""
    if field.kind == "reso":
        return _fmt_reso(value)
    if field.kind == "args":
        return " ".join(value) if value else ""
    if value is None:
        if field.off is not _UNSET:
            return field.off
        return "" if field.kind == "text" else value
    if field.kind == "int":
        return int(value)
    if field.kind == "float":
        return float(value)
    return value


def from_ui(field: Field, value):
    """The config value for what a component holds (None = leave the key out)."""
    if field.kind == "reso":
        s = str(value or "").strip()
        return s or None  # the engine's parser reads "512" / "512,768"
    if field.kind == "args":
        s = str(value or "").strip()
        return s.split() if s else None
    if field.kind == "text":
        s = "" if value is None else str(value)
        return None if (field.off is not _UNSET and s == field.off) else s
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if field.kind == "int":
        f = float(value)
        if not f.is_integer():
            raise TrainConfigError(f"{field.label}: {value!r} is not a whole number")
        v = int(f)
    elif field.kind == "float":
        v = float(value)
        if not math.isfinite(v):
            raise TrainConfigError(f"{field.label}: {value!r} is not a finite number")
    else:
        v = value
    if field.off is not _UNSET and v == field.off:
        return None
    if field.minimum is not None and isinstance(v, (int, float)) and not isinstance(v, bool) and v < field.minimum:
        raise TrainConfigError(f"{field.label} must be at least {field.minimum:g}, got {value!r}")
    return v


def form_defaults(preset: str) -> dict:
    return {k: to_ui(FIELD_BY_KEY[k], v) for k, v in preset_values(preset).items()}


def collect_config(ui_values: dict, paths: dict | None = None) -> tuple[dict, str]:
    """UI values (field key -> component value) + folder/output paths -> (flat config dict, sample prompt).

    ``ui_extra_toml`` is parsed and merged (form fields win, with an error if both set one key differently)."""
    cfg: dict[str, Any] = {}
    for key, value in ui_values.items():
        field = FIELD_BY_KEY[key]
        if key in UI_ONLY:
            continue
        v = from_ui(field, value)
        if v is not None:
            cfg[key] = v
    extra_text = str(ui_values.get("ui_extra_toml") or "").strip()
    if extra_text:
        try:
            extra = tomllib.loads(extra_text)
        except tomllib.TOMLDecodeError as e:
            raise TrainConfigError(f"'Other sd-scripts keys' is not valid TOML: {e}. Write one key = value per line, "
                                   "e.g. noise_offset_random_strength = true") from e
        for section, value in list(extra.items()):  # sections are flattened as sd-scripts does
            items = value.items() if isinstance(value, dict) else [(section, value)]
            for k, v in items:
                if k in FIELD_BY_KEY:
                    raise TrainConfigError(f"'Other sd-scripts keys' sets {k}, which has its own field "
                                           f"('{FIELD_BY_KEY[k].label}'); set it there instead")
                cfg[k] = v
    for k, v in (paths or {}).items():
        if v not in (None, ""):
            cfg[k] = v
    if cfg.get("max_train_epochs") is not None:
        cfg.pop("max_train_steps", None)  # epochs decide the length; keeping both only earns a note
    if "network_module" in ui_values:  # (the field's choice, not "not set": no note that it was left out)
        cfg.setdefault("network_module", "networks.lora")
    return cfg, str(ui_values.get("ui_sample_prompt") or "")


def config_to_ui(cfg: TrainConfig) -> tuple[dict, dict, str]:
    """A parsed config -> (field values, paths, extra TOML for keys without a field that differ from defaults)."""
    values = {}
    for f in FIELDS:
        if f.key in UI_ONLY:
            continue
        values[f.key] = to_ui(f, getattr(cfg, f.key))
    paths = {k: getattr(cfg, k) or "" for k in PATH_KEYS}
    default = TrainConfig()
    extra = {}
    for k in config_keys():
        if k in FIELD_BY_KEY or k in PATH_KEYS or k in ("pretrained_model_name_or_path", "sample_prompts"):
            continue
        v = getattr(cfg, k)
        if v != getattr(default, k):
            extra[k] = v
    return values, paths, dumps_toml(extra) if extra else ""


# ---------------------------------------------------------------------------------------------------------------
# TOML export (no writer library in the WebUI's environment; values are simple)

_MODEL_KEYS = {"pretrained_model_name_or_path", "v2", "v_parameterization", "vae", "clip_skip", "no_half_vae"}
_DATASET_KEYS = {f.name for f in dataclasses.fields(TrainConfig)
                 if f.name in ("train_data_dir", "reg_data_dir", "dataset_config", "resolution", "train_batch_size",
                               "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
                               "bucket_no_upscale", "caption_extension", "shuffle_caption", "keep_tokens",
                               "caption_prefix", "caption_suffix", "caption_dropout_rate",
                               "caption_dropout_every_n_epochs", "caption_tag_dropout_rate", "flip_aug", "color_aug",
                               "random_crop", "cache_latents", "cache_latents_to_disk", "prior_loss_weight",
                               "keep_tokens_separator", "caption_separator", "secondary_separator")}


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"{v!r} cannot be written to TOML")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise ValueError(f"cannot write {type(v).__name__} {v!r} to TOML")


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)


def _export_value(k, v):
    if k == "resolution" and isinstance(v, (tuple, list)):
        return f"{v[0]},{v[1]}"  # a string: sd-scripts splits it and crashes on an integer
    if k == "face_crop_aug_range" and isinstance(v, (tuple, list)):
        return f"{v[0]},{v[1]}"
    return v


def dumps_toml(flat: dict, sections: bool = False) -> str:
    """Flat config keys -> TOML text; with ``sections`` grouped as [model] / [dataset] / [training] (the tutorial's
    layout, which sd-scripts and our parser both merge)."""
    items = [(k, _export_value(k, v)) for k, v in flat.items() if v is not None]
    if not sections:
        return "".join(f"{_toml_key(k)} = {_toml_value(v)}\n" for k, v in items)
    out = []
    for title, pick in (("model", lambda k: k in _MODEL_KEYS), ("dataset", lambda k: k in _DATASET_KEYS),
                        ("training", lambda k: k not in _MODEL_KEYS and k not in _DATASET_KEYS)):
        rows = [(k, v) for k, v in items if pick(k)]
        if rows:
            out.append(f"[{title}]\n" + "".join(f"{_toml_key(k)} = {_toml_value(v)}\n" for k, v in rows))
    return "\n".join(out)


def export_toml(cfg_dict: dict, model_path: str | None = None) -> str:
    """A training TOML both sd-scripts (train_network.py --config_file) and our trainer read the same way."""
    cfg = parse_train_config(dict(cfg_dict), source="the form")  # refuse to export what would not load
    flat = {}
    if model_path:
        flat["pretrained_model_name_or_path"] = model_path
    default = TrainConfig()
    for k in config_keys():
        v = getattr(cfg, k)
        if k in cfg_dict or k in ("network_module", "caption_extension") or v != getattr(default, k):
            flat[k] = v
    flat["network_module"] = cfg.network_module or "networks.lora"
    header = ("# LoRA Studio training config (sd-scripts names; also runs with\n"
              "# accelerate launch train_network.py --config_file=this.toml)\n")
    return header + dumps_toml(flat, sections=True)


__all__ = ["BASE", "FIELDS", "FIELD_BY_KEY", "GROUPS", "PRESETS", "PRESET_NOTES", "Field", "collect_config",
           "config_to_ui", "dumps_toml", "export_toml", "form_defaults", "from_ui", "preset_for_family",
           "preset_values", "to_ui"]
