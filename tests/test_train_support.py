"""Every config key the trainer cannot honour is named, never silently ignored."""

from lib_lora.train.config import parse_train_config, parse_train_config_text
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
    assert "full_bf16 = True" in text and "face_crop_aug_range" in text and "'algo'" in text
    assert "'loraplus_lr_ratio' is not supported" not in text  # honoured now
    assert "random_crop" not in text and "color_aug" not in text  # honoured now
    assert "ip_noise_gamma" not in text and "loss_type" not in text  # honoured
    assert "'conv_dim'" not in text
    assert errors == []  # every scheduler name sd-scripts knows is available now
    assert "lr_scheduler_type = 'mymodule.MyScheduler'" in text  # a custom scheduler class is not
