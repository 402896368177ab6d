"""kohya_ss GUI presets (the LoRA tab's .json files) read as the sd-scripts config the GUI hands sd-scripts.

The rules are the GUI's own (bmaltais/kohya_ss 45088f04: ``common_gui.update_my_data`` for the value coercion,
``lora_gui.train_model`` for the LoRA type -> network_module / network_args and for what reaches the TOML; values
0, "", False and None are left out there, so sd-scripts' defaults apply). Where the GUI does something its preset's
author cannot have meant, we do what the preset says and a note names the difference:
- a preset without ``max_train_steps`` trains 1600 steps in GUIs since v24.0.5 and ignores its ``epoch``: here the
  epochs are trained;
- a block-weight value with spaces ("2, 2, 4") is split by the GUI into tokens sd-scripts stops on: here the spaces
  are dropped.
"""

from __future__ import annotations

from typing import Any

# every LoRA-tab preset has it; nothing else in a training config does
MARKER = "LoRA_type"

_LYCO_COMMON = ("preset", "conv_dim", "conv_alpha")
# LyCORIS types: the network_args the GUI always writes, in its order (GUI key in brackets when it differs)
_LYCO_ARGS = {
    "LyCORIS/LoCon": ("locon", _LYCO_COMMON + ("use_tucker", "rank_dropout", "bypass_mode", "dora_wd",
                                               "module_dropout", "use_scalar", "rank_dropout_scale", "train_norm")),
    "LyCORIS/LoHa": ("loha", _LYCO_COMMON + ("use_tucker", "rank_dropout", "bypass_mode", "dora_wd",
                                             "module_dropout", "use_scalar", "rank_dropout_scale", "train_norm")),
    "LyCORIS/LoKr": ("lokr", _LYCO_COMMON + ("use_tucker", "rank_dropout", "bypass_mode", "dora_wd",
                                             "module_dropout", "factor", "use_cp", "use_scalar", "decompose_both",
                                             "rank_dropout_scale", "train_norm")),
    "LyCORIS/iA3": ("ia3", _LYCO_COMMON + ("train_on_input",)),
    "LyCORIS/DyLoRA": ("dylora", _LYCO_COMMON + ("use_tucker", "block_size[unit]", "rank_dropout",
                                                 "module_dropout", "train_norm")),
    "LyCORIS/GLoRA": ("glora", _LYCO_COMMON + ("use_tucker", "rank_dropout", "module_dropout",
                                               "rank_dropout_scale", "train_norm")),
    "LyCORIS/Diag-OFT": ("diag-oft", _LYCO_COMMON + ("module_dropout", "use_tucker", "rank_dropout",
                                                     "rank_dropout_scale", "constraint[constrain]", "rescaled",
                                                     "train_norm")),
    "LyCORIS/BOFT": ("boft", _LYCO_COMMON + ("module_dropout", "use_tucker", "rank_dropout", "rank_dropout_scale",
                                             "train_norm")),
    "LyCORIS/Native Fine-Tuning": ("full", ("preset", "rank_dropout", "module_dropout", "rank_dropout_scale",
                                            "train_norm")),
}
# kohya types: (network_module, keys written only when truthy)
_BLOCK_KEYS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "block_dims",
               "block_alphas", "conv_block_dims", "conv_block_alphas")
_KOHYA = {
    "Standard": ("networks.lora", _BLOCK_KEYS + ("rank_dropout", "module_dropout")),
    "Kohya LoCon": ("networks.lora", _BLOCK_KEYS + ("rank_dropout", "module_dropout")),
    "LoRA-FA": ("networks.lora_fa", _BLOCK_KEYS + ("rank_dropout", "module_dropout")),
    "Kohya DyLoRA": ("networks.dylora", ("conv_dim", "conv_alpha") + _BLOCK_KEYS + ("unit", "rank_dropout",
                                                                                  "module_dropout")),
}
_OTHER_MODULES = {"Kohya LoHa": "networks.loha", "Kohya LoKr": "networks.lokr", "Flux1": "networks.lora_flux",
                  "Flux1 OFT": "networks.oft_flux", "HunyuanImage-2.1": "networks.lora_hunyuan_image",
                  "Anima": "networks.lora_anima", "Lumina": "networks.lora_lumina"}
_LORAPLUS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")

# fresh-GUI values of the keys a preset may leave out (lora_gui HEAD)
_DEFAULTS = {
    "LoRA_type": "Standard", "network_dim": 8, "network_alpha": 1, "conv_dim": 1, "conv_alpha": 1, "factor": -1,
    "unit": 1, "constrain": 0.0, "train_on_input": True, "LyCORIS_preset": "full", "rank_dropout": 0,
    "module_dropout": 0.0, "learning_rate": 1e-4, "text_encoder_lr": 1e-4, "unet_lr": 1e-4, "lr_scheduler": "cosine",
    "lr_warmup": 10, "lr_warmup_steps": 0, "lr_scheduler_num_cycles": 1, "lr_scheduler_power": 1.0, "epoch": 1,
    "max_train_epochs": 0, "mixed_precision": "fp16", "save_precision": "fp16", "max_resolution": "512,512",
    "min_bucket_reso": 256, "max_bucket_reso": 2048, "bucket_reso_steps": 64, "cache_latents": True,
    "bucket_no_upscale": True, "enable_bucket": True, "max_timestep": 1000, "max_grad_norm": 1.0,
    "prior_loss_weight": 1.0, "noise_offset_type": "Original", "multires_noise_discount": 0.3, "clip_skip": 1,
    "max_token_length": 75, "sample_sampler": "euler_a", "loss_type": "l2", "huber_schedule": "snr", "huber_c": 0.1,
    "huber_scale": 1.0, "caption_extension": ".txt", "train_batch_size": 1, "save_every_n_epochs": 1,
    **{k: False for k in ("use_tucker", "use_cp", "use_scalar", "bypass_mode", "dora_wd", "rank_dropout_scale",
                          "train_norm", "decompose_both", "rescaled")},
}
# update_my_data: int(value), a value int() refuses becomes the given number
_INTS = {"clip_skip": 0, "epoch": 0, "gradient_accumulation_steps": 0, "keep_tokens": 0, "lr_warmup": 0,
         "max_data_loader_n_workers": 0, "max_train_epochs": 0, "save_every_n_epochs": 0, "seed": 0,
         "lr_scheduler_num_cycles": 1, "max_train_steps": 0, "caption_dropout_every_n_epochs": 0,
         "max_token_length": 75}
_FLOATS = {"adaptive_noise_scale": 0.0, "noise_offset": 0.0, "learning_rate": 0.0, "text_encoder_lr": 0.0,
           "unet_lr": 0.0, "lr_scheduler_power": 1.0}
# read by the translation below (the rest of a preset's sd-scripts keys go on as they are)
_CONSUMED = {
    "LoRA_type", "lora_network_weights", "use_8bit_adam", "optimizer", "optimizer_args", "lr_scheduler_args", "sdxl",
    "sdxl_no_half_vae", "sdxl_cache_text_encoder_outputs", "xformers", "mem_eff_attn", "noise_offset_type",
    "noise_offset", "adaptive_noise_scale", "noise_offset_random_strength", "multires_noise_iterations",
    "multires_noise_discount", "conv_dim", "conv_alpha", "factor", "unit", "constrain", "train_on_input",
    "LyCORIS_preset", "rank_dropout", "module_dropout", "use_tucker", "use_cp", "use_scalar", "bypass_mode",
    "dora_wd", "rank_dropout_scale", "rescaled", "train_norm", "decompose_both", *_BLOCK_KEYS, *_LORAPLUS,
    "learning_rate", "text_encoder_lr", "unet_lr", "epoch", "max_train_epochs", "max_train_steps", "lr_warmup",
    "lr_warmup_steps", "max_resolution", "stop_text_encoder_training", "sample_prompts", "additional_parameters"}
# GUI settings with no meaning for a trainer inside the WebUI (launcher, logging, other model families)
_GUI_ONLY = {
    "model_list", "training_preset", "num_cpu_threads_per_process", "num_processes", "num_machines", "multi_gpu",
    "gpu_ids", "main_process_port", "dynamo_backend", "dynamo_mode", "dynamo_use_fullgraph", "dynamo_use_dynamic",
    "extra_accelerate_launch_args", "use_wandb", "log_with", "wandb_api_key", "wandb_run_name", "log_tracker_name",
    "log_tracker_config", "log_config", "max_data_loader_n_workers", "persistent_data_loader_workers", "lowvram",
    "highvram", "save_as_bool", "no_token_padding", "stop_text_encoder_training_pct", "conv_dims", "conv_alphas",
    "t5xxl_lr", "v2", "v_parameterization", "save_model_as", "flux1_checkbox", "sd3_checkbox", "train_lora_ggpo",
    "huggingface_repo_id", "huggingface_token", "huggingface_repo_type", "huggingface_repo_visibility",
    "huggingface_path_in_repo", "save_state_to_huggingface", "resume_from_huggingface", "async_upload",
}


def is_gui_preset(data: Any) -> bool:
    return isinstance(data, dict) and MARKER in data


def _int(v, fallback: int) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return fallback


def _float(v, fallback: float) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return fallback


def _dropped(v) -> bool:
    """The GUI's filter: ``value in ["", False, None]`` (so 0 and 0.0 too; empty lists stay)."""
    return not isinstance(v, list) and v in ("", False, None)


def _args(text) -> list[str]:
    return str(text or "").replace('"', "").split()


def from_gui_preset(data: dict, known_keys: set[str]) -> tuple[dict, list[str], str | None]:
    """(sd-scripts keys, notes, the preset's sample prompt text or None). ``known_keys``: the keys our config
    parser reads; other preset keys are listed in a note, never passed on."""
    g: dict[str, Any] = dict(_DEFAULTS)
    g["optimizer"] = "AdamW8bit" if data.get("use_8bit_adam") else "AdamW"
    g.update({k: v for k, v in data.items() if v is not None})
    not_numbers = []
    for table, read in ((_INTS, _int), (_FLOATS, _float)):
        for k, fallback in table.items():
            if k in g:
                v = read(g[k], None)
                if v is None and not _dropped(g[k]):
                    not_numbers.append(f"{k} = {g[k]!r} is not a number: read as {fallback!r}, as the GUI reads it")
                g[k] = fallback if v is None else v
    if g["LoRA_type"] == "LoCon":
        g["LoRA_type"] = "LyCORIS/LoCon"
    if isinstance(g.get("xformers"), bool):
        g["xformers"] = "xformers" if g["xformers"] else "none"
    if "lora_network_weights" in data:
        g["network_weights"] = data["lora_network_weights"]

    lora_type = str(g["LoRA_type"])
    notes = [f"read as a kohya_ss GUI preset (LoRA type {lora_type!r}), translated to the sd-scripts settings the "
             "GUI passes on"] + not_numbers
    out: dict[str, Any] = {}

    # ---- network type
    if lora_type in _LYCO_ARGS:
        algo, keys = _LYCO_ARGS[lora_type]
        args = []
        for spec in keys:
            name, _, gui = spec.partition("[")
            gui = gui.rstrip("]") or name
            value = g.get("LyCORIS_preset" if name == "preset" else gui)
            if not any(a.startswith(name + "=") for a in args):  # (LoCon/LoHa write use_tucker twice)
                args.append(f"{name}={value}")
        at = next((i for i, a in enumerate(args) if a.startswith("train_norm=")), len(args))
        args.insert(at, f"algo={algo}")  # the GUI writes algo just before train_norm (last for iA3)
        out["network_module"] = "lycoris.kohya"
    elif lora_type in _KOHYA:
        out["network_module"], keys = _KOHYA[lora_type]
        args = [f"conv_dim={g['conv_dim']}", f"conv_alpha={g['conv_alpha']}"] if lora_type == "Kohya LoCon" else []
        for k in keys:
            v = g.get(k)
            if v:
                if isinstance(v, str) and any(c.isspace() for c in v.strip()):
                    notes.append(f"{k} = {v!r}: spaces removed (the GUI would split the value at them and "
                                 "sd-scripts would stop)")
                    v = "".join(v.split())
                args.append(f"{k}={v}")
    elif lora_type in _OTHER_MODULES:
        out["network_module"], args = _OTHER_MODULES[lora_type], []
    else:
        known = ", ".join(list(_KOHYA) + list(_LYCO_ARGS) + list(_OTHER_MODULES))
        raise ValueError(f"LoRA_type {lora_type!r} is not one the kohya_ss GUI knows ({known})")
    for k in _LORAPLUS:
        if _float(g.get(k), 0.0):
            args.append(f"{k}={g[k]}")
    out["network_args"] = [a.replace('"', "") for a in args]

    # ---- learning rates (the GUI: a text-encoder LR of 0 trains the UNet only, and the other way round)
    te, unet, lr = g["text_encoder_lr"], g["unet_lr"], g["learning_rate"]
    if te == unet == lr == 0:
        raise ValueError("the preset's learning_rate, unet_lr and text_encoder_lr are all 0 (the GUI stops here "
                         "too): set a learning rate")
    out.update(learning_rate=lr, unet_lr=unet, text_encoder_lr=te)
    if te == 0 and unet != 0:
        out["network_train_unet_only"] = True
    elif te != 0 and unet == 0:
        out["network_train_text_encoder_only"] = True

    # ---- length: the preset's own numbers, as its author meant them
    epochs, steps = g.get("max_train_epochs") or 0, g.get("max_train_steps") or 0
    if epochs:
        out["max_train_epochs"] = epochs
    elif steps:
        out["max_train_steps"] = steps
        if g["epoch"] > 1:
            notes.append(f"max_train_steps = {steps} sets the length; the preset's epoch = {g['epoch']} is not used "
                         "(as in the GUI)")
    else:
        out["max_train_epochs"] = max(1, g["epoch"])
        if "max_train_steps" not in data:
            notes.append(f"the preset has no max_train_steps: kohya_ss GUIs since v24.0.5 would train 1600 steps "
                         f"and ignore its epoch = {g['epoch']}; LoRA Studio trains the {max(1, g['epoch'])} "
                         "epoch(s) the preset names")

    # ---- warm-up: an absolute lr_warmup_steps wins, else lr_warmup percent as a share of the run
    if g["lr_scheduler"] == "constant" and (g.get("lr_warmup_steps") or g["lr_warmup"]):
        notes.append("lr_scheduler = constant takes no warm-up (sd-scripts stops on one); the preset's warm-up is "
                     "left out")
    elif _int(g.get("lr_warmup_steps"), 0) > 0:
        out["lr_warmup_steps"] = _int(g["lr_warmup_steps"], 0)
    elif g["lr_warmup"]:
        out["lr_warmup_steps"] = g["lr_warmup"] / 100

    out["optimizer_type"] = g["optimizer"]
    out["optimizer_args"] = _args(g.get("optimizer_args"))
    out["lr_scheduler_args"] = _args(g.get("lr_scheduler_args"))
    out["resolution"] = str(g["max_resolution"])
    _fit_bucket_defaults(data, g, notes)

    # ---- noise: the type picks which settings go on
    if g["noise_offset_type"] == "Multires":
        out["multires_noise_iterations"] = g.get("multires_noise_iterations")
        out["multires_noise_discount"] = g.get("multires_noise_discount")
        ignored_noise = [k for k in ("noise_offset", "adaptive_noise_scale") if g.get(k)]
    else:
        out["noise_offset"] = g.get("noise_offset")
        out["adaptive_noise_scale"] = g.get("adaptive_noise_scale")
        out["noise_offset_random_strength"] = g.get("noise_offset_random_strength")
        ignored_noise = [k for k in ("multires_noise_iterations",) if g.get(k)]
    if ignored_noise:
        notes.append(f"noise_offset_type = {g['noise_offset_type']}: {', '.join(ignored_noise)} not used (as in "
                     "the GUI)")
    if g.get("sdxl"):
        out["no_half_vae"] = bool(g.get("sdxl_no_half_vae"))
        out["cache_text_encoder_outputs"] = bool(g.get("sdxl_cache_text_encoder_outputs"))
        notes.append("the preset is for SDXL; LoRA Studio trains the model loaded in the WebUI")
    if g.get("stop_text_encoder_training"):
        notes.append("stop_text_encoder_training is ignored (the GUI ignores it too; sd-scripts has it only for "
                     "DreamBooth)")
    if str(g.get("additional_parameters") or "").strip():
        notes.append(f"additional_parameters {g['additional_parameters']!r} are command-line flags for "
                     "sd-scripts and are not read here; set those keys in the config instead")

    # ---- every other preset key that is an sd-scripts key goes on as it is (the GUI's filter applied)
    unknown = []
    for k, v in g.items():
        if k in out or k in _CONSUMED or k in _GUI_ONLY:
            continue
        if k in known_keys:
            out[k] = v
        else:
            unknown.append(k)
    if unknown:
        notes.append(f"kohya_ss GUI keys with no sd-scripts counterpart here, ignored: {', '.join(sorted(unknown))}")
    prompt = str(g.get("sample_prompts") or "").strip() or None
    if not prompt and (out.get("sample_every_n_epochs") or out.get("sample_every_n_steps")):
        out.pop("sample_every_n_epochs", None), out.pop("sample_every_n_steps", None)
        notes.append("the preset samples but has no sample prompt (the GUI renders nothing then): no samples")
    out = {k: (int(v) if isinstance(v, float) and v.is_integer() and k not in _FLOAT_KEYS else v)
           for k, v in out.items() if not _dropped(v)}
    return out, notes, prompt


def _fit_bucket_defaults(data: dict, g: dict, notes: list[str]) -> None:
    """A bucket limit the preset leaves out comes from the fresh GUI (256 / 2048); where that contradicts the
    preset's own resolution (sd-scripts would stop on a key its author never wrote), it is moved to the resolution."""
    try:
        sides = [int(float(x)) for x in str(g["max_resolution"]).replace(" ", "").split(",") if x]
    except ValueError:
        return  # the config check names the bad resolution
    if not sides or not g.get("enable_bucket"):
        return
    step = max(1, _int(g.get("bucket_reso_steps"), 64))
    if data.get("min_bucket_reso") is None and min(sides) < g["min_bucket_reso"]:
        new = max(step, min(sides) - min(sides) % step)
        notes.append(f"the preset has no min_bucket_reso and the GUI's default {g['min_bucket_reso']} is above its "
                     f"resolution {g['max_resolution']}: min_bucket_reso = {new}")
        g["min_bucket_reso"] = new
    if data.get("max_bucket_reso") is None and max(sides) > g["max_bucket_reso"]:
        new = -(-max(sides) // step) * step
        notes.append(f"the preset has no max_bucket_reso and the GUI's default {g['max_bucket_reso']} is below its "
                     f"resolution {g['max_resolution']}: max_bucket_reso = {new}")
        g["max_bucket_reso"] = new


# kept as floats even when whole (the rest are ints in sd-scripts' parser)
_FLOAT_KEYS = {"learning_rate", "unet_lr", "text_encoder_lr", "lr_warmup_steps", "lr_scheduler_power",
               "max_grad_norm", "prior_loss_weight", "noise_offset", "adaptive_noise_scale", "huber_c", "huber_scale",
               "network_alpha", "min_snr_gamma", "multires_noise_discount", "caption_dropout_rate", "network_dropout",
               "scale_weight_norms", "ip_noise_gamma", "v_pred_like_loss", "caption_tag_dropout_rate"}
