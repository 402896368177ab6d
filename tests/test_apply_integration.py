"""End to end on the tiny real-ldm models: hand-keyed kohya files → load_network → Patcher → outputs → restore.

The key → layer pairs below are written by hand from A1111's naming (assign_network_names_to_compvis_modules) and
kohya's rules (diffusers block names under `lora_unet_`, HF CLIP names under `lora_te_`); they are not derived from
lib_lora.formats, so a keymap bug shows up here as a miss.
"""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import models
from lib_lora.apply import Patcher, layer_mapping, load_network, model_family
from lib_lora.apply.cache import LRU
from lib_lora.formats.errors import FamilyMismatchError, LoraFileError

torch.set_num_threads(1)

SD1_KEYS = {
    # attention / transformer (LoRA-LierLa)
    "lora_unet_down_blocks_0_attentions_0_proj_in": "diffusion_model_input_blocks_1_1_proj_in",  # 1x1 conv in SD1
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
        "diffusion_model_input_blocks_1_1_transformer_blocks_0_attn1_to_q",
    "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k":
        "diffusion_model_input_blocks_2_1_transformer_blocks_0_attn2_to_k",
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj":
        "diffusion_model_input_blocks_4_1_transformer_blocks_0_ff_net_0_proj",
    "lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_attn1_to_out_0":
        "diffusion_model_input_blocks_8_1_transformer_blocks_0_attn1_to_out_0",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v":
        "diffusion_model_middle_block_1_transformer_blocks_0_attn2_to_v",
    "lora_unet_mid_block_attentions_0_proj_out": "diffusion_model_middle_block_1_proj_out",
    "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_ff_net_2":
        "diffusion_model_output_blocks_5_1_transformer_blocks_0_ff_net_2",
    "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_q":
        "diffusion_model_output_blocks_11_1_transformer_blocks_0_attn1_to_q",
    # resnets / samplers (LoCon, C3Lier)
    "lora_unet_down_blocks_1_resnets_0_conv1": "diffusion_model_input_blocks_4_0_in_layers_2",
    "lora_unet_down_blocks_1_resnets_0_conv_shortcut": "diffusion_model_input_blocks_4_0_skip_connection",
    "lora_unet_up_blocks_0_resnets_2_conv2": "diffusion_model_output_blocks_2_0_out_layers_3",
    "lora_unet_up_blocks_1_upsamplers_0_conv": "diffusion_model_output_blocks_5_2_conv",
    "lora_unet_down_blocks_0_downsamplers_0_conv": "diffusion_model_input_blocks_3_0_op",
    "lora_unet_mid_block_resnets_1_time_emb_proj": "diffusion_model_middle_block_2_emb_layers_1",
    # text encoder
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": "transformer_text_model_encoder_layers_0_self_attn_q_proj",
    "lora_te_text_model_encoder_layers_0_self_attn_out_proj":
        "transformer_text_model_encoder_layers_0_self_attn_out_proj",
    "lora_te_text_model_encoder_layers_1_mlp_fc1": "transformer_text_model_encoder_layers_1_mlp_fc1",
    "lora_te_text_model_encoder_layers_1_mlp_fc2": "transformer_text_model_encoder_layers_1_mlp_fc2",
}

SD2_TE_KEYS = {  # kohya SD2: HF names in the file, OpenCLIP MultiheadAttention in the model
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": ("model_transformer_resblocks_0_attn", "q"),
    "lora_te_text_model_encoder_layers_0_self_attn_k_proj": ("model_transformer_resblocks_0_attn", "k"),
    "lora_te_text_model_encoder_layers_0_self_attn_v_proj": ("model_transformer_resblocks_0_attn", "v"),
    "lora_te_text_model_encoder_layers_0_self_attn_out_proj": ("model_transformer_resblocks_0_attn_out_proj", None),
    "lora_te_text_model_encoder_layers_1_self_attn_q_proj": ("model_transformer_resblocks_1_attn", "q"),  # q+v only
    "lora_te_text_model_encoder_layers_1_self_attn_v_proj": ("model_transformer_resblocks_1_attn", "v"),
    "lora_te_text_model_encoder_layers_1_mlp_fc1": ("model_transformer_resblocks_1_mlp_c_fc", None),
    "lora_unet_down_blocks_0_attentions_0_proj_in": ("diffusion_model_input_blocks_1_1_proj_in", None),  # Linear
}

SDXL_KEYS = {  # kohya SDXL: compvis UNet names, lora_te1_/lora_te2_
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q":
        ("diffusion_model_input_blocks_4_1_transformer_blocks_0_attn1_to_q", None),
    "lora_unet_output_blocks_2_1_proj_out": ("diffusion_model_output_blocks_2_1_proj_out", None),
    "lora_te1_text_model_encoder_layers_0_self_attn_k_proj":
        ("0_transformer_text_model_encoder_layers_0_self_attn_k_proj", None),
    "lora_te2_text_model_encoder_layers_1_self_attn_v_proj": ("1_model_transformer_resblocks_1_attn", "v"),
    "lora_te2_text_model_encoder_layers_1_mlp_fc2": ("1_model_transformer_resblocks_1_mlp_c_proj", None),
}

RANK, ALPHA = 4, 2.0


def _weight(module, part):
    if isinstance(module, nn.MultiheadAttention):
        w = module.in_proj_weight
        d = w.shape[0] // 3
        i = "qkv".index(part)
        return w[i * d:(i + 1) * d]
    return module.weight


def _rows(module, part):
    if part is None:
        return slice(None)
    d = module.in_proj_weight.shape[0] // 3
    i = "qkv".index(part)
    return slice(i * d, (i + 1) * d)


def _lora_tensors(key, weight, g):
    if weight.dim() == 4:
        o, i, kh, kw = weight.shape
        down, up = torch.randn(RANK, i, kh, kw, generator=g), torch.randn(o, RANK, 1, 1, generator=g)
    else:
        o, i = weight.shape
        down, up = torch.randn(RANK, i, generator=g), torch.randn(o, RANK, generator=g)
    return {f"{key}.lora_down.weight": (down * 0.05).half(), f"{key}.lora_up.weight": (up * 0.05).half(),
            f"{key}.alpha": torch.tensor(ALPHA).half()}


def write_kohya(path, keys, mapping, metadata, seed=0):
    """keys: kohya module key -> (A1111 layer, part). Shapes come from the model's own layers."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, (layer, part) in keys.items():
        tensors.update(_lora_tensors(key, _weight(mapping[layer], part), g))
    save_file(tensors, str(path), metadata=metadata)
    return tensors


def expected_delta(tensors, key, shape, m):
    up = tensors[f"{key}.lora_up.weight"].float().flatten(1)
    down = tensors[f"{key}.lora_down.weight"].float().flatten(1)
    alpha = float(tensors[f"{key}.alpha"].float())
    return (m * alpha / RANK * (up @ down)).reshape(shape)


def _with_parts(keys):
    return {k: (v if isinstance(v, tuple) else (v, None)) for k, v in keys.items()}


@pytest.fixture(scope="module")
def sd1():
    return models.make_sd1()


@pytest.fixture(scope="module")
def sd2():
    return models.make_sd2()


@pytest.fixture(scope="module")
def sdxl():
    return models.make_sdxl()


# ------------------------------------------------------------------------------------------------------ layer names

def test_layer_mapping_sd1_names(sd1):
    mp = layer_mapping(sd1)
    assert model_family(sd1) == "sd1"
    for layer in SD1_KEYS.values():
        assert layer in mp, layer
    assert isinstance(mp["diffusion_model_input_blocks_1_1_proj_in"], nn.Conv2d)
    assert isinstance(mp["transformer_text_model_encoder_layers_0_self_attn_q_proj"], nn.Linear)
    assert isinstance(mp["transformer_text_model_final_layer_norm"], nn.LayerNorm)
    assert isinstance(mp["diffusion_model_out_0"], nn.GroupNorm)
    assert mp["diffusion_model_input_blocks_1_1_proj_in"] is sd1.model.diffusion_model.input_blocks[1][1].proj_in


def test_layer_mapping_uses_wrapped_text_encoder(sd1):
    class Hijack(nn.Module):  # A1111's FrozenCLIPEmbedderWithCustomWords keeps the ldm embedder in .wrapped
        def __init__(self, wrapped):
            super().__init__()
            self.wrapped = wrapped

    orig = sd1.cond_stage_model
    try:
        sd1.cond_stage_model = Hijack(orig)
        mp = layer_mapping(sd1)
        assert mp["transformer_text_model_encoder_layers_0_self_attn_q_proj"] is \
            orig.transformer.text_model.encoder.layers[0].self_attn.q_proj
        assert not any(k.startswith("wrapped_") for k in mp)
    finally:
        sd1.cond_stage_model = orig


def test_layer_mapping_sd2_and_sdxl(sd2, sdxl):
    mp2 = layer_mapping(sd2)
    assert model_family(sd2) == "sd2"
    assert isinstance(mp2["model_transformer_resblocks_0_attn"], nn.MultiheadAttention)
    assert mp2["model_transformer_resblocks_0_attn_out_proj"] is mp2["model_transformer_resblocks_0_attn"].out_proj
    assert isinstance(mp2["model_transformer_resblocks_1_mlp_c_fc"], nn.Linear)
    assert isinstance(mp2["diffusion_model_input_blocks_1_1_proj_in"], nn.Linear)
    mpx = layer_mapping(sdxl)
    assert model_family(sdxl) == "sdxl"
    assert isinstance(mpx["0_transformer_text_model_encoder_layers_0_self_attn_q_proj"], nn.Linear)
    assert isinstance(mpx["1_model_transformer_resblocks_1_attn"], nn.MultiheadAttention)
    assert "diffusion_model_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in mpx
    assert not any(k.startswith(("2_", "3_", "4_")) for k in mpx)  # size embedders have no .wrapped


def test_model_family_structural_without_flags(sd1, sd2, sdxl):
    for m, fam in ((sd1, "sd1"), (sd2, "sd2"), (sdxl, "sdxl")):
        saved = {k: getattr(m, k) for k in ("is_sd1", "is_sd2", "is_sdxl")}
        try:
            for k in saved:
                delattr(m, k)
            assert model_family(m) == fam
        finally:
            for k, v in saved.items():
                setattr(m, k, v)


# ------------------------------------------------------------------------------------------------------ end to end

def _unet_out(model):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features,
                      generator=g)
    with torch.no_grad():
        return model.apply_model(x, torch.tensor([500]), ctx)


def _te_out(model):
    with torch.no_grad():
        return model.get_learned_conditioning(["a photo of a cat"])


def test_sd1_kohya_file_full_match_changes_output_and_restores(sd1, tmp_path):
    mp = layer_mapping(sd1)
    keys = _with_parts(SD1_KEYS)
    path = tmp_path / "kohya_sd1.safetensors"
    tensors = write_kohya(path, keys, mp, {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1"})
    h0 = models.model_state_hash(sd1)
    unet0, te0 = _unet_out(sd1), _te_out(sd1)
    w0 = {layer: mp[layer].weight.detach().clone() for layer, _ in keys.values()}

    net = load_network(path, model_family(sd1), cache=None, layer_names=mp)
    assert net.report.total_modules == len(SD1_KEYS)
    assert len(net.report.matched) == len(SD1_KEYS) and not net.report.unmatched, net.report.details()
    assert net.family == "sd1" and net.writer == "kohya"
    assert {t.name for items in net.modules.values() for t, _ in items} == set(SD1_KEYS.values())

    p = Patcher()
    te_m, unet_m = 0.7, 1.3
    res = p.apply(mp, [(net, te_m, unet_m, None)])
    assert res.ok and res.networks[0].matched == len(SD1_KEYS) and not res.networks[0].unmatched
    for key, (layer, _) in keys.items():
        m = te_m if layer.startswith("transformer_") else unet_m
        want = w0[layer] + expected_delta(tensors, key, w0[layer].shape, m)
        torch.testing.assert_close(mp[layer].weight.detach(), want, rtol=1e-5, atol=1e-6, msg=layer)

    unet1, te1 = _unet_out(sd1), _te_out(sd1)
    assert not torch.equal(unet1, unet0) and not torch.equal(te1, te0)
    assert models.model_state_hash(sd1) != h0

    assert p.apply(mp, [(net, te_m, unet_m, None)]).noop
    p.restore()
    assert models.model_state_hash(sd1) == h0
    assert torch.equal(_unet_out(sd1), unet0) and torch.equal(_te_out(sd1), te0)


def test_sd2_mha_rows_and_partial_qkv(sd2, tmp_path):
    mp = layer_mapping(sd2)
    path = tmp_path / "kohya_sd2.safetensors"
    tensors = write_kohya(path, SD2_TE_KEYS, mp, {"ss_network_module": "networks.lora", "ss_v2": "True",
                                                   "ss_base_model_version": "sd_v2"})
    h0 = models.model_state_hash(sd2)
    te0 = _te_out(sd2)
    attn0, attn1 = mp["model_transformer_resblocks_0_attn"], mp["model_transformer_resblocks_1_attn"]
    in0, in1 = attn0.in_proj_weight.detach().clone(), attn1.in_proj_weight.detach().clone()
    out0 = attn0.out_proj.weight.detach().clone()

    net = load_network(path, "sd2", cache=None, layer_names=mp)
    assert not net.report.unmatched, net.report.details()
    p = Patcher()
    res = p.apply(mp, [(net, 1.0, 0.5, None)])
    assert res.ok and res.networks[0].matched == len(SD2_TE_KEYS)
    d = in0.shape[1]
    for key, (layer, part) in SD2_TE_KEYS.items():
        if part is None:
            continue
        i = "qkv".index(part)
        base = (in0 if "resblocks_0" in layer else in1)[i * d:(i + 1) * d]
        got = mp[layer].in_proj_weight.detach()[i * d:(i + 1) * d]
        torch.testing.assert_close(got, base + expected_delta(tensors, key, base.shape, 1.0), rtol=1e-5, atol=1e-6)
    # layer 1 has no k: those rows are untouched bit for bit
    assert torch.equal(attn1.in_proj_weight.detach()[d:2 * d], in1[d:2 * d])
    key_out = "lora_te_text_model_encoder_layers_0_self_attn_out_proj"
    torch.testing.assert_close(attn0.out_proj.weight.detach(),
                               out0 + expected_delta(tensors, key_out, out0.shape, 1.0), rtol=1e-5, atol=1e-6)
    assert not torch.equal(_te_out(sd2), te0)  # MHA forward sees the merged in_proj/out_proj
    p.restore()
    assert models.model_state_hash(sd2) == h0
    assert torch.equal(_te_out(sd2), te0)


def test_sdxl_kohya_file(sdxl, tmp_path):
    mp = layer_mapping(sdxl)
    path = tmp_path / "kohya_sdxl.safetensors"
    write_kohya(path, SDXL_KEYS, mp, {"ss_network_module": "networks.lora",
                                      "ss_base_model_version": "sdxl_base_v1-0"})
    # (model_state_hash of the whole SDXL stand-in is slow: its 1280-wide token embedding alone is 250 MB)
    touched = {f"{layer}.{n}": t for layer, _ in SDXL_KEYS.values() for n, t in mp[layer].named_parameters()}
    before = {k: t.detach().clone() for k, t in touched.items()}
    net = load_network(path, "sdxl", cache=None, layer_names=mp)
    assert not net.report.unmatched, net.report.details()
    assert net.report.by_component == {"unet": 2, "te1": 1, "te2": 2}
    p = Patcher()
    res = p.apply(mp, [(net, 1.0, 1.0, None)])
    assert res.ok and res.networks[0].matched == len(SDXL_KEYS) and res.modules_merged == len(SDXL_KEYS)
    for layer, part in SDXL_KEYS.values():
        assert not torch.equal(_weight(mp[layer], part), before[f"{layer}.{'in_proj_weight' if part else 'weight'}"]
                               [_rows(mp[layer], part)]), layer
    p.restore()
    assert all(torch.equal(touched[k].detach(), before[k]) for k in touched)


# ------------------------------------------------------------------------------------------------------ loader

def test_family_mismatch_is_clear(sd1, sdxl, tmp_path):
    path = tmp_path / "xl.safetensors"
    write_kohya(path, SDXL_KEYS, layer_mapping(sdxl), {"ss_network_module": "networks.lora",
                                                       "ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(FamilyMismatchError, match="this LoRA is for SDXL, the loaded model is SD1.5"):
        load_network(path, "sd1", cache=None)
    net = load_network(path, "sd1", cache=None, on_mismatch="flag")
    assert net.family_mismatch == "this LoRA is for SDXL, the loaded model is SD1.5"
    assert "SDXL" in net.report.summary()


def test_unmatched_keys_are_counted_and_named(sd1, tmp_path):
    mp = layer_mapping(sd1)
    keys = _with_parts(dict(list(SD1_KEYS.items())[:3]))
    g = torch.Generator().manual_seed(1)
    tensors = write_kohya(tmp_path / "tmp.safetensors", keys, mp, {"ss_network_module": "networks.lora"})
    # a layer the model does not have, and a bogus prefix
    tensors.update(_lora_tensors("lora_unet_down_blocks_7_attentions_0_proj_in", torch.zeros(8, 8), g))
    tensors.update(_lora_tensors("something_else_entirely", torch.zeros(8, 8), g))
    path = tmp_path / "partial.safetensors"
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1"})
    net = load_network(path, "sd1", cache=None, layer_names=mp)
    assert len(net.report.matched) == 3 and len(net.report.unmatched) == 2
    assert "something_else_entirely" in net.report.unmatched
    assert "3/5" in net.report.summary()


def test_loader_cache_by_path_mtime_size(sd1, tmp_path):
    mp = layer_mapping(sd1)
    keys = _with_parts(dict(list(SD1_KEYS.items())[:2]))
    path = tmp_path / "c.safetensors"
    write_kohya(path, keys, mp, {"ss_network_module": "networks.lora"})
    cache = LRU(4)
    a = load_network(path, "sd1", cache=cache)
    assert load_network(path, "sd1", cache=cache) is a
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    b = load_network(path, "sd1", cache=cache)
    assert b is not a and b.key != a.key


def test_loader_refuses_pickles(tmp_path):
    p = tmp_path / "x.pt"
    p.write_bytes(b"\x80\x04junk")
    with pytest.raises(LoraFileError, match="pickle"):
        load_network(p, "sd1", cache=None)


def test_loader_refuses_a_file_with_nan_or_inf(sd1, tmp_path):
    """A NaN in one lora_up only gives black images and an A1111 error that names no LoRA: said at load."""
    mp = layer_mapping(sd1)
    keys = _with_parts(dict(list(SD1_KEYS.items())[:2]))
    path = tmp_path / "nan.safetensors"
    write_kohya(path, keys, mp, {"ss_network_module": "networks.lora"})
    t = load_file(str(path))
    up = sorted(k for k in t if k.endswith("lora_up.weight"))[0]
    t[up][0, 0] = float("nan")
    save_file(t, str(path))
    with pytest.raises(LoraFileError, match=rf"nan.safetensors: 1 tensor\(s\) hold NaN or infinite values \(e.g. "
                                            rf"{up}\): the file is damaged"):
        load_network(path, "sd1", cache=None)


def test_switch_between_two_files_uses_delta_cache(sd1, tmp_path):
    mp = layer_mapping(sd1)
    keys = _with_parts(SD1_KEYS)
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_kohya(pa, keys, mp, {"ss_network_module": "networks.lora"}, seed=1)
    write_kohya(pb, keys, mp, {"ss_network_module": "networks.lora"}, seed=2)
    h0 = models.model_state_hash(sd1)
    a, b = load_network(pa, "sd1", cache=None), load_network(pb, "sd1", cache=None)
    p = Patcher(cache_mb=64)
    p.apply(mp, [(a, 1.0, 1.0, None)])
    p.apply(mp, [(b, 1.0, 1.0, None)])
    r = p.apply(mp, [(a, 1.0, 1.0, None)])
    assert r.deltas_computed == 0 and r.cache_hits == len(SD1_KEYS)
    p.restore()
    assert models.model_state_hash(sd1) == h0
