"""Dataset plans built from real image trees in tmp_path.

Expected counts are literals derived by hand from sd-scripts' rules (training-anchors.md §1.1-§1.5, §2):
samples = images x repeats; reg samples balanced to the training samples; buckets by nearest aspect ratio; each
bucket gives ceil(count / batch) batches; steps = epochs x ceil(batches / grad_accum)."""

import io
import json
import zlib
import struct

import numpy as np
import pytest
from PIL import Image

from lib_lora.train.config import TrainConfig, parse_train_config
from lib_lora.train.dataset import ImageEntry, balance_reg_repeats, build_plan
from lib_lora.train.images import load_image_rgb, probe_image


def _img(path, size=(64, 64), color=(200, 30, 30), mode="RGB", **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save)
    return path


def _cfg(train, reg=None, **kw):
    base = dict(train_data_dir=str(train), reg_data_dir=str(reg) if reg else None, resolution=(512, 512),
                enable_bucket=True, train_batch_size=2, max_train_epochs=3)
    base.update(kw)
    return TrainConfig(**base)


def _four_train_images(root):
    d = root / "train" / "10_svs cat"
    # buckets (512 list): 512x512 exact; 600x400 -> 640x384; 400x600 -> 384x640; 1024x768 -> 576x448
    _img(d / "a.png", (512, 512))
    _img(d / "b.png", (600, 400))
    _img(d / "c.jpg", (400, 600))
    _img(d / "d.png", (1024, 768))
    return root / "train"


def test_repeats_buckets_and_steps(tmp_path):
    train = _four_train_images(tmp_path)
    plan = build_plan(_cfg(train))
    assert plan.ok, plan.report()
    (s,) = plan.subsets
    assert (s.name, s.repeats, s.instance_token, s.class_token) == ("10_svs cat", 10, "svs", "cat")
    # 4 images x 10 repeats
    assert plan.num_train_images == 40
    assert plan.bucket_histogram == {(384, 640): 10, (512, 512): 10, (576, 448): 10, (640, 384): 10}
    # 4 buckets x ceil(10/2) = 20 batches; 3 epochs x 20 = 60 steps
    assert plan.batches_per_epoch == 20
    assert (plan.steps.max_train_steps, plan.steps.num_epochs) == (60, 3)
    # grad accumulation 3: ceil(20/3) = 7 per epoch -> 21
    assert build_plan(_cfg(train, gradient_accumulation_steps=3)).steps.max_train_steps == 21
    # max_train_steps alone: 50 steps, ceil(50/20) = 3 epochs
    st = build_plan(_cfg(train, max_train_epochs=None, max_train_steps=50)).steps
    assert (st.max_train_steps, st.num_epochs) == (50, 3)
    # upscaled: b (600x400 -> 640x427), c (-> 427x640); d shrinks (1024x768 -> 597x448); a exact
    assert s.upscaled == ["b.png", "c.jpg"]
    # mean |ar error|: a 0; b 1.6667-1.5; c |0.6-0.6667|; d |1.2857-1.3333|
    want = (0 + (640 / 384 - 1.5) + abs(384 / 640 - 400 / 600) + abs(576 / 448 - 1024 / 768)) / 4
    assert plan.datasets[0].mean_ar_error == pytest.approx(want)
    # everything the same but batch 3: ceil(10/3) = 4 per bucket -> 16
    assert build_plan(_cfg(train, train_batch_size=3)).batches_per_epoch == 16


def test_reg_fewer_than_train_are_repeated_and_steps_double(tmp_path):
    train = _four_train_images(tmp_path)
    for i in range(6):
        _img(tmp_path / "reg" / "1_cat" / f"r{i}.png", (512, 512))
    plan = build_plan(_cfg(train, tmp_path / "reg"))
    assert plan.ok, plan.report()
    reg = [s for s in plan.subsets if s.is_reg][0]
    assert (reg.class_token, reg.instance_token) == ("cat", None)
    # train 40; reg 6 x 1 = 6 before balancing. first pass 6, then +1 per image per pass: 5 more passes -> 36,
    # then r0..r3 get one more -> 40. repeats: r0-r3 = 1+5+1 = 7, r4-r5 = 6
    assert plan.num_reg_images == 6
    assert [e.num_repeats for e in reg.images] == [7, 7, 7, 7, 6, 6]
    assert reg.samples_used == 40
    # buckets: 512x512 = 10 train + 40 reg = 50 -> 25 batches; 3 other buckets x 5 -> 40 batches (20 without reg)
    assert plan.bucket_histogram[(512, 512)] == 50
    assert plan.batches_per_epoch == 40 and plan.datasets[0].batches_without_reg == 20
    assert plan.steps.max_train_steps == 120 and plan.steps_without_reg.max_train_steps == 60
    text = plan.report()
    assert "fewer, so sd-scripts repeats reg images" in text
    assert "4 images x 7, 2 images x 6 = 40 reg samples per epoch" in text
    assert "20 batches without reg images, 40 with them" in text
    md = plan.ss_dataset_metadata()
    assert md["ss_num_reg_images"] == "6" and md["ss_num_train_images"] == "40"
    assert md["ss_num_batches_per_epoch"] == "40"
    assert json.loads(md["ss_reg_dataset_dirs"]) == {"1_cat": {"n_repeats": 1, "img_count": 6}}


def test_reg_more_than_train_surplus_unused(tmp_path):
    train = _four_train_images(tmp_path)
    for i in range(25):
        _img(tmp_path / "reg" / "2_cat" / f"r{i:02d}.png", (16, 16))
    plan = build_plan(_cfg(train, tmp_path / "reg"))
    reg = [s for s in plan.subsets if s.is_reg][0]
    # 25 x 2 = 50 > 40: images taken in order with 2 repeats until 40 -> the first 20 used, last 5 never
    assert plan.num_reg_images == 50
    assert [e.num_repeats for e in reg.images] == [2] * 20 + [0] * 5
    assert reg.samples_used == 40
    # 16x16 squares -> 512x512 bucket: 10 + 40 = 50 -> 25 batches, + 15 -> 40
    assert plan.batches_per_epoch == 40
    assert "5 reg images are never used" in plan.report()
    assert any(f.code == "reg-surplus" for f in plan.findings)


def test_reg_balancing_overshoots_by_the_last_repeats():
    entries = [ImageEntry(None, (1, 1), "", "folder", None, True, 3) for _ in range(20)]
    # 40 training samples, repeats 3: after 13 images n = 39, the 14th makes 42 >= 40 -> 14 used, total 42
    balance_reg_repeats(40, entries)
    assert [e.num_repeats for e in entries] == [3] * 14 + [0] * 6
    entries = [ImageEntry(None, (1, 1), "", "folder", None, True, 1) for _ in range(3)]
    balance_reg_repeats(0, entries)  # no training samples -> nothing used
    assert [e.num_repeats for e in entries] == [0, 0, 0]


def test_no_upscale_buckets(tmp_path):
    d = tmp_path / "train" / "1_x"
    _img(d / "a.png", (300, 300))  # -> bucket 256x256, not resized
    _img(d / "b.png", (2000, 1000))  # -> resized 640x320, bucket 640x320
    _img(d / "c.png", (200, 130))  # -> bucket 192x128
    plan = build_plan(_cfg(tmp_path / "train", bucket_no_upscale=True, train_batch_size=1))
    assert plan.ok, plan.report()
    assert plan.bucket_histogram == {(192, 128): 1, (256, 256): 1, (640, 320): 1}
    assert plan.subsets[0].upscaled == []
    assert json.loads(plan.ss_dataset_metadata()["ss_bucket_info"])["buckets"] == {
        "0": {"resolution": [192, 128], "count": 1}, "1": {"resolution": [256, 256], "count": 1},
        "2": {"resolution": [640, 320], "count": 1}}


def test_captions_trigger_and_tag_frequency(tmp_path):
    d = tmp_path / "train" / "5_svs cat"
    for n in "abcd":
        _img(d / f"{n}.png")
    (d / "a.txt").write_text("svs, Cat, red\nignored second line", encoding="utf-8")
    (d / "b.txt").write_text("a cat, sitting", encoding="utf-8")  # trigger missing
    (d / "c.caption").write_text("svs, cat", encoding="utf-8")  # wrong extension: not used
    plan = build_plan(_cfg(tmp_path / "train"))
    (s,) = plan.subsets
    assert s.n_images == 4 and s.n_captioned == 2
    assert s.missing_trigger == ["b.png"]
    assert s.other_extension_captions == ["c.png"]
    assert {e.path.name: e.caption for e in s.images} == {
        "a.png": "svs, Cat, red", "b.png": "a cat, sitting", "c.png": "svs cat", "d.png": "svs cat"}
    # raw captions split on ",", lower-cased: svs 1, cat 1, red 1, a cat 1, sitting 1, "svs cat" 2 (fallbacks)
    assert plan.tag_frequency == {"5_svs cat": {"svs": 1, "cat": 1, "red": 1, "a cat": 1, "sitting": 1, "svs cat": 2}}
    codes = {f.code for f in plan.findings}
    assert {"missing-trigger", "caption-extension", "no-caption"} <= codes
    text = plan.report()
    assert "trigger word 'svs' is missing from 1 of 4 caption(s): b.png" in text
    assert 'caption_extension = ".caption"' in text
    # a prefix carrying the trigger satisfies it
    assert build_plan(_cfg(tmp_path / "train", caption_prefix="svs")).subsets[0].missing_trigger == []
    # with .caption configured, c's caption is read and the .txt ones are not
    s2 = build_plan(_cfg(tmp_path / "train", caption_extension=".caption")).subsets[0]
    assert s2.n_captioned == 1 and sorted(s2.other_extension_captions) == ["a.png", "b.png"]


def test_bad_caption_files_are_errors(tmp_path):
    d = tmp_path / "train" / "5_svs"
    _img(d / "a.png")
    (d / "a.txt").write_text("", encoding="utf-8")
    plan = build_plan(_cfg(tmp_path / "train"))
    assert not plan.ok and any(f.code == "caption-file" and "empty" in f.message for f in plan.errors)
    # a caption in another encoding is said to be unreadable, not said to lack the trigger word it holds
    (d / "a.txt").write_bytes("svs, caf\u00e9".encode("utf-16"))
    plan = build_plan(_cfg(tmp_path / "train"))
    assert any(f.code == "caption-file" and "not UTF-8" in f.message for f in plan.errors)
    assert not any(f.code == "missing-trigger" for f in plan.findings)


def _png16_rgb(path, rgb16):
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one)."""
    h, w = rgb16.shape[:2]
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(t, data):
        return struct.pack(">I", len(data)) + t + data + struct.pack(">I", zlib.crc32(t + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def test_image_modes_convert_predictably(tmp_path):
    # 16-bit greyscale: 25700/257 = 100, 65535/257 = 255
    a = np.full((8, 10), 25700, np.uint16)
    a[0, 0] = 65535
    Image.fromarray(a, mode="I;16").save(tmp_path / "g16.png")
    arr = load_image_rgb(tmp_path / "g16.png")
    assert arr.shape == (8, 10, 3) and arr.dtype == np.uint8
    assert tuple(arr[1, 1]) == (100, 100, 100) and tuple(arr[0, 0]) == (255, 255, 255)
    assert any("16-bit" in n for n in probe_image(tmp_path / "g16.png").notes)
    # 16-bit RGB: Pillow keeps the high byte: 0x1234 -> 0x12 = 18
    _png16_rgb(tmp_path / "rgb16.png", np.full((4, 5, 3), 0x1234, np.uint16))
    assert tuple(load_image_rgb(tmp_path / "rgb16.png")[0, 0]) == (18, 18, 18)
    # CMYK JPEG: C0 M255 Y255 K0 is red
    _img(tmp_path / "cmyk.jpg", (16, 16), (0, 255, 255, 0), mode="CMYK", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    r, g, b = (int(v) for v in load_image_rgb(tmp_path / "cmyk.jpg")[8, 8])
    assert r > 240 and g < 15 and b < 15
    # RGBA: alpha dropped as convert("RGB") does -> stored colour, not white
    _img(tmp_path / "rgba.png", (4, 4), (10, 20, 30, 0), mode="RGBA")
    assert tuple(load_image_rgb(tmp_path / "rgba.png")[0, 0]) == (10, 20, 30)
    # LA -> grey triplet; palette -> palette colour; 1-bit -> 0/255
    _img(tmp_path / "la.png", (4, 4), (77, 0), mode="LA")
    assert tuple(load_image_rgb(tmp_path / "la.png")[0, 0]) == (77, 77, 77)
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 12, 34, 56] + [0] * 762)
    p.save(tmp_path / "pal.png")
    assert tuple(load_image_rgb(tmp_path / "pal.png")[0, 0]) == (12, 34, 56)
    _img(tmp_path / "bw.bmp", (4, 4), 1, mode="1")
    assert tuple(load_image_rgb(tmp_path / "bw.bmp")[0, 0]) == (255, 255, 255)
    _img(tmp_path / "w.webp", (4, 4), (0, 0, 255), lossless=True)
    assert tuple(load_image_rgb(tmp_path / "w.webp")[0, 0]) == (0, 0, 255)


def test_exif_orientation_applied(tmp_path):
    d = tmp_path / "train" / "1_x"
    d.mkdir(parents=True)
    im = Image.new("RGB", (60, 40), (255, 0, 0))
    im.paste((0, 0, 255), (30, 0, 60, 40))  # stored: left half red, right half blue
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(d / "rot.jpg", exif=exif.tobytes(), quality=95)
    arr = load_image_rgb(d / "rot.jpg")
    # displayed 40 wide, 60 tall; the stored left (red) half ends up on top
    assert arr.shape == (60, 40, 3)
    assert arr[5, 20, 0] > 200 and arr[5, 20, 2] < 60
    assert arr[55, 20, 2] > 200 and arr[55, 20, 0] < 60
    plan = build_plan(_cfg(tmp_path / "train"))
    e = plan.subsets[0].images[0]
    # oriented 40x60 (ar .667) -> bucket 384x640 (stored 60x40 would have gone to 640x384)
    assert e.size == (40, 60) and e.bucket == (384, 640)
    assert any(f.code == "exif-rotation" for f in plan.findings)


def test_corrupt_files_listed_never_crash(tmp_path):
    d = tmp_path / "train" / "3_svs"
    _img(d / "ok.png", (512, 512))
    (d / "garbage.png").write_bytes(b"this is not an image")
    (d / "empty.webp").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), np.uint8)).save(buf, "JPEG")
    (d / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    # a PNG whose pixel data is damaged (its header and EXIF are fine): not blamed on EXIF and used
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)).save(buf, "PNG")
    png = bytearray(buf.getvalue())
    at = png.find(b"IDAT") + 4
    png[at:at + 2] = b"\0\0"
    (d / "bad_idat.png").write_bytes(bytes(png))
    (d / "anim.gif").write_bytes(b"GIF89a")
    (d / "notes.txt.bak").write_text("x")
    (d / "UPPER.PNG").write_bytes((d / "ok.png").read_bytes())
    (d / "Mixed.Png").write_bytes((d / "ok.png").read_bytes())
    plan = build_plan(_cfg(tmp_path / "train"))
    (s,) = plan.subsets
    assert sorted(n for n, _ in s.unreadable) == ["bad_idat.png", "empty.webp", "garbage.png", "truncated.jpg"]
    assert dict(s.unreadable)["empty.webp"].endswith("the file is empty (0 bytes)")
    assert "EXIF" not in plan.report()
    assert sorted(e.path.name for e in s.images) == ["Mixed.Png", "UPPER.PNG", "ok.png"]
    # 3 usable x 3 repeats, one 512x512 bucket -> ceil(9/2) = 5 batches
    assert plan.num_train_images == 9 and plan.batches_per_epoch == 5
    assert s.unsupported_files == ["anim.gif"]
    assert plan.ok  # unreadable files are left out with a warning, not fatal
    text = plan.report()
    assert "4 file(s) cannot be read and are left out" in text and "truncated.jpg" in text
    assert any(f.code == "mixed-case-ext" and "Mixed.Png" in f.message for f in plan.findings)


def test_truncated_detected_even_when_pillow_allows_truncation(tmp_path, monkeypatch):
    from PIL import ImageFile
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (128, 128, 3), np.uint8)).save(buf, "JPEG")
    (tmp_path / "t.jpg").write_bytes(buf.getvalue()[:-600])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # the WebUI may set this globally
    pr = probe_image(tmp_path / "t.jpg")
    assert not pr.ok and "truncated" in pr.error


def test_folder_name_problems(tmp_path):
    t = tmp_path / "train"
    _img(t / "10_svs cat" / "a.png")
    _img(t / "cats" / "b.png")
    _img(t / "dog_20" / "c.png")
    _img(t / "0_bird" / "d.png")
    _img(t / "loose.png")
    (t / "logs").mkdir()
    plan = build_plan(_cfg(t))
    msgs = {f.code: f.message for f in plan.findings}
    assert [s.name for s in plan.subsets] == ["10_svs cat"]
    named = [f.message for f in plan.findings if f.code == "folder-name"]
    assert any("'cats'" in m and "'10_cats'" in m for m in named)
    assert any("'dog_20'" in m and "'20_dog'" in m for m in named)
    assert "repeat count 0" in msgs["zero-repeats"]
    assert "directly inside train_data_dir" in msgs["loose-images"]
    assert plan.ok
    # the only folder has 0 repeats: the error itself says so
    _img(tmp_path / "only" / "0_svs" / "a.png")
    plan = build_plan(_cfg(tmp_path / "only"))
    assert not plan.ok and [f.message for f in plan.errors] == [
        f"no usable `N_name` folder in train_data_dir '{tmp_path / 'only'}': '0_svs' repeat their images 0 times; "
        "give a repeat count of 1 or more, e.g. rename to '1_svs'"]


def test_wrong_level_folders(tmp_path):
    t = tmp_path / "training_data"
    _img(t / "10_svs cat" / "a.png")
    _img(tmp_path / "reg" / "1_cat" / "r.png")
    _img(tmp_path / "flat_reg" / "r.png")
    # reg dir given one level too deep: the `1_cat` folder itself
    plan = build_plan(_cfg(t, tmp_path / "reg" / "1_cat"))
    f = [f for f in plan.findings if f.code == "wrong-level"]
    assert f and f"Give reg_data_dir = '{tmp_path / 'reg'}'" in f[0].message
    # a flat folder of reg images
    plan = build_plan(_cfg(t, tmp_path / "flat_reg"))
    f = [f for f in plan.findings if f.code == "wrong-level"]
    assert f and "1_<class>" in f[0].message and "kohya_ss#3322" in f[0].message
    # training dir given one level too deep
    plan = build_plan(_cfg(t / "10_svs cat"))
    f = [f for f in plan.findings if f.code == "wrong-level"]
    assert f and f"Give train_data_dir = '{t}'" in f[0].message and not plan.ok
    # reg dir given one level too high (its parent)
    plan = build_plan(_cfg(t, tmp_path))
    f = [f for f in plan.findings if f.code == "nested-data-dir" and "'reg'" in f.message]
    assert f and f"reg_data_dir = '{tmp_path / 'reg'}'" in f[0].message
    # reg folder put inside the training folder with no reg_data_dir
    _img(t / "reg" / "1_cat" / "r.png")
    plan = build_plan(_cfg(t))
    f = [f for f in plan.findings if f.code == "nested-data-dir"]
    assert f and f[0].level == "error" and "give reg_data_dir" in f[0].message
    # ...and with reg_data_dir pointing at it, it is simply the reg set
    plan = build_plan(_cfg(t, t / "reg"))
    assert [s.name for s in plan.subsets if s.is_reg] == ["1_cat"] and plan.ok
    # same folder for both
    plan = build_plan(_cfg(t, t))
    assert any(f.code == "reg-is-train" for f in plan.errors)


def test_seed_tutorial_end_to_end(tmp_path):
    from test_train_dataset_config import SEED_TOML
    (tmp_path / "training_config.toml").write_text(SEED_TOML, encoding="utf-8")
    d = tmp_path / "training_data" / "10_concept_name"
    _img(d / "image001.jpg", (512, 512))
    _img(d / "image002.jpg", (768, 512))
    _img(d / "image003.jpg", (512, 768))
    (d / "image001.txt").write_text("concept_name, a photo", encoding="utf-8")
    (d / "image002.txt").write_text("concept_name, outdoors", encoding="utf-8")
    from lib_lora.train.config import load_train_config
    plan = build_plan(load_train_config(tmp_path / "training_config.toml"))
    assert plan.ok, plan.report()
    s = plan.subsets[0]
    assert s.n_captioned == 2 and s.images[0].caption == "concept_name, a photo"
    assert s.images[2].caption == "concept_name"  # no .txt -> folder tokens
    # 768x512 (1.5) -> 640x384; 512x768 -> 384x640; 10 repeats each; batch 2 -> 3 x 5 = 15 batches; 10 epochs -> 150
    assert plan.bucket_histogram == {(384, 640): 10, (512, 512): 10, (640, 384): 10}
    assert plan.batches_per_epoch == 15 and plan.steps.max_train_steps == 150
    # lr_warmup_steps 100 < 150: no warmup warning; with 5 epochs (75 steps) there is one
    assert not any(f.code == "warmup-too-long" for f in plan.findings)
    c = load_train_config(tmp_path / "training_config.toml")
    c.max_train_epochs = 5
    assert any(f.code == "warmup-too-long" for f in build_plan(c).findings)


def test_dataset_config_plan(tmp_path):
    _img(tmp_path / "imgs" / "a.png", (512, 512))
    _img(tmp_path / "imgs" / "b.png", (600, 400))
    _img(tmp_path / "parent" / "5_x" / "c.png")
    (tmp_path / "ds.toml").write_text(
        '[general]\nenable_bucket = true\n[[datasets]]\nresolution = 512\nbatch_size = 4\n'
        '  [[datasets.subsets]]\n  image_dir = "imgs"\n  num_repeats = 3\n  class_tokens = "svs cat"\n'
        '  [[datasets.subsets]]\n  image_dir = "parent"\n', encoding="utf-8")
    cfg = parse_train_config({"dataset_config": "ds.toml", "max_train_epochs": 2}, base_dir=tmp_path)
    plan = build_plan(cfg)
    # imgs: 2 images x 3 = 6 samples: 512x512 3 -> 1 batch, 640x384 3 -> 1 batch (batch 4) -> 2 per epoch
    assert plan.num_train_images == 6 and plan.batches_per_epoch == 2 and plan.steps.max_train_steps == 4
    f = [f for f in plan.findings if f.code == "wrong-level"]
    assert f and "folder names carry no meaning" in f[0].message
    md = plan.ss_dataset_metadata()
    ds = json.loads(md["ss_datasets"])
    assert ds[0]["subsets"][0]["image_dir"] == "imgs" and ds[0]["num_train_images"] == 6
    assert json.loads(md["ss_dataset_dirs"]) == {"imgs": {"n_repeats": 3, "img_count": 2}, "parent": {"n_repeats": 1, "img_count": 0}}


def test_a_subset_with_num_repeats_below_1_is_left_out_and_said(tmp_path):
    _img(tmp_path / "imgs" / "a.png", (512, 512))
    _img(tmp_path / "off" / "b.png", (512, 512))
    (tmp_path / "ds.toml").write_text(
        '[[datasets]]\nresolution = 512\n  [[datasets.subsets]]\n  image_dir = "imgs"\n  num_repeats = 2\n'
        '  [[datasets.subsets]]\n  image_dir = "off"\n  num_repeats = 0\n', encoding="utf-8")
    plan = build_plan(parse_train_config({"dataset_config": "ds.toml", "max_train_epochs": 1}, base_dir=tmp_path))
    assert plan.num_train_images == 2
    f = [f for f in plan.warnings if f.code == "zero-repeats"]
    assert len(f) == 1 and f[0].message == "subset 'off': num_repeats = 0 is below 1, so the subset is left out"


def test_bucket_setting_errors_and_epoch_batches(tmp_path):
    train = _four_train_images(tmp_path)
    plan = build_plan(_cfg(train, min_bucket_reso=640))
    assert not plan.ok and plan.steps is None
    assert any(f.code == "bucket-settings" and "min_bucket_reso 640" in f.message for f in plan.errors)
    plan = build_plan(_cfg(train, bucket_reso_steps=32), family="sd1")
    assert [f.message for f in plan.errors if f.code == "bucket-steps"] == [
        "bucket_reso_steps 32 is not a multiple of 64: bucket sides must be sizes the model's UNet can take "
        "(sd-scripts refuses this too). Use bucket_reso_steps = 64 (SDXL: 32)"]
    assert not plan.ok and "Buckets (samples" not in plan.report()  # (no bucket table for what cannot run)
    plan = build_plan(_cfg(train))
    part = plan.datasets[0]
    batches = part.epoch_batches(seed=1, epoch=2)
    assert len(batches) == part.batches == 20
    assert sum(len(b) for b in batches) == 40
    assert all(len({e.bucket for e in b}) == 1 for b in batches)
    assert batches == part.epoch_batches(seed=1, epoch=2)


def test_buckets_off_single_bucket(tmp_path):
    train = _four_train_images(tmp_path)
    plan = build_plan(_cfg(train, enable_bucket=False))
    # everything in the one 512x512 bucket: 40 samples -> 20 batches; no ss bucket info
    assert plan.bucket_histogram == {(512, 512): 40} and plan.batches_per_epoch == 20
    assert plan.ss_dataset_metadata()["ss_bucket_info"] == "null"
    assert any(f.code == "buckets-off" for f in plan.findings)


def test_buckets_off_resolution_the_unet_cannot_take(tmp_path):
    """Buckets off, 100x100 pixels: 12x12 latents the SD1 UNet halves to 3 and cannot concatenate back (a
    traceback after caching latents, in sd-scripts too): refused before training, with the sizes that work."""
    train = _four_train_images(tmp_path)
    plan = build_plan(_cfg(train, enable_bucket=False, resolution=(100, 100)), family="sd1")
    assert not plan.ok
    assert [f.message for f in plan.errors if f.code == "resolution-steps"] == [
        "resolution 100x100 is not a multiple of 64: the model cannot take images of that size. Use 64x64 or "
        "128x128, or set enable_bucket = true"]
    for family, ok in (("sdxl", True), (None, True), ("sd2", False)):  # 96: SDXL's 32-step rule; unknown: warned
        plan = build_plan(_cfg(train, enable_bucket=False, resolution=(512, 96)), family=family)
        assert plan.ok is ok, (family, plan.report())
    assert any(f.code == "resolution-steps" and f.level == "warning" and "SDXL accepts 32" in f.message
               for f in build_plan(_cfg(train, enable_bucket=False, resolution=(512, 96))).findings)
    # bucket_no_upscale does nothing without buckets: said, and the enlarging note points at both keys
    d = tmp_path / "small" / "1_x"
    _img(d / "a.png", (64, 64))
    plan = build_plan(_cfg(tmp_path / "small", enable_bucket=False, bucket_no_upscale=True), family="sd1")
    assert any(f.code == "no-upscale-unused" and "works with enable_bucket = true only" in f.message
               for f in plan.findings)
    up = [f.message for f in build_plan(_cfg(tmp_path / "small", enable_bucket=False), family="sd1").findings
          if f.code == "upscaled"]
    assert up and up[0].endswith("a.png; enable_bucket = true with bucket_no_upscale = true avoids it")


def test_validation_split_and_missing_resolution(tmp_path):
    train = _four_train_images(tmp_path)
    plan = build_plan(_cfg(train, validation_split=0.25, validation_seed=0))
    (s,) = plan.subsets
    # sd-scripts split_train_val: training = first ceil(4 * 0.75) = 3 after a seeded shuffle, validation = last
    # round(4 * 0.25) = 1; training samples 3 x 10 = 30
    assert (s.n_images, len(s.validation_images)) == (3, 1)
    assert plan.num_train_images == 30
    assert {e.path.name for e in s.images} | {e.path.name for e in s.validation_images} == {"a.png", "b.png", "c.jpg", "d.png"}
    plan = build_plan(_cfg(train, resolution=None))
    assert not plan.ok and any(f.code == "no-resolution" for f in plan.errors)
    assert "resolution is not set" in plan.report()


def test_caption_and_link_slips_are_said_not_lost(tmp_path):
    """A typo in a caption's name, lines after the first, a blank or UTF-16 caption and a dangling link each lost
    data without a word: each is named now."""
    d = tmp_path / "train" / "5_svs cat"
    for n in ("a", "b", "c", "x", "y"):
        _img(d / f"{n}.png")
    (d / "a.txt").write_text("svs cat, red\nsvs cat, blue\r\n\n", encoding="utf-8")  # two lines: one used
    (d / "b.txt").write_text("svs cat\n", encoding="utf-8")
    (d / "c.txt").write_text("svs cat", encoding="utf-8")
    (d / "x.png.txt").write_text("svs cat", encoding="utf-8")  # (a near miss: x.txt)
    (d / "y.TXT").write_text("svs cat", encoding="utf-8")
    (d / "b .txt").write_text("svs cat", encoding="utf-8")  # (b already has its caption: just unused)
    (d / "orphan.txt").write_text("svs cat", encoding="utf-8")
    (d / "gone.png").symlink_to(tmp_path / "nowhere.png")
    plan = build_plan(_cfg(tmp_path / "train"))
    assert plan.ok, plan.report()
    (s,) = plan.subsets
    assert [e.caption for e in s.images if e.path.name == "a.png"] == ["svs cat, red"]  # (sd-scripts' first line)
    by = {f.code: f.message for f in plan.findings}
    assert ("1 caption file(s) have more than one line, and only the first line is used (as in sd-scripts): a.txt"
            in by["caption-lines"])
    assert by["caption-orphan"] == (
        "'5_svs cat': 4 caption file(s) belong to no image and are not used: b .txt, orphan.txt, x.png.txt (looks "
        "like the caption of x.png: rename it to x.txt), y.TXT (looks like the caption of y.png: rename it to y.txt). "
        "A caption is read from the file named like its image (a.png: a.txt)")
    assert s.unreadable == [("gone.png", f"a link to {tmp_path / 'nowhere.png'}, which does not exist: fix or "
                                         "delete the link")]
    assert "gone.png" in by["unreadable"]
    # blank and UTF-16-without-BOM captions are errors, not "the trigger word is missing"
    (d / "c.txt").write_text(" \n\t\n", encoding="utf-8")
    (d / "b.txt").write_bytes("svs cat".encode("utf-16-le"))
    plan = build_plan(_cfg(tmp_path / "train"))
    msgs = sorted(f.message for f in plan.errors if f.code == "caption-file")
    assert len(msgs) == 2
    assert "holds NUL bytes: it is probably UTF-16 text; re-save it as UTF-8 (image b.png)" in msgs[0]
    assert msgs[1].endswith("holds only blank space; write a caption in it or delete it (image c.png)")
    assert not any(f.code == "missing-trigger" for f in plan.findings)


def test_captions_surely_over_max_token_length_are_said_before_training(tmp_path):
    d = tmp_path / "train" / "5_svs cat"
    _img(d / "long.png")
    _img(d / "short.png")
    (d / "long.txt").write_text("svs cat, " + ", ".join(f"tag{i}" for i in range(40)), encoding="utf-8")
    (d / "short.txt").write_text("svs cat, it's a photo... (red:1.2)", encoding="utf-8")
    # at least 152 tokens by the lower bound (tag12: tag, 1, 2; 39 commas): over 75, under 225
    said = [f.message for f in build_plan(_cfg(tmp_path / "train")).findings if f.code == "caption-too-long"]
    assert len(said) == 1 and said[0].startswith("1 caption(s) are longer than max_token_length (75 tokens) and "
                                                  "their ends will not be trained: long.png (at least ")
    assert said[0].endswith("tokens); set max_token_length = 150 or 225, or shorten them")
    plan = build_plan(_cfg(tmp_path / "train", max_token_length=225))
    assert not any(f.code == "caption-too-long" for f in plan.findings)


def test_an_output_folder_inside_the_dataset_is_said(tmp_path):
    train = _four_train_images(tmp_path)
    said = {}
    for out in (train / "10_svs cat", train, tmp_path / "out", tmp_path / "train_out"):  # (train_out: a sibling)
        plan = build_plan(_cfg(train, output_dir=str(out)))
        assert plan.ok
        said[out.name] = [f.message for f in plan.findings if f.code == "output-in-dataset"]
    assert said["10_svs cat"] == [f"output_dir {str(train / '10_svs cat')!r} is inside the dataset folder "
                                  f"{str(train)!r}: the LoRA files, samples and states would be written among your "
                                  "images. Choose another output folder"]
    assert len(said["train"]) == 1 and said["out"] == said["train_out"] == []


def test_regularisation_captions_that_undo_it_are_said(tmp_path):
    """Reg images in '1_' (no class) train with empty captions, and a reg folder named with the trigger teaches
    the trigger as the class: both ran without a word."""
    train = _four_train_images(tmp_path)
    _img(tmp_path / "reg" / "1_" / "r0.png", (512, 512))
    _img(tmp_path / "reg" / "1_svs cat" / "r1.png", (512, 512))
    plan = build_plan(_cfg(train, reg=tmp_path / "reg"))
    by = {f.code: f.message for f in plan.findings}
    assert by["reg-empty-caption"] == ("'1_': 1 regularisation image(s) train with an empty caption: r0.png. Name "
                                       "the folder after the class (e.g. 1_cat), or give them captions with the "
                                       "class word")
    assert by["reg-trigger"].startswith("'1_svs cat': the trigger word 'svs' is in 1 regularisation caption(s): "
                                        "r1.png.")
    assert by["reg-trigger"].endswith("(a folder named 1_cat, not 1_svs cat)")
    _img(tmp_path / "reg2" / "1_cat" / "r2.png", (512, 512))  # the right way: no finding
    codes = {f.code for f in build_plan(_cfg(train, reg=tmp_path / "reg2")).findings}
    assert not codes & {"reg-empty-caption", "reg-trigger"}


def test_very_large_images_are_said_in_plain_words(tmp_path, monkeypatch, recwarn):
    """Pillow's limits (shrunk here to fit tiny files): over twice the limit it refuses, with its 'decompression
    bomb DOS attack' wording, and between once and twice it only warns, on the console at every decode."""
    d = tmp_path / "train" / "2_svs"
    _img(d / "big.png", (64, 64))      # 4096 pixels: over 3000, under 6000
    _img(d / "huge.png", (100, 100))   # 10000 pixels: over 6000
    _img(d / "ok.png", (40, 40))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)
    plan = build_plan(_cfg(tmp_path / "train", resolution=(64, 64)))
    (s,) = plan.subsets
    assert s.unreadable == [("huge.png", "is too large to open (0 megapixels), beyond the image library's safety "
                                         "limit (0 megapixels): downscale it; a training image needs no more than a "
                                         "few times the training resolution")]
    assert [f.message for f in plan.findings if f.code == "large-image"] == [
        "'2_svs': 1 image(s) are very large (each decode takes seconds and gigabytes; downscale them unless latents "
        "are cached): big.png"]
    load_image_rgb(d / "big.png")
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_an_unreadable_exif_block_is_a_note_not_a_console_warning(tmp_path, recwarn):
    d = tmp_path / "train" / "2_svs"
    _img(d / "a.png", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff")  # (an IFD that runs off the end)
    plan = build_plan(_cfg(tmp_path / "train"))
    assert plan.ok and [f.message for f in plan.findings if f.code == "bad-exif"] == [
        "'2_svs': 1 image(s) have an unreadable EXIF block and are used as stored, without EXIF rotation: a.png"]
    load_image_rgb(d / "a.png")  # (decoded at every step without latent caching)
    assert not [w for w in recwarn if "EXIF" in str(w.message)]


def test_folder_and_file_name_slips(tmp_path):
    """A hidden concept folder, a file named like one, a repeat count that is a date, two images sharing one
    caption: each ran (or was skipped) without a useful word."""
    train = tmp_path / "train"
    _img(train / "10_svs cat" / "a.png")
    _img(train / "10_svs cat" / "a.jpg")
    (train / "10_svs cat" / "a.txt").write_text("svs cat", encoding="utf-8")
    _img(train / ".5_svs dog" / "b.png")
    (train / "3_svs bird.zip").write_bytes(b"PK\x03\x04")
    _img(train / "20240501_svs" / "c.png")
    plan = build_plan(_cfg(train))
    by = {f.code: f.message for f in plan.findings}
    assert "Rename it, e.g. to '5_svs dog'" in by["folder-name"]
    assert by["not-a-folder"].startswith("'3_svs bird.zip' in train_data_dir is named like an image folder but is a "
                                         "file, not a folder; it is ignored")
    assert by["many-repeats"].startswith("folder '20240501_svs' repeats each image 20,240,501 times per epoch")
    assert by["caption-shared"].startswith("'10_svs cat': 1 caption file(s) are read by more than one image of the "
                                           "same name: a.txt (a.jpg, a.png).")


def test_a_batch_no_bucket_can_fill_is_said(tmp_path):
    d = tmp_path / "train" / "1_svs"
    _img(d / "a.png", (512, 512))
    _img(d / "b.png", (512, 512))
    said = [f.message for f in build_plan(_cfg(tmp_path / "train", train_batch_size=8)).findings
            if f.code == "batch-never-full"]
    assert said == ["batch size 8, but no bucket holds more than 2 sample(s) per epoch (images x repeats), so no "
                    "batch is ever full: each step trains on fewer images than set. Lower the batch size to 2 or "
                    "less, or add images or repeats"]
    assert not [f for f in build_plan(_cfg(tmp_path / "train", train_batch_size=2)).findings
                if f.code == "batch-never-full"]


def test_images_left_out_by_bucket_no_upscale_say_why_they_are_too_small(tmp_path):
    """96x64 images at resolution 64 were 'smaller than bucket_reso_steps 64' though they are not: shrunk to the
    resolution's area (78x52) their short side is."""
    d = tmp_path / "train" / "1_svs"
    _img(d / "a.png", (96, 64))
    plan = build_plan(_cfg(tmp_path / "train", resolution=(64, 64), bucket_no_upscale=True, min_bucket_reso=64,
                           max_bucket_reso=128))
    assert [f.message for f in plan.warnings if f.code == "too-small"] == [
        "'1_svs': 1 image(s) have a side smaller than bucket_reso_steps 64 once shrunk to the resolution's area "
        "(64x64), as bucket_no_upscale does with larger images, and are left out: a.png"]
