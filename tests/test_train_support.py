"""Every config key the trainer cannot honour is named, never silently ignored."""

import re

import pytest

from lib_lora.train.config import TrainConfigError, parse_train_config, parse_train_config_text
from lib_lora.train.support import check_support


def test_seed_config_needs_no_unsupported_notes():
    from seed_config import SEED_TOML as seed
    errors, notes = check_support(parse_train_config_text(seed))
    assert errors == [] and notes == []


def test_unsupported_keys_are_named():
    cfg = parse_train_config({"train_data_dir": "x", "full_bf16": True, "face_crop_aug_range": [2.0, 4.0],
                              "network_args": ["conv_dim=4", "loraplus_lr_ratio=16", "algo=loha"],
                              "lr_scheduler": "inverse_sqrt",
                              "lr_scheduler_type": "mymodule.MyScheduler",
                              "loss_type": "huber", "ip_noise_gamma": 0.1})
    errors, notes = check_support(cfg)
    text = "\n".join(notes)
    assert "face_crop_aug_range" not in text and "'algo'" in text  # (honoured now)
    assert "full_bf16 = True" not in text and "full_bf16: the LoRA weights, their gradients and the optimizer state " \
        "stay in fp32" in text
    assert "'loraplus_lr_ratio' is not supported" not in text  # honoured now
    assert "random_crop" not in text and "color_aug" not in text  # honoured now
    assert "ip_noise_gamma" not in text and "loss_type" not in text  # honoured
    assert "'conv_dim'" not in text
    # every scheduler name sd-scripts knows is available; lr_scheduler_type takes torch's classes, not any module's
    assert errors == ["lr_scheduler_type = 'mymodule.MyScheduler': only torch's own schedulers "
                      "(torch.optim.lr_scheduler) can be named here; classes of other packages are not imported. "
                      "Choose one of " + errors[0].split("Choose one of ")[1]]
    assert "'inverse_sqrt' is not used: lr_scheduler_type = 'mymodule.MyScheduler' sets the schedule" in text


def test_torch_scheduler_type_is_checked_before_queueing():
    def check(**kw):
        return check_support(parse_train_config(dict({"train_data_dir": "x", "lr_scheduler_type": "StepLR"}, **kw)))

    assert check(lr_scheduler_args=["step_size=10", "gamma=0.5"]) == ([], [])
    errors, _ = check(lr_scheduler_args=["gamma=0.5"])
    assert any("StepLR refused lr_scheduler_args ['gamma=0.5']" in e and "step_size" in e for e in errors), errors
    errors, _ = check(lr_scheduler_args=["step_size=10"], lr_warmup_steps=100)
    assert any("lr_warmup_steps = 100 with lr_scheduler_type = 'StepLR'" in e for e in errors), errors


@pytest.mark.parametrize("key, value, says", [
    ("network_dim", -4, "network_dim = -4 must be at least 1"),
    ("learning_rate", -1e-3, "learning_rate = -0.001 must be at least 0"),
    ("gradient_accumulation_steps", 0, "gradient_accumulation_steps = 0 must be at least 1"),
    ("caption_dropout_rate", 2.0, "caption_dropout_rate = 2.0 must be from 0 to 1"),
    ("network_dropout", 1.5, "network_dropout = 1.5 must be at least 0 and below 1"),
    ("min_timestep", 2000, "min_timestep = 2000 must be at least 0 and below 1000"),
    ("resolution", 8, "each side must be at least 64 pixels"),
    ("output_name", "a/b", "must be a file name without folders"),
    ("output_name", "..", "output_name = '..' would make hidden files (...safetensors)"),
])
def test_values_a_run_cannot_use_are_refused_with_the_range(key, value, says):
    """Found by feeding wrong values to a 1-step run: each of these crashed inside torch (negative tensor sizes,
    a 1x1 latent in GroupNorm, dropout > 1, timesteps out of range) or trained something nobody wants."""
    with pytest.raises(TrainConfigError, match=re.escape(says)):
        parse_train_config({"train_data_dir": "x", key: value})


def test_output_name_slips_are_read_as_meant_and_said():
    """A pasted file name, or an empty name, gave 'svs.safetensors.safetensors' or 'lora' without a word."""
    cfg = parse_train_config({"train_data_dir": "x", "output_name": "svs.safetensors"})
    assert cfg.output_name == "svs"
    assert ("output_name = 'svs.safetensors' read as 'svs': the extension is added when saving (the file is "
            "svs.safetensors, not svs.safetensors.safetensors)") in cfg.notes
    cfg = parse_train_config({"train_data_dir": "x", "output_name": ""})
    assert cfg.output_name is None and any(n.startswith("output_name is empty: the files are named lora.safetensors")
                                           for n in cfg.notes)
    cfg = parse_train_config({"train_data_dir": "x", "output_name": "my.lora.v2"})
    assert cfg.output_name == "my.lora.v2" and not any("output_name" in n for n in cfg.notes)


@pytest.mark.parametrize("key, value, says", [
    # a user review of the HTTP API: each of these queued a job that "finished" with an untrained LoRA
    ("max_train_steps", -3, "max_train_steps = -3 must be at least 1 (optimizer steps in the run)"),
    ("max_train_steps", 0, "max_train_steps = 0 must be at least 1"),
    ("max_train_epochs", -2, "max_train_epochs = -2 must be at least 1 (passes over the dataset; leave it out"),
    ("max_train_epochs", 0, "max_train_epochs = 0 must be at least 1"),
    # sd-scripts divides by these (global_step % save_every_n_steps), so 0 is not "off" there
    ("save_every_n_steps", 0, "save_every_n_steps = 0 must be at least 1 (steps between saves; leave it out"),
    ("save_every_n_epochs", -1, "save_every_n_epochs = -1 must be at least 1 (epochs between saves; leave it out"),
    ("save_every_n_epochs", 0, "save_every_n_epochs = 0 must be at least 1"),
    ("validate_every_n_steps", 0, "validate_every_n_steps = 0 must be at least 1"),
    ("validate_every_n_epochs", 0, "validate_every_n_epochs = 0 must be at least 1"),
    ("lr_scheduler_timescale", 0, "lr_scheduler_timescale = 0 must be at least 1"),
    # 0 keeps or trains nothing
    ("save_last_n_epochs", 0, "save_last_n_epochs = 0 must be at least 1 (epoch saves kept; leave it out"),
    ("save_last_n_steps", -5, "save_last_n_steps = -5 must be at least 1"),
    ("max_validation_steps", 0, "max_validation_steps = 0 must be at least 1"),
    ("lr_scheduler_num_cycles", 0, "lr_scheduler_num_cycles = 0 must be at least 1"),
    ("dataset_repeats", 0, "dataset_repeats = 0 must be at least 1"),
    ("train_batch_size", 0, "train_batch_size = 0 must be at least 1"),
    ("vae_batch_size", 0, "vae_batch_size = 0 must be at least 1"),
    ("bucket_reso_steps", 0, "bucket_reso_steps = 0 must be at least 1"),
    ("min_bucket_reso", 0, "min_bucket_reso = 0 must be at least 1"),
    # 0 is off (as in sd-scripts); a negative count is a mistake
    ("sample_every_n_epochs", -1, "sample_every_n_epochs = -1 must be at least 0 (epochs between sample sets; "
                                  "0 = off)"),
    ("sample_every_n_steps", -10, "sample_every_n_steps = -10 must be at least 0"),
    ("save_n_epoch_ratio", -1, "save_n_epoch_ratio = -1 must be at least 0"),
    ("save_last_n_epochs_state", -1, "save_last_n_epochs_state = -1 must be at least 0"),
    ("save_last_n_steps_state", -1, "save_last_n_steps_state = -1 must be at least 0"),
    ("caption_dropout_every_n_epochs", -2, "caption_dropout_every_n_epochs = -2 must be at least 0"),
    ("token_warmup_step", -0.5, "token_warmup_step = -0.5 must be at least 0"),
    ("token_warmup_min", -1, "token_warmup_min = -1 must be at least 0"),
    ("multires_noise_iterations", -6, "multires_noise_iterations = -6 must be at least 0"),
    ("lr_decay_steps", -100, "lr_decay_steps = -100 must be at least 0"),
    ("initial_step", -1, "initial_step = -1 must be at least 0"),
    ("initial_epoch", -1, "initial_epoch = -1 must be at least 0"),
])
def test_counts_that_make_no_sense_are_refused(key, value, says):
    with pytest.raises(TrainConfigError, match=re.escape(says)):
        parse_train_config({"train_data_dir": "x", key: value})


def test_zero_stays_off_where_sd_scripts_reads_it_as_off():
    off = ("sample_every_n_epochs", "sample_every_n_steps", "save_n_epoch_ratio", "save_last_n_epochs_state",
           "save_last_n_steps_state", "caption_dropout_every_n_epochs", "token_warmup_step",
           "multires_noise_iterations", "lr_decay_steps", "lr_warmup_steps", "keep_tokens", "token_warmup_min",
           "initial_step", "initial_epoch")
    cfg = parse_train_config({"train_data_dir": "x", **{k: 0 for k in off}})
    assert all(getattr(cfg, k) == 0 for k in off)
    cfg = parse_train_config({"train_data_dir": "x", "max_train_steps": 1, "max_train_epochs": 1,
                              "save_every_n_steps": 1, "save_every_n_epochs": 1, "save_last_n_epochs": 1})
    assert (cfg.max_train_steps, cfg.max_train_epochs, cfg.save_every_n_steps) == (1, 1, 1)


def test_every_integer_key_has_a_range():
    """A new integer key must say which counts make sense, or why any integer does."""
    from lib_lora.train.config import _RANGES, CHOICES, _field_kinds
    any_integer = {"seed", "validation_seed",  # (any integer seeds the generators)
                   "max_bucket_reso"}  # (the dataset plan refuses one below the resolution, with both sizes)
    ints = {k for k, kind in _field_kinds().items() if kind in ("int", "num")}
    assert ints - set(_RANGES) - set(CHOICES) - any_integer == set()


@pytest.mark.parametrize("key, value, says", [
    # the noise is gaussian: a negative strength trains exactly as the positive one, never "the other way"
    ("noise_offset", -0.05, "noise_offset = -0.05 must be at least 0 without adaptive_noise_scale (the offset's "
                            "sign is random, so it trains as 0.05; write 0.05"),
    ("ip_noise_gamma", -0.1, "ip_noise_gamma = -0.1 must be at least 0 (the input perturbation's strength"),
    ("multires_noise_discount", -0.3, "multires_noise_discount = -0.3 must be at least 0"),
    # the loss weights turn negative (or the loss vanishes): the run climbs the loss or learns nothing
    ("min_snr_gamma", -5, "min_snr_gamma = -5.0 must be at least 0 (5 is common; 0 = off)"),
    ("v_pred_like_loss", -0.1, "v_pred_like_loss = -0.1 must be at least 0"),
    ("huber_c", 0, "huber_c = 0.0 must be above 0 (the Huber loss's threshold; 0.1 as usual)"),
    ("huber_c", -0.1, "huber_c = -0.1 must be above 0"),
    ("huber_scale", 0, "huber_scale = 0.0 must be above 0"),
    # sqrt of a negative ratio: every LoRA weight becomes nan after the first step
    ("scale_weight_norms", -1, "scale_weight_norms = -1.0 must be at least 0 (the largest norm of a module's "
                               "weights; 1 to start with; 0 = off)"),
    # the schedule: a rate growing without bound, a negative last rate, a "minimum" above the start
    ("lr_scheduler_power", -1, "lr_scheduler_power = -1.0 must be at least 0 (polynomial's exponent"),
    ("lr_scheduler_min_lr_ratio", -0.1, "lr_scheduler_min_lr_ratio = -0.1 must be from 0 to 1"),
    ("lr_scheduler_min_lr_ratio", 1.5, "lr_scheduler_min_lr_ratio = 1.5 must be from 0 to 1"),
    # (already checked; kept here with the other float keys)
    ("unet_lr", -1e-4, "unet_lr = -0.0001 must be at least 0"),
    ("max_grad_norm", -1, "max_grad_norm = -1.0 must be at least 0 (0 turns clipping off)"),
    ("prior_loss_weight", -1, "prior_loss_weight = -1.0 must be at least 0"),
    ("caption_tag_dropout_rate", 1.5, "caption_tag_dropout_rate = 1.5 must be from 0 to 1"),
    ("network_alpha", -8, "network_alpha = -8.0 must be at least 0"),
])
def test_float_values_that_break_a_run_are_refused(key, value, says):
    with pytest.raises(TrainConfigError, match=re.escape(says)):
        parse_train_config({"train_data_dir": "x", key: value})


def test_float_values_sd_scripts_gives_a_meaning_are_kept():
    off = ("noise_offset", "ip_noise_gamma", "min_snr_gamma", "v_pred_like_loss", "scale_weight_norms",
           "multires_noise_discount", "lr_scheduler_power", "lr_scheduler_min_lr_ratio", "max_grad_norm",
           "prior_loss_weight", "caption_dropout_rate", "network_dropout", "adaptive_noise_scale")
    cfg = parse_train_config({"train_data_dir": "x", **{k: 0 for k in off}})
    assert all(getattr(cfg, k) == 0 for k in off)
    cfg = parse_train_config({"train_data_dir": "x", "lr_scheduler_min_lr_ratio": 1, "caption_dropout_rate": 1,
                              "huber_c": 2.5, "huber_scale": 0.5, "multires_noise_discount": 1.5,
                              "base_weights": ["a", "b"], "base_weights_multiplier": [-1, 0]})
    assert (cfg.lr_scheduler_min_lr_ratio, cfg.huber_c, cfg.base_weights_multiplier) == (1.0, 2.5, [-1.0, 0.0])
    # a negative adaptive_noise_scale lowers the offset for images far from grey; with it, a negative
    # noise_offset is a threshold (sd-scripts clamps the sum at 0)
    cfg = parse_train_config({"train_data_dir": "x", "noise_offset": 0.1, "adaptive_noise_scale": -0.05})
    assert (cfg.noise_offset, cfg.adaptive_noise_scale) == (0.1, -0.05)
    cfg = parse_train_config({"train_data_dir": "x", "noise_offset": -0.02, "adaptive_noise_scale": 0.1})
    assert cfg.noise_offset == -0.02


def _float_keys():
    from lib_lora.train.config import _field_kinds
    return sorted(k for k, kind in _field_kinds().items() if kind in ("float", "num", "list_float", "pair_float"))


@pytest.mark.parametrize("key", _float_keys())
def test_no_float_key_takes_nan_or_inf(key):
    """nan passes every range comparison and inf reaches int() (lr_warmup_steps) or the loss; JSON and TOML carry
    both, and a string spells them too."""
    for bad in (float("nan"), float("inf"), float("-inf"), "nan", "1e999"):
        value = [2.0, bad] if key == "face_crop_aug_range" else [1.0, bad] if key == "base_weights_multiplier" else bad
        with pytest.raises(TrainConfigError, match="must be (a finite number|finite numbers|two finite numbers)"):
            parse_train_config({"train_data_dir": "x", key: value})


def test_nan_and_inf_in_json_and_toml_text():
    with pytest.raises(TrainConfigError, match=re.escape("learning_rate = nan must be a finite number (e.g. 1e-4)")):
        parse_train_config_text('{"learning_rate": NaN}')
    with pytest.raises(TrainConfigError, match=re.escape("lr_warmup_steps = inf must be a finite number (steps, or")):
        parse_train_config_text("lr_warmup_steps = inf")
    with pytest.raises(TrainConfigError, match="noise_offset = -inf must be a finite number"):
        parse_train_config_text('{"training": {"noise_offset": -Infinity}}')
    with pytest.raises(TrainConfigError, match="learning_rate = 1000.* must be a finite number"):
        parse_train_config_text('{"learning_rate": 1' + "0" * 400 + "}")  # (too large for a float)
    with pytest.raises(TrainConfigError, match="resolution must be 'size' or 'width,height'"):
        parse_train_config({"train_data_dir": "x", "resolution": "inf"})  # (crashed int() with OverflowError)


def test_every_float_key_has_a_range():
    """A new float key must say which values make sense (lo None: any finite one), as the integer keys do."""
    from lib_lora.train.config import _RANGES
    checked_where_read = {"face_crop_aug_range"}  # (two sizes above 0, low <= high: _coerce)
    assert set(_float_keys()) - set(_RANGES) - checked_where_read == set()


def test_timestep_order_and_network_arg_numbers():
    with pytest.raises(TrainConfigError, match="min_timestep = 500 must not be above max_timestep = 400"):
        parse_train_config({"train_data_dir": "x", "min_timestep": 500, "max_timestep": 400})
    with pytest.raises(TrainConfigError, match="min_timestep = max_timestep = 1000 is past the last noise step"):
        parse_train_config({"train_data_dir": "x", "min_timestep": 1000})
    # one fixed noise step, as sd-scripts' get_timesteps gives it (torch.randint refused an empty range)
    parse_train_config({"train_data_dir": "x", "min_timestep": 500, "max_timestep": 500})
    from lib_lora.train.loss import sample_timesteps
    assert sample_timesteps(3, None, "cpu", 500, 500).tolist() == [500, 500, 500]
    cfg = parse_train_config({"train_data_dir": "x", "network_args": ["conv_dim=-2", "rank_dropout=1",
                                                                       "module_dropout=x"]})
    errors, _ = check_support(cfg)
    assert any("conv_dim=-2 must be at least 0" in e for e in errors)
    assert any("rank_dropout=1 must be at least 0 and below 1" in e for e in errors)
    assert any("module_dropout=x: not a number" in e for e in errors)
    errors, _ = check_support(parse_train_config({"train_data_dir": "x", "network_args": [
        "rank_dropout=nan", "conv_alpha=inf"]}))
    assert any("rank_dropout=nan must be a finite number" in e for e in errors)
    assert any("conv_alpha=inf must be a finite number" in e for e in errors)


def test_cache_text_encoder_outputs_says_what_happens():
    """Cached by themselves when the text encoder is frozen; with a trained one sd-scripts stops, we say so."""
    cfg = parse_train_config({"train_data_dir": "x", "cache_text_encoder_outputs": True,
                              "network_train_unet_only": True})
    assert any("cached in memory by themselves whenever the text encoder is not trained" in n for n in cfg.notes)
    assert not any("not supported" in n for n in cfg.notes)
    _, notes = check_support(cfg)
    assert not any("sd-scripts stops here" in n for n in notes)
    _, notes = check_support(parse_train_config({"train_data_dir": "x", "cache_text_encoder_outputs": True,
                                                 "text_encoder_lr": 5e-5}))
    assert any("cache_text_encoder_outputs with a trained text encoder" in n for n in notes), notes


def test_the_schedulefree_wrapper_is_said_to_be_off_in_sd_scripts_too():
    cfg = parse_train_config({"train_data_dir": "x", "optimizer_schedulefree_wrapper": True,
                              "schedulefree_wrapper_args": ["momentum=0.9"]})
    said = [n for n in cfg.notes if "schedulefree_wrapper" in n]
    assert len(said) == 2 and all("sd-scripts has switched this option off" in n and "AdamWScheduleFree" in n
                                  for n in said)


def test_adaptive_noise_scale_without_noise_offset_is_said_to_change_nothing():
    _, notes = check_support(parse_train_config({"train_data_dir": "x", "adaptive_noise_scale": 0.01}))
    assert any(n.startswith("adaptive_noise_scale = 0.01 changes nothing without noise_offset") for n in notes)
    _, notes = check_support(parse_train_config({"train_data_dir": "x", "adaptive_noise_scale": 0.01,
                                                 "noise_offset": 0.05}))
    assert not any("adaptive_noise_scale" in n for n in notes)


def test_clip_skip_on_sdxl_is_said_to_do_nothing():
    """sd-scripts warns; SDXL's encoders always give their penultimate layer, here as in the WebUI."""
    cfg = parse_train_config({"train_data_dir": "x", "clip_skip": 2})
    _, notes = check_support(cfg, "sdxl")
    assert any(n.startswith("clip_skip = 2 is not used on SDXL") for n in notes), notes
    for family, skip in (("sd1", 2), ("sdxl", 1)):
        _, notes = check_support(parse_train_config({"train_data_dir": "x", "clip_skip": skip}), family)
        assert not any("clip_skip" in n for n in notes), notes


def test_loss_scalings_for_the_other_prediction_type_are_refused():
    """sd-scripts stops on both; inside the WebUI the loaded model decides, so an SD2-768-v config met an SD1.5
    model and weighted its high-noise steps ~200x less without a word."""
    cfg = parse_train_config({"train_data_dir": "x", "scale_v_pred_loss_like_noise_pred": True})
    errors, _ = check_support(cfg, "sd1", "eps")
    assert any(e.startswith("scale_v_pred_loss_like_noise_pred is for v-prediction models") for e in errors)
    assert not check_support(cfg, "sd2", "v")[0] and not check_support(cfg, "sd1")[0]
    cfg = parse_train_config({"train_data_dir": "x", "v_pred_like_loss": 0.1})
    assert any(e.startswith("v_pred_like_loss = 0.1 is for noise-prediction models")
               for e in check_support(cfg, "sd2", "v")[0])
    assert not check_support(cfg, "sd1", "eps")[0]


def test_clip_skip_on_sd2_is_said_to_follow_the_webui():
    _, notes = check_support(parse_train_config({"train_data_dir": "x", "clip_skip": 2}), "sd2")
    assert any(n.startswith("clip_skip = 2 is not used on SD2: the WebUI gives SD2") for n in notes), notes


def test_a_warm_up_with_the_constant_scheduler_warms_up_and_says_so():
    """sd-scripts stops on lr_warmup_steps with constant; here it was dropped without a word."""
    _, notes = check_support(parse_train_config({"train_data_dir": "x", "lr_warmup_steps": 10}))
    assert any("lr_warmup_steps = 10 with lr_scheduler = constant: the LR warms up" in n for n in notes), notes
    for kw in ({"lr_scheduler": "cosine"}, {"optimizer_type": "Adafactor"}, {"optimizer_type": "AdamWScheduleFree"}):
        _, notes = check_support(parse_train_config(dict({"train_data_dir": "x", "lr_warmup_steps": 10}, **kw)))
        assert not any("warms up" in n for n in notes), (kw, notes)
    _, notes = check_support(parse_train_config({"train_data_dir": "x", "lr_warmup_steps": 10,
                                                 "optimizer_type": "Adafactor",
                                                 "optimizer_args": ["relative_step=False"]}))
    assert any("warms up" in n for n in notes)


def test_polynomial_end_value_needs_a_learning_rate_above_it():
    errors, _ = check_support(parse_train_config({"train_data_dir": "x", "lr_scheduler": "polynomial",
                                                  "learning_rate": 1e-7, "unet_lr": 1e-4}))
    assert any("decays to lr_end = 1e-07, which must be smaller than learning_rate (1e-07)" in e for e in errors)
    assert not check_support(parse_train_config({"train_data_dir": "x", "lr_scheduler": "polynomial"}))[0]


def test_prodigy_refusing_two_learning_rates_is_said_before_queueing():
    """prodigyopt 1.1 stops at the first step (after latent caching) when the groups' LRs differ; the note said
    they 'act as ratios'."""
    pytest.importorskip("prodigyopt")
    cfg = parse_train_config({"train_data_dir": "x", "optimizer_type": "Prodigy", "unet_lr": 1.0,
                              "text_encoder_lr": 0.5, "learning_rate": 1.0})
    errors, _ = check_support(cfg)
    assert any(e.startswith("prodigy refuses a different learning rate per group") and "text_encoder_lr = 0" in e
               for e in errors), errors
    for lrs in ({"text_encoder_lr": 1.0}, {"text_encoder_lr": 0}):
        cfg = parse_train_config(dict({"train_data_dir": "x", "optimizer_type": "Prodigy", "unet_lr": 1.0,
                                       "learning_rate": 1.0}, **lrs))
        assert not check_support(cfg)[0]
    import torch
    from lib_lora.train.optim import OptimizerGroupsError, make_optimizer
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(OptimizerGroupsError, match="refuses a different learning rate per group"):
        make_optimizer("Prodigy", [{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.5}], lr=1.0, notes=[])


def test_a_resume_state_of_another_rank_is_told_before_the_model_loads(tmp_path):
    import torch

    from lib_lora.train.config import parse_train_config
    from lib_lora.train.saving import save_state
    from lib_lora.train.support import input_file_problems, resume_problems
    net = {"lora_unet_a_to_q.lora_down.weight": torch.zeros(4, 32), "lora_unet_a_to_q.alpha": torch.tensor(4.0),
           "lora_unet_b_proj_in.lora_down.weight": torch.zeros(4, 32, 1, 1),
           "lora_unet_c_conv1.lora_down.weight": torch.zeros(2, 32, 3, 3)}
    path = tmp_path / "svs-cancelled-state.lsstate"
    save_state(str(path), {"network": net, "optimizer": {}, "step": 3, "rng": {}})

    def cfg(**kw):
        return parse_train_config({"network_dim": 4, "network_args": ["conv_dim=2"], "resume": str(path), **kw})
    assert input_file_problems(cfg(), folders=False) == []
    assert input_file_problems(cfg(network_dim=8), folders=False) == [
        "resume: svs-cancelled-state.lsstate was trained with network_dim 4, this config says 8: set network_dim = 4 "
        "to continue it (a state goes on with the network it was saved with), or start a new run without resume"]
    state = {"network": net}
    assert "was trained with conv_dim 2 (3x3 convs), this config has none: set network_args conv_dim = 2" in \
        resume_problems(cfg(network_args=[]), state, str(path))[0]
    no_conv = {k: v for k, v in net.items() if "conv1" not in k}
    assert "was trained without 3x3 convs, this config sets conv_dim 2: leave conv_dim out" in \
        resume_problems(cfg(), {"network": no_conv}, str(path))[0]
    # block ranks, dim_from_weights and other modules: left to the run's own check
    assert resume_problems(cfg(network_dim=8, dim_from_weights=True), state, str(path)) == []
    assert resume_problems(cfg(network_dim=8, network_module="lycoris.kohya"), state, str(path)) == []



def test_a_checkpoint_or_an_embedding_given_as_network_weights_is_said_before_the_model_loads(tmp_path):
    import torch

    from lib_lora.formats.safetensors_io import save_file_atomic
    from lib_lora.train.config import parse_train_config
    from lib_lora.train.support import input_file_problems
    ckpt = tmp_path / "model.safetensors"
    save_file_atomic({"model.diffusion_model.out.2.weight": torch.zeros(4, 8, 3, 3),
                      "alphas_cumprod": torch.zeros(1000)}, str(ckpt))
    emb = tmp_path / "emb.safetensors"
    save_file_atomic({"emb_params": torch.zeros(2, 768)}, str(emb))
    cfg = parse_train_config({"network_weights": str(ckpt), "base_weights": [str(emb)]})
    assert input_file_problems(cfg, folders=False) == [
        "network_weights: model.safetensors: it is a full Stable Diffusion checkpoint, not a LoRA; network_weights "
        "takes a LoRA file the run starts from (the model to train on is pretrained_model_name_or_path, or the "
        "WebUI's)",
        "base_weights: emb.safetensors: it is a textual-inversion embedding, not a LoRA; base_weights takes a LoRA "
        "file the run merges into the model first (the model to train on is pretrained_model_name_or_path, or the "
        "WebUI's)"]


def test_a_network_args_typo_is_refused_with_the_setting_meant_and_other_keys_noted():
    from lib_lora.train.config import parse_train_config
    from lib_lora.train.support import check_support
    errors, notes = check_support(parse_train_config({"network_args": ["conv_dimm=4", "conv_alpha=1", "lbw=1"]}))
    assert errors == ["network_args 'conv_dimm' is not a setting: did you mean 'conv_dim'?"]
    assert any(n.startswith("network_args 'lbw' is not supported yet and is ignored (supported: ") for n in notes)


def test_spaces_around_a_name_are_left_out_with_a_note():
    from lib_lora.train.config import parse_train_config
    c = parse_train_config({"optimizer_type": "AdamW8bit ", "lr_scheduler": " cosine"})
    assert (c.optimizer_type, c.lr_scheduler) == ("AdamW8bit", "cosine")
    assert "optimizer_type = 'AdamW8bit ' read as 'AdamW8bit'" in c.notes


def test_learning_rates_of_zero_are_refused_by_the_check():
    from lib_lora.train.config import parse_train_config
    from lib_lora.train.support import check_support
    said = "both learning rates are 0, so nothing would train; set unet_lr or text_encoder_lr"
    assert said in check_support(parse_train_config({"learning_rate": 0}))[0]
    assert said in check_support(parse_train_config({"unet_lr": 0, "network_train_unet_only": True}))[0]
    assert said not in check_support(parse_train_config({"learning_rate": 0, "unet_lr": 1e-4}))[0]
