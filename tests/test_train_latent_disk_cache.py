"""cache_latents_to_disk: a second run takes the latents (and SDXL's size numbers) from the cache without decoding
the images, gives the same LoRA as the first, and never trusts a damaged or outdated file."""
import glob
import os

import pytest
import torch

import models
import train_data
from lib_lora.formats.safetensors_io import load_tensors, read_metadata, save_file_atomic
from lib_lora.host.base import ModelHost
from lib_lora.train import trainer as T
from lib_lora.train.config import parse_train_config
from lib_lora.train.run import plan_for


def _run(model, family_dir, img, monkeypatch, **kw):
    calls = []
    real = T.load_image_rgb
    monkeypatch.setattr(T, "load_image_rgb", lambda p: calls.append(p) or real(p))
    c = {"train_data_dir": img, "resolution": 64, "enable_bucket": True, "min_bucket_reso": 32,
         "output_dir": str(family_dir / "out"), "output_name": "c", "network_dim": 4, "learning_rate": 1e-3,
         "max_train_steps": 3, "seed": 4, "save_precision": "float", "cache_latents": True,
         "cache_latents_to_disk": True}
    c.update(kw)
    cfg = parse_train_config(c, base_dir=str(family_dir))
    host = ModelHost(model, "m")
    tr = T.Trainer(host, cfg, plan_for(host, cfg))
    res = tr.run()
    assert res.status == "done"
    return tr, res, calls


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_second_run_reads_no_image_and_trains_the_same(family, tmp_path, monkeypatch):
    model = models.make_sd1(seed=3) if family == "sd1" else models.make_sdxl(seed=3)
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=3, repeats=1, size=(64, 40))
    tr1, first, calls1 = _run(model, tmp_path, img, monkeypatch)
    files = sorted(glob.glob(str(tmp_path / "out" / ".lora-studio-cache" / "latents" / "*.safetensors")))
    assert len(calls1) == 3 and len(files) == 3
    assert all("size_cond" in read_metadata(f) for f in files)
    tr2, second, calls2 = _run(model, tmp_path, img, monkeypatch)
    assert calls2 == []  # every latent and its size numbers came from the cache
    assert tr2.size_cond == tr1.size_cond and tr1.size_cond[(0, False)][0] == (40, 64)  # original h, w
    a, b = load_tensors(first.final), load_tensors(second.final)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_damaged_or_older_cache_files_are_rebuilt(tmp_path, monkeypatch):
    model = models.make_sd1(seed=3)
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=1)
    _, first, _ = _run(model, tmp_path, img, monkeypatch)
    files = sorted(glob.glob(str(tmp_path / "out" / ".lora-studio-cache" / "latents" / "*.safetensors")))
    with open(files[0], "wb") as f:
        f.write(b"not a safetensors file")
    z = load_tensors(files[1])["latent"]
    save_file_atomic({"latent": z}, files[1], {"image": "c1.png"})  # as an older version wrote it
    tr, second, calls = _run(model, tmp_path, img, monkeypatch)
    assert len(calls) == 2  # both images read again: one to re-encode, one for its size numbers
    assert any(n.startswith(f"latent cache file {os.path.basename(files[0])} in ") and n.endswith(
        "is damaged (a write cut short?); its image is encoded again and the file rewritten") for n in tr.notes), tr.notes
    assert not any("Download it again" in n for n in tr.notes)  # (load_tensors' advice is for downloaded files)
    assert all("size_cond" in read_metadata(f) for f in files)  # both rewritten in the current form
    a, b = load_tensors(first.final), load_tensors(second.final)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # another resize filter is another latent: not taken from the cache
    _, _, calls = _run(model, tmp_path, img, monkeypatch, resize_interpolation="lanczos")
    assert len(calls) == 2
    assert os.path.isdir(tmp_path / "out" / ".lora-studio-cache")
