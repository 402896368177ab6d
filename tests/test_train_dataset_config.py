"""Training TOML (the seed tutorial's file) and dataset TOML parsing."""

import dataclasses

import pytest

from lib_lora.train.config import (
    TrainConfig,
    TrainConfigError,
    load_dataset_config,
    load_train_config,
    parse_resolution,
    parse_train_config,
    parse_train_config_text,
)

from seed_config import SEED_TOML  # noqa: E402  (tests/data/seed_config.toml)


def test_defaults_are_sd_scripts_defaults():
    c = TrainConfig()
    # training-anchors §4 "sd-scripts CLI": AdamW, lr 2e-6, constant, warmup 0, 1600 steps, batch 1, alpha 1,
    # mixed_precision no, max_grad_norm 1.0; §1.4/§1.5 bucket defaults 256/1024/64, no buckets
    assert (c.optimizer_type, c.learning_rate, c.lr_scheduler, c.lr_warmup_steps) == ("", 2e-6, "constant", 0)
    assert (c.max_train_steps, c.max_train_epochs, c.train_batch_size) == (1600, None, 1)
    assert (c.network_dim, c.network_alpha, c.mixed_precision, c.max_grad_norm) == (None, 1.0, "no", 1.0)
    assert (c.enable_bucket, c.min_bucket_reso, c.max_bucket_reso, c.bucket_reso_steps) == (False, 256, 1024, 64)
    assert (c.prior_loss_weight, c.multires_noise_discount, c.huber_c, c.loss_type) == (1.0, 0.3, 0.1, "l2")
    assert (c.keep_tokens, c.caption_separator, c.token_warmup_min, c.sample_sampler) == (0, ",", 1, "ddim")
    assert c.caption_extension == ".txt"  # our one deliberate default change (sd-scripts: .caption)


def test_seed_toml_is_read_as_its_author_meant(tmp_path):
    p = tmp_path / "training_config.toml"
    p.write_text(SEED_TOML, encoding="utf-8")
    c = load_train_config(p)
    assert c.resolution == (512, 512)
    assert c.train_batch_size == 2
    assert c.caption_extension == ".txt"
    assert c.enable_bucket is True and (c.min_bucket_reso, c.max_bucket_reso) == (256, 1024)
    assert c.max_train_epochs == 10 and c.max_train_steps == 1600
    assert (c.learning_rate, c.unet_lr, c.text_encoder_lr) == (1e-4, 1e-4, 5e-5)
    assert c.lr_scheduler == "cosine_with_restarts" and c.lr_warmup_steps == 100
    assert c.network_dim == 32 and c.network_alpha == 16.0 and isinstance(c.network_alpha, float)
    assert (c.optimizer_type, c.mixed_precision, c.save_every_n_epochs) == ("AdamW8bit", "fp16", 2)
    assert c.save_model_as == "safetensors" and c.output_name == "my_lora"
    assert c.pretrained_model_name_or_path == "./models/sd/v1-5-pruned.safetensors" and c.v2 is False
    assert c.network_module == "networks.lora"
    # relative paths resolve against the config's folder
    assert c.resolve(c.train_data_dir) == tmp_path.resolve() / "training_data"
    notes = "\n".join(c.notes)
    assert "batch_size` read as train_batch_size" in notes
    assert "read as 512x512" in notes
    assert ".txt files" in notes
    assert "networks.lora" in notes


def test_every_field_is_typed_and_defaulted():
    for f in dataclasses.fields(TrainConfig):
        assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, f.name


def test_unknown_keys_refused_with_suggestions():
    text = 'lerning_rate = 1e-4\n[dataset]\nbatchsize = 2\nnetwork_dimm = 8\ncompletely_new = 1\n'
    with pytest.raises(TrainConfigError) as ei:
        parse_train_config_text(text, source="x.toml")
    msg = str(ei.value)
    assert "x.toml" in msg
    assert "lerning_rate (did you mean 'learning_rate'" in msg
    assert "batchsize (did you mean" in msg and "'batch_size'" in msg
    assert "network_dimm (did you mean 'network_dim'" in msg
    assert "completely_new" in msg


def test_unknown_key_in_a_section_says_which_section():
    with pytest.raises(TrainConfigError) as ei:
        parse_train_config({"foo": {"bar": 1}, "training": {"network_dimm": 8}, "model": {"network_dimm": 4},
                            "lerning_rate": 1e-4})
    msg = str(ei.value)
    assert "  - in [foo]: bar\n" in msg
    assert "  - in [training] and [model]: network_dimm (did you mean 'network_dim'" in msg
    assert "  - lerning_rate (did you mean 'learning_rate'" in msg  # (the top level: no section to name)


def test_null_leaves_a_key_at_its_default():
    """The HTTP API takes JSON: null means "not set", flat or inside a section, for any kind of key."""
    c = parse_train_config({"max_train_steps": None, "network_dim": None, "network_args": None, "seed": None,
                            "training": {"max_train_epochs": None, "save_every_n_epochs": None,
                                         "optimizer_args": None, "learning_rate": None, "enable_bucket": None},
                            "dataset": {"resolution": None, "caption_extension": None}})
    d = TrainConfig()
    for k in ("max_train_steps", "network_dim", "network_args", "seed", "max_train_epochs", "save_every_n_epochs",
              "optimizer_args", "learning_rate", "enable_bucket", "resolution"):
        assert getattr(c, k) == getattr(d, k), k
    assert c.caption_extension == ".txt" and any(".txt files" in n for n in c.notes)  # (not given: the note says)
    c = parse_train_config_text('{"network_args": ["conv_dim=4"], "max_train_steps": null, '
                                '"network": {"network_dim": 8}, "model": {"network_dim": null}}')
    assert c.network_args == ["conv_dim=4"] and c.max_train_steps == 1600
    assert c.network_dim == 8 and not any("set in both" in n for n in c.notes)  # (null does not undo [network])
    with pytest.raises(TrainConfigError, match="max_train_stepz \\(did you mean 'max_train_steps'"):
        parse_train_config({"max_train_stepz": None})  # a misspelt key is refused even when null


def test_values_checked_and_known_unused_keys_noted():
    with pytest.raises(TrainConfigError, match="mixed_precision = 'fp32'"):
        parse_train_config({"mixed_precision": "fp32"})
    with pytest.raises(TrainConfigError, match="network_dim must be an integer"):
        parse_train_config({"network_dim": 32.5})
    with pytest.raises(TrainConfigError, match="keep only train_batch_size"):
        parse_train_config({"batch_size": 2, "train_batch_size": 4})
    c = parse_train_config({"training": {"xformers": True, "network_dim": 16.0, "learning_rate": "1e-4",
                                         "use_8bit_adam": True, "text_encoder_lr": [5e-5, 1e-5]}})
    assert c.network_dim == 16 and c.learning_rate == 1e-4 and c.optimizer_type == "AdamW8bit"
    assert c.text_encoder_lr == 5e-5
    assert c.ignored == {"xformers": True}
    assert any("xformers" in n and "ignored" in n for n in c.notes)


def test_dataset_toml_is_flagged_when_given_as_training_config():
    with pytest.raises(TrainConfigError, match="dataset config"):
        parse_train_config({"general": {}, "datasets": []})


def test_resolution_forms():
    assert parse_resolution(512)[0] == (512, 512)
    assert parse_resolution("512")[0] == (512, 512)
    assert parse_resolution("512,768")[0] == (512, 768)  # (width, height)
    assert parse_resolution([640, 448])[0] == (640, 448)
    c = parse_train_config({"resolution": "512,768"})
    assert c.resolution == (512, 768)
    with pytest.raises(TrainConfigError, match="resolution"):
        parse_train_config({"resolution": "big"})


DATASET_TOML = """\
[general]
shuffle_caption = true
keep_tokens = 1
caption_extension = "txt"

[[datasets]]
resolution = [640, 512]
batch_size = 4
enable_bucket = true

  [[datasets.subsets]]
  image_dir = "imgs"
  num_repeats = 5
  class_tokens = "svs cat"

  [[datasets.subsets]]
  image_dir = "reg"
  is_reg = true
  class_tokens = "cat"
  keep_tokens = 0

[[datasets]]
resolution = 768

  [[datasets.subsets]]
  image_dir = "imgs"
"""


def test_dataset_toml_fallback_chain(tmp_path):
    p = tmp_path / "ds.toml"
    p.write_text(DATASET_TOML, encoding="utf-8")
    defaults = TrainConfig(train_batch_size=3, flip_aug=True)
    specs, notes = load_dataset_config(p, defaults)
    a, b = specs
    assert a.resolution == (640, 512) and a.batch_size == 4 and a.enable_bucket is True
    s1, s2 = a.subsets
    assert s1.image_dir == str(tmp_path.resolve() / "imgs")
    assert (s1.num_repeats, s1.class_tokens, s1.is_reg) == (5, "svs cat", False)
    assert s1.captions.shuffle_caption is True and s1.captions.keep_tokens == 1  # from [general]
    assert s1.caption_extension == ".txt"  # leading dot added
    assert s1.flip_aug is True  # from the training config (sd-scripts' argparse fallback)
    assert s2.is_reg is True and s2.captions.keep_tokens == 0  # subset value wins
    # second dataset: int resolution, batch size from the training config's train_batch_size, repeats default 1
    assert b.resolution == (768, 768) and b.batch_size == 3 and b.enable_bucket is False
    assert b.subsets[0].num_repeats == 1 and b.subsets[0].class_tokens is None


def test_dataset_toml_refuses_bad_keys_and_levels(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text(
        '[general]\nimage_dir = "x"\nshufle_caption = true\nprior_loss_weight = 1.0\n'
        '[[datasets]]\nresolution = 512\n'
        '  [[datasets.subsets]]\n  image_dir = "a"\n  batch_size = 2\n'
        '  [[datasets.subsets]]\n  metadata_file = "meta.json"\n',
        encoding="utf-8")
    with pytest.raises(TrainConfigError) as ei:
        load_dataset_config(p)
    msg = str(ei.value)
    assert "[general]: image_dir is not allowed here; it belongs in [[datasets.subsets]]" in msg
    assert "unknown key 'shufle_caption' (did you mean 'shuffle_caption'" in msg
    assert "prior_loss_weight cannot be set in a dataset config" in msg
    assert "batch_size is not allowed here; it belongs in [general] or [[datasets]]" in msg
    assert "subsets with metadata_file (fine-tuning) and without it (image folders) cannot be mixed" in msg


def test_dataset_toml_counts_are_checked_as_in_the_training_config(tmp_path):
    p = tmp_path / "counts.toml"
    p.write_text('[general]\nkeep_tokens = -1\n[[datasets]]\nresolution = 512\nbatch_size = 0\nmin_bucket_reso = 0\n'
                 '  [[datasets.subsets]]\n  image_dir = "a"\n  caption_dropout_every_n_epochs = -2\n'
                 '  [[datasets.subsets]]\n  image_dir = "b"\n  num_repeats = 0\n', encoding="utf-8")
    with pytest.raises(TrainConfigError) as ei:
        load_dataset_config(p)
    msg = str(ei.value)
    assert "[general]: keep_tokens = -1 must be at least 0" in msg
    assert "[[datasets]] #1: batch_size = 0 must be at least 1 (images per step)" in msg
    assert "[[datasets]] #1: min_bucket_reso = 0 must be at least 1" in msg
    assert "[[datasets]] #1 subset #1: caption_dropout_every_n_epochs = -2 must be at least 0" in msg
    assert "num_repeats" not in msg  # (below 1 leaves the subset out, as in sd-scripts)


def test_dataset_toml_floats_are_checked_as_in_the_training_config(tmp_path):
    p = tmp_path / "floats.toml"
    p.write_text('[general]\ncaption_dropout_rate = 1.5\nnetwork_multiplier = nan\n'
                 '[[datasets]]\nresolution = 512\nvalidation_split = inf\n'
                 '  [[datasets.subsets]]\n  image_dir = "a"\n  token_warmup_step = nan\n'
                 '  face_crop_aug_range = [2.0, inf]\n  caption_tag_dropout_rate = -0.1\n', encoding="utf-8")
    with pytest.raises(TrainConfigError) as ei:
        load_dataset_config(p)
    msg = str(ei.value)
    assert "[general]: caption_dropout_rate = 1.5 must be from 0 to 1 (a share of the steps)" in msg
    assert "[general]: network_multiplier = nan must be a finite number" in msg
    assert "[[datasets]] #1: validation_split = inf must be a finite number (the share of images held out" in msg
    assert "[[datasets]] #1 subset #1: token_warmup_step = nan must be a finite number" in msg
    assert "[[datasets]] #1 subset #1: face_crop_aug_range must be two finite numbers" in msg
    assert "[[datasets]] #1 subset #1: caption_tag_dropout_rate = -0.1 must be from 0 to 1" in msg


def test_dataset_json_null_means_not_set(tmp_path):
    """A .json dataset config (load_dataset_config reads it as the TOML) from a JSON client: null is "not set", at
    every level, as in the training config."""
    p = tmp_path / "ds.json"
    p.write_text('{"general": {"keep_tokens": null, "caption_dropout_rate": null, "shuffle_caption": true}, '
                 '"datasets": [{"resolution": 512, "batch_size": null, "network_multiplier": null, "subsets": '
                 '[{"image_dir": "a", "num_repeats": null, "class_tokens": null, "metadata_file": null, '
                 '"face_crop_aug_range": null, "flip_aug": null}]}]}', encoding="utf-8")
    (ds,), _ = load_dataset_config(p, TrainConfig(train_batch_size=2, keep_tokens=3))
    (sub,) = ds.subsets
    assert (ds.batch_size, ds.network_multiplier) == (2, 1.0)  # (the training config's, the default)
    assert (sub.num_repeats, sub.class_tokens, sub.metadata_file, sub.face_crop_aug_range, sub.flip_aug) == \
        (1, None, None, None, False)
    assert (sub.captions.keep_tokens, sub.captions.caption_dropout_rate, sub.captions.shuffle_caption) == (3, 0.0, True)
    p.write_text('{"general": null, "datasets": [{"resolution": 512, "subsets": [{"image_dir": "a"}]}]}',
                 encoding="utf-8")
    assert len(load_dataset_config(p)[0]) == 1
    p.write_text('{"general": {"shufle_caption": null, "prior_loss_weight": null}, "datasets": [{"resolution": 512, '
                 '"subsets": [{"image_dir": "a", "batch_size": null}]}]}', encoding="utf-8")
    with pytest.raises(TrainConfigError) as ei:
        load_dataset_config(p)  # a misspelt or misplaced key is refused even when null
    msg = str(ei.value)
    assert "unknown key 'shufle_caption'" in msg and "prior_loss_weight cannot be set in a dataset config" in msg
    assert "batch_size is not allowed here" in msg


def test_a_dataset_network_multiplier_is_said_to_change_nothing(tmp_path):
    p = tmp_path / "ds.toml"
    p.write_text('[[datasets]]\nresolution = 512\nnetwork_multiplier = -1.0\n  [[datasets.subsets]]\n  image_dir = "a"\n'
                 '[[datasets]]\nresolution = 512\n  [[datasets.subsets]]\n  image_dir = "b"\n', encoding="utf-8")
    _, notes = load_dataset_config(p)
    said = [n for n in notes if "network_multiplier" in n]
    assert said == ["[[datasets]] #1: network_multiplier = -1 changes nothing: the LoRA trains at strength 1 "
                    "(sd-scripts' train_network.py reads it too but does not apply it)"]
