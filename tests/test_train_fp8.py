"""FP8 base weights: sd-scripts' fp8_base / fp8_base_unet, and models the WebUI keeps in FP8 (its "FP8 weight"
setting, sd_models.load_model_weights: every Linear/Conv2d outside the VAE `.to(torch.float8_e4m3fn)`).

The reference is closed-form: a layer stored in FP8 computes, under bf16 autocast, with its weight rounded to FP8
(every e4m3 value is a bf16 value). So training on FP8 storage must give bit for bit the LoRA that training gives on
a copy of the model whose weights were rounded through FP8 beforehand, computed in bf16 autocast.
"""

import pytest
import torch
import torch.nn as nn

import models
import train_data
from lib_lora.formats.safetensors_io import load_tensors, read_metadata
from lib_lora.host.base import ModelHost
from lib_lora.train.config import parse_train_config
from lib_lora.train.fp8 import fp8_storage
from lib_lora.train.run import plan_for
from lib_lora.train.sampling import SamplePrompt, generate
from lib_lora.train.trainer import Trainer

FP8 = torch.float8_e4m3fn


def _layers(model, with_vae=False):
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and (with_vae or not name.startswith("first_stage_model")):
            yield name, m


def _a1111_fp8(model):
    """What the WebUI's FP8 weight setting does to a loaded model (weights and biases, VAE excepted)."""
    for _, m in _layers(model):
        m.to(FP8)
    return model


def _rounded(model, biases: bool):
    """The reference: the same layers rounded through FP8 but kept in their own dtype."""
    with torch.no_grad():
        for _, m in _layers(model):
            for p in [m.weight] + ([m.bias] if biases and m.bias is not None else []):
                p.copy_(p.to(FP8).to(p.dtype))
    return model


def _run(model, tmp_path, img, sample_fn=None, **kw):
    cfg = parse_train_config(train_data.job_config(img, tmp_path / "out", **{"max_train_steps": 3, **kw}),
                             base_dir=str(tmp_path))
    host = ModelHost(model, "m")
    tr = Trainer(host, cfg, plan_for(host, cfg), sample_fn=sample_fn)
    res = tr.run()
    assert res.status == "done"
    return res, load_tensors(res.final)


def _same(a: dict, b: dict):
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


def test_fp8_storage_stores_linear_and_conv_weights_and_gives_them_back_exactly():
    model = models.make_sd1(seed=4)
    before = models.model_state_hash(model)
    unet = model.model.diffusion_model
    params = {n: p for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"):
        with fp8_storage([unet, model.cond_stage_model]) as n:
            layers = list(_layers(model))
            assert n == len(layers) > 0
            assert all(m.weight.dtype == FP8 for _, m in layers)
            # biases, norms, embeddings and the VAE keep their dtype (as A1111's FP8 weight)
            assert all(m.bias is None or m.bias.dtype == torch.float32 for _, m in layers)
            assert unet.out[0].weight.dtype == torch.float32  # GroupNorm
            assert all(m.weight.dtype == torch.float32 for _, m in _layers(model.first_stage_model, True))
            raise RuntimeError("boom")
    assert models.model_state_hash(model) == before
    assert all(p is params[n] for n, p in model.named_parameters())  # the same Parameter objects


@pytest.mark.parametrize("net", ["lora", "loha"])
def test_fp8_base_trains_as_on_fp8_rounded_weights_and_gives_the_model_back(tmp_path, net):
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=2)
    kw = {"lora": {}, "loha": {"network_module": "lycoris.kohya", "network_args": ["algo=loha"]}}[net]
    model = models.make_sd1(seed=5)
    before = models.model_state_hash(model)
    seen = []

    def sample_fn(epoch, step, should_cancel=None):  # (inside the job: the weights are FP8 now)
        seen.append(model.model.diffusion_model.time_embed[0].weight.dtype)
        seen.append(model.cond_stage_model.transformer.text_model.encoder.layers[0].mlp.fc1.weight.dtype)
        return []

    res, got = _run(model, tmp_path / "a", img, sample_fn, fp8_base=True, mixed_precision="bf16",
                    sample_every_n_epochs=1, **kw)
    assert models.model_state_hash(model) == before
    assert seen[:2] == [FP8, FP8]
    assert any(n.startswith("fp8_base: ") and "UNet and text encoder are stored in FP8" in n for n in res.notes)
    md = read_metadata(res.final)
    assert md["ss_fp8_base"] == "True" and md["ss_fp8_base_unet"] == "False"
    ref, want = _run(_rounded(models.make_sd1(seed=5), biases=False), tmp_path / "b", img, mixed_precision="bf16",
                     **kw)
    _same(got, want)
    assert [l for _, l in res.losses] == [l for _, l in ref.losses]


def test_fp8_base_dora_starts_from_the_full_precision_norm(tmp_path):
    """sd-scripts builds the network before it casts the model to FP8, so LyCORIS' DoRA magnitude is the norm of
    the full-precision weight; with a negligible LR the saved magnitudes show where they started."""
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=2)
    kw = {"network_module": "lycoris.kohya", "network_args": ["algo=locon", "dora_wd=True"],
          "mixed_precision": "bf16", "max_train_steps": 1, "learning_rate": 1e-12, "text_encoder_lr": 0}
    _, got = _run(models.make_sd1(seed=5), tmp_path / "a", img, fp8_base=True, **kw)
    _, full = _run(models.make_sd1(seed=5), tmp_path / "b", img, **kw)
    _, rounded = _run(_rounded(models.make_sd1(seed=5), biases=False), tmp_path / "c", img, **kw)
    mags = [k for k in got if k.endswith("dora_scale")]
    assert len(mags) > 20
    assert all(torch.allclose(got[k], full[k], rtol=1e-6, atol=0) for k in mags)
    assert not all(torch.allclose(got[k], rounded[k], rtol=1e-6, atol=0) for k in mags)


def test_fp8_base_unet_stores_only_the_unet(tmp_path):
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=2)
    model = models.make_sd1(seed=5)
    before = models.model_state_hash(model)
    seen = []

    def sample_fn(epoch, step, should_cancel=None):
        seen.append(model.model.diffusion_model.time_embed[0].weight.dtype)
        seen.append(model.cond_stage_model.transformer.text_model.encoder.layers[0].mlp.fc1.weight.dtype)
        return []

    res, _ = _run(model, tmp_path / "a", img, sample_fn, fp8_base_unet=True, mixed_precision="bf16",
                  sample_every_n_epochs=1)
    assert seen[:2] == [FP8, torch.float32]
    assert models.model_state_hash(model) == before
    assert read_metadata(res.final)["ss_fp8_base_unet"] == "True"


@pytest.mark.parametrize("family, net", [(f, n) for f in ("sd1", "sd2") for n in ("lora", "dora")]
                         + [("sd2", "ia3"), ("sd2", "full"), ("sd2", "glora")])
def test_a_model_the_webui_keeps_in_fp8_is_trained_as_stored(tmp_path, family, net):
    """Was refused ("set FP8 weight to Disable"). SD2 covers open_clip's MultiheadAttention (its out_proj is a
    Linear, so FP8) with the text encoder trained; fp32 asked on a CPU -> bf16 autocast with a note. IA3 scales
    the FP8 weights themselves, GLoRA multiplies them (W·a1·a2); full trains the MHA's FP8 biases too."""
    make = {"sd1": models.make_sd1, "sd2": models.make_sd2}[family]
    lyco = {"dora": ["algo=locon", "dora_wd=True"], "ia3": ["algo=ia3", "preset=ia3"],
            "full": ["algo=full", "preset=attn-only"], "glora": ["algo=glora", "preset=attn-mlp"]}
    kw = {"network_module": "lycoris.kohya", "network_args": lyco[net]} if net in lyco else {}
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=2)
    model = _a1111_fp8(make(seed=6))
    before = models.model_state_hash(model)
    res, got = _run(model, tmp_path / "a", img, mixed_precision="no", **kw)
    assert models.model_state_hash(model) == before
    notes = "\n".join(res.notes)
    assert "UNet and text encoder Linear/Conv weights are stored in FP8 (the WebUI's" in notes
    assert "FP8 weights are computed in bf16 autocast: mixed_precision = bf16 is used" in notes
    assert read_metadata(res.final)["ss_mixed_precision"] == "bf16"
    ref, want = _run(_rounded(make(seed=6), biases=True), tmp_path / "b", img, mixed_precision="bf16", **kw)
    _same(got, want)
    if family == "sd2":
        assert any(k.startswith("lora_te_") and f"self_attn_{'k' if net == 'ia3' else 'out'}_proj" in k for k in got)
    if net == "full":
        assert float(got["lora_te_text_model_encoder_layers_0_self_attn_q_proj.diff_b"].abs().max()) > 0


def test_samples_from_fp8_weights(tmp_path):
    """The headless sampler computes FP8 weights in bf16 autocast (before: a dtype error): the image is the one
    the FP8-rounded model gives in bf16, within a few grey levels of the fp32 one."""
    import numpy as np
    sp = SamplePrompt(prompt="svs cat", negative="", width=64, height=64, steps=3, seed=1, cfg_scale=5.0)
    fp8 = generate(ModelHost(_a1111_fp8(models.make_sd1(seed=7)), "m"), [sp])[0][0]
    full = generate(ModelHost(_rounded(models.make_sd1(seed=7), biases=True), "m"), [sp])[0][0]
    a, b = (np.asarray(i).astype(int) for i in (fp8, full))
    assert a.shape == b.shape and np.abs(a - b).mean() < 8, np.abs(a - b).mean()


def test_sdxl_fp8_base_with_both_text_encoders_trained(tmp_path):
    """SDXL: both text encoders (CLIP-L and the open_clip one with MultiheadAttention) and the UNet in FP8,
    LoRA on all three, against the FP8-rounded model; the model comes back bit for bit."""
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=2)
    model = models.make_sdxl(seed=2)
    before = models.model_state_hash(model)
    res, got = _run(model, tmp_path / "a", img, fp8_base=True, mixed_precision="bf16", max_train_steps=2)
    assert models.model_state_hash(model) == before
    assert any(k.startswith("lora_te2_") and "out_proj" in k for k in got)
    _, want = _run(_rounded(models.make_sdxl(seed=2), biases=False), tmp_path / "b", img, mixed_precision="bf16",
                   max_train_steps=2)
    _same(got, want)
