"""Headless checkpoint loading: offline tokenizer, SD1/SD2 from .safetensors via ldm, clear refusals."""

import os

import pytest
import torch

import models
from lib_lora.formats.safetensors_io import save_file_atomic
from lib_lora.host.headless import CheckpointError, checkpoint_family, load_checkpoint


class PickledObject:
    """Any class instance: weights_only loading refuses it (it could run code when unpickled)."""


def _save(model, path, drop=(), rename=None):
    sd = {}
    for k, v in model.state_dict().items():
        if any(k.startswith(d) for d in drop):
            continue
        sd[rename(k) if rename else k] = v.contiguous().clone()
    save_file_atomic(sd, str(path))
    return sd


# ----------------------------------------------------------------------------------------------- tokenizer

def test_tokenizer_matches_open_clips_own_bpe(tmp_path):
    from open_clip.tokenizer import SimpleTokenizer

    from lib_lora.host.tokenizer import clip_tokenizer, tokenizer_dir
    tok = clip_tokenizer()
    ref = SimpleTokenizer()  # open_clip's pure-python BPE: an independent implementation
    for p in ["a photo of a cat", "<lora:x:0.5> (red hair:1.2), [blue|green]", "MiXeD\tcase  ÉTÉ 🐱 42",
              "1girl, solo, 123456", ""]:
        assert tok(p)["input_ids"] == [49406] + ref.encode(p) + [49407], p
    assert tok.pad_token_id == 49407 and len(tok) == 49408
    assert os.path.isfile(os.path.join(tokenizer_dir(), "merges.txt"))
    # a second cache location builds the same files
    other = tokenizer_dir(str(tmp_path))
    assert open(os.path.join(other, "vocab.json"), "rb").read() == \
        open(os.path.join(tokenizer_dir(), "vocab.json"), "rb").read()


# ----------------------------------------------------------------------------------------------- SD1

@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory):
    from lib_lora.host.tiny import make_tiny_sd15
    m = make_tiny_sd15(seed=4)
    path = tmp_path_factory.mktemp("ckpt") / "tiny-sd15.safetensors"
    _save(m, path)
    return m, path


def test_sd1_loads_bit_exact_and_runs_like_the_original(sd1_file):
    m, path = sd1_file
    host = load_checkpoint(path)
    assert host.family == "sd1" and host.parameterization == "eps"
    assert host.model_name == "tiny-sd15" and len(host.model_legacy_hash) == 8
    assert host.load_report.missing == [] and host.load_report.unexpected == []
    assert "embedded v1-inference.yaml" in host.load_report.summary()
    got = host.sd_model.state_dict()
    want = m.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not any(p.requires_grad for p in host.sd_model.parameters())
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        c1 = m.cond_stage_model.encode(["a cat"])
        c2 = host.sd_model.cond_stage_model.encode(["a cat"])
        assert torch.equal(c1, c2)
        assert torch.equal(m.model.diffusion_model(x, torch.tensor([300]), context=c1),
                           host.sd_model.model.diffusion_model(x, torch.tensor([300]), context=c2))
    # sha256 is lazy and equals the file's
    import hashlib
    assert host.model_sha256 == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert checkpoint_family(path) == "sd1"


def test_missing_weights_are_listed(sd1_file, tmp_path):
    m, _ = sd1_file
    path = tmp_path / "no-vae.safetensors"
    _save(m, path, drop=("first_stage_model.decoder.",))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "no-vae.safetensors" in msg and "VAE" in msg and "first_stage_model.decoder." in msg


def test_unexpected_keys_and_ema_are_noted_and_old_te_keys_renamed(sd1_file, tmp_path):
    m, _ = sd1_file
    path = tmp_path / "old.safetensors"
    sd = _save(m, path, rename=lambda k: k.replace("cond_stage_model.transformer.text_model.",
                                                   "cond_stage_model.transformer."))
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["some_extra_head.weight"] = torch.zeros(2)
    save_file_atomic(sd, str(path))
    host = load_checkpoint(path)
    notes = " ".join(host.notes)
    assert "EMA" in notes and "some_extra_head.weight" in notes and "renamed" in notes


def test_ckpt_is_read_with_weights_only(sd1_file, tmp_path):
    m, _ = sd1_file
    good = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": m.state_dict()}, good)
    assert load_checkpoint(good).family == "sd1"
    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "callback": PickledObject()}, bad)  # like Lightning callbacks in old .ckpt
    with pytest.raises(CheckpointError, match="safely"):
        load_checkpoint(bad)


def test_yaml_beside_the_checkpoint_wins(sd1_file, tmp_path):
    import shutil

    import yaml

    from lib_lora.host.tiny import tiny_sd15_config
    _, path = sd1_file
    dst = tmp_path / "withyaml.safetensors"
    shutil.copy(path, dst)
    cfg = tiny_sd15_config()
    cfg["params"]["unet_config"]["params"]["num_heads"] = 4  # not stored in weights: only a yaml can say it
    (tmp_path / "withyaml.yaml").write_text(yaml.safe_dump({"model": cfg}), encoding="utf-8")
    host = load_checkpoint(dst)
    assert host.load_report.config_source.endswith("withyaml.yaml")
    attn = host.sd_model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1
    assert attn.heads == 4


# ----------------------------------------------------------------------------------------------- SD2 / SDXL / others

def test_sd2_v_model_loads_with_the_flag(tmp_path):
    m = models.make_sd2(seed=1)
    path = tmp_path / "tiny-sd2.safetensors"
    _save(m, path)
    host = load_checkpoint(path, v_parameterization=True)
    assert host.family == "sd2" and host.parameterization == "v"
    with torch.no_grad():
        tokens = torch.randint(0, 49407, (1, 77), generator=torch.Generator().manual_seed(0))
        assert torch.equal(m.cond_stage_model.encode_with_transformer(tokens),
                           host.sd_model.cond_stage_model.encode_with_transformer(tokens))
    # without the flag A1111's UNet test decides, and says so
    auto = load_checkpoint(path)
    assert any("detected (A1111's test" in n for n in auto.notes)


def test_sdxl_without_webui_says_what_to_do(tmp_path):
    m = models.make_sdxl(seed=0)
    path = tmp_path / "tiny-xl.safetensors"
    sd = {k.replace(".wrapped.", "."): v.contiguous().clone() for k, v in m.state_dict().items()
          if not k.startswith("cond_stage_model.")}
    save_file_atomic(sd, str(path))
    assert checkpoint_family(path) == "sdxl"
    with pytest.raises(CheckpointError, match=r"--webui PATH.*generative-models"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="repositories/generative-models"):
        load_checkpoint(path, webui=str(tmp_path))


def test_non_sd_files_are_refused(tmp_path):
    p = tmp_path / "flux.safetensors"
    save_file_atomic({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2)}, str(p))
    with pytest.raises(CheckpointError, match="Flux"):
        load_checkpoint(p)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown checkpoint type"):
        load_checkpoint(tmp_path / "model.onnx")


def test_external_vae_replaces_the_vae_and_changes_the_cache_id(sd1_file, tmp_path):
    from lib_lora.host.tiny import make_tiny_sd15
    _, path = sd1_file
    host = load_checkpoint(path)
    other = make_tiny_sd15(seed=9).first_stage_model.state_dict()
    vae_file = tmp_path / "vae.safetensors"
    save_file_atomic({k: v.contiguous() for k, v in other.items()}, str(vae_file))
    before = host.model_id
    assert "VAE replaced" in host.load_vae(vae_file)
    got = host.sd_model.first_stage_model.state_dict()
    assert all(torch.equal(got[k], other[k]) for k in other)
    assert host.model_id != before and host.model_id.startswith(before)
    bad = tmp_path / "diffusers-vae.safetensors"
    save_file_atomic({"encoder.down_blocks.0.resnets.0.conv1.weight": torch.zeros(1)}, str(bad))
    with pytest.raises(CheckpointError, match="diffusers-format"):
        host.load_vae(bad)
