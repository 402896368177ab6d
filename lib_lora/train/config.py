"""Training config (sd-scripts ``--config_file`` TOML) and dataset config (``--dataset_config`` TOML) parsing.

Training TOML: every ``[section]`` is merged into one flat set of keys, as ``train_util.read_config_from_file`` does,
so the tutorial file with ``[model]``, ``[dataset]``, ``[training]`` works. Each key is either a ``TrainConfig``
field, an alias we translate (with a note), an sd-scripts option we recognise but do not use (accepted, with a note
saying why), or unknown: unknown keys stop the load with one error naming each, with close-match suggestions.

Defaults are sd-scripts' argparse defaults (train_util.py / train_network.py @48d368fa) with one deliberate
exception: ``caption_extension`` defaults to ``.txt`` (sd-scripts: ``.caption``; kohya_ss GUI and every tutorial
use ``.txt``; sd-scripts silently ignores ``.txt`` captions with its default).

Dataset TOML: ``[general]``, ``[[datasets]]``, ``[[datasets.subsets]]`` with the DreamBooth-style keys of
``config_util.ConfigSanitizer``; a value is looked up subset -> dataset -> general -> training config -> default
(``BlueprintGenerator.generate_params_by_fallbacks``). Keys sd-scripts would reject are refused, with where they
belong when they are at the wrong level.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from . import kohya_gui
from .captions import CaptionOptions

from lib_lora.formats.errors import LoraError


class TrainConfigError(LoraError, ValueError):
    """A training or dataset config that cannot be used as written; the message says what to change."""


# ---------------------------------------------------------------------------------------------------------------
# TrainConfig


@dataclass
class TrainConfig:
    # --- model (train_util.add_sd_models_arguments, add_training_arguments)
    pretrained_model_name_or_path: str | None = None
    v2: bool = False
    v_parameterization: bool = False
    vae: str | None = None
    clip_skip: int | None = None
    max_token_length: int | None = None
    no_half_vae: bool = False

    # --- dataset (train_util.add_dataset_arguments)
    train_data_dir: str | None = None
    reg_data_dir: str | None = None
    dataset_config: str | None = None
    # sd-scripts' fine-tuning dataset: captions (and tags) from a metadata JSON instead of caption files
    in_json: str | None = None
    dataset_repeats: int = 1
    resolution: tuple[int, int] | None = None  # (width, height)
    train_batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    caption_extension: str = ".txt"  # sd-scripts: ".caption" (see module docstring)
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: int | float = 0
    weighted_captions: bool = False
    color_aug: bool = False
    flip_aug: bool = False
    random_crop: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    alpha_mask: bool = False
    resize_interpolation: str | None = None
    cache_latents: bool = False
    cache_latents_to_disk: bool = False
    vae_batch_size: int = 1
    prior_loss_weight: float = 1.0
    validation_split: float = 0.0
    validation_seed: int | None = None
    validate_every_n_steps: int | None = None
    validate_every_n_epochs: int | None = None
    max_validation_steps: int | None = None

    # --- run length, precision, optimiser
    output_dir: str | None = None
    output_name: str | None = None
    max_train_steps: int = 1600
    max_train_epochs: int | None = None
    seed: int | None = None
    gradient_checkpointing: bool = False
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    full_fp16: bool = False
    full_bf16: bool = False
    fp8_base: bool = False
    fp8_base_unet: bool = False
    learning_rate: float = 2e-6
    unet_lr: float | None = None
    text_encoder_lr: float | None = None
    lr_scheduler: str = "constant"
    lr_warmup_steps: int | float = 0
    lr_decay_steps: int | float = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    lr_scheduler_min_lr_ratio: float | None = None
    lr_scheduler_type: str = ""
    lr_scheduler_timescale: int | None = None  # inverse_sqrt's timescale (default: the warm-up, else 10000)
    lr_scheduler_args: list[str] | None = None
    optimizer_type: str = ""  # "" means AdamW
    optimizer_args: list[str] | None = None
    max_grad_norm: float = 1.0

    # --- network (train_network.setup_parser)
    network_module: str | None = None
    network_dim: int | None = None  # None -> 4 in networks.lora.create_network
    network_alpha: float = 1.0
    network_dropout: float | None = None
    network_args: list[str] | None = None
    network_weights: str | None = None
    dim_from_weights: bool = False
    base_weights: list[str] | None = None  # LoRA files merged into the model for the job (paths)
    base_weights_multiplier: list[float] | None = None
    network_train_unet_only: bool = False
    network_train_text_encoder_only: bool = False
    scale_weight_norms: float | None = None

    # --- noise and loss
    noise_offset: float | None = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    zero_terminal_snr: bool = False
    min_timestep: int | None = None
    max_timestep: int | None = None
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    min_snr_gamma: float | None = None
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None
    debiased_estimation_loss: bool = False
    masked_loss: bool = False

    # --- saving
    save_model_as: str = "safetensors"
    save_precision: str | None = None
    save_every_n_epochs: int | None = None
    save_every_n_steps: int | None = None
    save_n_epoch_ratio: int | None = None
    save_last_n_epochs: int | None = None
    save_last_n_steps: int | None = None
    save_last_n_epochs_state: int | None = None  # (default: as save_last_n_epochs / save_last_n_steps)
    save_last_n_steps_state: int | None = None
    save_state: bool = False
    save_state_on_train_end: bool = False
    resume: str | None = None
    # sd-scripts: start at this epoch / step (numbering only), or continue there with skip_until_initial_step
    initial_epoch: int | None = None
    initial_step: int | None = None
    skip_until_initial_step: bool = False
    no_metadata: bool = False
    training_comment: str | None = None
    metadata_title: str | None = None
    metadata_author: str | None = None
    metadata_description: str | None = None
    metadata_license: str | None = None
    metadata_tags: str | None = None

    # --- samples and logs
    sample_prompts: str | None = None
    sample_every_n_steps: int | None = None
    sample_every_n_epochs: int | None = None
    sample_at_first: bool = False
    sample_sampler: str = "ddim"
    # LoRA Studio only (not sd-scripts): the engine's fast step (flat LoRA buffer, fused AdamW, inputs kept on the
    # device, no host sync in a step; same results within float tolerance) and CUDA-graph capture per bucket shape
    # (None = on where it can work: a CUDA device and no setting that decides on the host; each graph is checked
    # once against the eager step and dropped if it differs)
    fast_path: bool | None = None  # None: the WebUI setting (Settings -> LoRA Studio), else on
    cuda_graphs: bool | None = None
    # sd-scripts' names: compile the UNet with torch.compile (None: the WebUI setting, else off: a cold compile
    # costs minutes and pays back only on long runs)
    torch_compile: bool | None = None
    dynamo_backend: str | None = None
    logging_dir: str | None = None
    log_prefix: str | None = None

    # --- bookkeeping (not config keys)
    notes: list[str] = field(default_factory=list, metadata={"internal": True})
    ignored: dict[str, Any] = field(default_factory=dict, metadata={"internal": True})
    source: str | None = field(default=None, metadata={"internal": True})
    base_dir: str | None = field(default=None, metadata={"internal": True})
    # a kohya_ss GUI preset holds its sample prompts as text, not as a file
    sample_prompt_text: str | None = field(default=None, metadata={"internal": True})

    def resolve(self, path: str | os.PathLike | None) -> Path | None:
        """A path from the config, made absolute against the config file's folder (the tutorial runs sd-scripts
        from that folder; the WebUI's working directory is elsewhere)."""
        if path is None:
            return None
        p = Path(os.path.expanduser(os.fspath(path)))
        if p.is_absolute() or self.base_dir is None:
            return p
        return Path(self.base_dir) / p

    def caption_options(self) -> CaptionOptions:
        return CaptionOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(CaptionOptions)})

    def keys(self) -> list[str]:
        return config_keys()


def config_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig) if not f.metadata.get("internal")]


# Names sd-scripts also accepts for one of our fields.
ALIASES = {
    "batch_size": ("train_batch_size", "`batch_size` read as train_batch_size (sd-scripts' name; sd-scripts itself "
                   "ignores `batch_size` in a training config and would train at batch 1)"),
    "caption_extention": ("caption_extension", "`caption_extention` (old misspelling) read as caption_extension"),
}

# Legacy optimiser switches sd-scripts maps to optimizer_type (train_util.get_optimizer).
_LEGACY_OPTIMIZER_FLAGS = {"use_8bit_adam": "AdamW8bit", "use_lion_optimizer": "Lion"}

_R_ATTN = "attention runs as the host has it: the WebUI's own optimisation, headless PyTorch's SDPA"
_R_LOADER = "images are loaded in-process"
_R_DIST = "a single-GPU trainer"
_R_HUB = "nothing is uploaded"
_R_LOG = "progress and losses are shown in the UI and written to the run's log"
_R_MODEL = "the model is loaded once (inside the WebUI, the loaded checkpoint is trained)"
# sd-scripts options we recognise and do not use: accepted with a note giving the reason.
KNOWN_UNUSED = {
    **{k: _R_ATTN for k in ("xformers", "sdpa", "mem_eff_attn")},
    **{k: "not used: " + _R_MODEL for k in ("lowram", "highvram", "disable_mmap_load_safetensors",
                                            "tokenizer_cache_dir")},
    **{k: _R_LOADER for k in ("max_data_loader_n_workers", "persistent_data_loader_workers")},
    **{k: _R_DIST for k in ("ddp_timeout", "ddp_gradient_as_bucket_view", "ddp_static_graph", "deepspeed",
                            "zero_stage", "offload_optimizer_device", "offload_optimizer_nvme_path",
                            "offload_param_device", "offload_param_nvme_path", "zero3_init_flag",
                            "zero3_save_16bit_model", "fp16_master_weights_and_gradients", "blocks_to_swap",
                            "cpu_offload_checkpointing", "fused_backward_pass")},
    **{k: _R_HUB for k in ("huggingface_repo_id", "huggingface_repo_type", "huggingface_path_in_repo",
                           "huggingface_token", "huggingface_repo_visibility", "save_state_to_huggingface",
                           "resume_from_huggingface", "async_upload")},
    **{k: _R_LOG for k in ("log_with", "log_tracker_name", "log_tracker_config", "wandb_run_name", "wandb_api_key",
                           "log_config")},
    **{k: "not needed: the dataset is planned and checked before training" for k in ("debug_dataset", "cache_info",
                                                                                      "skip_cache_check")},
    **{k: "command-line only in sd-scripts" for k in ("config_file", "output_config")},
    "use_safetensors": "files are always written as .safetensors",
    "cache_text_encoder_outputs": "text-encoder outputs are cached in memory by themselves whenever the text "
                                  "encoder is not trained and the captions do not change between steps",
    "cache_text_encoder_outputs_to_disk": "text-encoder outputs are cached in memory only (when the text encoder is "
                                          "not trained); nothing is written to disk",
    "text_encoder_batch_size": "not needed: text-encoder outputs are computed with each step's batch and kept "
                               "per caption",
    **{k: "sd-scripts has switched this option off (its code is disabled), so it does nothing there either; for a "
          "schedule-free run choose optimizer_type AdamWScheduleFree, RAdamScheduleFree or SGDScheduleFree"
       for k in ("optimizer_schedulefree_wrapper", "schedulefree_wrapper_args")},
    "perlin_noise": "sd-scripts has switched this option off (its argument is commented out), so it does nothing "
                    "there either; noise_offset or multires_noise_iterations shape the noise",
    "dataset_class": "custom dataset classes are not supported",
    "conditioning_data_dir": "train_network reads mask images per subset: give conditioning_data_dir in a "
                             "dataset_config subset, with masked_loss = true (ControlNet training is not supported)",
    "weighting_scheme": "used by SD3/Flux trainers only",
    "logit_mean": "used by SD3/Flux trainers only",
    "logit_std": "used by SD3/Flux trainers only",
    "mode_scale": "used by SD3/Flux trainers only",
    **{k: "not written" for k in ("metadata_usage_hint", "metadata_thumbnail", "metadata_merged_from",
                                  "metadata_trigger_phrase", "metadata_preprocessor", "metadata_is_negative_embedding")},
}

_NAMES = {"optimizer_type", "network_module", "lr_scheduler_type", "sample_sampler"}  # (names, not free text)

CHOICES = {
    "mixed_precision": ("no", "fp16", "bf16"),
    "save_precision": (None, "float", "fp16", "bf16"),
    "save_model_as": ("safetensors", "ckpt", "pt"),
    "max_token_length": (None, 75, 150, 225),
    "loss_type": ("l1", "l2", "huber", "smooth_l1"),
    "huber_schedule": ("constant", "exponential", "snr"),
    "resize_interpolation": (None, "lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box"),
    "lr_scheduler": ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
                     "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay", "piecewise_constant", "adafactor"),
}

# ---------------------------------------------------------------------------------------------------------------
# value coercion shared by both parsers


class _Bad(Exception):
    pass


def _kind(annotation: str) -> str:
    a = annotation.replace(" ", "")
    table = {
        "bool": "bool", "bool|None": "bool",
        "int": "int", "int|None": "int",
        "float": "float", "float|None": "float",
        "int|float": "num", "int|float|None": "num",
        "str": "str", "str|None": "str",
        "tuple[int,int]|None": "reso",
        "tuple[float,float]|None": "pair_float",
        "list[str]|None": "list_str",
        "list[float]|None": "list_float",
        "dict": "dict", "dict|None": "dict", "dict[str,Any]|None": "dict",
    }
    if a not in table:
        raise TypeError(f"internal: no coercion for annotation {annotation!r}")
    return table[a]


class _Range(NamedTuple):
    lo: float | None  # None: no lowest (a float key still has to be finite)
    hi: float | None
    hi_ok: bool  # whether hi itself is allowed
    what: str  # what the value is, and what to write
    lo_ok: bool = True  # whether lo itself is allowed


# Values a training cannot run with (or runs with a meaning nobody wants), refused before anything starts:
# key -> _Range fields as a tuple. A count is at least 0 where sd-scripts reads 0 as off, else at least 1 (0 would
# divide by zero in sd-scripts, or train or keep nothing). Every float key is here, and none may be nan or inf.
# A strength that multiplies fresh gaussian noise is at least 0: the noise's sign is random, so -x would train as x.
_RANGES = {
    "network_dim": (1, None, True, "the LoRA's rank; 4 to 128 is common"),
    "network_alpha": (0, None, True, "0 means the rank itself"),
    "learning_rate": (0, None, True, "e.g. 1e-4"),
    "unet_lr": (0, None, True, "0 freezes the UNet part"),
    "text_encoder_lr": (0, None, True, "0 freezes the text encoder part"),
    "train_batch_size": (1, None, True, "images per step"),
    "gradient_accumulation_steps": (1, None, True, "batches per optimizer step"),
    "max_grad_norm": (0, None, True, "0 turns clipping off"),
    "lr_warmup_steps": (0, None, True, "steps, or a share of the run below 1"),
    "lr_decay_steps": (0, None, True, "steps, or a share of the run below 1"),
    "lr_scheduler_num_cycles": (1, None, True, "cosine_with_restarts' cycles; 1 is plain cosine"),
    "lr_scheduler_timescale": (1, None, True, "inverse_sqrt's timescale in steps; leave it out for the warm-up's"),
    "keep_tokens": (0, None, True, "tags kept at the front"),
    "token_warmup_min": (0, None, True, "tags shown at the first step"),
    "token_warmup_step": (0, None, True, "steps, or a share of the run below 1; 0 = off"),
    "caption_dropout_every_n_epochs": (0, None, True, "0 = off"),
    "prior_loss_weight": (0, None, True, "the regularisation images' loss weight, 1 as usual"),
    "caption_dropout_rate": (0, 1, True, "a share of the steps"),
    "caption_tag_dropout_rate": (0, 1, True, "a chance per tag"),
    "network_dropout": (0, 1, False, "a dropout probability; 0.1 is common"),
    "min_timestep": (0, 1000, False, "of the 1000 noise steps"),
    "max_timestep": (1, 1000, True, "of the 1000 noise steps"),
    "clip_skip": (0, None, True, "1 = the last layer, 2 = the one before"),
    "multires_noise_iterations": (0, None, True, "6 to 10 is common; 0 = off"),
    # 1 or more would hold out every image
    "validation_split": (0, 1, False, "the share of images held out, e.g. 0.1"),
    "validate_every_n_steps": (1, None, True, "steps between validations; leave it out to validate per epoch"),
    "validate_every_n_epochs": (1, None, True, "epochs between validations; leave it out for every epoch"),
    "max_validation_steps": (1, None, True, "validation batches per check; leave it out for all"),
    "dataset_repeats": (1, None, True, "how often each image is seen per epoch"),
    "vae_batch_size": (1, None, True, "images per VAE call while caching latents"),
    "min_bucket_reso": (1, None, True, "the shortest bucket side in pixels; 256 as usual"),
    "bucket_reso_steps": (1, None, True, "bucket sides are multiples of it; 64 as usual"),
    "max_train_steps": (1, None, True, "optimizer steps in the run"),
    "max_train_epochs": (1, None, True, "passes over the dataset; leave it out to train max_train_steps"),
    "initial_epoch": (0, None, True, "1 = the first epoch"),
    "initial_step": (0, None, True, "0 = the first step"),
    "save_every_n_epochs": (1, None, True, "epochs between saves; leave it out to save the final file only"),
    "save_every_n_steps": (1, None, True, "steps between saves; leave it out for no step saves"),
    "save_n_epoch_ratio": (0, None, True, "at least this many saves over the run; 0 = off"),
    "save_last_n_epochs": (1, None, True, "epoch saves kept; leave it out to keep them all"),
    "save_last_n_steps": (1, None, True, "steps whose saves are kept; leave it out to keep them all"),
    "save_last_n_epochs_state": (0, None, True, "epoch states kept; 0 = as save_last_n_epochs"),
    "save_last_n_steps_state": (0, None, True, "steps whose states are kept; 0 = as save_last_n_steps"),
    "sample_every_n_epochs": (0, None, True, "epochs between sample sets; 0 = off"),
    "sample_every_n_steps": (0, None, True, "steps between sample sets; 0 = off"),
    # negative: the rate grows without bound toward the end (0 ** -p divides by zero at the last step)
    "lr_scheduler_power": (0, None, True, "polynomial's exponent; 1 decays linearly, 0 keeps the rate"),
    # below 0: warmup_stable_decay ends on a negative rate, cosine_with_min_lr reaches 0 before the end; above 1
    # the "minimum" is above the starting rate
    "lr_scheduler_min_lr_ratio": (0, 1, True, "the last learning rate as a share of the first, e.g. 0.1"),
    # below 0 the rescale takes the square root of a negative ratio: every weight becomes nan
    "scale_weight_norms": (0, None, True, "the largest norm of a module's weights; 1 to start with; 0 = off"),
    # (its lowest depends on adaptive_noise_scale: _range_problems)
    "noise_offset": (None, None, True, "the offset noise's strength; 0.05 to 0.1 is common; 0 = off"),
    # added to noise_offset per image before the clamp at 0, so a negative one lowers it (sd-scripts allows it)
    "adaptive_noise_scale": (None, None, True, "times the latents' mean, added to noise_offset; e.g. 0.01"),
    "multires_noise_discount": (0, None, True, "each coarser noise level's weight; 0.1 to 0.3 is common"),
    "ip_noise_gamma": (0, None, True, "the input perturbation's strength; 0.1 is common; 0 = off"),
    # 0 or less: log(0) in the exponential schedule, a zero (or negative: ascending) Huber loss in the others
    "huber_c": (0, None, True, "the Huber loss's threshold; 0.1 as usual", False),
    "huber_scale": (0, None, True, "scales huber_c in the constant and exponential schedules; 1 as usual", False),
    # below 0 the weights turn negative: the loss would be climbed, not descended
    "min_snr_gamma": (0, None, True, "5 is common; 0 = off"),
    "v_pred_like_loss": (0, None, True, "the weight of the added v-prediction-like loss, e.g. 0.1; 0 = off"),
    # a merge weight: 0 merges nothing, a negative one subtracts the LoRA
    "base_weights_multiplier": (None, None, True, "each base_weights file's merge weight, 1 as usual"),
}


def _out_of_range(key: str, v: Any, name: str | None = None) -> str | None:
    """What is wrong with ``v`` for the ``_RANGES`` key ``key`` (written as ``name``), or None."""
    if key not in _RANGES or v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    lo, hi, hi_ok, what, lo_ok = _Range(*_RANGES[key])
    too_low = lo is not None and (v < lo or (v == lo and not lo_ok))
    if too_low or (hi is not None and (v > hi or (v == hi and not hi_ok))):
        low = None if lo is None else f"at least {lo}" if lo_ok else f"above {lo}"
        high = None if hi is None else f"at most {hi}" if hi_ok else f"below {hi}"
        span = f"from {lo} to {hi}" if low and high and lo_ok and hi_ok else " and ".join(p for p in (low, high) if p)
        return f"{name or key} = {v!r} must be {span} ({what})"
    return None


def _finite(key: str, shown: Any, *values: float) -> None:
    """nan and inf pass every comparison of a range (or crash int()), so no float key takes them."""
    if not all(math.isfinite(v) for v in values):
        raise _not_finite(key, shown, "finite numbers" if isinstance(shown, (list, tuple)) else "a finite number")


def _not_finite(key: str, shown: Any, must: str = "a finite number") -> _Bad:
    what = f" ({_RANGES[key][3]})" if key in _RANGES else ""
    return _Bad(f"{key} = {shown!r} must be {must}{what}")


def _range_problems(values: dict) -> list[str]:
    out = [p for p in (_out_of_range(key, values.get(key)) for key in _RANGES) if p]
    lo_t, hi_t = values.get("min_timestep"), values.get("max_timestep")
    hi = hi_t if isinstance(hi_t, int) else 1000
    if isinstance(lo_t, int) and lo_t > hi:
        out.append(f"min_timestep = {lo_t} must not be above max_timestep = {hi}")
    elif isinstance(lo_t, int) and lo_t == hi and hi >= 1000:  # (one fixed step, as sd-scripts allows: 0..999)
        out.append(f"min_timestep = max_timestep = {hi} is past the last noise step, 999")
    # the offset's sign is drawn at random; only adaptive_noise_scale (added before the clamp at 0) gives it a meaning
    off = values.get("noise_offset")
    if isinstance(off, (int, float)) and off < 0 and not values.get("adaptive_noise_scale"):
        out.append(f"noise_offset = {off!r} must be at least 0 without adaptive_noise_scale (the offset's sign is "
                   f"random, so it trains as {-off!r}; write {-off!r}, or 0 for no offset)")
    name = values.get("output_name")
    if isinstance(name, str) and ("/" in name or "\\" in name):
        out.append(f"output_name = {name!r} must be a file name without folders (the folder is output_dir)")
    elif isinstance(name, str) and name.strip().startswith("."):
        out.append(f"output_name = {name!r} would make hidden files ({name.strip()}.safetensors), which the WebUI's "
                   "LoRA page does not list: use a name that starts with a letter or digit")
    return out


def parse_resolution(value: Any, key: str = "resolution") -> tuple[tuple[int, int], str | None]:
    """``512`` -> (512, 512); ``"512"`` / ``"512,768"`` -> (w, h); ``[512, 768]`` -> (512, 768).
    Returns ``(reso, note_or_None)``; the note says when sd-scripts would have read the value differently."""
    note = None
    if isinstance(value, bool):
        raise _Bad(f"{key} must be a size like 512 or \"512,768\", got {value!r}")
    if isinstance(value, int):
        parts = [value]
        note = (f"{key} = {value} (a number, not a string) read as {value}x{value}; sd-scripts' training config "
                f"expects a string such as \"{value},{value}\" and stops with \"'int' object has no attribute "
                f"'split'\"")
    elif isinstance(value, float) and value.is_integer():
        parts = [int(value)]
    elif isinstance(value, str):
        try:
            parts = [int(float(p.strip())) for p in value.replace("x", ",").split(",")]
        except (ValueError, OverflowError):  # (OverflowError: "inf")
            raise _Bad(f"{key} must be 'size' or 'width,height' (e.g. \"512\" or \"512,768\"), got {value!r}") from None
    elif isinstance(value, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise _Bad(f"{key} as a list must hold integers [width, height], got {value!r}")
        parts = list(value)
    else:
        raise _Bad(f"{key} must be a size like 512 or \"512,768\", got {value!r}")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) <= 0:
        raise _Bad(f"{key} must be one or two positive sizes (width,height), got {value!r}")
    if min(parts) < 64:
        raise _Bad(f"{key} = {value!r} is too small: each side must be at least 64 pixels (the model works on "
                   "1/8-size latents that the UNet halves 3 more times; SD1.5 trains at 512, SDXL at 1024)")
    return (int(parts[0]), int(parts[1])), note


PATH_LIST_KEYS = ("base_weights",)


def _coerce(key: str, value: Any, kind: str, notes: list[str]) -> Any:
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            notes.append(f"{key} = {value!r} (a string) read as {value.strip().lower()}")
            return value.strip().lower() == "true"
        raise _Bad(f"{key} must be true or false, got {value!r}")
    if kind == "int":
        if isinstance(value, bool):
            raise _Bad(f"{key} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            notes.append(f"{key} = {value!r} read as the integer {int(value)}")
            return int(value)
        if isinstance(value, str):
            try:
                v = int(value.strip())
            except ValueError:
                raise _Bad(f"{key} must be an integer, got {value!r}") from None
            notes.append(f"{key} = {value!r} (a string) read as the integer {v}")
            return v
        raise _Bad(f"{key} must be an integer, got {value!r}")
    if kind in ("float", "num"):
        if isinstance(value, bool):
            raise _Bad(f"{key} must be a number, got {value!r}")
        if isinstance(value, int):
            if kind == "num":
                return value
            try:
                return float(value)
            except OverflowError:  # (a JSON integer of 400 digits)
                raise _not_finite(key, value) from None
        if isinstance(value, float):
            _finite(key, value, value)
            return value
        if isinstance(value, str):
            try:
                v = float(value.strip())
            except ValueError:
                raise _Bad(f"{key} must be a number, got {value!r}") from None
            _finite(key, value, v)
            if kind == "num" and v.is_integer() and "." not in value and "e" not in value.lower():
                v = int(v)
            notes.append(f"{key} = {value!r} (a string) read as the number {v!r}")
            return v
        raise _Bad(f"{key} must be a number, got {value!r}")
    if kind == "str":
        if isinstance(value, str):
            return value
        raise _Bad(f"{key} must be a string, got {value!r}")
    if kind == "reso":
        reso, note = parse_resolution(value, key)
        if note:
            notes.append(note)
        return reso
    if kind == "pair_float":
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, (list, tuple)) and len(value) == 2:
            try:
                a, b = float(value[0]), float(value[1])
            except (TypeError, ValueError, OverflowError):
                raise _Bad(f"{key} must be two numbers 'low,high', got {value!r}") from None
            if not (math.isfinite(a) and math.isfinite(b)):
                raise _Bad(f"{key} must be two finite numbers 'low,high', e.g. [2.0, 4.0], got {value!r}")
            if a > b:
                raise _Bad(f"{key} must be 'low,high' with low <= high, got {value!r}")
            if a <= 0:  # (face sizes across the crop: 0 would divide by zero in the crop)
                raise _Bad(f"{key} must be two numbers above 0, e.g. [2.0, 4.0], got {value!r}")
            return (a, b)
        raise _Bad(f"{key} must be two numbers 'low,high', got {value!r}")
    if kind == "list_str" and key in PATH_LIST_KEYS:  # (a path may hold spaces: a string is one path)
        if isinstance(value, str):
            return [value] if value.strip() else []
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        raise _Bad(f"{key} must be a file path or a list of paths, got {value!r}")
    if kind == "list_float":
        items = value.split() if isinstance(value, str) else value
        items = items if isinstance(items, (list, tuple)) else [items]
        try:
            if any(isinstance(v, bool) for v in items):
                raise ValueError
            out = [float(v) for v in items]
        except (TypeError, ValueError, OverflowError):
            raise _Bad(f"{key} must be a number or a list of numbers, got {value!r}") from None
        _finite(key, value, *out)
        return out
    if kind == "list_str":
        if isinstance(value, str):
            return value.split()
        if isinstance(value, dict):
            notes.append(f"{key} given as a table; read as the list of 'key=value' strings sd-scripts expects")
            return [f"{k}={v}" for k, v in value.items()]
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value]
        raise _Bad(f"{key} must be a list of strings like [\"conv_dim=8\"], got {value!r}")
    if kind == "dict":
        if isinstance(value, dict):
            return dict(value)
        raise _Bad(f"{key} must be a table, got {value!r}")
    raise TypeError(f"internal: unknown kind {kind}")


def _suggest(key: str, names) -> str:
    close = difflib.get_close_matches(key, list(names), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def _field_kinds() -> dict[str, str]:
    return {f.name: _kind(f.type) for f in dataclasses.fields(TrainConfig) if not f.metadata.get("internal")}


# ---------------------------------------------------------------------------------------------------------------
# training config


def _flatten_sections(data: dict, notes: list[str]) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Merge all ``[section]`` tables into one dict, later sections winning, as sd-scripts does.

    Returns ``(flat, sections)``: ``sections`` names the sections each key was written in (empty: the top level).
    A ``None`` value (JSON ``null``) leaves its key unset, as a JSON client means it; the key still counts as
    written, so a misspelt one is still refused."""
    flat: dict[str, Any] = {}
    where: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    for section, value in data.items():
        items = value.items() if isinstance(value, dict) else [(section, value)]
        label = f"[{section}]" if isinstance(value, dict) else "the top level"
        for k, v in items:
            sections.setdefault(k, [])
            if isinstance(value, dict) and label not in sections[k]:
                sections[k].append(label)
            if v is None:
                continue
            if k in flat and flat[k] != v:
                notes.append(f"{k} is set in both {where[k]} and {label}; the value from {label} ({v!r}) is used, as in sd-scripts")
            flat[k] = v
            where[k] = label
    return flat, sections


def translate_gui_preset(data: dict, source: str = "<config>") -> tuple[dict, list[str], str | None]:
    """A kohya_ss GUI preset as sd-scripts keys (kohya_gui.py): (config, notes, sample prompt text or None)."""
    known = set(_field_kinds()) | set(ALIASES) | set(KNOWN_UNUSED) | set(_LEGACY_OPTIMIZER_FLAGS)
    try:
        return kohya_gui.from_gui_preset(data, known)
    except ValueError as e:
        raise TrainConfigError(f"{source}: {e}") from None


def parse_train_config(data: dict, source: str = "<config>", base_dir: str | os.PathLike | None = None) -> TrainConfig:
    """Build a ``TrainConfig`` from an already-parsed TOML dict (sections allowed)."""
    if not isinstance(data, dict):
        kind = "JSON object" if str(source).lower().endswith(".json") else "TOML table"
        raise TrainConfigError(f"{source}: a training config must be a {kind} of keys, got {type(data).__name__}")
    if "datasets" in data or "general" in data:
        raise TrainConfigError(
            f"{source}: this looks like a dataset config ([general] / [[datasets]]), not a training config. "
            f"Give it as dataset_config = \"{Path(source).name}\" in the training config instead."
        )
    notes: list[str] = []
    kinds = _field_kinds()
    known_names = set(kinds) | set(ALIASES) | set(KNOWN_UNUSED) | set(_LEGACY_OPTIMIZER_FLAGS)
    prompt_text = None
    if kohya_gui.is_gui_preset(data):
        data, notes, prompt_text = translate_gui_preset(data, source)
    flat, sections = _flatten_sections(data, notes)

    unknown = sorted(k for k in sections if k not in known_names)
    if unknown:
        at = {k: f"in {' and '.join(sections[k])}: " if sections[k] else "" for k in unknown}
        lines = [f"  - {at[k]}{k}{_suggest(k, known_names)}" for k in unknown]
        raise TrainConfigError(
            f"{source}: unknown key(s), nothing was started:\n" + "\n".join(lines)
            + "\nFix the spelling or remove them; the accepted keys are sd-scripts' option names."
        )

    values: dict[str, Any] = {}
    ignored: dict[str, Any] = {}
    problems: list[str] = []
    for k, v in flat.items():
        target = k
        if k in ALIASES:
            target, note = ALIASES[k]
            if target in flat and flat[target] != v:
                problems.append(f"both {k} = {v!r} and {target} = {flat[target]!r} are set; keep only {target}")
                continue
            notes.append(note)
        elif k in _LEGACY_OPTIMIZER_FLAGS:
            if v is True:
                if flat.get("optimizer_type"):
                    notes.append(f"{k} ignored: optimizer_type = {flat['optimizer_type']!r} is set")
                else:
                    values["optimizer_type"] = _LEGACY_OPTIMIZER_FLAGS[k]
                    notes.append(f"{k} = true read as optimizer_type = {_LEGACY_OPTIMIZER_FLAGS[k]!r}")
            continue
        elif k in KNOWN_UNUSED:
            ignored[k] = v
            notes.append(f"{k} is an sd-scripts option this trainer does not use ({KNOWN_UNUSED[k]}); ignored")
            continue
        try:
            if target == "text_encoder_lr" and isinstance(v, list):
                # sd-scripts takes a list but networks.lora uses only the first value, for both SDXL encoders
                if not v:
                    raise _Bad("text_encoder_lr = [] holds no value")
                if len(v) > 1:
                    notes.append(f"text_encoder_lr = {v!r}: only the first value {v[0]!r} is used (as networks.lora "
                                 "in sd-scripts does, for both SDXL text encoders)")
                v = v[0]
            values[target] = _coerce(target, v, kinds[target], notes)
        except _Bad as e:
            problems.append(str(e))
    for k in set(CHOICES) | _NAMES:  # (a GUI field or a paste can carry a space around a name)
        val = values.get(k)
        if isinstance(val, str) and val != val.strip():
            notes.append(f"{k} = {val!r} read as {val.strip()!r}")
            values[k] = val.strip()
    for k, allowed in CHOICES.items():
        if k in values:
            val = values[k]
            cmp = val.lower() if isinstance(val, str) else val
            if cmp not in allowed:
                problems.append(f"{k} = {val!r} is not one of {', '.join(repr(a) for a in allowed if a is not None)}"
                                + _suggest(str(val), [a for a in allowed if isinstance(a, str)]))
            elif cmp != val:
                values[k] = cmp
    problems += _range_problems(values)
    if problems:
        raise TrainConfigError(f"{source}: invalid value(s):\n" + "\n".join(f"  - {p}" for p in problems))

    cfg = TrainConfig(**values)
    cfg.source = source
    cfg.base_dir = os.fspath(base_dir) if base_dir is not None else None
    cfg.ignored = ignored
    cfg.sample_prompt_text = prompt_text
    _post_checks(cfg, flat, notes)
    cfg.notes = notes
    return cfg


def missing_path_hint(path, base_dir=None) -> str:
    """What a path that does not exist may have meant: the same relative path from the current folder (sd-scripts
    reads relative paths from there; a config's are read from its own folder), or a name one typo away."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        return " (that is a folder: give the file itself)"
    if base_dir:
        base = os.path.abspath(os.fspath(base_dir))
        if path.startswith(base + os.sep):
            alt = os.path.abspath(os.path.relpath(path, base))
            if alt != path and os.path.exists(alt):
                return (f" (relative paths are read from the config file's folder, {base}; {alt} exists: write "
                        "that path)")
    parent, name = os.path.split(path)
    try:
        close = difflib.get_close_matches(name, os.listdir(parent), n=1, cutoff=0.8)
    except OSError:
        return ""
    return f" (did you mean {os.path.join(parent, close[0])}?)" if close else ""


def output_stem(name: str) -> str:
    """An output_name as the files are named: a model file's extension typed with it is dropped (saving adds
    .safetensors)."""
    stem, ext = os.path.splitext(name.strip())
    return stem if stem and ext.lower() in (".safetensors", ".ckpt", ".pt") else name.strip()


def _post_checks(cfg: TrainConfig, flat: dict, notes: list[str]) -> None:
    if cfg.caption_extension and not cfg.caption_extension.startswith("."):
        notes.append(f"caption_extension {cfg.caption_extension!r} read as '.{cfg.caption_extension}'")
        cfg.caption_extension = "." + cfg.caption_extension
    if "caption_extension" not in flat and "caption_extention" not in flat and not cfg.in_json:
        notes.append("captions are read from .txt files next to the images (sd-scripts' default would be "
                     ".caption and would skip .txt files)")
    name = cfg.output_name
    if isinstance(name, str):
        stem = output_stem(name)
        if stem != name.strip():
            cfg.output_name = stem
            notes.append(f"output_name = {name!r} read as {stem!r}: the extension is added when saving (the file is "
                         f"{stem}.safetensors, not {name.strip()}.safetensors)")
        elif not name.strip():
            cfg.output_name = None
            notes.append("output_name is empty: the files are named lora.safetensors (then lora-000001 ...)")
    if cfg.network_module is None:
        cfg.network_module = "networks.lora"
        notes.append("network_module not set: a standard kohya LoRA (networks.lora) is trained "
                     "(sd-scripts requires network_module and stops without it)")
    if cfg.max_train_epochs is not None and "max_train_steps" in flat:
        notes.append(f"max_train_epochs = {cfg.max_train_epochs} overrides max_train_steps = {cfg.max_train_steps} "
                     "(sd-scripts' rule)")
    if cfg.dataset_config and (cfg.train_data_dir or cfg.reg_data_dir):
        notes.append("dataset_config is set, so train_data_dir / reg_data_dir are ignored (sd-scripts' rule)")
    if cfg.resolution is None and cfg.dataset_config is None:
        notes.append("resolution is not set; sd-scripts requires it (e.g. resolution = 512)")


def load_train_config(path: str | os.PathLike) -> TrainConfig:
    """Read a training TOML file. Relative paths inside it are resolved against its folder (``TrainConfig.resolve``)."""
    p = Path(path)
    data = _read_toml(p)
    return parse_train_config(data, source=str(p), base_dir=p.parent.resolve())


def parse_train_config_text(text: str, source: str = "<pasted config>", base_dir: str | os.PathLike | None = None) -> TrainConfig:
    """TOML (sd-scripts), or JSON (a kohya_ss GUI preset, or the HTTP API's flat keys)."""
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise TrainConfigError(f"{source}: starts like JSON but is not valid JSON: {e}") from e
        return parse_train_config(data, source=source, base_dir=base_dir)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise TrainConfigError(f"{source}: not valid TOML: {e}") from e
    return parse_train_config(data, source=source, base_dir=base_dir)


def _read_toml(p: Path) -> dict:
    """A TOML file, or a .json one (a kohya_ss GUI preset)."""
    if p.is_dir():
        raise TrainConfigError(f"{str(p)!r} is a folder, not a config file: give the training config (.toml, or a "
                               "kohya_ss GUI preset .json)")
    if not p.is_file():
        raise TrainConfigError(f"config file {str(p)!r} not found" + missing_path_hint(p))
    try:
        if p.suffix.lower() == ".json":
            with open(p, encoding="utf-8") as f:
                return json.load(f)
        with open(p, "rb") as f:
            return tomllib.load(f)
    except json.JSONDecodeError as e:
        raise TrainConfigError(f"{p}: not valid JSON: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise TrainConfigError(f"{p}: not valid TOML: {e}") from e
    except UnicodeDecodeError as e:
        raise TrainConfigError(f"{p}: not UTF-8 text: {e}") from e


# ---------------------------------------------------------------------------------------------------------------
# dataset config


@dataclass
class SubsetSpec:
    """One image folder of a dataset with its settings (sd-scripts' DreamBoothSubset)."""

    image_dir: str
    num_repeats: int = 1
    is_reg: bool = False
    class_tokens: str | None = None
    caption_extension: str = ".txt"
    captions: CaptionOptions = field(default_factory=CaptionOptions)
    color_aug: bool = False
    flip_aug: bool = False
    random_crop: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    alpha_mask: bool = False
    conditioning_data_dir: str | None = None  # masked_loss: a mask image per training image (same file name)
    cache_info: bool = False
    custom_attributes: dict = field(default_factory=dict)
    resize_interpolation: str | None = None
    from_folder_name: bool = False  # repeats/class tokens came from an `N_name` folder name
    # sd-scripts' fine-tuning subset: image keys and captions from this JSON (image_dir: where keys are looked up)
    metadata_file: str | None = None

    @property
    def name(self) -> str:
        if self.metadata_file:  # (sd-scripts keys its tag frequency by the metadata file's name)
            return os.path.basename(self.metadata_file)
        return os.path.basename(os.path.normpath(self.image_dir))


@dataclass
class DatasetSpec:
    """Settings shared by the subsets of one dataset (sd-scripts' DreamBoothDataset)."""

    resolution: tuple[int, int] | None
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    network_multiplier: float = 1.0
    resize_interpolation: str | None = None
    validation_split: float = 0.0
    validation_seed: int | None = None
    subsets: list[SubsetSpec] = field(default_factory=list)


# Key -> kind, grouped as config_util.ConfigSanitizer groups them.
_SUBSET_ASCENDABLE = {
    "color_aug": "bool", "face_crop_aug_range": "pair_float", "flip_aug": "bool", "num_repeats": "int",
    "random_crop": "bool", "shuffle_caption": "bool", "keep_tokens": "int", "keep_tokens_separator": "str",
    "secondary_separator": "str", "caption_separator": "str", "enable_wildcard": "bool", "token_warmup_min": "int",
    "token_warmup_step": "num", "caption_prefix": "str", "caption_suffix": "str", "custom_attributes": "dict",
    "resize_interpolation": "str",
}
_DROPOUT_ASCENDABLE = {"caption_dropout_every_n_epochs": "int", "caption_dropout_rate": "float",
                       "caption_tag_dropout_rate": "float"}
_DB_SUBSET_ASCENDABLE = {"caption_extension": "str", "class_tokens": "str", "cache_info": "bool"}
_DB_SUBSET_DISTINCT = {"image_dir": "str", "is_reg": "bool", "alpha_mask": "bool", "conditioning_data_dir": "str"}
_DATASET_ASCENDABLE = {
    "batch_size": "int", "bucket_no_upscale": "bool", "bucket_reso_steps": "int", "enable_bucket": "bool",
    "max_bucket_reso": "int", "min_bucket_reso": "int", "validation_seed": "int", "validation_split": "float",
    "resolution": "reso", "network_multiplier": "float", "resize_interpolation": "str",
}
_FT_SUBSET_DISTINCT = {"metadata_file": "str"}  # (a fine-tuning subset's own key)
_GENERAL_KEYS = {**_DATASET_ASCENDABLE, **_SUBSET_ASCENDABLE, **_DB_SUBSET_ASCENDABLE, **_DROPOUT_ASCENDABLE}
_DATASET_KEYS = {**_GENERAL_KEYS}
_SUBSET_KEYS = {**_SUBSET_ASCENDABLE, **_DB_SUBSET_DISTINCT, **_DB_SUBSET_ASCENDABLE, **_DROPOUT_ASCENDABLE,
                **_FT_SUBSET_DISTINCT}
_ARGPARSE_ONLY = ("prior_loss_weight", "max_token_length", "debug_dataset")
# the DreamBooth-only keys a fine-tuning subset may not have (sd-scripts' FT subset schema)
_DB_ONLY = ("is_reg", "class_tokens", "caption_extension", "cache_info", "conditioning_data_dir")
# TrainConfig names for dataset keys where they differ.
_FROM_TRAIN_CONFIG = {"batch_size": "train_batch_size", "num_repeats": "dataset_repeats"}


def _check_level(table: dict, allowed: dict, level: str, where: str, problems: list[str]) -> dict:
    out = {}
    all_levels = set(_GENERAL_KEYS) | set(_SUBSET_KEYS) | {"subsets"}
    for k, v in table.items():
        if k in allowed:
            out[k] = v
        elif k == "subsets" and level == "dataset":
            continue
        elif k in _ARGPARSE_ONLY:
            problems.append(f"{where}: {k} cannot be set in a dataset config (sd-scripts takes it from the training "
                            f"config only); move it to the training config")
        elif k in all_levels:
            if k in _DB_SUBSET_DISTINCT or k in _FT_SUBSET_DISTINCT or k == "subsets":
                home = "[[datasets.subsets]]" if k != "subsets" else "[[datasets]]"
            else:
                home = "[general] or [[datasets]]"
            problems.append(f"{where}: {k} is not allowed here; it belongs in {home}")
        else:
            problems.append(f"{where}: unknown key {k!r}{_suggest(k, all_levels)}")
    return out


def parse_dataset_config(
    data: dict, defaults: TrainConfig | None = None, source: str = "<dataset config>",
    base_dir: str | os.PathLike | None = None,
) -> tuple[list[DatasetSpec], list[str]]:
    """``[general]`` / ``[[datasets]]`` / ``[[datasets.subsets]]`` -> dataset specs plus notes.

    Every problem in the file is collected and raised together as one ``TrainConfigError``."""
    defaults = defaults or TrainConfig()
    notes: list[str] = []
    problems: list[str] = []
    if not isinstance(data, dict):
        raise TrainConfigError(f"{source}: a dataset config must be a TOML table")
    for k in data:
        if k not in ("general", "datasets"):
            problems.append(f"{source}: unknown top-level key {k!r}{_suggest(k, ['general', 'datasets'])}; "
                            "a dataset config holds [general] and [[datasets]] only")
    # (JSON null, here and for any key below, means "not set", as in the training config)
    general_raw = data.get("general") if data.get("general") is not None else {}
    if not isinstance(general_raw, dict):
        problems.append(f"{source}: [general] must be a table")
        general_raw = {}
    datasets_raw = data.get("datasets") if data.get("datasets") is not None else []
    if not isinstance(datasets_raw, list):
        problems.append(f"{source}: datasets must be an array of tables ([[datasets]])")
        datasets_raw = []
    if not datasets_raw and not problems:
        problems.append(f"{source}: no [[datasets]] defined")

    def coerce_table(table: dict, kinds: dict, where: str) -> dict:
        out = {}
        for k, v in table.items():
            if v is None:  # (a misspelt or misplaced key was reported by _check_level all the same)
                continue
            try:
                out[k] = _coerce(k, v, kinds[k], notes)
            except _Bad as e:
                problems.append(f"{where}: {e}")
                continue
            # (the training config's ranges; num_repeats below 1 is sd-scripts' way to leave a subset out)
            bad = None if k == "num_repeats" else _out_of_range(_FROM_TRAIN_CONFIG.get(k, k), out[k], k)
            if bad:
                problems.append(f"{where}: {bad}")
        return out

    general = coerce_table(_check_level(general_raw, _GENERAL_KEYS, "general", "[general]", problems),
                           _GENERAL_KEYS, "[general]")
    tc = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(TrainConfig)}

    def lookup(key: str, chain: list[dict], default: Any) -> Any:
        for d in chain:
            v = d.get(key)
            if v is not None:
                return v
        v = tc.get(_FROM_TRAIN_CONFIG.get(key, key))
        return default if v is None else v

    specs: list[DatasetSpec] = []
    for i, ds_raw in enumerate(datasets_raw):
        where = f"[[datasets]] #{i + 1}"
        if not isinstance(ds_raw, dict):
            problems.append(f"{where}: must be a table")
            continue
        ds = coerce_table(_check_level(ds_raw, _DATASET_KEYS, "dataset", where, problems), _DATASET_KEYS, where)
        chain = [ds, general]
        spec = DatasetSpec(
            resolution=lookup("resolution", chain, None),
            batch_size=lookup("batch_size", chain, 1),
            enable_bucket=lookup("enable_bucket", chain, False),
            min_bucket_reso=lookup("min_bucket_reso", chain, 256),
            max_bucket_reso=lookup("max_bucket_reso", chain, 1024),
            bucket_reso_steps=lookup("bucket_reso_steps", chain, 64),
            bucket_no_upscale=lookup("bucket_no_upscale", chain, False),
            network_multiplier=lookup("network_multiplier", chain, 1.0),
            resize_interpolation=lookup("resize_interpolation", chain, None),
            validation_split=lookup("validation_split", chain, 0.0),
            validation_seed=lookup("validation_seed", chain, None),
        )
        if spec.resolution is None:
            problems.append(f"{where}: resolution is required (set it here, in [general] or in the training config)")
        if spec.network_multiplier != 1.0:
            notes.append(f"{where}: network_multiplier = {spec.network_multiplier:g} changes nothing: the LoRA trains "
                         "at strength 1 (sd-scripts' train_network.py reads it too but does not apply it)")
        subsets_raw = ds_raw.get("subsets", [])
        if not isinstance(subsets_raw, list) or not subsets_raw:
            problems.append(f"{where}: no [[datasets.subsets]] defined")
            subsets_raw = []
        seen_dirs: set[str] = set()
        ft = [isinstance(r, dict) and r.get("metadata_file") is not None for r in subsets_raw]
        if any(ft) and not all(ft):
            problems.append(f"{where}: subsets with metadata_file (fine-tuning) and without it (image folders) "
                            "cannot be mixed in one dataset (sd-scripts' rule); put them in separate [[datasets]]")
        for j, sub_raw in enumerate(subsets_raw):
            swhere = f"{where} subset #{j + 1}"
            if not isinstance(sub_raw, dict):
                problems.append(f"{swhere}: must be a table")
                continue
            sub = coerce_table(_check_level(sub_raw, _SUBSET_KEYS, "subset", swhere, problems), _SUBSET_KEYS, swhere)
            metadata_file = sub.get("metadata_file")
            if metadata_file:
                wrong = [k for k in _DB_ONLY if k in sub]
                if wrong:
                    problems.append(f"{swhere}: {', '.join(wrong)} cannot be set in a fine-tuning subset "
                                    "(metadata_file): its captions come from the metadata file (sd-scripts' rule)")
            elif "image_dir" not in sub:
                problems.append(f"{swhere}: image_dir is required (or metadata_file, for a fine-tuning subset)")
                continue
            image_dir = sub.get("image_dir")
            resolved = str(_resolve(image_dir, base_dir)) if image_dir else ""
            if image_dir and resolved in seen_dirs and not metadata_file:
                notes.append(f"{swhere}: image_dir {image_dir!r} repeats an earlier subset of this dataset and is "
                             "ignored (sd-scripts' rule)")
                continue
            seen_dirs.add(resolved)
            sch = [sub, ds, general]
            if metadata_file:  # (DreamBooth-only keys of [general] or the dataset do not reach it)
                sch = [{k: v for k, v in t.items() if k not in _DB_ONLY} for t in sch]
            cap_ext = lookup("caption_extension", sch, ".txt")
            if cap_ext and not cap_ext.startswith("."):
                cap_ext = "." + cap_ext
            captions = CaptionOptions(**{
                f.name: lookup(f.name, sch, f.default) for f in dataclasses.fields(CaptionOptions)
            })
            specs_sub = SubsetSpec(
                image_dir=resolved,
                num_repeats=lookup("num_repeats", sch, 1),
                is_reg=sub.get("is_reg", False),
                class_tokens=lookup("class_tokens", sch, None),
                caption_extension=cap_ext,
                captions=captions,
                color_aug=lookup("color_aug", sch, False),
                flip_aug=lookup("flip_aug", sch, False),
                random_crop=lookup("random_crop", sch, False),
                face_crop_aug_range=lookup("face_crop_aug_range", sch, None),
                alpha_mask=lookup("alpha_mask", [sub], False),
                conditioning_data_dir=(str(_resolve(sub["conditioning_data_dir"], base_dir))
                                       if sub.get("conditioning_data_dir") else None),
                cache_info=lookup("cache_info", sch, False),
                custom_attributes=lookup("custom_attributes", sch, None) or {},
                resize_interpolation=lookup("resize_interpolation", sch, None),
                metadata_file=str(_resolve(metadata_file, base_dir)) if metadata_file else None,
            )
            spec.subsets.append(specs_sub)
        for k in ("resize_interpolation",):
            v = getattr(spec, k)
            if v is not None and v not in CHOICES[k]:
                problems.append(f"{where}: {k} = {v!r} is not one of {', '.join(c for c in CHOICES[k] if c)}")
        specs.append(spec)
    if problems:
        raise TrainConfigError(f"{source}: the dataset config cannot be used:\n" + "\n".join(f"  - {p}" for p in problems))
    return specs, notes


def _resolve(path: str, base_dir) -> Path:
    p = Path(os.path.expanduser(path))
    if p.is_absolute() or base_dir is None:
        return p
    return Path(base_dir) / p


def load_dataset_config(path: str | os.PathLike, defaults: TrainConfig | None = None) -> tuple[list[DatasetSpec], list[str]]:
    p = Path(path)
    data = _read_toml(p)
    return parse_dataset_config(data, defaults, source=str(p), base_dir=p.parent.resolve())


__all__ = [
    "ALIASES",
    "CHOICES",
    "DatasetSpec",
    "KNOWN_UNUSED",
    "SubsetSpec",
    "TrainConfig",
    "TrainConfigError",
    "config_keys",
    "load_dataset_config",
    "load_train_config",
    "parse_dataset_config",
    "output_stem",
    "parse_resolution",
    "parse_train_config",
    "parse_train_config_text",
]
