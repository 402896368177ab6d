"""kohya_ss GUI presets (the LoRA tab's .json files) read as the sd-scripts config the GUI hands sd-scripts.

The expected network_args and keys are the ones the GUI itself wrote to its TOML for presets like these
(bmaltais/kohya_ss 45088f04, lora_gui.train_model run in print-only mode on its shipped presets "SDXL - LoKR v1.0",
"loha-sd15", "sd15 - EDG_LoraOptiSettings" and variations; recorded in the session notes). The presets below are
written here in the GUI's format (string numbers, "" for unset, GUI-only keys), not copied.
"""
import json
import os

import pytest

import models
import train_data
from lib_lora.formats.safetensors_io import read_metadata
from lib_lora.host.base import ModelHost
from lib_lora.train.config import TrainConfigError, load_train_config, parse_train_config, parse_train_config_text
from lib_lora.train.run import run_training
from lib_lora.train.support import check_support

GUI_ONLY = {"num_cpu_threads_per_process": 2, "max_data_loader_n_workers": "0", "persistent_data_loader_workers": False,
            "mem_eff_attn": False, "xformers": True, "v2": False, "v_parameterization": False, "use_wandb": False,
            "model_list": "custom", "conv_dims": "", "conv_alphas": "", "additional_parameters": "",
            "stop_text_encoder_training": 0, "no_token_padding": False}

LOKR_SDXL = dict(GUI_ONLY, **{
    "LoRA_type": "LyCORIS/LoKr", "sdxl": True, "sdxl_no_half_vae": True, "sdxl_cache_text_encoder_outputs": False,
    "network_dim": 64, "network_alpha": 64, "conv_dim": 64, "conv_alpha": 64, "factor": -1, "use_cp": True,
    "decompose_both": False, "rank_dropout": 0.1, "module_dropout": 0.1, "epoch": 20, "max_train_epochs": "",
    "learning_rate": 1.0, "unet_lr": 1.0, "text_encoder_lr": 1.0, "optimizer": "Prodigy", "optimizer_args": "",
    "lr_scheduler": "constant", "lr_warmup": 0, "lr_scheduler_num_cycles": "", "lr_scheduler_power": "",
    "max_resolution": "1024,1024", "train_batch_size": 8, "gradient_accumulation_steps": 1.0, "seed": "12345",
    "clip_skip": "1", "keep_tokens": "0", "max_token_length": "75", "noise_offset_type": "Multires",
    "noise_offset": 0.0357, "multires_noise_iterations": 8, "multires_noise_discount": 0.2, "min_snr_gamma": 10,
    "mixed_precision": "bf16", "save_precision": "fp16", "save_every_n_epochs": 1, "save_every_n_steps": 0,
    "cache_latents": True, "cache_latents_to_disk": True, "bucket_reso_steps": 64, "bucket_no_upscale": True,
    "enable_bucket": True, "caption_extension": ".txt", "caption_dropout_every_n_epochs": 0.0,
    "gradient_checkpointing": True, "lora_network_weights": "", "training_comment": "", "scale_weight_norms": 0,
})
# the GUI's TOML for a preset like that one (its network_args verbatim)
LOKR_SDXL_ARGS = ["preset=full", "conv_dim=64", "conv_alpha=64", "use_tucker=False", "rank_dropout=0.1",
                  "bypass_mode=False", "dora_wd=False", "module_dropout=0.1", "factor=-1", "use_cp=True",
                  "use_scalar=False", "decompose_both=False", "rank_dropout_scale=False", "algo=lokr",
                  "train_norm=False"]

STANDARD = dict(GUI_ONLY, **{
    "LoRA_type": "Standard", "network_dim": 64, "network_alpha": 64, "conv_dim": 1, "conv_alpha": 1,
    "learning_rate": "0.0001", "unet_lr": "0.0001", "text_encoder_lr": "0", "optimizer": "AdamW8bit",
    "optimizer_args": '"weight_decay=0.1" "betas=0.9,0.99"', "lr_scheduler": "cosine", "lr_warmup": "10",
    "max_resolution": "512,650", "epoch": 3, "max_train_steps": "", "max_train_epochs": "", "clip_skip": 2,
    "seed": "1234", "bucket_reso_steps": 64.0, "noise_offset": "0.05", "adaptive_noise_scale": 0,
    "multires_noise_iterations": 6, "down_lr_weight": "0,0,0,0,0,0,1,1,1,1,1,1", "mid_lr_weight": "0",
    "up_lr_weight": "", "block_dims": "2, 2, 4, 4, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8",
    "rank_dropout": 0.1, "module_dropout": 0, "loraplus_lr_ratio": 16, "sample_prompts": "svs cat --w 64 --h 64 --s 2",
    "sample_every_n_epochs": 1, "save_precision": "bf16", "mixed_precision": "bf16",
})


def _translate(preset):
    return parse_train_config(json.loads(json.dumps(preset)), source="preset.json")


def test_lycoris_preset_gives_the_guis_network_args_and_keys():
    cfg = _translate(LOKR_SDXL)
    assert cfg.network_module == "lycoris.kohya" and cfg.network_args == LOKR_SDXL_ARGS
    assert (cfg.network_dim, cfg.network_alpha, cfg.optimizer_type, cfg.lr_scheduler) == (64, 64, "Prodigy", "constant")
    assert (cfg.learning_rate, cfg.unet_lr, cfg.text_encoder_lr) == (1.0, 1.0, 1.0)
    assert (cfg.resolution, cfg.train_batch_size, cfg.seed, cfg.clip_skip) == ((1024, 1024), 8, 12345, 1)
    # Multires: the GUI passes the multires settings and not noise_offset
    assert (cfg.multires_noise_iterations, cfg.multires_noise_discount, cfg.noise_offset) == (8, 0.2, None)
    assert cfg.no_half_vae is True and cfg.min_snr_gamma == 10 and cfg.gradient_checkpointing is True
    # the preset's 20 epochs (the GUI would run its default 1600 steps: said)
    assert cfg.max_train_epochs == 20
    text = " ".join(cfg.notes)
    assert "kohya_ss GUI preset" in text and "would train 1600 steps and ignore its epoch = 20" in text
    assert "noise_offset not used" in text and "the preset is for SDXL" in text
    assert not any("is an sd-scripts option this trainer does not use" in n for n in cfg.notes)  # GUI-only: quiet
    errors, notes = check_support(cfg, "sdxl")
    assert errors == [] and not any("not supported" in n for n in notes), (errors, notes)


def test_standard_preset_strings_warmup_blocks_loraplus_and_prompts():
    cfg = _translate(STANDARD)
    assert cfg.network_module == "networks.lora"
    # the GUI's order; block_dims with its spaces removed (the GUI would split it and sd-scripts would stop)
    assert cfg.network_args == ["down_lr_weight=0,0,0,0,0,0,1,1,1,1,1,1", "mid_lr_weight=0",
                                "block_dims=2,2,4,4,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8", "rank_dropout=0.1",
                                "loraplus_lr_ratio=16"]
    assert any("block_dims" in n and "spaces removed" in n for n in cfg.notes)
    # a text-encoder LR of 0: the GUI trains the UNet only
    assert cfg.network_train_unet_only is True and cfg.unet_lr == 1e-4
    assert cfg.optimizer_args == ["weight_decay=0.1", "betas=0.9,0.99"]
    assert cfg.lr_warmup_steps == pytest.approx(0.1)  # 10 % of the run, as a share (sd-scripts multiplies it out)
    assert (cfg.noise_offset, cfg.multires_noise_iterations) == (0.05, None)  # Original: no multires
    assert cfg.max_train_epochs == 3 and cfg.bucket_reso_steps == 64 and cfg.seed == 1234
    assert cfg.sample_prompt_text == "svs cat --w 64 --h 64 --s 2" and cfg.sample_every_n_epochs == 1
    assert not any("read as the integer" in n or "(a string) read as" in n for n in cfg.notes)


def test_gui_rules_for_length_warmup_and_unknown_types():
    cfg = _translate(dict(STANDARD, max_train_steps="500", epoch=4))
    assert cfg.max_train_steps == 500 and cfg.max_train_epochs is None
    assert any("max_train_steps = 500 sets the length; the preset's epoch = 4 is not used" in n for n in cfg.notes)
    assert _translate(dict(STANDARD, max_train_epochs="6")).max_train_epochs == 6
    assert _translate(dict(STANDARD, lr_warmup_steps=25)).lr_warmup_steps == 25  # an absolute count wins
    cfg = _translate(dict(STANDARD, lr_scheduler="constant"))
    assert cfg.lr_warmup_steps == 0 and any("constant takes no warm-up" in n for n in cfg.notes)
    cfg = _translate(dict(STANDARD, LoRA_type="Kohya LoCon", conv_dim=0, conv_alpha=1, text_encoder_lr="5e-05"))
    assert cfg.network_args[:2] == ["conv_dim=0", "conv_alpha=1"] and not cfg.network_train_unet_only
    cfg = _translate(dict(STANDARD, LoRA_type="LyCORIS/iA3"))
    # (LoRA+ ratios go on for every type, as the GUI appends them)
    assert cfg.network_args == ["preset=full", "conv_dim=1", "conv_alpha=1", "train_on_input=True", "algo=ia3",
                                "loraplus_lr_ratio=16"]
    errors, notes = check_support(cfg, "sd1")
    assert not errors and any("train_on_input changes nothing" in n for n in notes)
    errors, _ = check_support(_translate(dict(STANDARD, LoRA_type="LyCORIS/Diag-OFT", constrain=0.01)), "sd1")
    assert not errors
    cfg = _translate(dict(STANDARD, LoRA_type="LyCORIS/GLoRA"))
    assert "algo=glora" in cfg.network_args and check_support(cfg, "sd1")[0] == []
    for gui_type, algo in (("Kohya LoHa", "loha"), ("Kohya LoKr", "lokr")):  # (sd-scripts' branch-only modules)
        errors, _ = check_support(_translate(dict(STANDARD, LoRA_type=gui_type)), "sdxl")
        assert any(f"use network_module = lycoris.kohya with network_args algo={algo}" in e for e in errors), errors
    errors, _ = check_support(_translate(dict(STANDARD, LoRA_type="LyCORIS/DyLoRA")), "sd1")
    assert any("algo=dylora" in e for e in errors)  # applied with <lora:>, not trained: said before queueing
    with pytest.raises(TrainConfigError, match="LoRA_type 'LyCORIS/Whatever' is not one the kohya_ss GUI knows"):
        _translate(dict(STANDARD, LoRA_type="LyCORIS/Whatever"))
    with pytest.raises(TrainConfigError, match="all 0"):
        _translate(dict(STANDARD, learning_rate=0, unet_lr=0, text_encoder_lr=0))
    cfg = _translate(dict(STANDARD, epoch="abc"))  # (a hand-edited preset: named, as the GUI reads it)
    assert "epoch = 'abc' is not a number: read as 0, as the GUI reads it" in cfg.notes
    cfg = _translate(dict(STANDARD, some_future_gui_key=3))
    assert any("ignored: some_future_gui_key" in n for n in cfg.notes)


def test_bucket_limits_a_preset_leaves_out_fit_its_own_resolution():
    """The fresh GUI's min_bucket_reso 256 would stop a 128 px preset on a key its author never wrote."""
    cfg = _translate(dict(STANDARD, max_resolution="128,192", enable_bucket=True))
    assert (cfg.min_bucket_reso, cfg.max_bucket_reso) == (128, 2048)
    assert any("no min_bucket_reso and the GUI's default 256 is above its resolution 128,192: min_bucket_reso = 128"
               in n for n in cfg.notes), cfg.notes
    cfg = _translate(dict(STANDARD, max_resolution="100", enable_bucket=True, bucket_reso_steps=32))
    assert cfg.min_bucket_reso == 96
    cfg = _translate(dict(STANDARD, max_resolution="4096,4096", enable_bucket=True))
    assert cfg.max_bucket_reso == 4096 and any("max_bucket_reso = 4096" in n for n in cfg.notes)
    # written by the preset's author: kept (and refused by the bucket check with its own key named)
    cfg = _translate(dict(STANDARD, max_resolution="128,128", enable_bucket=True, min_bucket_reso=256))
    assert cfg.min_bucket_reso == 256 and not any("min_bucket_reso =" in n for n in cfg.notes)
    assert _translate(dict(STANDARD, max_resolution="512,650", enable_bucket=True)).min_bucket_reso == 256


def test_json_text_and_json_files_are_read(tmp_path):
    text = json.dumps(LOKR_SDXL)
    assert parse_train_config_text(text).network_args == LOKR_SDXL_ARGS
    p = tmp_path / "my preset.json"
    p.write_text(text)
    assert load_train_config(p).network_args == LOKR_SDXL_ARGS
    with pytest.raises(TrainConfigError, match="not valid JSON"):
        parse_train_config_text("{ not json")


def test_a_gui_loha_preset_trains_here(tmp_path):
    """A LyCORIS LoHa preset as the GUI saves it, with folders added, runs as a LoHa job (with its sample prompt
    text turned into samples by the headless sampler's path: the prompt text is what it renders)."""
    sd1 = models.make_sd1()
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=3, repeats=1)
    preset = dict(GUI_ONLY, **{
        "LoRA_type": "LyCORIS/LoHa", "network_dim": 4, "network_alpha": 2, "conv_dim": 2, "conv_alpha": 1,
        "epoch": 1, "max_resolution": "64,64", "train_batch_size": 1, "learning_rate": "0.001",
        "text_encoder_lr": "0.0005", "unet_lr": "0.001", "optimizer": "AdamW", "lr_scheduler": "cosine",
        "lr_warmup": 0, "seed": "3", "enable_bucket": True, "save_precision": "float", "cache_latents": True,
        "train_data_dir": img, "output_dir": str(tmp_path / "out"), "output_name": "gui",
    })
    p = tmp_path / "preset.json"
    p.write_text(json.dumps(preset))
    cfg = load_train_config(p)
    res = run_training(ModelHost(sd1, "m"), cfg)
    assert res.status == "done"
    md = read_metadata(res.final)
    assert md["ss_network_module"] == "lycoris.kohya" and json.loads(md["ss_network_args"])["algo"] == "loha"
    assert os.path.basename(res.final) == "gui.safetensors"


def test_a_gui_preset_naming_a_lycoris_preset_file_reads_it_beside_the_json(tmp_path):
    """The GUI's LyCORIS Preset box takes "path_to_config_file.toml": a relative one is read from the JSON's folder,
    and its layer choice is the network's."""
    from lib_lora.train.support import lyco_settings, network_args
    (tmp_path / "attn.toml").write_text('unet_target_module = ["CrossAttention"]\nunet_target_name = []\n'
                                        'text_encoder_target_module = []\n')
    p = tmp_path / "preset.json"
    p.write_text(json.dumps(dict(LOKR_SDXL, LyCORIS_preset="attn.toml")))
    cfg = load_train_config(p)
    assert "preset=attn.toml" in cfg.network_args
    errors, _ = check_support(cfg, "sdxl")
    assert errors == []
    s = lyco_settings(cfg.network_module, network_args(cfg), [], cfg)
    assert s.custom is not None and s.custom.unet_modules == ("CrossAttention",) and s.custom.te_modules == ()
    p.write_text(json.dumps(dict(LOKR_SDXL, LyCORIS_preset="missing.toml")))
    errors, _ = check_support(load_train_config(p), "sdxl")
    assert any(f"no such file ({tmp_path / 'missing.toml'})" in e for e in errors), errors
