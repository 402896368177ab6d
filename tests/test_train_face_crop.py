"""face_crop_aug_range: sd-scripts' crop around the face named in the file (name_cx_cy_w_h.png), for datasets
without buckets."""

import json
import os
import random

import numpy as np
import pytest
from PIL import Image

import models
from lib_lora.host.base import ModelHost
from lib_lora.train import trainer as trainer_mod
from lib_lora.train.config import TrainConfigError, parse_train_config
from lib_lora.train.dataset import build_plan
from lib_lora.train.images import face_crop, face_crop_box, face_from_name
from lib_lora.train.run import run_training

REF = os.path.join(os.path.dirname(__file__), "data", "face_crop_reference.json")


def test_boxes_are_sd_scripts_own():
    """sd-scripts' crop_target run on coordinate images (tests/data/face_crop_reference.py): the scaled size and
    the crop's corner for 702 sizes / faces / targets / ranges / random_crop / seeds."""
    cases = json.load(open(REF))["cases"]
    assert len(cases) == 702 and sum(c["box"] is not None for c in cases) == 666
    scaled = {tuple(c["box"][0]) != tuple(c["size"]) for c in cases if c["box"]}
    assert scaled == {True, False}  # both scaled and unscaled crops are in the reference
    for c in cases:
        got = face_crop_box(tuple(c["size"]), tuple(c["face"]), tuple(c["target"]), tuple(c["range"]),
                            c["random_crop"], random.Random(c["seed"]))
        want = None if c["box"] is None else (tuple(c["box"][0]), tuple(c["box"][1]))
        assert got == want, c


def test_face_from_name():
    assert face_from_name("/d/portrait_120_80_40_50.png") == (120, 80, 40, 50)
    assert face_from_name("a_b_120_80_40_50.jpg") == (120, 80, 40, 50)
    assert face_from_name("x_1_2_3.png") is None  # fewer than five parts
    assert face_from_name("my_photo_of_a_cat.png") is None  # sd-scripts stops on this name; not a face here
    assert face_from_name("p_0_80_40_50.png") is None  # cx 0: sd-scripts' "no face"


def test_an_image_smaller_than_the_target_is_scaled_up_to_cover_it():
    # sd-scripts asserts here; the crop still centres the face
    (nw, nh), (x, y) = face_crop_box((100, 80), (50, 40, 20, 20), (128, 128), (2.0, 4.0))
    assert nh == 128 and nw == 160 and y == 0 and x == 16
    img = np.zeros((80, 100, 3), np.uint8)
    out = face_crop(img, (50, 40, 20, 20), (128, 128), (2.0, 4.0), rng=random.Random(0))
    assert out.pixels.shape == (128, 128, 3) and out.original_size == (128, 128) and out.crop_ltrb == (0, 0, 0, 0)


def _face_dataset(root, names, size=(256, 192)):
    d = os.path.join(root, "img", "2_svs face")
    os.makedirs(d, exist_ok=True)
    for n in names:
        a = np.zeros((size[1], size[0], 3), np.uint8)
        a[:] = (20, 40, 220)
        parts = os.path.splitext(n)[0].split("_")
        if len(parts) >= 5:
            cx, cy, fw, fh = (int(p) for p in parts[-4:])
            a[cy - fh // 2: cy + fh // 2, cx - fw // 2: cx + fw // 2] = (230, 30, 30)
        Image.fromarray(a).save(os.path.join(d, n))
    return os.path.join(root, "img")


def _cfg(root, img, **kw):
    c = {"train_data_dir": img, "resolution": 64, "train_batch_size": 1, "output_dir": os.path.join(root, "out"),
         "output_name": "f", "network_dim": 4, "network_alpha": 2, "learning_rate": 1e-3, "max_train_epochs": 1,
         "seed": 5, "enable_bucket": False, "network_train_unet_only": True}
    c.update(kw)
    return parse_train_config(c, base_dir=root)


def test_plan_findings(tmp_path):
    img = _face_dataset(str(tmp_path), ["a_200_50_40_40.png", "plain.png"])
    plan = build_plan(_cfg(str(tmp_path), img, face_crop_aug_range=[2.0, 4.0]), family="sd1")
    assert not plan.errors
    info = [f.message for f in plan.findings if f.code == "face-crop-no-face"]
    assert info == ["'2_svs face': 1 of 2 image(s) carry no face position in their name (name_cx_cy_w_h.png, in "
                    "pixels) and are centre-cropped: plain.png"]
    for bad, why in (([4.0, 2.0], "with low <= high"), ([0, 2.0], "two numbers above 0")):
        with pytest.raises(TrainConfigError, match=why):
            _cfg(str(tmp_path), img, face_crop_aug_range=bad)
    plan = build_plan(_cfg(str(tmp_path), img, face_crop_aug_range=[2.0, 4.0], enable_bucket=True), family="sd1")
    assert any(f.code == "face-crop-buckets" and f.level == "warning" for f in plan.findings)


@pytest.fixture()
def encoded(monkeypatch):
    """The pixels the VAE gets, per call."""
    got = []
    real = trainer_mod.Trainer._vae_encode

    def record(self, px):
        got.append(np.array(px))
        return real(self, px)
    monkeypatch.setattr(trainer_mod.Trainer, "_vae_encode", record)
    return got


def _red_centre(px):
    """Share of red pixels in the crop's middle 16x16 (the face), and in all of it."""
    red = (px[..., 0] > 150) & (px[..., 2] < 100)
    return red[24:40, 24:40].mean(), red.mean()


def test_a_fixed_range_is_cached_once_around_the_face(tmp_path, encoded):
    img = _face_dataset(str(tmp_path), ["a_200_50_40_40.png", "b_60_140_32_24.png"])
    # range [1, 1] at 64 px: scale 1 (never enlarges), the 64x64 crop centred on the face, no draws
    res = run_training(ModelHost(models.make_sd1(seed=3), "m"),
                       _cfg(str(tmp_path), img, face_crop_aug_range=[1.0, 1.0], cache_latents=True))
    assert res.status == "done" and res.steps == 4
    assert len(encoded) == 2  # cached: each image once
    for px in encoded:
        centre, whole = _red_centre(px)
        assert centre == 1.0 and 0.08 < whole < 0.5, (centre, whole)
    assert not any("augmented anew" in n for n in res.notes)


def test_a_range_crops_anew_every_step(tmp_path, encoded):
    img = _face_dataset(str(tmp_path), ["a_200_50_40_40.png", "plain.png"])
    res = run_training(ModelHost(models.make_sd1(seed=3), "m"),
                       _cfg(str(tmp_path), img, face_crop_aug_range=[1.5, 3.0], cache_latents=True))
    assert res.status == "done" and res.steps == 4
    # the plain image is cached once; the face image is cropped and encoded at each of its two steps
    assert len(encoded) == 1 + 2
    faces = [px for px in encoded if _red_centre(px)[0] > 0.5]
    assert len(faces) == 2 and not np.array_equal(faces[0], faces[1])  # another scale each step
    # the face spans 1.5 to 3 of its sizes in the 64 px crop: 21 to 43 px, so 7 % to 45 % of the crop is red
    for px in faces:
        assert 0.07 <= _red_centre(px)[1] <= 0.45
    assert any(n.startswith("face_crop_aug_range: 1 image(s) are augmented anew") and "face crops" in n
               for n in res.notes)
