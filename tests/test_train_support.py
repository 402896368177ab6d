"""Every config key the trainer cannot honour is named, never silently ignored."""

from lib_lora.train.config import parse_train_config, parse_train_config_text
from lib_lora.train.support import check_support


def test_seed_config_needs_no_unsupported_notes():
    seed = """
[model]
pretrained_model_name_or_path = "./models/sd/v1-5-pruned.safetensors"
v2 = false
v_parameterization = false
[dataset]
train_data_dir = "./training_data"
resolution = 512
batch_size = 2
enable_bucket = true
min_bucket_reso = 256
max_bucket_reso = 1024
[training]
output_dir = "./output"
output_name = "my_lora"
max_train_epochs = 10
learning_rate = 1e-4
unet_lr = 1e-4
text_encoder_lr = 5e-5
lr_scheduler = "cosine_with_restarts"
lr_warmup_steps = 100
network_dim = 32
network_alpha = 16
optimizer_type = "AdamW8bit"
mixed_precision = "fp16"
save_every_n_epochs = 2
save_model_as = "safetensors"
"""
    errors, notes = check_support(parse_train_config_text(seed))
    assert errors == [] and notes == []


def test_unsupported_keys_are_named():
    cfg = parse_train_config({"train_data_dir": "x", "random_crop": True, "ip_noise_gamma": 0.1,
                              "network_args": ["conv_dim=4", "loraplus_lr_ratio=16"], "lr_scheduler": "inverse_sqrt",
                              "loss_type": "huber"})
    errors, notes = check_support(cfg)
    text = "\n".join(notes)
    assert "random_crop = True" in text and "ip_noise_gamma = 0.1" in text and "'loraplus_lr_ratio'" in text
    assert "'conv_dim'" not in text
    assert any("inverse_sqrt" in e for e in errors) and any("huber" in e for e in errors)
