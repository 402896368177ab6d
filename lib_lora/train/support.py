"""Which config keys the trainer honours, and a note for every key set that it does not (never ignore silently).

The config parser accepts every sd-scripts key a tutorial may contain; this table says what the loop does with
each one. A key set to a non-default value that we cannot honour gives a note (or, where training as written
would be wrong, an error before anything starts).
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch

from . import blocks, lyco
from .config import TrainConfig, missing_path_hint
from .optim import SCHEDULERS, adapts_lr, make_torch_scheduler, polynomial_end_ratio, sets_own_lr

# keys whose value changes nothing here, or that we honour fully
HONOURED = {
    "pretrained_model_name_or_path", "v2", "v_parameterization", "vae", "clip_skip", "max_token_length", "no_half_vae",
    "train_data_dir", "reg_data_dir", "dataset_config", "resolution", "train_batch_size", "enable_bucket",
    "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale", "caption_extension",
    "shuffle_caption", "caption_separator", "keep_tokens", "keep_tokens_separator", "secondary_separator",
    "enable_wildcard", "caption_prefix", "caption_suffix", "caption_dropout_rate", "caption_dropout_every_n_epochs",
    "caption_tag_dropout_rate", "token_warmup_min", "token_warmup_step", "flip_aug", "resize_interpolation",
    "cache_latents", "cache_latents_to_disk", "vae_batch_size", "prior_loss_weight",
    "output_dir", "output_name", "max_train_steps", "max_train_epochs", "seed", "gradient_checkpointing",
    "gradient_accumulation_steps", "mixed_precision", "learning_rate", "unet_lr", "text_encoder_lr",
    "lr_scheduler", "lr_warmup_steps", "lr_scheduler_num_cycles", "lr_scheduler_power", "optimizer_type",
    "optimizer_args", "max_grad_norm", "network_module", "network_dim", "network_alpha", "network_dropout",
    "network_args", "network_weights", "network_train_unet_only", "network_train_text_encoder_only",
    "noise_offset", "min_timestep", "max_timestep", "loss_type", "min_snr_gamma",
    "save_model_as", "save_precision", "save_every_n_epochs", "save_every_n_steps", "save_last_n_epochs",
    "save_state", "save_state_on_train_end", "resume", "training_comment", "metadata_title", "metadata_author",
    "metadata_description", "metadata_license", "metadata_tags", "sample_prompts", "sample_every_n_epochs",
    "sample_sampler", "validation_split", "huber_schedule", "huber_c", "huber_scale", "multires_noise_discount",
    "fast_path", "cuda_graphs", "torch_compile", "dynamo_backend", "noise_offset_random_strength",
    "adaptive_noise_scale", "multires_noise_iterations", "ip_noise_gamma", "ip_noise_gamma_random_strength",
    "scale_v_pred_loss_like_noise_pred", "v_pred_like_loss", "debiased_estimation_loss",
    "sample_every_n_steps", "sample_at_first", "save_last_n_steps", "save_last_n_epochs_state",
    "save_last_n_steps_state", "no_metadata", "zero_terminal_snr",
    "scale_weight_norms", "validation_seed", "validate_every_n_steps", "validate_every_n_epochs",
    "max_validation_steps", "dim_from_weights", "save_n_epoch_ratio", "alpha_mask", "masked_loss", "lr_decay_steps",
    "lr_scheduler_min_lr_ratio", "lr_scheduler_args", "lr_scheduler_type", "lr_scheduler_timescale", "logging_dir",
    "log_prefix", "random_crop", "initial_epoch", "initial_step", "skip_until_initial_step", "face_crop_aug_range",
    "in_json", "dataset_repeats",
    "color_aug", "weighted_captions", "fp8_base", "fp8_base_unet", "full_fp16", "full_bf16",
    "base_weights", "base_weights_multiplier",
}

SUPPORTED_NETWORK_ARGS = {"conv_dim", "conv_alpha", "rank_dropout", "module_dropout", *blocks.KEYS}
# networks.dylora: what its create_network reads, and the dropouts the kohya_ss GUI writes (a note says they do nothing)
DYLORA_ARGS = {"conv_dim", "conv_alpha", "unit", "rank_dropout", "module_dropout", *blocks.KEYS}
OFT_SWITCHES = ("enable_all_linear", "enable_conv")
_OFT_ON = ("true", "1", "yes")  # (what reads as on both here and in sd-scripts; other values are refused)
# networks.oft reads its two switches; the rest is said to do nothing (a note) rather than "not supported yet"
OFT_ARGS = {*OFT_SWITCHES, "conv_dim", "conv_alpha", "rank_dropout", "module_dropout", *blocks.KEYS}
SUPPORTED_SCHEDULERS = set(SCHEDULERS)


def _defaults() -> dict:
    out = {}
    for f in dataclasses.fields(TrainConfig):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


def network_args(cfg: TrainConfig) -> dict[str, str]:
    """``network_args`` as a dict (sd-scripts: a list of key=value strings); ValueError names a bad entry."""
    out = {}
    for item in cfg.network_args or []:
        if "=" not in item:
            raise ValueError(f"network_args entry {item!r} is not key=value (e.g. conv_dim=8)")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


# network_args numbers: (type, lowest, below this, what it is)
_NET_NUMBERS = {
    "conv_dim": (int, 0, None, "the rank of the 3x3 conv layers (LoCon); 0 = off"),
    "conv_alpha": (float, 0, None, "the conv layers' alpha"),
    "rank_dropout": (float, 0, 1, "a dropout probability, e.g. 0.1"),
    "dropout": (float, 0, 1, "a dropout probability, e.g. 0.1 (LyCORIS' neuron dropout)"),
    "module_dropout": (float, 0, 1, "a dropout probability, e.g. 0.1"),
    "unit": (int, 1, None, "DyLoRA's block of ranks trained per step"),
}


def network_number_problems(nargs: dict) -> list[str]:
    out = []
    for key, (kind, lo, below, what) in _NET_NUMBERS.items():
        if key not in nargs:
            continue
        try:
            v = kind(nargs[key])
        except ValueError:
            out.append(f"network_args {key}={nargs[key]}: not {'a whole number' if kind is int else 'a number'} "
                       f"({what})")
            continue
        if not math.isfinite(v):  # (nan passes every comparison below)
            out.append(f"network_args {key}={nargs[key]} must be a finite number ({what})")
        elif v < lo or (below is not None and v >= below):
            span = f"at least {lo}" + (f" and below {below}" if below is not None else "")
            out.append(f"network_args {key}={nargs[key]} must be {span} ({what})")
    return out


def torch_scheduler_problems(cfg: TrainConfig) -> list[str]:
    """lr_scheduler_type checked before queueing: the class, its lr_scheduler_args (built once on a throwaway
    optimizer) and a warm-up, which sd-scripts refuses with these schedulers (they would ignore it)."""
    warmup = cfg.lr_warmup_steps or 0
    out = []
    if warmup:
        out.append(f"lr_warmup_steps = {warmup} with lr_scheduler_type = {cfg.lr_scheduler_type!r}: torch's "
                   "schedulers have no warm-up of their own (sd-scripts stops here too); set lr_warmup_steps = 0, "
                   "or use lr_scheduler (e.g. cosine) with its warm-up")
    try:
        probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        make_torch_scheduler(probe, cfg.lr_scheduler_type, cfg.lr_scheduler_args)
    except ValueError as e:
        out.append(str(e))
    return out


def base_dims(cfg: TrainConfig, nargs: dict, lyco: bool = False) -> tuple[int, float | None, int | None, float | None]:
    """(network_dim, network_alpha, conv_dim, conv_alpha) as the config gives them; ``lyco``: with LyCORIS'
    defaults (the conv layers take the linear rank and alpha)."""
    dim, alpha = int(cfg.network_dim or 4), cfg.network_alpha
    conv_dim = int(nargs["conv_dim"]) if "conv_dim" in nargs else (dim if lyco else None)
    conv_alpha = float(nargs["conv_alpha"]) if "conv_alpha" in nargs else (alpha if lyco else None)
    return dim, alpha, conv_dim, conv_alpha


def part_lrs(cfg: TrainConfig) -> tuple[float, float]:
    """(UNet, text encoder) learning rates: learning_rate where a part's own is not set, 0 for a part
    network_train_unet_only / network_train_text_encoder_only leave out (0: that part trains nothing)."""
    unet_lr = cfg.unet_lr if cfg.unet_lr is not None else cfg.learning_rate
    te_lr = cfg.text_encoder_lr if cfg.text_encoder_lr is not None else cfg.learning_rate
    if cfg.network_train_unet_only:
        te_lr = 0.0
    if cfg.network_train_text_encoder_only:
        unet_lr = 0.0
    return float(unet_lr or 0.0), float(te_lr or 0.0)


def lyco_settings(module: str | None, nargs: dict, notes: list[str], cfg: TrainConfig):
    """LyCORIS settings (None for networks.lora) with the combinations this trainer refuses; ValueError says
    what to change."""
    s = lyco.lyco_settings(module, nargs, notes, resolve=cfg.resolve)
    if s is None:
        return None
    given = [k for k in blocks.LR_KEYS + blocks.DIM_KEYS if k in nargs]
    if given:
        raise ValueError(f"network_args {', '.join(given)}: block learning rates and block ranks are networks.lora "
                         "options that LyCORIS does not read; remove them, or train with network_module = "
                         "networks.lora")
    what = f"algo={s.algo}" + (" with dora_wd" if s.dora else "")
    if not s.weight_forward and "rank_dropout" in nargs:
        notes.append(f"rank_dropout with algo={s.algo} works as in kohya's networks.lora (rank channels dropped per "
                     "sample and the rest scaled up); LyCORIS drops output rows of the whole delta without scaling")
    if s.rs_lora and cfg.dim_from_weights:
        # (an rs_lora file's alpha is written as alpha·dim/sqrt(dim), so alpha/dim is the trained scale; LyCORIS'
        # create_network_from_weights builds plain modules from it)
        notes.append("rs_lora changes nothing with dim_from_weights: each module takes the file's alpha, which "
                     "already holds the rank-stabilised scale (as LyCORIS builds modules from a file)")
        s.rs_lora = False
    if s.dora and cfg.scale_weight_norms and s.algo not in lyco.NO_MAX_NORM:
        notes.append(f"scale_weight_norms with {what} caps the norm of the delta before DoRA's renormalisation, as "
                     "LyCORIS does (the magnitude is not capped)")
    if s.weight_forward:
        if cfg.network_dropout or "dropout" in nargs:
            notes.append(f"network_dropout / network_args dropout is not applied with {what} (LyCORIS does not "
                         "implement it for modules that rebuild the weight either); "
                         + ("module_dropout is" if s.algo in lyco.NO_RANK_DROPOUT
                            else "rank_dropout and module_dropout are"))
    if s.train_norm and "rank_dropout" in nargs:
        notes.append("rank_dropout is not applied to the norm modules of train_norm (LyCORIS' NormModule keeps "
                     "only the channels it means to drop); the other modules use it")
    if s.algo in lyco.NO_RANK_DROPOUT and "rank_dropout" in nargs:
        notes.append(f"rank_dropout is not applied with algo={s.algo} (LyCORIS' {s.kind} has none); module_dropout "
                     "is")
    if s.algo in lyco.NO_MAX_NORM and cfg.scale_weight_norms:
        notes.append(f"scale_weight_norms changes nothing with algo={s.algo}: LyCORIS caps the norms of LoRA, "
                     "LoHa, LoKr and OFT modules only")
    if "glora" in s.algos:
        notes.append("GLoRA files apply in this extension's <lora:>, LyCORIS and ComfyUI; A1111's built-in Lora "
                     "(1.10) reads only LyCORIS' older GLoRA layout and reports this file as a network with errors")
    if s.algo != "ia3" and "ia3" in s.algos:
        notes.append("IA3 layers apply in this extension's <lora:>, A1111's built-in Lora and LyCORIS; ComfyUI "
                     "has no IA3 loader (it reports their keys as not loaded)")
    if s.algo in lyco.NO_RANK:
        if s.algo == "ia3":
            notes.append("IA3 files apply in this extension's <lora:>, A1111's built-in Lora and LyCORIS; ComfyUI "
                         "has no IA3 loader (it reports the keys as not loaded)")
        if s.algo == "ia3" and s.preset != "ia3":
            notes.append(f"algo=ia3 with preset={s.preset}: LyCORIS recommends preset=ia3 (the attention keys and "
                         "values and the feed-forward outputs), where IA3 was made to work")
        if s.algo == "ia3" and s.preset not in ("ia3", "attn-only"):
            notes.append(f"algo=ia3 with preset={s.preset} scales convolution layers too (SD1's proj_in/out, the "
                         "resnets): A1111's built-in Lora (1.10) fails on those layers of the file with a shape "
                         "error; this extension's <lora:> and LyCORIS apply them")
    if s.dora and s.wd_on_output:
        notes.append("DoRA (dora_wd) with the magnitude per output row, LyCORIS' default: this extension's <lora:> "
                     "and LyCORIS apply the file as trained; A1111's built-in Lora (1.10) assumes per-input files "
                     "and applies it wrongly without an error, and ComfyUI only nearly as trained (it measures the "
                     "row norms on the original weight). Add network_args wd_on_output=False for the per-input "
                     "layout those tools expect")
    rotations = sorted({"diag-oft", "boft"} & s.algos)
    if rotations:
        # (measured with ComfyUI's weight_adapter oft.py/boft.py against our merge, 2026-12)
        notes.append(f"{'/'.join(rotations)} files apply in ComfyUI as trained at strength 1 only (at other "
                     "strengths its rotation differs from LyCORIS' and this extension's)"
                     + ("; ComfyUI also ignores the rescaled scales, so there the file looks different at any "
                        "strength" if s.rescaled else ""))
    if s.weight_path:
        if any(k in nargs for k in blocks.PLUS_KEYS):
            notes.append(f"LoRA+ ratios change nothing with algo={s.algo}: they raise the learning rate of lora_up "
                         "weights, which its modules do not have (as in LyCORIS)")
    return s


def sd2_proj_notes(s, notes: list[str]):
    """SD2's proj_in/proj_out are Linear in the WebUI and ComfyUI but 1x1 convolutions in sd-scripts' SD2 UNet, whose
    shapes the file keeps (as LyCORIS' does): DoRA magnitudes and full differences of that shape are skipped there
    (measured with ComfyUI's loader code and A1111's built-in Lora)."""
    if s.dora:
        notes.append("DoRA on SD2: ComfyUI and A1111's built-in Lora (1.10) skip the proj_in/proj_out layers of the "
                     "file (their magnitudes have sd-scripts' 1x1-convolution shape, as LyCORIS writes them); this "
                     "extension's <lora:> applies them")
    if "full" in s.algos:
        notes.append("algo=full on SD2: ComfyUI skips the proj_in/proj_out differences of the file (sd-scripts' "
                     "1x1-convolution shape, as LyCORIS writes them); this extension's <lora:> and A1111's built-in "
                     "Lora apply them")


def block_settings(cfg: TrainConfig, family: str, notes: list[str], from_file: tuple | None = None):
    """(block LR weights, block dims, LoRA+ ratios) from network_args; BlockArgsError / ValueError say what is
    wrong. The trainer and the pre-flight check read them through this one function. ``from_file``: the base
    dims dim_from_weights took from the network_weights file; they win over block_dims (as in sd-scripts)."""
    nargs = network_args(cfg)
    if cfg.network_module == "networks.oft":  # (oft_problems names them: nothing block-wise or LoRA+ applies)
        nargs = {k: v for k, v in nargs.items() if k not in blocks.KEYS}
    if cfg.network_module == "networks.dylora":
        given = [k for k in blocks.LR_KEYS + blocks.DIM_KEYS if k in nargs]
        if given:
            notes.append(f"network_args {', '.join(given)} are not read by networks.dylora (sd-scripts' DyLoRA has "
                         "no block learning rates or ranks); every module trains at network_dim and the UNet LR")
        nargs = {k: v for k, v in nargs.items() if k not in blocks.LR_KEYS + blocks.DIM_KEYS}
    lr_weights = blocks.block_lr_weights(nargs, family, notes)
    if from_file is not None:
        given = [k for k in blocks.DIM_KEYS if k in nargs]
        if given:
            notes.append(f"network_args {', '.join(given)} ignored: dim_from_weights takes the ranks from the "
                         "network_weights file (as sd-scripts does)")
        nargs = {k: v for k, v in nargs.items() if k not in blocks.DIM_KEYS}
    dims = blocks.block_dims(nargs, family, *(from_file or base_dims(cfg, nargs)), lr_weights)
    if dims is None and any(nargs.get(k) is not None for k in blocks.DIM_KEYS[1:]):
        notes.append("network_args block_alphas / conv_block_dims / conv_block_alphas work together with "
                      "block_dims or block learning-rate weights; without either they are ignored (as in sd-scripts)")
    plus = blocks.loraplus_ratios(nargs)
    if cfg.network_module == "networks.lora_fa" and any(r is not None for r in plus):
        notes.append("LoRA+ ratios are not used with networks.lora_fa (sd-scripts' LoRA-FA has no LoRA+; its "
                     "lora_down does not train)")
        plus = (None, None)
    if any(r is not None for r in plus) and adapts_lr(cfg.optimizer_type):
        notes.append(f"LoRA+ with {cfg.optimizer_type}: these optimizers set the step size themselves, so the "
                     "lora_up learning-rate ratio does little (sd-scripts calls the combination unsupported)")
    return lr_weights, dims, plus


def dylora_problems(cfg: TrainConfig, nargs: dict, errors: list[str], notes: list[str]):
    """networks.dylora: what sd-scripts' DyLoRA asserts, refuses by crashing, or ignores."""
    dim = int(cfg.network_dim or 4)
    try:
        unit = int(nargs.get("unit", 1))
        conv_dim = int(nargs["conv_dim"]) if "conv_dim" in nargs else dim
    except ValueError:
        return  # (network_number_problems says it)
    if unit >= 1 and dim % unit:
        errors.append(f"network_args unit={unit} with network_dim = {dim}: DyLoRA trains the rank in blocks of unit, "
                      f"so network_dim must be a multiple of it (sd-scripts stops here); e.g. unit=1 or "
                      f"network_dim = {dim - dim % unit or unit}")
    if conv_dim != dim:
        errors.append(f"network_args conv_dim={nargs['conv_dim']} with network_dim = {dim}: sd-scripts' DyLoRA needs "
                      "conv_dim equal to network_dim (it stops otherwise); set conv_dim=" + str(dim) + " or remove it")
    if "conv_alpha" in nargs and "conv_dim" in nargs:
        notes.append("network_args conv_alpha is not read by networks.dylora: its 3x3 conv layers use network_alpha "
                     "(as in sd-scripts)")
    given = [k for k in ("rank_dropout", "module_dropout") if k in nargs] + (
        ["network_dropout"] if cfg.network_dropout else [])
    if given:
        notes.append(f"{', '.join(given)} not applied with networks.dylora: sd-scripts' DyLoRA has no dropout")
    if cfg.scale_weight_norms:
        notes.append("scale_weight_norms is not used with networks.dylora: sd-scripts' DyLoRA has no max-norm "
                     "regularisation (sd-scripts warns and trains without it)")
    if cfg.dim_from_weights:
        errors.append("dim_from_weights with networks.dylora: set network_dim instead (network_weights still loads "
                      "a file of that rank)")
    notes.append("networks.dylora: each step trains one random block of unit ranks per module while every rank "
                 "takes part, as sd-scripts does; the LoRA weights are then kept one tensor per rank, so the step "
                 "is slower than a plain LoRA's and CUDA graphs are off")


def kohya_oft_switches(nargs: dict) -> tuple[bool, bool]:
    """networks.oft's (enable_all_linear, enable_conv), written True (values other than True/False are refused by
    oft_problems)."""
    return tuple(str(nargs.get(k, "false")).strip().lower() in _OFT_ON for k in OFT_SWITCHES)


def oft_problems(cfg: TrainConfig, nargs: dict, errors: list[str], notes: list[str], family: str | None = None):
    """sd-scripts' networks.oft: its switches, and what it ignores or warns about."""
    if family != "sdxl":
        notes.append(("networks.oft on SD1/SD2: " if family is None else "networks.oft: ") + "A1111's built-in Lora "
                     "(1.10) finds none of the layers of such a file (it maps the oft_unet_ names to SDXL's layout "
                     "only; sd-scripts' own SD1 OFT files are the same); this extension's <lora:> applies it")
    notes.append("networks.oft: ComfyUI loads none of such a file (it has no mapping for sd-scripts' oft_unet_ "
                 "names); for ComfyUI, train network_module = lycoris.kohya with algo=diag-oft")
    for k in OFT_SWITCHES:
        if k in nargs and str(nargs[k]).strip().lower() not in _OFT_ON:
            errors.append(f"network_args {k}={nargs[k]}: sd-scripts reads any value of {k} as True (bool of the "
                          f"text), so it would switch it on; remove the entry to leave it off, or write {k}=True")
    if (cfg.network_alpha or 0) >= 1:  # (sd-scripts' default network_alpha is 1)
        notes.append(f"networks.oft: network_alpha = {cfg.network_alpha:g} is OFT's constraint on each rotation, not "
                     "a LoRA alpha; sd-scripts warns that 1 or more is too large and suggests e.g. 1e-3")
    te = not cfg.network_train_unet_only and (cfg.text_encoder_lr if cfg.text_encoder_lr is not None
                                              else cfg.learning_rate)
    if te:
        notes.append("networks.oft trains the UNet only (sd-scripts' OFT has no text-encoder modules); the text "
                     "encoder learning rate is not used")
    given = [k for k in ("conv_dim", "conv_alpha", "rank_dropout", "module_dropout", *blocks.LR_KEYS,
                         *blocks.DIM_KEYS, *blocks.PLUS_KEYS) if k in nargs]
    given += ["network_dropout"] if cfg.network_dropout else []
    if given:
        notes.append(f"{', '.join(given)} not used with networks.oft: sd-scripts' OFT reads network_dim (blocks "
                     "per layer), network_alpha (the constraint), enable_all_linear and enable_conv only")
    if cfg.scale_weight_norms:
        notes.append("scale_weight_norms is not used with networks.oft: sd-scripts' OFT has no max-norm "
                     "regularisation (sd-scripts warns and trains without it)")
    if cfg.dim_from_weights:
        errors.append("dim_from_weights with networks.oft: set network_dim (the number of blocks) instead")


def optimizer_problems(name: str | None, cfg: TrainConfig | None = None) -> tuple[list[str], list[str]]:
    """(errors, notes) for optimizer_type before queueing: a name nothing provides, a package that is missing
    (an 8-bit/paged one falls back to its 32-bit twin with a note instead); with ``cfg``, Prodigy's refusal of
    different UNet and text-encoder learning rates."""
    from .optim import (OptimizerNameError, OptimizerUnavailable, fallback_twin, group_lrs_message, group_lrs_refused,
                        literal_args, optimizer_class, optimizer_key)

    try:
        cls = optimizer_class(name or "AdamW")
    except OptimizerNameError as e:
        return [str(e)], []
    except OptimizerUnavailable as e:
        twin = fallback_twin(name)
        if twin:
            return [], [f"{e} Until then {twin} is used instead."]
        return [str(e)], []
    if cfg is not None and adapts_lr(name):
        unet_lr, te_lr = part_lrs(cfg)
        if unet_lr and te_lr and unet_lr != te_lr:
            try:
                kw = literal_args(cfg.optimizer_args)  # (as the trainer reads them)
            except ValueError:
                kw = None  # (an entry without '=': the job stops on it when the optimizer is built)
            refused = group_lrs_refused(cls, kw) if kw is not None else None
            if refused:
                return [group_lrs_message(optimizer_key(name), refused)], []
    return [], []


CPU_FP16_NOTE = "mixed_precision fp16 needs a CUDA GPU; training in fp32 on the CPU instead."


def wrong_family_message(key: str, name: str, file_family: str, model_family: str) -> str:
    """A network_weights / base_weights file made for another model family (the check before a run and the run's
    own check say the same)."""
    from ..formats.keymap import label
    return (f"{key}: {name} is a LoRA for {label(file_family)}, the loaded model is {label(model_family)}: give a "
            f"file trained on this model family, or load an {label(file_family)} checkpoint")


def sample_problems(cfg: TrainConfig) -> list[str]:
    """A sample_sampler name no sampler has, or a sample prompt file with a line that cannot be read: the run
    would stop on them when it starts its samples, after the model has loaded."""
    from .sampling import SamplePromptError, config_prompts, resolve_sampler

    problems = []
    try:
        resolve_sampler(cfg.sample_sampler or "ddim", "sample_sampler")
    except SamplePromptError as e:
        problems.append(str(e))
    if cfg.sample_prompt_text or (cfg.sample_prompts and os.path.isfile(cfg.resolve(cfg.sample_prompts))):
        try:
            config_prompts(cfg)
        except (SamplePromptError, OSError) as e:
            problems.append(str(e))
    return problems


def input_file_problems(cfg: TrainConfig, family: str | None = None, folders: bool = True) -> list[str]:
    """What a run would stop on in the files it reads before its first step, found without loading them (headers,
    names): missing folders and files, a network_weights / base_weights file that is not a LoRA or is one for
    another model family than ``family``, a resume file that is not a state. Each says what to change.
    ``folders=False``: the dataset's own files are left to the dataset plan, which reports them."""
    from ..formats.family import detect_family
    from ..formats.report import not_a_lora
    from ..formats.safetensors_io import read_header
    from .saving import StateFileError, load_state

    problems = []
    keys = ("train_data_dir", "reg_data_dir", "dataset_config", "in_json") if folders else ()
    for key in keys + ("sample_prompts",):
        value = getattr(cfg, key, None)
        if value and not os.path.exists(cfg.resolve(value)):
            problems.append(f"{key}: {cfg.resolve(value)} does not exist"
                            + missing_path_hint(cfg.resolve(value), cfg.base_dir))
    problems += sample_problems(cfg)
    weights = [("network_weights", cfg.network_weights)] + [("base_weights", w) for w in cfg.base_weights or []]
    for key, value in weights:
        if not value:
            continue
        path = str(cfg.resolve(value))
        if not os.path.isfile(path):
            problems.append(f"{key}: {path} does not exist" + missing_path_hint(path, cfg.base_dir))
            continue
        try:
            header = read_header(path)
        except Exception as e:  # (the message says what is wrong with the file)
            problems.append(f"{key}: {e}")
            continue
        shapes = {k: v["shape"] for k, v in header.items() if k != "__metadata__"}
        what = not_a_lora(shapes, header.get("__metadata__") or {})
        if what:  # (the run would find none of its tensors fit the network, after loading the model)
            problems.append(f"{key}: {os.path.basename(path)}: {what.split(':')[0]}; {key} takes a LoRA file the run "
                            + ("starts from" if key == "network_weights" else "merges into the model first")
                            + " (the model to train on is pretrained_model_name_or_path, or the WebUI's)")
            continue
        fam = detect_family(shapes, header.get("__metadata__") or {})
        if fam.refused:
            problems.append(f"{key}: {fam.refusal_message(path)}")
        elif family and fam.family and fam.family != family:
            problems.append(wrong_family_message(key, os.path.basename(path), fam.family, family))
    if cfg.resume:
        try:
            state = load_state(str(cfg.resolve(cfg.resume)), check_only=True)
        except StateFileError as e:
            problems.append(f"resume: {e}")
        else:
            problems += [f"resume: {p}" for p in resume_problems(cfg, state, str(cfg.resume))]
    return problems


def resume_problems(cfg: TrainConfig, state: dict, path: str) -> list[str]:
    """A networks.lora state whose ranks are not the config's network_dim / conv_dim, told before the model loads
    (the run found it only after loading the model and caching latents). Block ranks, dim_from_weights and other
    network modules are left to the run's own check."""
    nargs = network_args(cfg)
    if ((cfg.network_module or "networks.lora") not in ("networks.lora", "networks.lora_fa") or cfg.dim_from_weights
            or "block_dims" in nargs or "conv_block_dims" in nargs):
        return []
    downs = [v.shape for k, v in (state.get("network") or {}).items()
             if k.endswith(".lora_down.weight") and hasattr(v, "shape")]
    lin = {int(s[0]) for s in downs if len(s) == 2 or tuple(s[2:]) == (1, 1)}
    conv = {int(s[0]) for s in downs if len(s) == 4 and tuple(s[2:]) != (1, 1)}
    dim, _, conv_dim, _ = base_dims(cfg, nargs)
    name, fix = os.path.basename(path), "to continue it (a state goes on with the network it was saved with)"
    problems = []
    if len(lin) == 1 and lin != {dim}:
        problems.append(f"{name} was trained with network_dim {min(lin)}, this config says {dim}: set "
                        f"network_dim = {min(lin)} {fix}, or start a new run without resume")
    if len(conv) == 1 and conv != {conv_dim}:
        problems.append(f"{name} was trained with conv_dim {min(conv)} (3x3 convs), this config has "
                        + (f"conv_dim {conv_dim}" if conv_dim else "none") + f": set network_args conv_dim = "
                        f"{min(conv)} {fix}, or start a new run without resume")
    elif downs and not conv and conv_dim:
        problems.append(f"{name} was trained without 3x3 convs, this config sets conv_dim {conv_dim}: leave "
                        f"conv_dim out {fix}, or start a new run without resume")
    return problems


def resume_data_notes(name: str, state: dict, plan) -> list[str]:
    """A state continued on other data (images added or removed, another resolution or batch size) is allowed,
    as sd-scripts allows it, but said: the steps and epochs it counts then mean other things."""
    from .dataset import signature_changes
    changes = signature_changes(state.get("data"), plan.signature())
    if not changes:
        return []
    return [f"resume: {name} was trained on other data ({'; '.join(changes)}): the run goes on with this data "
            f"from step {int(state.get('step') or 0)}. If that is not what you meant, point the config at the "
            "dataset of that run, or train without resume to start over on this one"]


def loaded_model_notes(cfg: TrainConfig, info: dict | None) -> list[str]:
    """Inside the WebUI a job trains the loaded checkpoint as it is: the model keys of a pasted sd-scripts config
    (``pretrained_model_name_or_path``, ``v2``, ``v_parameterization``, ``vae``) choose nothing; say so where they
    disagree with it. ``info``: the backend's model_info (name, family, parameterization)."""
    if not info or not info.get("loaded", True):
        return []
    name, family = info.get("name") or "the loaded model", info.get("family")
    notes = []
    if cfg.pretrained_model_name_or_path:
        want = os.path.basename(str(cfg.pretrained_model_name_or_path).rstrip("/\\"))
        if os.path.splitext(want)[0] not in name:
            notes.append(f"The config names the model {want}; LoRA Studio trains the checkpoint loaded in the WebUI "
                         f"({name}). Load {want} first if you meant it.")
    if cfg.v2 and family and family != "sd2":
        notes.append(f"v2 = true, but the loaded model ({name}) is {family.upper()}: it is trained as it is")
    param = info.get("parameterization")
    if cfg.v_parameterization and param and param != "v":
        notes.append(f"v_parameterization = true, but the loaded model ({name}) predicts {param}: it is trained as "
                     "it predicts (the key chooses for a checkpoint the command line loads)")
    if cfg.vae:
        notes.append(f"vae = {cfg.vae!r} is not loaded: jobs in the WebUI use the VAE chosen in the WebUI "
                     "(Settings → Stable Diffusion → SD VAE)")
    if (cfg.mixed_precision or "").lower() == "fp16" and str(info.get("device", "")).startswith("cpu"):
        notes.append(CPU_FP16_NOTE)
    return notes


def schedule_problems(cfg: TrainConfig, notes: list[str]) -> list[str]:
    """lr_scheduler with the warm-up and end value sd-scripts hands transformers."""
    if cfg.lr_scheduler_type or sets_own_lr(cfg.optimizer_type, cfg.optimizer_args):
        return []  # (torch schedulers: torch_scheduler_problems; no schedule at all: the trainer's note)
    name = cfg.lr_scheduler or "constant"
    if name == "constant" and cfg.lr_warmup_steps:
        notes.append(f"lr_warmup_steps = {cfg.lr_warmup_steps:g} with lr_scheduler = constant: the LR warms up over "
                     "those steps and then stays constant (constant_with_warmup); sd-scripts stops on this "
                     "combination, since its constant takes no warm-up")
    if name == "polynomial":
        args = {k.strip(): v.strip() for k, _, v in (str(a).partition("=") for a in cfg.lr_scheduler_args or [])}
        try:
            polynomial_end_ratio(args, cfg.learning_rate)
        except ValueError as e:
            return [str(e)]
    return []


def prediction_problems(cfg: TrainConfig, parameterization: str | None) -> list[str]:
    """Loss scalings made for the other prediction type (sd-scripts refuses both): inside the WebUI the loaded
    model decides, so a config written for SD2-768-v meets an SD1.5 model here."""
    out = []
    if parameterization == "eps" and cfg.scale_v_pred_loss_like_noise_pred:
        out.append("scale_v_pred_loss_like_noise_pred is for v-prediction models (SD2 768-v), but this model "
                   "predicts noise: it would train high-noise steps hundreds of times less (sd-scripts stops "
                   "here too); remove it, or load the v-prediction checkpoint the config was written for")
    if parameterization == "v" and cfg.v_pred_like_loss:
        out.append(f"v_pred_like_loss = {cfg.v_pred_like_loss:g} is for noise-prediction models, but this model "
                   "predicts v (sd-scripts stops here too); remove it, or load the noise-prediction checkpoint "
                   "the config was written for")
    return out


def check_support(cfg: TrainConfig, family: str | None = None,
                  parameterization: str | None = None) -> tuple[list[str], list[str]]:
    """(errors, notes) for keys this trainer cannot honour as written; with the model ``family`` the per-block
    network_args are checked too (their lengths depend on it), with its ``parameterization`` ("eps"/"v") the
    loss settings made for one of them."""
    errors: list[str] = []
    notes: list[str] = []
    if cfg.adaptive_noise_scale and not cfg.noise_offset:  # (sd-scripts stops here; a GUI preset may carry it)
        notes.append(f"adaptive_noise_scale = {cfg.adaptive_noise_scale:g} changes nothing without noise_offset "
                     "(it adjusts the offset); set noise_offset too, e.g. 0.0357")
    defaults = _defaults()
    for name, default in defaults.items():
        f = TrainConfig.__dataclass_fields__[name]
        if f.metadata.get("internal") or name in HONOURED:
            continue
        value = getattr(cfg, name)
        if value != default and value not in (None, False, 0, "", []):
            notes.append(f"{name} = {value!r} is not supported by LoRA Studio's trainer yet and is ignored")
    te_trained = not cfg.network_train_unet_only and (cfg.text_encoder_lr if cfg.text_encoder_lr is not None
                                                       else cfg.learning_rate)
    if any(cfg.ignored.get(k) for k in ("cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk")) \
            and te_trained:
        notes.append("cache_text_encoder_outputs with a trained text encoder: sd-scripts stops here; this run "
                     "trains the text encoder and computes its outputs at every step. Set network_train_unet_only "
                     "= true (or text_encoder_lr = 0) to train the UNet only with cached outputs")
    if part_lrs(cfg) == (0.0, 0.0):  # (the run stops on it; said before the model loads)
        errors.append("both learning rates are 0, so nothing would train; set unet_lr or text_encoder_lr")
    errors += schedule_problems(cfg, notes)
    errors += prediction_problems(cfg, parameterization)
    if family == "sdxl" and cfg.clip_skip not in (None, 1):
        notes.append(f"clip_skip = {cfg.clip_skip} is not used on SDXL: its text encoders always give their "
                     "penultimate layer, when training as when generating (sd-scripts warns the same); the file "
                     "still records it")
    if family == "sd2" and cfg.clip_skip not in (None, 1):
        notes.append(f"clip_skip = {cfg.clip_skip} is not used on SD2: the WebUI gives SD2 the text encoder's "
                     "penultimate layer whatever its CLIP skip setting, so the LoRA trains on what it will meet "
                     "when generating (sd-scripts applies it and warns that the result is unexpected)")
    for name in ("full_fp16", "full_bf16"):
        if getattr(cfg, name):
            notes.append(f"{name}: the LoRA weights, their gradients and the optimizer state stay in fp32 here (a few "
                         "hundred MB at most, more precise than half precision); the model itself computes in the "
                         "mixed precision set")
    if cfg.network_module == "networks.dylora":
        try:
            dylora_problems(cfg, network_args(cfg), errors, notes)
        except ValueError:
            pass  # (an entry without '=': reported below)
    if cfg.network_module == "networks.oft":
        try:
            oft_problems(cfg, network_args(cfg), errors, notes, family)
        except ValueError:
            pass  # (an entry without '=': reported below)
    errors_opt, notes_opt = optimizer_problems(cfg.optimizer_type, cfg)
    errors += errors_opt
    notes += notes_opt
    if cfg.lr_scheduler_timescale and (cfg.lr_scheduler_type or cfg.lr_scheduler != "inverse_sqrt"):
        notes.append(f"lr_scheduler_timescale = {cfg.lr_scheduler_timescale} is read by lr_scheduler = "
                     "inverse_sqrt only; it changes nothing here (as in sd-scripts)")
    if cfg.lr_scheduler_type:
        errors += torch_scheduler_problems(cfg)
        if (cfg.lr_scheduler or "constant") != "constant":
            notes.append(f"lr_scheduler = {cfg.lr_scheduler!r} is not used: lr_scheduler_type = "
                         f"{cfg.lr_scheduler_type!r} sets the schedule (as in sd-scripts)")
    elif (cfg.lr_scheduler or "constant") not in SUPPORTED_SCHEDULERS:
        errors.append(f"lr_scheduler = {cfg.lr_scheduler!r} is not available here; choose one of "
                      f"{', '.join(sorted(SUPPORTED_SCHEDULERS))}")
    supported = {"networks.dylora": DYLORA_ARGS, "networks.oft": OFT_ARGS}.get(cfg.network_module,
                                                                                SUPPORTED_NETWORK_ARGS)
    try:
        nargs = network_args(cfg)
    except ValueError:
        nargs = None  # reported below
    if nargs is not None:
        if cfg.network_module == "lycoris.kohya":  # (also when a refusal below stops it: no stray notes)
            supported = SUPPORTED_NETWORK_ARGS | lyco.KEYS
        try:
            s = lyco_settings(cfg.network_module, nargs, notes, cfg)
        except ValueError as e:
            errors.append(str(e))
        else:
            if family == "sd2" and s is not None:
                sd2_proj_notes(s, notes)
    if (cfg.save_model_as or "safetensors") != "safetensors":
        notes.append(f"save_model_as = {cfg.save_model_as!r}: files are written as .safetensors (pickle formats "
                     f"can run code when loaded)")
    for item in cfg.network_args or []:
        key = item.split("=", 1)[0].strip()
        if key in supported:
            continue
        import difflib
        close = difflib.get_close_matches(key, sorted(supported), n=1, cutoff=0.85)
        if close:  # (a typo of a setting: ignoring it would train without what it asks for)
            errors.append(f"network_args {key!r} is not a setting: did you mean {close[0]!r}?")
        else:
            notes.append(f"network_args {key!r} is not supported yet and is ignored "
                         f"(supported: {', '.join(sorted(supported))})")
    if cfg.weighted_captions and (cfg.shuffle_caption or cfg.caption_tag_dropout_rate or cfg.keep_tokens):
        notes.append("weighted_captions with shuffled or dropped tags: keep commas out of the brackets, e.g. "
                     "'(red hair:1.2), smiling', or a tag split at its comma loses its weight (as in sd-scripts)")
    try:
        errors += network_number_problems(network_args(cfg))
    except ValueError as e:  # an entry without '='
        errors.append(str(e))
    if family is not None and not errors:
        try:
            block_settings(cfg, family, notes)
        except ValueError as e:  # BlockArgsError included
            errors.append(str(e))
    return errors, notes


def network_build_problems(sd_model, family: str, cfg: TrainConfig) -> list[str]:
    """What building the network on this loaded model would stop on: a layer size BOFT / OFT cannot split, a
    LyCORIS preset file that picks no layer. Found when the job is queued instead of when it starts (behind other
    jobs, maybe hours later). The network is built on the meta device: nothing is allocated or read from the
    weights. Settings errors are check_support's; they give no problem here."""
    try:
        nargs = network_args(cfg)
        s = lyco_settings(cfg.network_module, nargs, [], cfg)
        oft = kohya_oft_switches(nargs) if cfg.network_module == "networks.oft" else None
    except ValueError:
        return []
    if oft is None and (s is None or s.custom is None and s.algo not in lyco.OFT):
        return []  # (the other types fit any layer)
    from .lora_net import LoRANetwork, NetworkShapeError
    from .lyco_preset import PresetError
    dim, alpha, conv_dim, conv_alpha = base_dims(cfg, nargs, lyco=s is not None)
    if oft:  # (as the trainer builds it: every layer dim blocks)
        conv_dim = dim
    unet_lr, te_lr = part_lrs(cfg)
    if s is not None:  # (what only sets values, not shapes, and reads tensors the meta device has not)
        s = dataclasses.replace(s, dora=False, rs_lora=False)
    try:
        with torch.device("meta"):
            LoRANetwork(sd_model, family, dim=dim, alpha=alpha, conv_dim=conv_dim, conv_alpha=conv_alpha,
                        train_unet=bool(unet_lr), train_text_encoder=bool(te_lr), lyco=s, kohya_oft=oft)
    except (NetworkShapeError, PresetError) as e:
        return [str(e)]
    return []


def dry_run_space_problems(cfg: TrainConfig, family: str | None, epochs: int, end_step: int,
                           resumed_at: int = 0) -> tuple[str | None, str | None]:
    """A dry run's (problem, note) for the disk of the output folder, as the run's own check at its start finds
    them, with the network's size estimated for the full-size model of ``family`` (LoRA, LoCon, LoHa; other
    network types are checked when the run starts)."""
    from .saving import estimated_lora_params, run_space_problems

    unet_lr, te_lr = part_lrs(cfg)
    n = estimated_lora_params(cfg, family, bool(unet_lr), bool(te_lr))
    if not n or not cfg.output_dir:
        return None, None
    folder = os.path.abspath(str(cfg.resolve(cfg.output_dir)))
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:  # (made when the run starts)
        folder = os.path.dirname(folder)
    problem, note = run_space_problems(folder, n, cfg, epochs, end_step, resumed_at)
    said = (f" (estimated for a full-size {family.upper()} model at network_dim {int(cfg.network_dim or 4)}; "
            "the run checks the exact size when it starts)")
    return (problem + said if problem else None), (note + said if note else None)

