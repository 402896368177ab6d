"""LyCORIS preset files (network_args preset=<file>.toml) on the WebUI's ldm/sgm models.

References, none of them our code:
- tests/data/lycoris_preset_reference.json.gz: sd-scripts' own SD1/SD2/SDXL UNet module trees (path, class) and
  the layers LyCORIS' kohya wrapper picks on them for a set of preset files (class targets, regex and fnmatch
  names, exclude_name, enable_conv, train_norm), written by tests/data/lycoris_preset_reference.py;
- LyCORIS itself (test-only peer): create_network with a preset file on transformers' CLIPTextModel (the tiny SD1
  model's own, and one shaped like the tiny SD2 / SDXL open_clip towers as sd-scripts converts them).
"""
import gzip
import json
import os
import re

import pytest
import torch
import torch.nn as nn

import models
import train_data
from lib_lora.apply.layers import layer_mapping
from lib_lora.apply.loader import load_network
from lib_lora.formats.safetensors_io import load_tensors
from lib_lora.host.base import ModelHost
from lib_lora.train import lyco_preset as lp
from lib_lora.train.config import parse_train_config
from lib_lora.train.lora_net import LoRANetwork
from lib_lora.train.lyco import LycoSettings
from lib_lora.train.run import plan_for, run_training
from lib_lora.train.support import check_support
from lib_lora.train.targets import lycoris_unet_targets, text_encoder_targets
from lib_lora.train.trainer import Trainer, TrainingError
from test_train_lycoris import _full_size_unet

try:  # LyCORIS' kohya wrapper keeps the last preset in class attributes: its defaults as imported (collection
    # runs before any test), put back before each reference run here
    import copy

    import lycoris.kohya as _lk
    _LYCO_STATE = {k: copy.deepcopy(v) for k, v in vars(_lk.LycorisNetworkKohya).items() if k.isupper()}
except ImportError:
    _LYCO_STATE = {}


def _lycoris_defaults():
    import lycoris.kohya as lk
    for k, v in _LYCO_STATE.items():
        setattr(lk.LycorisNetworkKohya, k, copy.deepcopy(v))


REF = json.load(gzip.open(os.path.join(os.path.dirname(__file__), "data", "lycoris_preset_reference.json.gz"), "rt"))


def _preset(d: dict, path="p.toml") -> lp.CustomPreset:
    p = lp.CustomPreset(path)
    for key, attr in (("unet_target_module", "unet_modules"), ("unet_target_name", "unet_names"),
                      ("text_encoder_target_module", "te_modules"), ("text_encoder_target_name", "te_names"),
                      ("exclude_name", "exclude")):
        if key in d:
            setattr(p, attr, tuple(d[key]))
    p.enable_conv, p.use_fnmatch = d.get("enable_conv", True), d.get("use_fnmatch", False)
    return p


def _toml(d: dict) -> str:
    def val(v):
        return ("true" if v else "false") if isinstance(v, bool) else json.dumps(v)
    return "".join(f"{k} = {val(v)}\n" for k, v in d.items())


def _names(sd_model, family, preset, conv=True, train_norm=False, unet=True, te=False, notes=None):
    ts = lp.custom_targets(sd_model, family, preset, conv, unet, te, train_norm, notes if notes is not None else [])
    out = []
    for t in ts:  # (an open_clip attention: one module per projection, as LyCORIS names them)
        out += [f"{t.kohya_name}_{p}_proj" for p in t.parts] if t.kind == "mha" else [t.kohya_name]
    return sorted(out)


@pytest.fixture(scope="module")
def full_unets():
    return {f: _full_size_unet(f) for f in ("sd1", "sd2", "sdxl")}


def _as_model(unet):
    import types
    return types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=unet))


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_the_view_is_sd_scripts_module_tree(family, full_unets):
    """Every Linear / conv / norm and every block class of sd-scripts' UNet, under its path and class."""
    want = {tuple(r) for r in REF["families"][family]["tree"]}
    classes = {c for _, c in want}
    got = {(r.path, r.cls) for r in lp.unet_view(full_unets[family], family) if r.cls in classes}
    assert got == want, (sorted(want - got)[:5], sorted(got - want)[:5])


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_preset_files_pick_the_layers_lycoris_picks_on_sd_scripts(family, full_unets):
    fam = REF["families"][family]
    tree = fam["tree"]
    for picked, train_norm in ((fam["picked"], False), (fam["picked_norms"], True)):
        for name, ids in picked.items():
            want = sorted("lora_unet_" + tree[i][0].replace(".", "_") for i in ids)
            preset = _preset(REF["presets"][name])
            if not want:
                with pytest.raises(lp.PresetError, match="picks no layer of this SDXL model"):
                    _names(_as_model(full_unets[family]), family, preset)
                continue
            assert _names(_as_model(full_unets[family]), family, preset, train_norm=train_norm) == want, name


def test_a_file_of_lycoris_defaults_is_the_full_preset(full_unets):
    """A file that sets nothing keeps the wrapper's defaults: the built-in full preset's layers, also on the tiny
    models (whose block counts differ from the full-size ones)."""
    tiny = {"sd1": models.make_sd1(seed=1), "sd2": models.make_sd2(seed=1), "sdxl": models.make_sdxl(seed=1)}
    for family in ("sd1", "sd2", "sdxl"):
        for m in (_as_model(full_unets[family]), tiny[family]):
            want = sorted(t.kohya_name for t in lycoris_unet_targets(m.model.diffusion_model, family, "full", True))
            assert _names(m, family, _preset({})) == want, family
            # conv layers off: enable_conv = false, or conv_dim 0
            want = sorted(t.kohya_name for t in lycoris_unet_targets(m.model.diffusion_model, family, "full", False))
            assert _names(m, family, _preset({"enable_conv": False})) == want
            assert _names(m, family, _preset({}), conv=False) == want


def test_nested_target_classes_train_each_layer_once(full_unets):
    """LyCORIS stops with "duplicated lora name" when one target class sits inside another; here each layer is
    trained once: the union of the two classes' layers."""
    m = _as_model(full_unets["sd1"])
    both = _names(m, "sd1", _preset({"unet_target_module": ["BasicTransformerBlock", "FeedForward"],
                                     "unet_target_name": []}))
    outer = _names(m, "sd1", _preset({"unet_target_module": ["BasicTransformerBlock"], "unet_target_name": []}))
    inner = _names(m, "sd1", _preset({"unet_target_module": ["FeedForward"], "unet_target_name": []}))
    # (16 blocks: q, k, v, out twice, GEGLU's proj, ff out)
    assert set(inner) < set(outer) and both == outer and len(both) == len(set(both)) == 16 * 10


def _lycoris_te_net(clip, preset_path, dim=8, alpha=4, **kw):
    """LyCORIS' create_network with a preset file on a text encoder (its kohya wrapper's class state put back
    after)."""
    import lycoris.kohya as lk
    cls = lk.LycorisNetworkKohya
    keep = {k: getattr(cls, k) for k in ("TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME",
                                          "USE_FNMATCH", "TARGET_EXCLUDE_NAME", "ENABLE_CONV", "MODULE_ALGO_MAP",
                                          "NAME_ALGO_MAP", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME")}
    _lycoris_defaults()
    try:
        return lk.create_network(1.0, dim, alpha, None, clip, nn.Module(), preset=str(preset_path), algo="locon",
                                 **kw)
    finally:
        for k, v in keep.items():
            setattr(cls, k, v)


def _lycoris_te_names(tmp_path, clip, d, **kw):
    path = tmp_path / "te.toml"
    path.write_text(_toml(d))
    return sorted(m.lora_name for m in _lycoris_te_net(clip, path, 4, 1, **kw).text_encoder_loras)


TE_PRESETS = [
    {"text_encoder_target_module": ["CLIPMLP"],
     "text_encoder_target_name": ["text_model.encoder.layers.0.self_attn.q_proj"]},
    {"text_encoder_target_module": ["CLIPEncoderLayer"],
     "exclude_name": [".*fc1", "text_model\\.encoder\\.layers\\.1\\."]},
    {"use_fnmatch": True, "text_encoder_target_module": ["CLIPAttention"],
     "text_encoder_target_name": ["*.layers.1.mlp.fc2"], "exclude_name": ["*.v_proj"]},
    {},
]


@pytest.mark.parametrize("d", TE_PRESETS, ids=["mlp+name", "layers-exclude", "fnmatch", "defaults"])
def test_text_encoder_layers_are_lycoris_on_clip(d, tmp_path):
    pytest.importorskip("lycoris")
    sd1 = models.make_sd1(seed=2)
    clip = getattr(sd1.cond_stage_model, "wrapped", sd1.cond_stage_model).transformer
    want = _lycoris_te_names(tmp_path, clip, d)
    assert want and _names(sd1, "sd1", _preset(d), unet=False, te=True) == want


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
@pytest.mark.parametrize("d", TE_PRESETS, ids=["mlp+name", "layers-exclude", "fnmatch", "defaults"])
def test_open_clip_text_encoders_are_lycoris_on_their_clip_conversion(family, d, tmp_path):
    """SD2's and SDXL's second text encoder are open_clip towers here and transformers CLIPTextModels (the layers
    the model reads) in sd-scripts: LyCORIS on a CLIPTextModel of that shape picks what we pick."""
    pytest.importorskip("lycoris")
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    sd = models.make_sd2(seed=2) if family == "sd2" else models.make_sdxl(seed=2)
    if family == "sd2":
        cond = sd.cond_stage_model.wrapped if hasattr(sd.cond_stage_model, "wrapped") else sd.cond_stage_model
        tower, n = cond.model, len(cond.model.transformer.resblocks) - getattr(cond, "layer_idx", 1)
    else:
        e = sd.conditioner.embedders[1]
        tower = getattr(e, "wrapped", e).model
        n = len(tower.transformer.resblocks)
    width = tower.transformer.width if hasattr(tower.transformer, "width") else tower.ln_final.weight.shape[0]
    cfg = CLIPTextConfig(hidden_size=width, intermediate_size=width * 4, num_hidden_layers=n,
                         num_attention_heads=tower.transformer.resblocks[0].attn.num_heads, projection_dim=width)
    with torch.device("meta"):
        clip = (CLIPTextModel if family == "sd2" else CLIPTextModelWithProjection)(cfg)
    want = _lycoris_te_names(tmp_path, clip, d)
    got = _names(sd, family, _preset(d), unet=False, te=True)
    if family == "sdxl":  # (sd-scripts' SDXL text encoders are lora_te1_ / lora_te2_; LyCORIS got only the second)
        got = [g.replace("lora_te2_", "lora_te_") for g in got if g.startswith("lora_te2_")]
    assert want and got == want


def test_text_encoder_norms_with_train_norm_are_lycoris_norm_modules(tmp_path):
    """train_norm with a preset file that picks text-encoder blocks: their LayerNorms get norm modules, as LyCORIS
    gives them on the same CLIP; without train_norm none (as in LyCORIS)."""
    pytest.importorskip("lycoris")
    sd1 = models.make_sd1(seed=2)
    d = {"text_encoder_target_module": ["CLIPEncoderLayer"], "text_encoder_target_name": ["text_model.final_layer_norm"]}
    clip = getattr(sd1.cond_stage_model, "wrapped", sd1.cond_stage_model).transformer
    want = _lycoris_te_names(tmp_path, clip, d, train_norm="True")
    got = sorted(t.kohya_name for t in lp.custom_targets(sd1, "sd1", _preset(d), True, False, True, True, []))
    assert got == want and "lora_te_text_model_encoder_layers_0_layer_norm1" in got
    assert "lora_te_text_model_final_layer_norm" in got
    plain = [t.kohya_name for t in lp.custom_targets(sd1, "sd1", _preset(d), True, False, True, False, [])]
    assert plain and not any("norm" in n for n in plain)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_text_encoder_norms_train_and_apply(family, tmp_path):
    """The trained text-encoder norm modules (w_norm / b_norm) change the text encoder's output and load whole in
    this extension's <lora:> (SD2: on open_clip's ln_1 / ln_2 under sd-scripts' CLIP names)."""
    sd = models.make_sd1(seed=4) if family == "sd1" else models.make_sd2(seed=4)
    img, _ = _dataset(tmp_path)
    (tmp_path / "te.toml").write_text('unet_target_module = []\nunet_target_name = []\n'
                                      'text_encoder_target_module = ["CLIPEncoderLayer"]\n')
    before = models.model_state_hash(sd)
    res = run_training(ModelHost(sd, "m"), _cfg(tmp_path, img, max_train_steps=2, learning_rate=1e-2,
                                                text_encoder_lr=1e-2,
                                                network_args=["algo=locon", "preset=te.toml", "train_norm=True"]))
    assert res.status == "done" and models.model_state_hash(sd) == before
    w = load_tensors(res.final)
    norms = [k for k in w if k.endswith(".w_norm")]
    assert norms and all(k.startswith("lora_te_") and "layer_norm" in k for k in norms)
    assert max(float(w[k].abs().max()) for k in norms) > 0  # (they start at zero)
    net = load_network(res.final, family, layer_names=set(layer_mapping(sd)))
    assert len(net.report.matched) == net.report.total_modules == len({k.split(".")[0] for k in w})


def test_misses_are_said_like_lycoris_warns():
    sd1 = models.make_sd1(seed=2)
    notes: list = []
    _names(sd1, "sd1", _preset({"unet_target_module": ["Attention", "FeedForward"],
                                "unet_target_name": ["conv_in", "down_blocks\\.9\\..*"]}), notes=notes)
    assert any(re.search(r"UNet: no module of class Attention \(sd-scripts' model has .*CrossAttention", n)
               for n in notes), notes
    assert any(n.endswith("UNet: no module path matches down_blocks\\.9\\..*") for n in notes), notes
    assert len(notes) == 2


def _dataset(tmp_path):
    return train_data.make_dataset(str(tmp_path / "d"), n_concept=3, repeats=2)


def _cfg(tmp_path, img, **kw):
    c = {"train_data_dir": img, "resolution": 64, "train_batch_size": 2, "output_dir": str(tmp_path / "o"),
         "output_name": "pf", "network_dim": 4, "network_alpha": 2, "learning_rate": 2e-3, "text_encoder_lr": 1e-3,
         "max_train_epochs": 1, "seed": 3, "save_precision": "float", "network_module": "lycoris.kohya"}
    c.update(kw)
    return parse_train_config(c, base_dir=str(tmp_path))


def test_training_with_a_preset_file_writes_the_layers_it_picks(tmp_path):
    """A relative preset path is read from the config's folder; the file holds exactly the picked layers, all of
    them load, and the model is as before."""
    sd1 = models.make_sd1(seed=4)
    img, _ = _dataset(tmp_path)
    d = {"unet_target_module": ["Transformer2DModel"], "unet_target_name": ["conv_in"],
         "text_encoder_target_module": ["CLIPMLP"], "exclude_name": [".*attn1.*"]}
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "mine.toml").write_text(_toml(d))
    cfg = _cfg(tmp_path, img, network_args=["algo=loha", "preset=presets/mine.toml", "conv_dim=2"])
    errors, notes = check_support(cfg, "sd1")
    assert errors == []
    before = models.model_state_hash(sd1)
    events = []
    res = run_training(ModelHost(sd1, "m"), cfg, on_event=events.append)
    assert res.status == "done", [e.message for e in events if e.kind in ("error", "note")]
    start = next(e.message for e in events if e.kind == "start")
    assert start.startswith("LoHa (LyCORIS preset file presets/mine.toml)"), start
    assert models.model_state_hash(sd1) == before
    sd = load_tensors(res.final)
    names = {k.split(".")[0] for k in sd}
    assert names == set(_names(sd1, "sd1", _preset(d), conv=True, te=True))
    assert "lora_unet_conv_in" in names and not any("attn1" in n for n in names)
    assert any(n.startswith("lora_te_") and n.endswith("mlp_fc1") for n in names)
    assert not any("self_attn" in n for n in names)
    net = load_network(res.final, "sd1", layer_names=set(layer_mapping(sd1)))
    assert len(net.report.matched) == net.report.total_modules == len(names)


def test_preset_file_mistakes_are_said_before_the_job(tmp_path):
    sd1 = models.make_sd1(seed=4)
    img, _ = _dataset(tmp_path)
    files = {
        "bad.toml": ("unet_target_module = [\"Transformer2DModel\"\n", r"bad.toml is not a TOML file"),
        "keys.toml": ("unet_modules = [\"Transformer2DModel\"]\n", r"unknown keys unet_modules .*valid keys: enable_conv"),
        "maps.toml": ("[module_algo_map.CrossAttention]\nalgo = \"lokrr\"\n",
                      r"maps layers to algo=lokrr: use one of lora, locon, loha, lokr"),
        "dylora.toml": ("[module_algo_map.CrossAttention]\nalgo = \"dylora\"\n",
                        r"algo=dylora: .*use network_module = networks.dylora"),
        "mapkey.toml": ("[module_algo_map.CrossAttention]\nlinear_dim = 8\n",
                        r"module_algo_map.CrossAttention sets linear_dim, which is not trained per layer here; a map "
                        r"entry may set algo, dim, alpha, factor"),
        "mapval.toml": ("[name_algo_map.'conv_in']\ndim = 0\n", r"name_algo_map.conv_in dim = 0: use a whole number"),
        "mapre.toml": ("[name_algo_map.'*.attn2.*']\ndim = 2\n", r"is not a regular expression"),
        "type.toml": ("unet_target_module = \"Transformer2DModel\"\n", r"unet_target_module must be a list of strings"),
        "regex.toml": ("unet_target_name = [\"*.attn2.*\"]\n", r"is not a regular expression .*use_fnmatch = true"),
    }
    for name, (text, _) in files.items():
        (tmp_path / name).write_text(text)
    cases = {n: msg for n, (_, msg) in files.items()}
    cases["missing.toml"] = r"preset=missing.toml: no such file"
    cases["attn_mlp"] = r"preset=attn_mlp: did you mean attn-mlp\?"
    for preset, msg in cases.items():
        cfg = _cfg(tmp_path, img, network_args=["algo=locon", f"preset={preset}"])
        errors, _ = check_support(cfg, "sd1")
        assert any(re.search(msg, e) for e in errors), (preset, errors)
    # a file that picks nothing on this model stops the job when it starts, with what the names are matched to
    (tmp_path / "none.toml").write_text(_toml({"unet_target_module": ["Attention"], "unet_target_name": [],
                                               "text_encoder_target_module": []}))
    cfg = _cfg(tmp_path, img, network_args=["algo=locon", "preset=none.toml"])
    assert check_support(cfg, "sd1")[0] == []
    host = ModelHost(sd1, "m")
    before = models.model_state_hash(sd1)
    with pytest.raises(TrainingError, match=r"none.toml picks no layer of this SD1 model.*CrossAttention.*; "
                                            r"UNet: no module of class Attention \(sd-scripts' model has"):
        Trainer(host, cfg, plan_for(host, cfg)).run()
    assert models.model_state_hash(sd1) == before


def test_lycoris_loads_the_trained_file_on_its_own_model(tmp_path):
    """The file's modules are LyCORIS' own for those layers: its create_network_from_weights builds them on the
    same CLIP with no missing or unexpected key."""
    lk = pytest.importorskip("lycoris.kohya")
    sd1 = models.make_sd1(seed=5)
    img, _ = _dataset(tmp_path)
    d = {"unet_target_module": [], "unet_target_name": [], "text_encoder_target_module": ["CLIPAttention"],
         "exclude_name": [".*k_proj"]}
    (tmp_path / "te.toml").write_text(_toml(d))
    cfg = _cfg(tmp_path, img, network_args=["algo=lokr", "preset=te.toml"], learning_rate=0)
    res = run_training(ModelHost(sd1, "m"), cfg)
    assert res.status == "done"
    sd = load_tensors(res.final)
    clip = getattr(sd1.cond_stage_model, "wrapped", sd1.cond_stage_model).transformer
    _lycoris_defaults()
    net, weights = lk.create_network_from_weights(1.0, res.final, None, clip, nn.Module(), weights_sd=sd)
    assert sorted(m.lora_name for m in net.text_encoder_loras) == sorted({k.split(".")[0] for k in sd})
    net.apply_to(clip, nn.Module(), apply_text_encoder=True, apply_unet=False)
    missing, unexpected = net.load_state_dict(sd, strict=False)
    assert not unexpected and not [k for k in missing if k.startswith("lora_te")]
    assert len(sd) and not any("k_proj" in k or "unet" in k for k in sd)


def test_network_from_a_preset_file_keeps_lycoris_settings():
    sd2 = models.make_sd2(seed=3)
    d = {"unet_target_module": [], "unet_target_name": ["down_blocks\\.0\\.attentions\\.0\\.proj_(in|out)"],
         "text_encoder_target_module": [],
         "text_encoder_target_name": ["text_model\\.encoder\\.layers\\.0\\.self_attn\\.[qv]_proj"]}
    net = LoRANetwork(sd2, "sd2", dim=4, alpha=2, conv_dim=4, conv_alpha=2, lyco=LycoSettings("lokr", custom=_preset(d)))
    assert sorted(net.pairs) == ["lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                                 "lora_te_text_model_encoder_layers_0_self_attn_v_proj",
                                 "lora_unet_down_blocks_0_attentions_0_proj_in",
                                 "lora_unet_down_blocks_0_attentions_0_proj_out"]
    mha = [t for t in net.targets if t.kind == "mha"]
    assert len(mha) == 1 and mha[0].parts == ("q", "v")
    # SD2's linear proj_in/out save 4-D as sd-scripts trains them
    assert all(t.save_4d for t in net.targets if t.component == "unet")
    assert {t.kohya_name for t in text_encoder_targets(sd2, "sd2")} >= {mha[0].kohya_name}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("name", ["lokr_full_rank", "locon_ranks", "lokr_factors"])
def test_map_entries_give_each_layer_lycoris_module(family, name, full_unets, tmp_path):
    """module_algo_map / name_algo_map entries (ranks, alphas, LoKr factors; a rank also turns a 3x3 conv on with
    enable_conv = false): the modules, tensor shapes and scales LyCORIS builds on sd-scripts' UNet, layer by
    layer. The first map is Kohaku-XL-Delta's published full-rank LoKr preset."""
    algo, text = REF["map_presets"][name]
    (tmp_path / "m.toml").write_text(text)
    preset = lp.read_preset(tmp_path / "m.toml", "m.toml")
    tree = REF["families"][family]["tree"]
    want = {"lora_unet_" + tree[int(i)][0].replace(".", "_"): (sc, {k: tuple(s) for k, s in shapes.items()
                                                                    if k != "alpha"})
            for i, (sc, shapes) in REF["families"][family]["maps"][name].items()}
    with torch.device("meta"):
        net = LoRANetwork(_as_model(full_unets[family]), family, dim=REF["dim"], alpha=4, conv_dim=REF["conv_dim"],
                          conv_alpha=1, train_text_encoder=False, lyco=LycoSettings(algo, custom=preset))
    got = {n: (round(float(p.scale), 6), p.file_shapes()) for n, p in net.pairs.items()}
    assert sorted(got) == sorted(want)
    bad = [n for n in want if got[n] != want[n]]
    assert not bad, [(n, got[n], want[n]) for n in bad[:3]]


TE_MAP = r"""text_encoder_target_module = ["CLIPAttention"]
text_encoder_target_name = ["text_model\\.encoder\\.layers\\.0\\.mlp\\.fc.*"]
unet_target_module = []
unet_target_name = []
[module_algo_map.CLIPAttention]
dim = 2
alpha = 1
[name_algo_map.'text_model\.encoder\.layers\.0\.mlp\.fc2']
dim = 3
"""


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_text_encoder_map_entries_are_lycoris(family, tmp_path):
    """Ranks and alphas from the maps on the text encoder: LyCORIS on the same CLIP (SD1) or on its transformers
    conversion (SD2's open_clip) builds each module with the rank and scale ours has."""
    pytest.importorskip("lycoris.kohya")
    from transformers import CLIPTextConfig, CLIPTextModel
    (tmp_path / "te.toml").write_text(TE_MAP)
    sd = models.make_sd1(seed=2) if family == "sd1" else models.make_sd2(seed=2)
    cond = getattr(sd.cond_stage_model, "wrapped", sd.cond_stage_model)
    if family == "sd1":
        clip = cond.transformer
    else:
        tower, n = cond.model, len(cond.model.transformer.resblocks) - getattr(cond, "layer_idx", 1)
        width = tower.ln_final.weight.shape[0]
        cfg = CLIPTextConfig(hidden_size=width, intermediate_size=width * 4, num_hidden_layers=n,
                             num_attention_heads=tower.transformer.resblocks[0].attn.num_heads)
        with torch.device("meta"):
            clip = CLIPTextModel(cfg)
    ref = _lycoris_te_net(clip, tmp_path / "te.toml")
    want = {m.lora_name: (m.lora_dim, round(float(m.scale), 6)) for m in ref.text_encoder_loras}
    net = LoRANetwork(sd, family, dim=8, alpha=4, lyco=LycoSettings("locon", custom=lp.read_preset(
        tmp_path / "te.toml", "te.toml")))
    got = {n: (p.dim, round(float(p.scale), 6)) for n, p in net.pairs.items()}
    assert got == want and {d for d, _ in got.values()} == {2, 3, 8}


def test_training_kohaku_style_full_rank_lokr_preset(tmp_path):
    """The layout of Kohaku-XL-Delta's preset (full-rank LoKr on attention and MLP, a factor per class) trains on
    the tiny SD1 model; the file's modules are whole-matrix LoKr where mapped, decomposed elsewhere, and every
    module applies."""
    sd1 = models.make_sd1(seed=4)
    img, _ = _dataset(tmp_path)
    (tmp_path / "kohaku.toml").write_text(REF["map_presets"]["lokr_full_rank"][1])
    cfg = _cfg(tmp_path, img, network_args=["algo=lokr", "preset=kohaku.toml", "conv_dim=2"], network_dim=2)
    before = models.model_state_hash(sd1)
    res = run_training(ModelHost(sd1, "m"), cfg)
    assert res.status == "done" and models.model_state_hash(sd1) == before
    sd = load_tensors(res.final)
    attn = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert {k for k in sd if k.startswith(attn + ".")} == {f"{attn}.lokr_w1", f"{attn}.lokr_w2", f"{attn}.alpha"}
    proj = "lora_unet_down_blocks_0_attentions_0_proj_in"  # (not in a mapped class: network_dim 2)
    assert f"{proj}.lokr_w2_a" in sd and sd[f"{proj}.lokr_w2_a"].shape[1] == 2
    assert sd[f"{attn}.lokr_w2"].abs().max() > 0  # (trained: LoKr's w2 starts at zero)
    net = load_network(res.final, "sd1", layer_names=set(layer_mapping(sd1)))
    names = {k.split(".")[0] for k in sd}
    assert len(net.report.matched) == net.report.total_modules == len(names)


def test_a_double_quoted_pattern_key_is_read_as_toml_and_the_difference_said(tmp_path):
    """TOML unescapes "a\\\\.b" to the regex a\\.b (tomllib); LyCORIS' toml package keeps both backslashes, so
    under sd-scripts the entry matches nothing: the job says so."""
    pytest.importorskip("toml")
    import toml
    text = '[name_algo_map."conv_in\\\\..*"]\ndim = 2\n'
    (tmp_path / "q.toml").write_text(text)
    assert list(toml.loads(text)["name_algo_map"]) == ["conv_in\\\\..*"]  # (LyCORIS' reader)
    p = lp.read_preset(tmp_path / "q.toml", "q.toml")
    assert list(p.name_map) == ["conv_in\\..*"]
    assert any("LyCORIS' own reader keeps both backslashes" in n for n in p.notes), p.notes
    (tmp_path / "l.toml").write_text("[name_algo_map.'conv_in\\..*']\ndim = 2\n")
    p = lp.read_preset(tmp_path / "l.toml", "l.toml")
    assert list(p.name_map) == ["conv_in\\..*"] and not p.notes


def test_a_layer_sd_scripts_has_and_the_webui_holds_as_a_tensor_is_said():
    sdxl = models.make_sdxl(seed=2)
    notes: list = []
    got = _names(sdxl, "sdxl", _preset({"unet_target_module": [], "unet_target_name": ["input_blocks\\.0\\.0"],
                                         "text_encoder_target_module": [],
                                         "text_encoder_target_name": ["text_projection"]}), te=True, notes=notes)
    assert got == ["lora_unet_input_blocks_0_0"]
    assert any("lora_te2_text_projection is a Linear layer in sd-scripts' model but a plain tensor" in n
               for n in notes), notes


@pytest.mark.parametrize("algo", ["loha", "glora", "ia3"])
def test_dim_from_weights_builds_each_module_as_lycoris_does(algo, tmp_path):
    """dim_from_weights with a LyCORIS file of several ranks (a preset file's map gave the text encoder's attention
    rank 2 and its MLP rank 6): each module keeps its rank and alpha, layers the file lacks get none, as LyCORIS'
    create_network_from_weights builds them on the same CLIP; the run continues from the file."""
    lk = pytest.importorskip("lycoris.kohya")
    sd1 = models.make_sd1(seed=4)
    img, _ = _dataset(tmp_path)
    (tmp_path / "maps.toml").write_text('unet_target_module = []\nunet_target_name = []\n'
                                        'text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]\n'
                                        '[module_algo_map.CLIPAttention]\ndim = 2\nalpha = 1\n'
                                        '[module_algo_map.CLIPMLP]\ndim = 6\nalpha = 3\n')
    first = run_training(ModelHost(sd1, "m"), _cfg(tmp_path, img, network_args=[f"algo={algo}", "preset=maps.toml"]))
    assert first.status == "done"
    sd = load_tensors(first.final)
    cfg = _cfg(tmp_path, img, output_dir=str(tmp_path / "o2"), network_args=[f"algo={algo}"], network_dim=8,
               network_weights=first.final, dim_from_weights=True)
    assert check_support(cfg, "sd1")[0] == []
    events = []
    res = run_training(ModelHost(sd1, "m"), cfg, on_event=events.append)
    assert res.status == "done"
    again = load_tensors(res.final)
    assert {k: v.shape for k, v in again.items()} == {k: v.shape for k, v in sd.items()}
    if algo != "ia3":  # (IA3 has no rank; LyCORIS 4.1.3's create_network_from_weights fails on IA3 files)
        clip = getattr(sd1.cond_stage_model, "wrapped", sd1.cond_stage_model).transformer
        _lycoris_defaults()
        ref, _ = lk.create_network_from_weights(1.0, first.final, None, clip, nn.Module(), weights_sd=sd)
        want = {m.lora_name: (m.lora_dim, round(float(m.scale), 6)) for m in ref.text_encoder_loras}
        got = {}
        for k, v in again.items():
            n, key = k.split(".", 1)
            if key == {"loha": "hada_w1_b", "glora": "a2.weight"}[algo]:
                got[n] = (v.shape[0], round(float(again[n + ".alpha"]) / v.shape[0], 6))
        assert got == want and {d for d, _ in got.values()} == {2, 6}
    notes = [e.message for e in events if e.kind == "note"]
    assert any("keeps its own" in n and "layers it does not have get none" in n for n in notes), notes
    assert any(n.startswith(f"started from {first.final} (0 tensors not in that file)") for n in notes), notes
    # another algo in network_args: LyCORIS builds the file's own types all the same, and so does this (a note)
    res = run_training(ModelHost(sd1, "m"), _cfg(tmp_path, img, output_dir=str(tmp_path / "o3"),
                                                 network_args=["algo=locon"], network_weights=first.final,
                                                 dim_from_weights=True))
    assert res.status == "done"
    assert {k: v.shape for k, v in load_tensors(res.final).items()} == {k: v.shape for k, v in sd.items()}
    assert any("it holds no algo=locon module, so network_args algo=locon trains nothing" in n for n in res.notes)
    # networks.lora cannot hold them: what to set
    cfg = _cfg(tmp_path, img, output_dir=str(tmp_path / "o4"), network_module="networks.lora",
               network_weights=first.final, dim_from_weights=True)
    host = ModelHost(sd1, "m")
    with pytest.raises(TrainingError, match=f"holds {algo} modules, not lora ones: .*algo={algo}"):
        Trainer(host, cfg, plan_for(host, cfg)).run()


@pytest.mark.parametrize("algo, maps, first_args, second_args", [
    # LoKr: attention decomposed (w1 and w2 as low-rank pairs, factor 16), MLP whole (full_matrix, factor 8); the
    # second run's own settings (factor 4, dim 8) would give other shapes
    ("lokr", '[module_algo_map.CLIPAttention]\ndim = 2\nalpha = 1\nfactor = 16\ndecompose_both = true\n'
             '[module_algo_map.CLIPMLP]\ndim = 6\nalpha = 3\nfactor = 8\nfull_matrix = true\n',
     [], ["factor=4"]),
    # OFT: block sizes 2 and 6 (from dim), a constraint and a trained rescale the second run does not set
    ("diag-oft", '[module_algo_map.CLIPAttention]\ndim = 2\n[module_algo_map.CLIPMLP]\ndim = 6\n',
     ["constraint=0.01", "rescaled=True"], []),
    ("boft", '[module_algo_map.CLIPAttention]\ndim = 6\n[module_algo_map.CLIPMLP]\ndim = 12\n',
     ["constraint=0.02", "rescaled=True"], []),
])
def test_dim_from_weights_reads_lokr_and_oft_files_as_lycoris_does(algo, maps, first_args, second_args, tmp_path):
    """dim_from_weights with LoKr / OFT / BOFT files: each module takes the file's factor shapes (whole, low-rank
    or Tucker factors), block size, constraint and rescale, whatever the second run's network_args say; LyCORIS'
    create_network_from_weights builds the same modules (tensor shapes, scale or constraint) from the same file."""
    lk = pytest.importorskip("lycoris.kohya")
    sd1 = models.make_sd1(seed=4)
    img, _ = _dataset(tmp_path)
    (tmp_path / "maps.toml").write_text('unet_target_module = []\nunet_target_name = []\n'
                                        'text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]\n' + maps)
    first = run_training(ModelHost(sd1, "m"), _cfg(tmp_path, img, max_train_steps=2, network_args=[
        f"algo={algo}", "preset=maps.toml", *first_args]))
    assert first.status == "done"
    sd = load_tensors(first.final)
    cfg = _cfg(tmp_path, img, output_dir=str(tmp_path / "o2"), max_train_steps=2, network_dim=8,
               network_args=[f"algo={algo}", *second_args], network_weights=first.final, dim_from_weights=True)
    assert check_support(cfg, "sd1")[0] == []
    res = run_training(ModelHost(sd1, "m"), cfg)
    assert res.status == "done", res
    again = load_tensors(res.final)
    assert {k: v.shape for k, v in again.items()} == {k: v.shape for k, v in sd.items()}
    assert any(f"each module of {first.final} (" in n and "keeps its own algorithm" in n for n in res.notes)
    assert any(n.startswith(f"started from {first.final} (0 tensors not in that file)") for n in res.notes)
    clip = getattr(sd1.cond_stage_model, "wrapped", sd1.cond_stage_model).transformer
    _lycoris_defaults()
    ref, _ = lk.create_network_from_weights(1.0, first.final, None, clip, nn.Module(), weights_sd=sd)
    names = {k.split(".", 1)[0] for k in again}
    assert {m.lora_name for m in ref.text_encoder_loras} == names and len(names) == 2 * 6  # (2 CLIP layers)
    kinds = set()
    for m in ref.text_encoder_loras:
        for k, v in m.state_dict().items():
            if f"{m.lora_name}.{k}" in again:
                assert again[f"{m.lora_name}.{k}"].shape == v.shape, (m.lora_name, k)
        if algo == "lokr":
            w1a, w2b = again.get(f"{m.lora_name}.lokr_w1_a"), again.get(f"{m.lora_name}.lokr_w2_b")
            rank = w1a.shape[1] if w1a is not None else w2b.shape[0] if w2b is not None else None
            ours = 1.0 if rank is None else float(again[f"{m.lora_name}.alpha"]) / rank
            assert ours == pytest.approx(float(m.scale)), m.lora_name
            kinds.add(tuple(sorted(k.split(".", 1)[1] for k in again if k.startswith(m.lora_name + "."))))
        else:
            assert float(again[f"{m.lora_name}.alpha"]) == pytest.approx(float(m.constraint) / m.shape[0])
            assert f"{m.lora_name}.rescale" in again and m.rescaled
            kinds.add(tuple(again[f"{m.lora_name}.oft_blocks"].shape[-2:]))
    if algo == "lokr":  # both layouts came back
        assert kinds == {("alpha", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"), ("alpha", "lokr_w1", "lokr_w2")}
    else:
        assert kinds == ({(2, 2), (6, 6)} if algo == "diag-oft" else {(6, 6), (12, 12)})


def test_dim_from_weights_keeps_a_lokr_files_tucker_cores(tmp_path):
    """A LoKr file with Tucker cores on the UNet's 3x3 convs (use_tucker) continues with them under settings that
    have none (and another factor and rank): every tensor keeps its shape."""
    sd1 = models.make_sd1(seed=4)
    img, _ = _dataset(tmp_path)
    first = run_training(ModelHost(sd1, "m"), _cfg(tmp_path, img, max_train_steps=1, network_train_unet_only=True,
                                                   network_args=["algo=lokr", "conv_dim=4", "conv_alpha=1",
                                                                 "use_tucker=True", "factor=8",
                                                                 "decompose_both=True"]))
    sd = load_tensors(first.final)
    assert sum(k.endswith(".lokr_t2") for k in sd) > 20
    res = run_training(ModelHost(sd1, "m"), _cfg(tmp_path, img, output_dir=str(tmp_path / "o2"), max_train_steps=1,
                                                 network_train_unet_only=True, network_dim=16,
                                                 network_args=["algo=lokr"], network_weights=first.final,
                                                 dim_from_weights=True))
    assert res.status == "done"
    assert {k: v.shape for k, v in load_tensors(res.final).items()} == {k: v.shape for k, v in sd.items()}


MIXED = ('text_encoder_target_module = ["CLIPAttention"]\n'  # (name maps apply to layers picked by name)
         'text_encoder_target_name = ["text_model.encoder.layers.1.mlp.fc1", "text_model.encoder.layers.0.mlp.fc2", '
         '"text_model.encoder.layers.0.mlp.fc1"]\n'
         '[module_algo_map.CLIPAttention]\nalgo = "lokr"\ndim = 2\nfactor = 16\ndecompose_both = true\n'
         '[name_algo_map."text_model.encoder.layers.1.mlp.fc1"]\nalgo = "loha"\ndim = 3\nalpha = 1\n'
         '[name_algo_map."text_model.encoder.layers.0.mlp.fc2"]\nalgo = "ia3"\n')


def test_preset_maps_to_other_algorithms_build_what_lycoris_builds(tmp_path):
    """A preset file whose maps give layers other algorithms than the network's (LoKr attention, one LoHa and one
    IA3 MLP layer in a LoCon network): each layer gets the module LyCORIS' create_network makes for it on the same
    CLIP, with the same tensors (names, shapes) and scale."""
    pytest.importorskip("lycoris.kohya")
    sd1 = models.make_sd1(seed=4)
    (tmp_path / "mixed.toml").write_text(MIXED)
    clip = getattr(sd1.cond_stage_model, "wrapped", sd1.cond_stage_model).transformer
    ref = _lycoris_te_net(clip, tmp_path / "mixed.toml")
    want = {}
    for m in ref.text_encoder_loras:
        tensors = {k: tuple(v.shape) for k, v in m.state_dict().items() if k != "alpha"}
        want[m.lora_name] = (type(m).__name__, tensors, round(float(getattr(m, "scale", 1.0)), 6))
    kinds = {"LoConModule": "LoRAPair", "LokrModule": "LokrPair", "LohaModule": "LohaPair", "IA3Module": "Ia3Pair"}
    assert {v[0] for v in want.values()} == set(kinds)
    net = LoRANetwork(sd1, "sd1", dim=8, alpha=4, train_unet=False,
                      lyco=LycoSettings("locon", custom=lp.read_preset(tmp_path / "mixed.toml", "mixed.toml")))
    sd = net.kohya_state_dict()
    got = {}
    for name, pair in net.pairs.items():
        tensors = {k.split(".", 1)[1]: tuple(v.shape) for k, v in sd.items()
                   if k.startswith(name + ".") and not k.endswith(".alpha")}
        got[name] = (type(pair).__name__, tensors, round(float(getattr(pair, "scale", 1.0)), 6))
    assert {n: (kinds[c], t, s) for n, (c, t, s) in want.items()} == got


def test_a_mixed_algorithm_preset_trains_and_loads(tmp_path):
    sd1 = models.make_sd1(seed=4)
    img, _ = _dataset(tmp_path)
    (tmp_path / "mixed.toml").write_text('unet_target_module = ["Transformer2DModel"]\n' + MIXED)
    cfg = _cfg(tmp_path, img, max_train_steps=2, network_args=["algo=locon", "preset=mixed.toml"])
    errors, notes = check_support(cfg, "sd1")
    assert errors == [] and any("maps give algo=ia3, loha, lokr train as that algorithm" in n for n in notes), notes
    assert any(n.startswith("IA3 layers apply in this extension's <lora:>") for n in notes)
    before = models.model_state_hash(sd1)
    res = run_training(ModelHost(sd1, "m"), cfg)
    assert res.status == "done" and models.model_state_hash(sd1) == before
    sd = load_tensors(res.final)
    assert any(k.endswith("self_attn_q_proj.lokr_w1_a") for k in sd)
    assert "lora_te_text_model_encoder_layers_1_mlp_fc1.hada_w1_a" in sd
    assert "lora_te_text_model_encoder_layers_0_mlp_fc2.weight" in sd
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in sd)
    net = load_network(res.final, "sd1", layer_names=set(layer_mapping(sd1)))
    assert len(net.report.matched) == net.report.total_modules == len({k.split(".")[0] for k in sd})


def test_dim_from_weights_rebuilds_a_mixed_file_with_tucker_cores(tmp_path):
    """A file of several algorithms (a mixed preset: LoKr attention, LoHa and IA3 MLP layers, LoCon elsewhere with
    Tucker cores on the UNet's 3x3 convs) continues under a network of another algorithm and settings: every
    module keeps its type and every tensor its shape."""
    sd1 = models.make_sd1(seed=4)
    img, _ = _dataset(tmp_path)
    (tmp_path / "mixed.toml").write_text('unet_target_module = ["ResnetBlock2D", "Transformer2DModel"]\n'
                                         'enable_conv = true\n' + MIXED)
    first = run_training(ModelHost(sd1, "m"), _cfg(tmp_path, img, max_train_steps=1, network_args=[
        "algo=locon", "preset=mixed.toml", "conv_dim=2", "conv_alpha=1", "use_tucker=True"]))
    assert first.status == "done"
    sd = load_tensors(first.final)
    assert sum(k.endswith(".lora_mid.weight") for k in sd) > 10 and any(k.endswith(".hada_w1_a") for k in sd)
    res = run_training(ModelHost(sd1, "m"), _cfg(tmp_path, img, output_dir=str(tmp_path / "o2"), max_train_steps=1,
                                                 network_dim=16, network_args=["algo=lokr", "factor=4"],
                                                 network_weights=first.final, dim_from_weights=True))
    assert res.status == "done"
    assert {k: v.shape for k, v in load_tensors(res.final).items()} == {k: v.shape for k, v in sd.items()}
    assert any("keeps its own algorithm" in n and "LoRA/LoCon" in n for n in res.notes), res.notes
    assert any(n.startswith(f"started from {first.final} (0 tensors not in that file)") for n in res.notes)


@pytest.mark.parametrize("algo, axis", [("locon", "True"), ("lokr", "False")])
def test_dim_from_weights_keeps_a_files_dora_magnitudes(algo, axis, tmp_path):
    """A DoRA file (dora_wd, either axis) continues as DoRA under network_args without dora_wd, on SD2 (its text
    encoder's MultiheadAttention projections too): every tensor, dora_scale included, keeps its shape and the run
    starts from all of them, as LyCORIS' create_network_from_weights builds DoRA modules from dora_scale."""
    sd2 = models.make_sd2(seed=4)
    img, _ = _dataset(tmp_path)
    first = run_training(ModelHost(sd2, "m"), _cfg(tmp_path, img, max_train_steps=1, network_args=[
        f"algo={algo}", "preset=attn-mlp", "dora_wd=True", f"wd_on_output={axis}"]))
    assert first.status == "done"
    sd = load_tensors(first.final)
    assert any(k.startswith("lora_te_") and k.endswith("self_attn_q_proj.dora_scale") for k in sd)
    res = run_training(ModelHost(sd2, "m"), _cfg(tmp_path, img, output_dir=str(tmp_path / "o2"), max_train_steps=1,
                                                 network_args=["algo=locon", "preset=attn-mlp"],
                                                 network_weights=first.final, dim_from_weights=True))
    assert res.status == "done"
    assert {k: v.shape for k, v in load_tensors(res.final).items()} == {k: v.shape for k, v in sd.items()}
    assert any(n.startswith(f"started from {first.final} (0 tensors not in that file)") for n in res.notes)
    assert not any("not used (e.g." in n for n in res.notes), res.notes


def test_dim_from_weights_without_dora_magnitudes_adds_none(tmp_path):
    """A file without dora_scale continued under dora_wd=True stays without DoRA (LyCORIS' make_module turns
    weight decomposition on from the file's keys only), and the run says so."""
    sd1 = models.make_sd1(seed=4)
    img, _ = _dataset(tmp_path)
    first = run_training(ModelHost(sd1, "m"), _cfg(tmp_path, img, max_train_steps=1, network_args=[
        "algo=loha", "preset=attn-mlp"]))
    sd = load_tensors(first.final)
    res = run_training(ModelHost(sd1, "m"), _cfg(tmp_path, img, output_dir=str(tmp_path / "o2"), max_train_steps=1,
                                                 network_args=["algo=locon", "preset=attn-mlp", "dora_wd=True"],
                                                 network_weights=first.final, dim_from_weights=True))
    assert res.status == "done"
    got = load_tensors(res.final)
    assert not any(k.endswith(".dora_scale") for k in got)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in sd.items()}
    n = len({k.split(".")[0] for k in sd})
    assert any(f"{n} module(s) of {first.final} have no DoRA magnitude" in m for m in res.notes), res.notes


def test_dim_from_weights_with_rs_lora_keeps_the_files_scale(tmp_path):
    """An rs_lora file holds alpha·dim/sqrt(dim), so alpha/dim is its trained scale; continuing it with
    dim_from_weights and rs_lora again applies that scale once (as LyCORIS builds modules from a file): the
    alphas are written back unchanged, not rank-stabilised a second time."""
    sd1 = models.make_sd1(seed=4)
    img, _ = _dataset(tmp_path)
    args = ["algo=locon", "preset=attn-mlp", "rs_lora=True"]
    first = run_training(ModelHost(sd1, "m"), _cfg(tmp_path, img, max_train_steps=1, network_args=args))
    sd = load_tensors(first.final)
    alphas = {k: float(v) for k, v in sd.items() if k.endswith(".alpha")}
    assert set(alphas.values()) == {4.0}  # (network_alpha 2 at rank 4: 2·4/sqrt(4))
    cfg = _cfg(tmp_path, img, output_dir=str(tmp_path / "o2"), max_train_steps=1, network_dim=16,
               network_args=args, network_weights=first.final, dim_from_weights=True)
    errors, notes = check_support(cfg, "sd1")
    assert errors == [] and any(n.startswith("rs_lora changes nothing with dim_from_weights") for n in notes)
    res = run_training(ModelHost(sd1, "m"), cfg)
    assert res.status == "done"
    again = load_tensors(res.final)
    assert {k: float(v) for k, v in again.items() if k.endswith(".alpha")} == alphas
    assert {k: v.shape for k, v in again.items()} == {k: v.shape for k, v in sd.items()}
