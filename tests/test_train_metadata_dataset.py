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
    assert "2 metadata key(s) have no image in" in err and "gone, cached" in err and "cached .npz latent" in err
    assert any(f.code == "in-json-reg" for f in plan.findings)
    plan = build_plan(_cfg(tmp_path, in_json=str(tmp_path / "nope.json")), family="sd1")
    assert "does not exist" in plan.errors[0].message and "merge_captions_to_metadata" in plan.errors[0].message
    (tmp_path / "bad.json").write_text("[1, 2]")
    plan = build_plan(_cfg(tmp_path, in_json=str(tmp_path / "bad.json")), family="sd1")
    assert "is not sd-scripts' metadata" in plan.errors[0].message
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
