"""sd-scripts' fine-tuning datasets (in_json, dataset_config metadata_file): images found by their metadata keys,
captions and tags from the JSON, as FineTuningDataset reads them (train_util.py @48d368fa)."""

import json
import os

import pytest

import models
import train_data
from lib_lora.formats.safetensors_io import read_metadata
from lib_lora.host.base import ModelHost
from lib_lora.train.config import TrainConfigError, load_dataset_config, parse_train_config
from lib_lora.train.dataset import build_plan
from lib_lora.train.run import run_training


def _images(root):
    d = root / "imgs"
    d.mkdir()
    train_data.concept_image(0).save(d / "a.png")
    train_data.concept_image(1).save(d / "b.jpg")
    train_data.concept_image(2).save(d / "c.png")
    return d


def _meta(root, d):
    md = {"a": {"caption": "a photo", "tags": "red, square"},
          "b.jpg": {"tags": "blue"},  # (a file name in image_dir: read here, sd-scripts would look in its cwd)
          str(d / "c.png"): {"caption": "line1\nline2", "tags": "t1\nt2"}}
    (root / "meta.json").write_text(json.dumps(md))
    return root / "meta.json"


def _cfg(root, **kw):
    c = {"train_data_dir": str(root / "imgs"), "in_json": str(root / "meta.json"), "resolution": 64,
         "output_dir": str(root / "out"), "output_name": "ft", "network_dim": 4, "network_alpha": 2, "seed": 1,
         "max_train_steps": 2}
    c.update(kw)
    c = {k: v for k, v in c.items() if v is not None}
    return parse_train_config(c, base_dir=str(root))


def test_captions_and_tags_join_as_sd_scripts_does(tmp_path):
    d = _images(tmp_path)
    _meta(tmp_path, d)
    plan = build_plan(_cfg(tmp_path, dataset_repeats=3), family="sd1")
    assert not plan.errors, [f.message for f in plan.errors]
    (sub,) = plan.subsets
    # a key is a file stem in train_data_dir (any image extension) or a full path; caption + separator + tags;
    # tags alone when there is no caption (and then not counted as tags)
    got = {e.path.name: e.caption for e in sub.images}
    assert got == {"a.png": "a photo,red, square", "b.jpg": "blue", "c.png": "line1\nline2,t1\nt2"}
    assert sub.name == "meta.json" and sub.repeats == 3 and sub.samples == 9
    assert sub.tag_counts == {"red": 1, "square": 1, "t1\nt2": 1}
    md = plan.ss_dataset_metadata()
    assert json.loads(md["ss_dataset_dirs"]) == {"meta.json": {"n_repeats": 3, "img_count": 3}}
    assert json.loads(md["ss_tag_frequency"]) == {"meta.json": {"red": 1, "square": 1, "t1\nt2": 1}}
    assert "in_json:" in plan.report() and "captions from the metadata" in plan.report()
    # enable_wildcard: tags on one line, appended to every caption line
    plan = build_plan(_cfg(tmp_path, enable_wildcard=True), family="sd1")
    got = {e.path.name: e.caption for e in plan.subsets[0].images}
    assert got["c.png"] == "line1,t1,t2\nline2,t1,t2" and got["a.png"] == "a photo,red, square"
    # tags as a list (another tagger's JSON) read as those tags
    (tmp_path / "list.json").write_text(json.dumps({"a": {"caption": "x", "tags": ["red", "square"]}}))
    plan = build_plan(_cfg(tmp_path, in_json=str(tmp_path / "list.json")), family="sd1")
    assert [e.caption for e in plan.subsets[0].images] == ["x,red, square"]


def test_mistakes_are_said(tmp_path):
    d = _images(tmp_path)
    meta = _meta(tmp_path, d)
    md = json.loads(meta.read_text())
    md["gone"] = {"caption": "x"}
    (d / "cached.npz").write_bytes(b"")
    md["cached"] = {"caption": "y"}
    meta.write_text(json.dumps(md))
    plan = build_plan(_cfg(tmp_path, reg_data_dir=str(d)), family="sd1")
    (err,) = [f.message for f in plan.errors]
    assert "1 metadata key(s) have no image in" in err and ": gone." in err and "no cached latent" in err
    # (an empty .npz in the image's place is named as unreadable, not taken for a missing image)
    (bad,) = [f.message for f in plan.findings if f.code == "unreadable"]
    assert "cached.npz (cannot be read as .npz" in bad
    assert any(f.code == "in-json-reg" for f in plan.findings)
    plan = build_plan(_cfg(tmp_path, in_json=str(tmp_path / "nope.json")), family="sd1")
    assert "does not exist" in plan.errors[0].message and "merge_captions_to_metadata" in plan.errors[0].message
    (tmp_path / "bad.json").write_text("[1, 2]")
    plan = build_plan(_cfg(tmp_path, in_json=str(tmp_path / "bad.json")), family="sd1")
    assert "is not sd-scripts' metadata" in plan.errors[0].message
    (d / "cached.npz").unlink()
    md = {k: {**v, "train_resolution": [64, 64]} for k, v in json.loads(meta.read_text()).items()
          if k not in ("gone", "cached")}
    meta.write_text(json.dumps(md))
    plan = build_plan(_cfg(tmp_path), family="sd1")
    assert not plan.errors and any(f.code == "metadata-buckets" for f in plan.findings)


def test_dataset_config_metadata_subsets(tmp_path):
    d = _images(tmp_path)
    _meta(tmp_path, d)
    (tmp_path / "ds.toml").write_text('[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 64\n'
                                      '[[datasets.subsets]]\nimage_dir = "imgs"\nmetadata_file = "meta.json"\n'
                                      'num_repeats = 2\n')
    specs, _ = load_dataset_config(tmp_path / "ds.toml")
    sub = specs[0].subsets[0]
    assert sub.metadata_file == str(tmp_path / "meta.json") and sub.num_repeats == 2
    plan = build_plan(_cfg(tmp_path, in_json=None, train_data_dir=None, dataset_config=str(tmp_path / "ds.toml")),
                      family="sd1")
    assert not plan.errors and plan.subsets[0].samples == 6
    ds = json.loads(plan.ss_dataset_metadata()["ss_datasets"])
    assert ds[0]["is_dreambooth"] is False
    assert ds[0]["subsets"][0]["metadata_file"] == "meta.json" and ds[0]["subsets"][0]["image_dir"] == "imgs"
    assert "class_tokens" not in ds[0]["subsets"][0]
    # sd-scripts' rules: no DreamBooth keys in a fine-tuning subset, no mixing in one dataset
    (tmp_path / "bad.toml").write_text('[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "imgs"\n'
                                       'metadata_file = "meta.json"\nclass_tokens = "cat"\n'
                                       '[[datasets.subsets]]\nimage_dir = "imgs2"\n')
    with pytest.raises(TrainConfigError) as e:
        load_dataset_config(tmp_path / "bad.toml")
    assert "cannot be mixed in one dataset" in str(e.value)
    assert "class_tokens cannot be set in a fine-tuning subset" in str(e.value)
    (tmp_path / "level.toml").write_text('[general]\nmetadata_file = "meta.json"\n[[datasets]]\nresolution = 64\n'
                                         '[[datasets.subsets]]\nimage_dir = "imgs"\n')
    with pytest.raises(TrainConfigError, match=r"\[general\]: metadata_file is not allowed here; it belongs in "
                                               r"\[\[datasets.subsets\]\]"):
        load_dataset_config(tmp_path / "level.toml")


def test_in_json_trains_and_writes_sd_scripts_metadata(tmp_path):
    d = _images(tmp_path)
    _meta(tmp_path, d)
    res = run_training(ModelHost(models.make_sd1(seed=3), "m"), _cfg(tmp_path, dataset_repeats=2))
    assert res.status == "done" and res.steps == 2
    md = read_metadata(res.final)
    assert json.loads(md["ss_dataset_dirs"]) == {"meta.json": {"n_repeats": 2, "img_count": 3}}
    assert md["ss_num_train_images"] == "6" and os.path.basename(res.final) == "ft.safetensors"


def test_modelspec_resolution_comes_from_the_dataset_toml(tmp_path):
    """With the resolution in a dataset TOML (none in the config), the file said 512x512 whatever was trained."""
    d = _images(tmp_path)
    _meta(tmp_path, d)
    (tmp_path / "ds.toml").write_text('[[datasets]]\nresolution = [64, 128]\nenable_bucket = false\n'
                                      '[[datasets.subsets]]\nimage_dir = "imgs"\nmetadata_file = "meta.json"\n')
    cfg = _cfg(tmp_path, in_json=None, train_data_dir=None, resolution=None, max_train_steps=1,
               dataset_config=str(tmp_path / "ds.toml"), clip_skip=1, min_timestep=100)
    res = run_training(ModelHost(models.make_sd1(seed=3), "m"), cfg)
    assert res.status == "done", res.error
    md = read_metadata(res.final)
    assert md["modelspec.resolution"] == "64x128" and "ss_resolution" not in md  # (sd-scripts omits it with a TOML)
    # written as sd-scripts' sai_model_spec writes them: clip_skip whenever given, the timestep range when set
    assert md["modelspec.encoder_layer"] == "1" and md["modelspec.timestep_range"] == "100,1000"
    assert md["ss_resize_interpolation"] == "None"  # (sd-scripts writes it at the top level too)


# ---- keys whose images are gone: sd-scripts' cached latents (.npz) ------------------------------------------------

REF = os.path.join(os.path.dirname(__file__), "data", "sd_scripts_latents")


def _ref_arrays():
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "sds_latents_ref", os.path.join(os.path.dirname(__file__), "data", "sd_scripts_latents_reference.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sd_scripts_latent_files_are_read_as_sd_scripts_wrote_them(tmp_path):
    """Files written by sd-scripts' own SdSdxlLatentsCachingStrategy (tests/data/sd_scripts_latents_reference.py):
    a key without an image trains on its latent, bucketed at the latent's size; a latent for the other family or of
    a size the UNet cannot take is refused with what to do."""
    import shutil

    import numpy as np
    from lib_lora.train.sd_latents import load_latent

    ref = _ref_arrays()
    d = tmp_path / "imgs"
    shutil.copytree(REF, d)
    (tmp_path / "meta.json").write_text(json.dumps({"cat": {"caption": "a cat"}, "old": {"tags": "x",
                                                    "train_resolution": [64, 64]}}))
    plan = build_plan(_cfg(tmp_path, flip_aug=True, alpha_mask=True, random_crop=True, resolution=128), family="sd1")
    assert not plan.errors, [f.message for f in plan.errors]
    got = {e.path.name: e for e in plan.subsets[0].images}
    assert set(got) == {"cat_0100x0200_sd.npz", "old.npz"}
    cat, old = got["cat_0100x0200_sd.npz"], got["old.npz"]
    # the size from the file name (what sd-scripts buckets by), the bucket from the latent
    assert cat.size == (100, 200) and cat.bucket == (64, 128) and old.bucket == (64, 64)
    assert cat.latent.original_size == (100, 200) and cat.latent.crop_ltrb == (2, 0, 66, 128)
    assert cat.latent.flipped and cat.latent.alpha and not old.latent.flipped and old.latent.made_for is None
    assert cat.caption == "a cat" and old.caption == "x"
    z, zf, a = ref.arrays("cat", (64, 128))
    lz, la = load_latent(cat.latent, False)
    assert np.array_equal(lz, z) and np.array_equal(la, a)
    lz, la = load_latent(cat.latent, True)
    assert np.array_equal(lz, zf) and np.array_equal(la, a[:, ::-1])
    (note,) = [f for f in plan.findings if f.code == "cached-latents"]
    assert note.level == "warning" and "random_crop" in note.message and "flip_aug: 1 have no flipped" in note.message
    assert "alpha_mask: 1 hold no alpha mask" in note.message and "old.npz" in note.message
    # images present win over their latents; no note on train_resolution for a latent
    assert not any(f.code == "metadata-buckets" for f in plan.findings)
    # SDXL latent on an SD1 model, a 96-pixel latent on SD1: refused with what to do
    (tmp_path / "meta.json").write_text(json.dumps({"dog": {}, "odd": {}, "cat": {}}))
    plan = build_plan(_cfg(tmp_path, resolution=128), family="sd1")
    msgs = {f.code: f.message for f in plan.errors}
    assert "were made for SDXL" in msgs["cached-latents-family"] and "dog_0128x0064_sdxl.npz" in msgs["cached-latents-family"]
    assert "multiples of 64" in msgs["cached-latents-size"] and "odd_0096x0096_sd.npz (96x96)" in msgs["cached-latents-size"]
    # on SDXL the same files: dog and odd (multiple of 32) are fine, cat (an SD latent) is not
    plan = build_plan(_cfg(tmp_path, resolution=128), family="sdxl")
    assert [f.code for f in plan.errors] == ["cached-latents-family"] and "cat_0100x0200_sd.npz" in plan.errors[0].message
    # damaged or foreign .npz files are left out and named; a key with neither image nor latent is an error
    np.savez(d / "junk.npz", arr_0=np.zeros(3))
    (d / "bad_0064x0064_sd.npz").write_bytes(b"not a zip")
    (tmp_path / "meta.json").write_text(json.dumps({"cat": {}, "junk": {}, "bad": {}, "none": {}}))
    plan = build_plan(_cfg(tmp_path, resolution=128), family="sd1")
    (unreadable,) = [f.message for f in plan.findings if f.code == "unreadable"]
    assert "junk.npz (not an sd-scripts latent cache" in unreadable and "old-format" in unreadable
    assert "bad_0064x0064_sd.npz (cannot be read as .npz" in unreadable
    (err,) = [f.message for f in plan.errors]
    assert "1 metadata key(s) have no image" in err and "no cached latent" in err and ": none." in err


def _encode(host, px):
    """The VAE's latent (mode, unscaled: what sd-scripts stores) of uint8 HxWx3 pixels."""
    import torch
    x = torch.from_numpy(px).permute(2, 0, 1)[None].float().div(127.5).sub(1.0)
    with torch.no_grad():
        post = host.sd_model.first_stage_model.encode(x)
    return (post if isinstance(post, torch.Tensor) else post.mode())[0].numpy()


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_cached_latents_train_exactly_like_their_images(tmp_path, family):
    """A key whose image is replaced by an .npz holding that image's latent (flipped latent, alpha mask, SDXL
    size numbers as sd-scripts writes them) trains to the same LoRA as the image itself."""
    import numpy as np
    import torch
    from PIL import Image
    from lib_lora.formats.safetensors_io import load_tensors

    d = tmp_path / "imgs"
    d.mkdir()
    w = 96 if family == "sdxl" else 64  # (SDXL: a centre crop 16 px from the left, told by crop_ltrb)
    pics = {}
    for i, key in enumerate(("a", "b")):
        rgb = np.asarray(train_data.concept_image(i, w, 64).convert("RGB"))
        alpha = np.tile(np.linspace(40, 255, w, dtype=np.float32).astype(np.uint8), (64, 1))
        Image.fromarray(np.dstack([rgb, alpha])).save(d / f"{key}.png")
        pics[key] = (rgb, alpha)
    (tmp_path / "meta.json").write_text(json.dumps({"a": {"caption": "red"}, "b": {"caption": "blue"}}))
    make = models.make_sdxl if family == "sdxl" else models.make_sd1
    kw = dict(flip_aug=family == "sd1", alpha_mask=True, masked_loss=True, enable_bucket=False, max_train_steps=3,
              train_batch_size=2)
    first = run_training(ModelHost(make(seed=3), "m"), _cfg(tmp_path, output_name="img", **kw))
    assert first.status == "done"
    host = ModelHost(make(seed=3), "m")
    for key, (rgb, alpha) in pics.items():
        left = (w - 64) // 2
        rgb, alpha = rgb[:, left:left + 64], alpha[:, left:left + 64]
        # crop_ltrb as sd-scripts computes it (BucketManager.get_crop_ltrb: the image's aspect fitted into the
        # bucket, not the crop really made)
        fw, fh = (64 * w / 64, 64) if 1 > w / 64 else (64, 64 / (w / 64))
        cl, ct = (64 - fw) // 2, (64 - fh) // 2
        arrays = dict(latents=_encode(host, rgb), original_size=np.array([w, 64]),
                      crop_ltrb=np.array([cl, ct, cl + fw, ct + fh]),
                      alpha_mask=alpha.astype(np.float32) / 255.0)
        if family == "sd1":
            arrays["latents_flipped"] = _encode(host, rgb[:, ::-1].copy())
        # (the keys sd-scripts' save_latents_to_disk writes: see the reference files)
        with np.load(os.path.join(REF, "cat_0100x0200_sd.npz")) as ref:
            assert set(arrays) <= set(ref.files)
        np.savez(d / f"{key}_{w:04d}x0064_{'sdxl' if family == 'sdxl' else 'sd'}.npz", **arrays)
        (d / f"{key}.png").unlink()
    second = run_training(host, _cfg(tmp_path, output_name="npz", **kw))
    assert second.status == "done"
    a, b = load_tensors(first.final), load_tensors(second.final)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=0, atol=1e-6), k
