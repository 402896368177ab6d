"""The dataset doctor's counts against hand-computed expectations for sample folder trees, mistakes included,
and the VRAM formula against a hand calculation."""
import os

import numpy as np
import pytest
from PIL import Image

from lib_lora.ui import doctor as doc
from lib_lora.train.config import parse_train_config


def _img(path, w=64, h=64, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def _txt(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def _cfg(train, reg=None, **kw):
    cfg = {"train_data_dir": str(train), "resolution": 64, "train_batch_size": 2, "max_train_epochs": 4,
           "optimizer_type": "AdamW", "output_dir": "/tmp/out", "unet_lr": 1e-4}
    if reg:
        cfg["reg_data_dir"] = str(reg)
    cfg.update(kw)
    return cfg


@pytest.fixture()
def tree(tmp_path):
    """train/10_svs bear: a (caption with trigger), b (48 px: enlarged; caption WITHOUT the trigger), c (no caption)
       train/3_svs bear:  d (no caption), broken.png (not an image)
       train/bear_photos: 2 images in a folder without the N_ prefix (ignored)
       reg/1_bear:        4 images"""
    t = tmp_path / "train"
    a = t / "10_svs bear"
    _img(str(a / "a.png"), seed=1)
    _txt(str(a / "a.txt"), "svs bear, smiling")
    _img(str(a / "b.png"), 48, 48, seed=2)
    _txt(str(a / "b.txt"), "a bear in a forest")
    _img(str(a / "c.png"), seed=3)
    d = t / "3_svs bear"
    _img(str(d / "d.png"), seed=4)
    (d / "broken.png").write_bytes(b"this is not a png at all")
    for i in range(2):
        _img(str(t / "bear_photos" / f"p{i}.png"), seed=10 + i)
    for i in range(4):
        _img(str(tmp_path / "reg" / "1_bear" / f"r{i}.png"), seed=20 + i)
    return tmp_path


def test_counts_with_reg_and_mistakes(tree):
    rep = doc.check(_cfg(tree / "train", tree / "reg"), "sd1", check_pixels=True)
    rows = {r.name: r for r in rep.folders}
    assert set(rows) == {"10_svs bear", "3_svs bear", "1_bear"}  # bear_photos is not a subset

    a = rows["10_svs bear"]
    assert (a.role, a.images, a.repeats, a.instance_token, a.class_token) == ("train", 3, 10, "svs", "bear")
    assert a.captioned == 2                    # a.txt, b.txt
    assert a.missing_trigger == ["b.png"]      # c.png has no caption file: the folder name (with svs) is used
    assert a.upscaled == ["b.png"]             # 48 px scaled up to 64
    assert a.unreadable == []
    assert a.samples == 30                     # 3 images x 10 repeats

    d = rows["3_svs bear"]
    assert (d.images, d.repeats, d.captioned, d.samples) == (1, 3, 0, 3)
    assert d.unreadable == ["broken.png"]
    assert d.missing_trigger == []

    r = rows["1_bear"]
    assert (r.role, r.images, r.repeats, r.class_token, r.instance_token) == ("reg", 4, 1, "bear", None)
    assert r.samples == 4
    # 33 training samples per epoch; 4 reg images are repeated round-robin until they reach 33: 9 + 8 + 8 + 8
    assert r.samples_used == 33

    assert (rep.train_images, rep.reg_images) == (4, 4)
    assert (rep.train_samples, rep.reg_samples, rep.reg_samples_used) == (33, 4, 33)
    # no buckets: everything is 64x64; 33 + 33 samples at batch 2 = 33 batches; without reg ceil(33/2) = 17
    assert rep.buckets == {(64, 64): 66}
    assert (rep.batches_per_epoch, rep.batches_without_reg) == (33, 17)
    assert (rep.steps_per_epoch, rep.epochs, rep.total_steps) == (33, 4, 132)
    assert rep.total_steps_without_reg == 68    # reg doubling spelled out: 4 x 17
    assert rep.unreadable == 1 and rep.upscaled == 1
    for code in ("folder-name", "missing-trigger", "unreadable", "upscaled"):
        assert code in rep.finding_codes, (code, rep.finding_codes)
    assert rep.ok
    assert any("bear_photos" in w and "10_bear_photos" in w for w in rep.warnings), rep.warnings
    assert "twice" in (rep.reg_explanation or "")

    html = doc.to_html(rep)
    assert "Regularisation doubles the steps" in html and "68 steps instead of 132" in html
    assert "missing in 1: b.png" in html and "broken.png" in html
    md = doc.to_markdown(rep)
    assert "| 10_svs bear | training | 3 | 10 |" in md


def test_reg_folder_at_the_wrong_level(tree):
    # reg_data_dir pointing INTO the N_class folder (the images) instead of the folder above it
    rep = doc.check(_cfg(tree / "train", tree / "reg" / "1_bear"), "sd1")
    assert not rep.ok
    assert "wrong-level" in rep.finding_codes
    assert any("is itself an `N_name` folder" in e and str(tree / "reg") in e for e in rep.errors), rep.errors


def test_reg_images_directly_in_reg_dir(tmp_path):
    _img(str(tmp_path / "train" / "5_svs dog" / "a.png"))
    for i in range(2):
        _img(str(tmp_path / "regflat" / f"r{i}.png"), seed=i)
    rep = doc.check(_cfg(tmp_path / "train", tmp_path / "regflat"), "sd1")
    assert not rep.ok
    assert any("holds 2 images directly" in e for e in rep.errors), rep.errors


def test_reg_nested_inside_training_folder(tmp_path):
    _img(str(tmp_path / "train" / "5_svs dog" / "a.png"))
    _img(str(tmp_path / "train" / "reg" / "1_dog" / "r.png"))
    rep = doc.check(_cfg(tmp_path / "train"), "sd1")
    assert "nested-data-dir" in rep.finding_codes
    assert any("give reg_data_dir" in e for e in rep.errors), rep.errors
    assert [r.name for r in rep.folders] == ["5_svs dog"]
    # the tab names its boxes, not the config keys the command line reads
    html = doc.to_html(rep)
    assert ("folder &#x27;reg&#x27; in the Training folder is not an `N_name` (repeats, underscore, words: e.g. "
            "`10_svs cat`) folder") in html and f"set the Regularisation folder to &#x27;{tmp_path / 'train' / 'reg'}" \
        in html, html
    assert "_data_dir" not in html, html


def test_training_folder_is_the_image_folder(tmp_path):
    for i in range(3):
        _img(str(tmp_path / "10_svs cat" / f"{i}.png"), seed=i)
    rep = doc.check(_cfg(tmp_path / "10_svs cat"), "sd1")
    assert not rep.ok and rep.total_steps is None
    assert any(str(tmp_path) in e and "ABOVE" in e for e in rep.errors), rep.errors
    assert "cannot be trained" in doc.to_html(rep)


def test_buckets_histogram(tmp_path):
    # resolution 128 (16384 px area): squares go to 128x128, a 3:1 image exactly to 192x64
    d = tmp_path / "train" / "10_svs cat"
    _img(str(d / "s1.png"), 128, 128, 1)
    _img(str(d / "s2.png"), 256, 256, 2)
    _img(str(d / "wide.png"), 384, 128, 3)
    rep = doc.check(_cfg(tmp_path / "train", resolution=128, enable_bucket=True, min_bucket_reso=64,
                         max_bucket_reso=256, max_train_epochs=1), "sd1")
    assert rep.buckets == {(128, 128): 20, (192, 64): 10}
    assert rep.batches_per_epoch == 10 + 5 and rep.total_steps == 15
    assert rep.upscaled == 0  # every image is at least its bucket's size


def test_settings_problems_are_reported(tmp_path):
    _img(str(tmp_path / "train" / "1_svs cat" / "a.png"))
    rep = doc.check(_cfg(tmp_path / "train", unet_lr=0.0, text_encoder_lr=0.0, mixed_precision="fp16"), "sd1",
                    device_type="cpu")
    assert any("Both learning rates are 0" in e for e in rep.errors)
    assert any("needs a GPU" in w for w in rep.warnings)
    assert not rep.ok
    # the memory estimate is a GPU's for the full-size model: said when the model is on the CPU
    assert doc.cpu_vram_note("sd1") in rep.vram.advice
    assert "on the CPU it is system memory" in doc.to_html(rep) and "on the CPU it is system memory" in doc.to_markdown(rep)
    assert doc.cpu_vram_note("sd1") not in doc.check(_cfg(tmp_path / "train"), "sd1", device_type="cuda").vram.advice


def test_vram_formula_by_hand():
    gb = 1024 ** 3
    # SD1, 512 px, batch 1, fp16 weights, AdamW (8 bytes state), dim 32, UNet + text encoder
    est = doc.estimate_vram("sd1", batch=1, width=512, height=512, mixed_precision="fp16", dim=32)
    weights = (859.5e6 + 123.1e6 + 83.7e6) * 2 / gb
    lora = 32 * (423_936 + 165_888) * (4 + 4 + 8) / gb
    act = 16.0 * 1 * (512 * 512 / 1e6) * 1.15
    assert est.parts["model weights"] == pytest.approx(weights, abs=1e-3)
    assert est.parts["LoRA + optimizer"] == pytest.approx(lora, abs=1e-3)
    assert est.parts["activations"] == pytest.approx(act, abs=1e-3)
    assert est.total_gb == pytest.approx(0.8 + weights + lora + act, abs=0.01)
    assert 7.0 < est.total_gb < 8.5  # "SD1.5 512 px batch 1 ~ 7 GB"

    gc = doc.estimate_vram("sd1", batch=1, width=512, height=512, mixed_precision="fp16", dim=32,
                           gradient_checkpointing=True)
    assert gc.parts["activations"] == pytest.approx(act * 0.35, abs=1e-3)
    fp32 = doc.estimate_vram("sd1", batch=1, width=512, height=512, mixed_precision="no", dim=32)
    assert fp32.parts["activations"] == pytest.approx(act * 2, abs=1e-3)
    assert fp32.parts["model weights"] == pytest.approx(weights * 2, abs=1e-3)

    # SDXL 1024, UNet only, AdamW8bit, checkpointing: about 11 GB as users report for 12 GB cards
    xl = doc.estimate_vram("sdxl", batch=1, width=1024, height=1024, mixed_precision="bf16", dim=32,
                           gradient_checkpointing=True, train_te=False, optimizer="AdamW8bit")
    assert xl.parts["LoRA + optimizer"] == pytest.approx(32 * 2_659_840 * 10 / gb, abs=1e-3)
    assert 9.5 < xl.total_gb < 12.0
    assert xl.explanation.endswith(f"about {xl.total_gb:.1f} GB")
    # batch 4 at 512 fits a 24 GB card
    assert doc.estimate_vram("sd1", batch=4, width=512, height=512, dim=32).total_gb < 24
    # fp8_base: UNet and text-encoder weights at 1 byte, the VAE as loaded; fp8_base_unet: the UNet only
    f8 = doc.estimate_vram("sdxl", batch=1, width=1024, height=1024, mixed_precision="bf16", dim=32,
                           gradient_checkpointing=True, train_te=False, optimizer="AdamW8bit", fp8=("unet", "te"))
    assert f8.parts["model weights"] == pytest.approx((2567.5e6 + 817.6e6 + 83.7e6 * 2) / gb, abs=1e-3)
    assert "FP8 UNet and text encoder 1" in f8.explanation
    assert xl.total_gb - f8.total_gb == pytest.approx((2567.5e6 + 817.6e6) / gb, abs=0.01)
    # a model the WebUI loaded in FP8 (1 byte per weight read from it): its VAE is not FP8
    host = doc.estimate_vram("sdxl", batch=1, width=1024, height=1024, mixed_precision="bf16", dim=32,
                             weight_bytes=1)
    assert host.parts["model weights"] == f8.parts["model weights"]
    cfg = parse_train_config({"train_data_dir": "x", "fp8_base_unet": True})
    assert doc.fp8_parts_of(cfg, 2) == ("unet",) and doc.fp8_parts_of(cfg, 1) == ("unet", "te")


def test_vram_of_a_full_fine_tune_counts_every_weight_as_trained():
    """LyCORIS algo=full: the trained difference, its gradient and the optimizer state are model-sized (SD1.5
    UNet + text encoder in fp32 with AdamW: about 15 GB before activations), not LoRA-sized."""
    gb = 1024 ** 3
    est = doc.estimate_vram("sd1", batch=1, width=512, height=512, dim=32, full=True)
    assert est.parts["LoRA + optimizer"] == pytest.approx((859.5e6 + 123.1e6) * 16 / gb, abs=1e-3)
    assert "full fine-tune and optimizer (982.6 M parameters x 16 bytes)" in est.explanation
    unet = doc.estimate_vram("sd1", batch=1, width=512, height=512, dim=32, full=True, train_te=False)
    assert unet.parts["LoRA + optimizer"] == pytest.approx(859.5e6 * 16 / gb, abs=1e-3)
    cfg = parse_train_config({"train_data_dir": "x", "network_module": "lycoris.kohya",
                              "network_args": ["algo = full", "preset=attn-only"]})
    assert doc.trains_full(cfg.network_module, cfg.network_args)
    cfg = parse_train_config({"train_data_dir": "x", "network_args": ["algo=full"]})
    assert not doc.trains_full(cfg.network_module, cfg.network_args)
