"""Dataset helper: the copied N_trigger class / N_class layout (originals untouched), captions with the WebUI's
interrogators (faked), trigger insertion, and regularisation images from the backend's generator (faked)."""
import hashlib
import os

import numpy as np
import pytest
from PIL import Image

from lib_lora.ui import dataset_helper as dh
from lib_lora.ui.backend import UiError
from lib_lora.ui.doctor import check


class FakeBackend:
    def __init__(self):
        self.asked = []

    def interrogate(self, image, method):
        self.asked.append((image.size, method))
        return {"blip": "a bear standing in the grass", "deepbooru": "bear, grass, outdoors"}[method]

    def generate(self, prompt, n, seed, width, height, negative_prompt="", steps=None, on_image=None):
        out = []
        for i in range(n):
            img = Image.new("RGB", (width, height), ((seed + i) * 40 % 256, 10, 10))
            out.append(img)
            if on_image:
                on_image(i + 1, n, img)
        return out


def _digest(folder):
    return {n: (hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest(),
                os.stat(os.path.join(folder, n)).st_mtime_ns) for n in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, n))}


@pytest.fixture()
def pictures(tmp_path):
    src = tmp_path / "my pictures"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (80, 64, 3), dtype=np.uint8)).save(src / f"p{i}.png")
    (src / "p0.txt").write_text("svs bear, portrait\n")
    (src / "notes.md").write_text("not an image")
    (src / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(src / "sub" / "ignored.png")
    return src


def test_create_layout_copies_and_never_touches_originals(pictures, tmp_path):
    before = _digest(pictures)
    res = dh.create_layout(str(pictures), str(tmp_path / "dataset"), "svs", "bear", 10)
    lay = res.layout
    assert lay.image_dir == str(tmp_path / "dataset" / "img" / "10_svs bear")
    assert lay.reg_image_dir == str(tmp_path / "dataset" / "reg" / "1_bear")
    assert sorted(res.copied) == ["p0.png", "p1.png", "p2.png", "p3.png"] and res.captions == ["p0.txt"]
    assert sorted(os.listdir(lay.image_dir)) == ["p0.png", "p0.txt", "p1.png", "p2.png", "p3.png"]
    assert os.path.isdir(lay.reg_image_dir)
    assert _digest(pictures) == before  # same bytes, same mtimes, nothing moved
    # running it again copies nothing; a different file with a taken name is left alone and reported
    again = dh.create_layout(str(pictures), str(tmp_path / "dataset"), "svs", "bear", 10)
    assert again.copied == [] and len(again.unchanged) == 5
    Image.new("RGB", (8, 8), "red").save(os.path.join(lay.image_dir, "p1.png"))
    third = dh.create_layout(str(pictures), str(tmp_path / "dataset"), "svs", "bear", 10)
    assert third.conflicts == ["p1.png"] and "NOT copied" in third.summary()
    # the result is what the doctor and the trainer read
    rep = check({"train_data_dir": lay.train_data_dir, "reg_data_dir": lay.reg_data_dir, "resolution": 64,
                 "output_dir": str(tmp_path / "out"), "optimizer_type": "AdamW", "max_train_epochs": 1}, "sd1")
    row = rep.folders[0]
    assert (row.name, row.images, row.repeats, row.instance_token, row.class_token) == ("10_svs bear", 4, 10, "svs",
                                                                                       "bear")


def test_layout_input_errors(pictures, tmp_path):
    with pytest.raises(UiError, match="trigger word"):
        dh.create_layout(str(pictures), str(tmp_path / "d"), "", "bear", 10)
    with pytest.raises(UiError, match="class word"):
        dh.create_layout(str(pictures), str(tmp_path / "d"), "svs", " ", 10)
    with pytest.raises(UiError, match="cannot be in a folder name"):
        dh.create_layout(str(pictures), str(tmp_path / "d"), "svs/x", "bear", 10)
    with pytest.raises(UiError, match="at least 1"):
        dh.create_layout(str(pictures), str(tmp_path / "d"), "svs", "bear", 0)
    with pytest.raises(UiError, match="does not exist"):
        dh.create_layout(str(tmp_path / "nope"), str(tmp_path / "d"), "svs", "bear", 10)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UiError, match="No images"):
        dh.create_layout(str(empty), str(tmp_path / "d"), "svs", "bear", 10)


def test_captions_trigger_and_editor(pictures, tmp_path):
    lay = dh.create_layout(str(pictures), str(tmp_path / "ds"), "svs", "bear", 5).layout
    imgs = dh.training_images(lay.train_data_dir)
    assert [p.name for p in imgs] == ["p0.png", "p1.png", "p2.png", "p3.png"]
    fb = FakeBackend()
    steps = list(dh.iter_caption(fb, imgs, "blip", trigger="svs"))
    assert [s[3] for s in steps] == [None] + ["svs, a bear standing in the grass"] * 3  # p0 keeps its caption
    assert len(fb.asked) == 3 and fb.asked[0] == ((64, 80), "blip")
    assert dh.read_caption(imgs[0]) == "svs bear, portrait"
    list(dh.iter_caption(fb, imgs[:1], "deepbooru", overwrite=True))
    assert dh.read_caption(imgs[0]) == "bear, grass, outdoors"
    # the trigger goes first where it is missing; whole words only ("svsx" does not count)
    dh.write_caption(imgs[1], "svsx bear")
    assert dh.insert_trigger(imgs, "svs") == 2
    assert dh.read_caption(imgs[0]) == "svs, bear, grass, outdoors"
    assert dh.read_caption(imgs[1]) == "svs, svsx bear"
    assert dh.insert_trigger(imgs, "svs") == 0
    # an empty caption removes the file (the folder's tokens become the caption), never an empty .txt
    assert "removed" in dh.write_caption(imgs[2], "   ")
    assert not os.path.exists(dh.caption_path(imgs[2]))
    # the originals' caption is unchanged
    assert (pictures / "p0.txt").read_text() == "svs bear, portrait\n"


def test_regularisation_images(tmp_path):
    reg = tmp_path / "reg" / "1_bear"
    fb = FakeBackend()
    seen = []
    paths = dh.generate_reg_images(fb, str(reg), "a photo of a bear", 3, 7, 64, 48,
                                   on_image=lambda i, n, p: seen.append((i, n)))
    assert [os.path.basename(p) for p in paths] == ["reg_00001.png", "reg_00002.png", "reg_00003.png"]
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert Image.open(paths[0]).size == (64, 48)
    more = dh.generate_reg_images(fb, str(reg), "a photo of a bear", 2, 10, 64, 48)
    assert [os.path.basename(p) for p in more] == ["reg_00004.png", "reg_00005.png"]
    with pytest.raises(UiError, match="not an `N_class` folder"):
        dh.generate_reg_images(fb, str(tmp_path / "reg"), "a bear", 1, 0, 64, 64)
    with pytest.raises(UiError, match="class prompt"):
        dh.generate_reg_images(fb, str(reg), "", 1, 0, 64, 64)
    assert dh.default_reg_count(15) == 75
