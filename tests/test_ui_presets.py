"""Presets, form <-> config mapping, and the sd-scripts TOML round trip through parse_train_config_text."""
import tomllib

import pytest

from lib_lora.train.config import TrainConfigError, parse_train_config, parse_train_config_text
from lib_lora.ui import presets as P

PATHS = {"train_data_dir": "/data/img", "reg_data_dir": "/data/reg", "output_dir": "/out", "output_name": "svs_bear"}


def test_every_field_is_a_config_key_with_a_tooltip():
    from lib_lora.train.config import config_keys
    keys = set(config_keys())
    for f in P.FIELDS:
        assert f.key in keys or f.key.startswith("ui_"), f.key
        assert f.info and "\n" not in f.info and len(f.info) < 160, f.key  # one line
        assert f.group in dict(P.GROUPS)
    assert set(P.BASE) == {f.key for f in P.FIELDS}


def test_sd15_character_preset_is_the_tutorial():
    cfg, _ = P.collect_config(P.form_defaults("SD1.5 character"), PATHS)
    c = parse_train_config(cfg)
    assert (c.network_dim, c.network_alpha, c.unet_lr, c.text_encoder_lr) == (32, 16.0, 1e-4, 5e-5)
    assert (c.optimizer_type, c.train_batch_size, c.max_train_epochs, c.save_every_n_epochs) == ("AdamW8bit", 2, 10, 2)
    assert (c.resolution, c.enable_bucket, c.min_bucket_reso, c.max_bucket_reso) == ((512, 512), True, 256, 1024)
    assert (c.mixed_precision, c.lr_warmup_steps, c.caption_extension) == ("fp16", 100, ".txt")
    # the form's Network type is a choice, not a key left out: no "network_module not set" note on every run
    assert cfg["network_module"] == "networks.lora" and not any("network_module not set" in n for n in c.notes)


def test_sdxl_preset():
    c = parse_train_config(P.collect_config(P.form_defaults("SDXL character"), PATHS)[0])
    assert c.resolution == (1024, 1024) and c.max_bucket_reso == 2048 and c.network_train_unet_only
    assert c.mixed_precision == "bf16" and c.no_half_vae and c.min_snr_gamma == 5.0 and c.gradient_checkpointing
    assert P.preset_for_family("sdxl") == "SDXL character" and P.preset_for_family("sd1") == "SD1.5 character"


@pytest.mark.parametrize("preset", list(P.PRESETS))
def test_toml_round_trip(preset):
    form = P.form_defaults(preset)
    cfg, _ = P.collect_config(form, PATHS)
    text = P.export_toml(cfg, model_path="/models/v1-5.safetensors")
    data = tomllib.loads(text)
    assert set(data) == {"model", "dataset", "training"}
    # what sd-scripts needs to read it: a string resolution, train_batch_size, a network module, .txt captions
    assert isinstance(data["dataset"]["resolution"], str)
    assert data["dataset"]["train_batch_size"] == form["train_batch_size"]
    assert data["training"]["network_module"] == "networks.lora"
    assert data["dataset"]["caption_extension"] == ".txt"
    back = parse_train_config_text(text)
    values, paths, extra = P.config_to_ui(back)
    assert paths == PATHS
    for f in P.FIELDS:
        if f.key.startswith("ui_") or f.key == "max_train_steps":
            continue
        assert values[f.key] == form[f.key], (f.key, values[f.key], form[f.key])
    assert extra == ""
    assert back.pretrained_model_name_or_path == "/models/v1-5.safetensors"


def test_import_the_tutorial_config():
    from seed_config import SEED_TOML as text
    cfg = parse_train_config_text(text, base_dir="/work/tutorial")
    values, paths, extra = P.config_to_ui(cfg)
    assert values["train_batch_size"] == 2 and values["resolution"] == "512"
    assert values["lr_scheduler"] == "cosine_with_restarts" and values["network_dim"] == 32
    assert values["text_encoder_lr"] == 5e-5 and values["optimizer_type"] == "AdamW8bit"
    assert paths["train_data_dir"] == "./training_data" and paths["output_name"] == "my_lora"
    assert extra == ""


def test_extra_keys_survive_the_round_trip():
    form = P.form_defaults("SD1.5 character")
    form["ui_extra_toml"] = "noise_offset_random_strength = true\nmax_token_length = 225\n"
    cfg, _ = P.collect_config(form, PATHS)
    assert cfg["noise_offset_random_strength"] is True
    back = parse_train_config_text(P.export_toml(cfg))
    _, _, extra = P.config_to_ui(back)
    assert tomllib.loads(extra) == {"noise_offset_random_strength": True, "max_token_length": 225}


def test_a_lycoris_config_keeps_its_network_type_through_the_form():
    """network_module has a field: a pasted LyCORIS config must not come back from the form as a plain LoRA."""
    form = P.form_defaults("SD1.5 character")
    assert form["network_module"] == "networks.lora"
    form.update({"network_module": "lycoris.kohya", "network_args": "algo=lokr factor=8"})
    cfg, _ = P.collect_config(form, PATHS)
    assert cfg["network_module"] == "lycoris.kohya" and cfg["network_args"] == ["algo=lokr", "factor=8"]
    values, _, extra = P.config_to_ui(parse_train_config_text(P.export_toml(cfg)))
    assert values["network_module"] == "lycoris.kohya" and values["network_args"] == "algo=lokr factor=8"
    assert extra == ""


def test_off_values_and_bad_input():
    form = P.form_defaults("SD1.5 character")
    form.update({"seed": -1, "clip_skip": 1, "min_snr_gamma": 0, "max_train_epochs": 0, "max_train_steps": 300,
                 "optimizer_args": "weight_decay=0.1 betas=0.9,0.99"})
    cfg, _ = P.collect_config(form, PATHS)
    assert "seed" not in cfg and "clip_skip" not in cfg and "min_snr_gamma" not in cfg
    assert "max_train_epochs" not in cfg and cfg["max_train_steps"] == 300
    assert cfg["optimizer_args"] == ["weight_decay=0.1", "betas=0.9,0.99"]
    with pytest.raises(TrainConfigError, match="Network rank"):
        P.collect_config({**form, "network_dim": 0}, PATHS)
    # (the form's numbers have no gradio minimum, whose toast names no field: the message names it)
    with pytest.raises(TrainConfigError, match=r"^Batch size must be at least 1, got 0$"):
        P.collect_config({**form, "train_batch_size": 0}, PATHS)
    with pytest.raises(TrainConfigError, match=r"^UNet learning rate must be at least 0, got -0.0001$"):
        P.collect_config({**form, "unet_lr": -1e-4}, PATHS)
    with pytest.raises(TrainConfigError, match="whole number"):
        P.collect_config({**form, "train_batch_size": 1.5}, PATHS)
    with pytest.raises(TrainConfigError, match="not valid TOML"):
        P.collect_config({**form, "ui_extra_toml": "this is = = not toml"}, PATHS)
    with pytest.raises(TrainConfigError, match="its own field"):
        P.collect_config({**form, "ui_extra_toml": "network_dim = 8"}, PATHS)
    with pytest.raises(TrainConfigError, match="unknown key"):
        P.export_toml({**P.collect_config(form, PATHS)[0], "netwrok_dim": 4})
