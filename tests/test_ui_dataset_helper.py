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

    def generate(self, prompt, n, seed, width, height, negative_prompt="", steps=None, on_image=None,
                 should_stop=None):
        out = []
        for i in range(n):
            if should_stop and should_stop():
                break
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
    assert not os.path.exists(lay.reg_image_dir)  # (made with its first image: empty, every check warns of it)
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
    paths = dh.generate_reg_images(fb, str(reg), "a photo of a bear", 3, 7, 72, 64,
                                   on_image=lambda i, n, p: seen.append((i, n)))
    assert [os.path.basename(p) for p in paths] == ["reg_00001.png", "reg_00002.png", "reg_00003.png"]
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert Image.open(paths[0]).size == (72, 64)
    more = dh.generate_reg_images(fb, str(reg), "a photo of a bear", 2, 10, 72, 64)
    assert [os.path.basename(p) for p in more] == ["reg_00004.png", "reg_00005.png"]
    with pytest.raises(UiError, match="not an `N_class` folder"):
        dh.generate_reg_images(fb, str(tmp_path / "reg"), "a bear", 1, 0, 64, 64)
    with pytest.raises(UiError, match="class prompt"):
        dh.generate_reg_images(fb, str(reg), "", 1, 0, 64, 64)
    with pytest.raises(UiError, match="Width 65 is not a multiple of 8.*use 64 or 72"):  # (it came out 64 wide)
        dh.generate_reg_images(fb, str(reg), "a bear", 1, 0, 65, 64)
    made = []
    stopped = dh.generate_reg_images(fb, str(reg), "a bear", 5, 0, 64, 64, on_image=lambda i, n, p: made.append(p),
                                     should_stop=lambda: len(made) >= 2)
    assert [os.path.basename(p) for p in stopped] == ["reg_00006.png", "reg_00007.png"]
    assert dh.default_reg_count(15) == 75


def test_slips_a_user_makes_in_the_helper_are_said(pictures, tmp_path):
    """From a review of the sub-tab: a second Create after fixing the trigger copied everything again and both
    folders trained; unreadable files were copied without a word and stopped 'Caption all' half-way; a trigger
    pasted with its comma was inserted as 'svs,' at every click; a caption saved after its image was deleted made
    an orphan; skipped subfolders and files went unsaid."""
    (pictures / "bad.png").write_bytes(b"not an image")
    res = dh.create_layout(str(pictures), str(tmp_path / "ds"), "svs", "bear", 10)
    text = res.summary()
    assert res.unreadable and res.unreadable[0].startswith("bad.png (cannot be read as an image")
    assert "1 file(s) were NOT copied because they cannot be read as images: bad.png" in text
    assert "Not copied (only the images directly in the folder are): notes.md, sub/ (a subfolder)." in text
    assert not (tmp_path / "ds" / "img" / "10_svs bear" / "bad.png").exists()
    # the trigger fixed, Create again: the first folder is named
    again = dh.create_layout(str(pictures), str(tmp_path / "ds"), "svz", "bear", 10)
    assert again.twins == {"10_svs bear": 4}
    assert ("The training folder also holds '10_svs bear' with 4 of the same pictures: both folders train"
            in again.summary())
    # one trigger rule: a pasted comma is dropped, two words are refused with the fix
    assert dh.clean_trigger(" svs, ") == "svs"
    imgs = dh.training_images(str(tmp_path / "ds" / "img"))[:4]
    dh.write_caption(imgs[1], "a bear")
    assert dh.insert_trigger(imgs, "svs, ") == 1 and dh.insert_trigger(imgs, "svs,") == 0
    assert dh.read_caption(imgs[1]) == "svs, a bear"
    assert dh.read_caption(imgs[0]) == "svs bear, portrait"  # (p0's caption had it already)
    with pytest.raises(UiError, match="must be one word .* write 'svs_bear'"):
        dh.create_layout(str(pictures), str(tmp_path / "ds2"), "svs bear", "dog", 10)
    # Caption all skips a picture it cannot read and goes on
    (tmp_path / "ds" / "img" / "10_svs bear" / "bad.png").write_bytes(b"not an image")
    imgs = dh.training_images(str(tmp_path / "ds" / "img"))
    steps = list(dh.iter_caption(FakeBackend(), [p for p in imgs if "svs bear" in str(p)], "blip", overwrite=True))
    assert [s[2].name for s in steps if s[3] is False] == ["bad.png"] and len(steps) == 5
    assert all(isinstance(s[3], str) for s in steps if s[2].name != "bad.png")
    # a caption for an image that is gone is not written
    gone = next(p for p in imgs if p.name == "p1.png")
    os.remove(gone)
    os.remove(dh.caption_path(gone))
    with pytest.raises(UiError, match=f"{gone.name} is no longer in .*nothing was saved. Press Reload image list"):
        dh.write_caption(gone, "svs bear")
    assert not dh.caption_path(gone).exists()


def test_a_captioner_that_fails_writes_nothing_and_is_not_called_our_bug(tmp_path):
    """Offline, A1111's BLIP answers '<error>' and DeepBooru raises IndexError (their models download on first
    use): the first became the caption 'svs, <error>' with a green message, the second 'a bug in LoRA Studio'."""
    from lib_lora.ui.backend import LocalBackend

    def deepbooru(_):
        raise IndexError("list index out of range")
    be = LocalBackend.__new__(LocalBackend)
    be.interrogators = {"blip": lambda _: "<error>", "deepbooru": deepbooru}
    d = tmp_path / "img" / "5_svs bear"
    d.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(d / "a.png")
    for method, why in (("blip", "the WebUI console shows why"), ("deepbooru", "IndexError: list index out of range")):
        with pytest.raises(UiError) as e:
            list(dh.iter_caption(be, [d / "a.png"], method, trigger="svs"))
        assert why in str(e.value) and "downloads its model on first use" in str(e.value)
        assert "bug" not in str(e.value)
    assert not (d / "a.txt").exists()


def test_a_relative_dataset_folder_is_refused_with_a_full_path_to_use(pictures, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # (the WebUI's install folder, where a relative path would land)
    with pytest.raises(UiError, match=r"Write the full path of the new dataset folder \(e\.g\. .*datasets.mydata\)"):
        dh.create_layout(str(pictures), "mydata", "svs", "bear", 10)
    assert not (tmp_path / "mydata").exists()
    with pytest.raises(UiError, match="Repeats must be whole numbers"):
        dh.plan_layout(str(tmp_path / "d"), "svs", "bear", float("inf"))


def test_a_full_disk_leaves_no_truncated_picture_or_caption(pictures, tmp_path, monkeypatch):
    """Copying the pictures, writing a caption and making reg images write through a temp file: when the disk
    fills half-way the error is raised (the tab shows it) and neither a truncated picture (which a run would train
    on) nor a temp file stays; an existing caption keeps its text."""
    import errno
    import shutil

    def half_then_full(*a, **k):
        f = real_fdopen(*a, **k)
        write = f.write

        def w(data):
            write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        f.write = w
        return f
    real_fdopen = os.fdopen

    def copy_half(src, dst, *a, **k):
        with open(src, "rb") as s, open(dst, "wb") as d:
            d.write(s.read()[:100])
        raise OSError(errno.ENOSPC, "No space left on device")
    dest = tmp_path / "dataset"
    with monkeypatch.context() as m:
        m.setattr(shutil, "copy2", copy_half)
        with pytest.raises(OSError):
            dh.create_layout(str(pictures), str(dest), "svs", "bear", 10)
    img_dir = dest / "img" / "10_svs bear"
    assert [n for n in os.listdir(img_dir) if n.endswith((".png", ".tmp"))] == []
    res = dh.create_layout(str(pictures), str(dest), "svs", "bear", 10)  # room again: all of them, none "changed"
    assert sorted(res.copied) == ["p0.png", "p1.png", "p2.png", "p3.png"] and res.conflicts == []

    image = img_dir / "p0.png"
    with monkeypatch.context() as m:
        m.setattr(os, "fdopen", half_then_full)
        with pytest.raises(OSError):
            dh.write_caption(image, "svs bear, a much longer caption that does not fit")
        with pytest.raises(OSError):
            dh.generate_reg_images(FakeBackend(), str(dest / "reg" / "1_bear"), "a photo of a bear", 2, 7, 64, 64)
    assert dh.read_caption(image) == "svs bear, portrait"
    assert sorted(os.listdir(img_dir)) == ["p0.png", "p0.txt", "p1.png", "p2.png", "p3.png"]
    assert os.listdir(dest / "reg" / "1_bear") == []
