"""Training LyCORIS networks (network_module = "lycoris.kohya", algo=lora/locon/loha/lokr).

References, none of them our code:
- tests/data/lycoris_targets_reference.json: the layers LyCORIS' own kohya wrapper (lycoris.kohya.create_network)
  picks on sd-scripts' own SD1/SD2/SDXL UNets for every preset, and the tensors (names, shapes, alpha) it saves
  for them (written by tests/data/lycoris_targets_reference.py from an sd-scripts checkout);
- LyCORIS itself (lycoris-lora, a test-only peer): its create_network on the tiny models' CLIP text encoders, and
  its LoConModule / LohaModule / LokrModule on real layers for the initialisation, the forward output and the
  gradients (DoRA's magnitude included), and its forward of the trained files' modules against what our <lora:>
  loader makes of them.
"""
import json
import os
import re
import types

import pytest
import torch
import torch.nn as nn

import models
import train_data
from lib_lora.apply.layers import layer_mapping
from lib_lora.apply.loader import load_network
from lib_lora.formats.safetensors_io import load_tensors, read_metadata
from lib_lora.host.base import ModelHost
from lib_lora.train import lyco
from lib_lora.train.config import parse_train_config
from lib_lora.train.lora_net import LoRANetwork, LoRAPair
from lib_lora.train.run import plan_for, run_training
from lib_lora.train.support import check_support
from lib_lora.train.targets import LYCO_TE, lyco_preset_convs, lycoris_unet_targets, text_encoder_targets
from lib_lora.train.trainer import Trainer, TrainingError

lycoris = pytest.importorskip("lycoris")
from lycoris.modules.boft import ButterflyOFTModule  # noqa: E402
from lycoris.modules.diag_oft import DiagOFTModule  # noqa: E402
from lycoris.modules.full import FullModule  # noqa: E402
from lycoris.modules.ia3 import IA3Module  # noqa: E402
from lycoris.modules.loha import LohaModule  # noqa: E402
from lycoris.modules.norms import NormModule  # noqa: E402
from lycoris.modules.lokr import LokrModule  # noqa: E402

REF = json.load(open(os.path.join(os.path.dirname(__file__), "data", "lycoris_targets_reference.json")))


def _full_size_unet(family):
    """The real ldm (SD1/SD2) / sgm-shaped (SDXL) UNet at full size on the meta device: names and shapes only."""
    import sgm_like
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from test_formats_keymap_unet import SD1_LDM, SD2_LDM
    with torch.device("meta"):
        if family == "sdxl":
            return sgm_like.UNetModel(in_channels=4, model_channels=320, out_channels=4, num_res_blocks=2,
                                      attention_resolutions=[4, 2], channel_mult=[1, 2, 4], num_head_channels=64,
                                      use_spatial_transformer=True, transformer_depth=[1, 2, 10], context_dim=2048,
                                      use_linear_in_transformer=True, legacy=False, num_classes="sequential",
                                      adm_in_channels=2816, transformer_depth_middle=10)
        return UNetModel(**(SD1_LDM if family == "sd1" else SD2_LDM))


@pytest.fixture(scope="module")
def full_unets():
    return {f: _full_size_unet(f) for f in ("sd1", "sd2", "sdxl")}


@pytest.fixture(scope="module")
def sd1():
    return models.make_sd1(seed=6)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_unet_layers_of_every_preset_are_lycoris_on_sd_scripts(family, full_unets):
    for preset, want in REF["families"][family]["presets"].items():
        got = [t.kohya_name for t in lycoris_unet_targets(full_unets[family], family, preset,
                                                          lyco_preset_convs(preset))]
        assert len(got) == len(set(got))
        assert sorted(got) == want, (preset, sorted(set(want) - set(got))[:3], sorted(set(got) - set(want))[:3])
        if preset in REF["families"][family]["norms"]:  # train_norm: the norm layers of the same blocks
            norms = [t.kohya_name for t in lycoris_unet_targets(full_unets[family], family, preset,
                                                                lyco_preset_convs(preset), norms=True)
                     if t.kind == "norm"]
            assert sorted(norms) == REF["families"][family]["norms"][preset], preset
    # SD1: the four layers outside the blocks are the difference to kohya's LoCon (278 modules)
    assert len(REF["families"]["sd1"]["presets"]["full"]) == 278 + 4


ALGO_SETTINGS = {"locon": lyco.LycoSettings("locon"), "loha": lyco.LycoSettings("loha"),
                 "lokr": lyco.LycoSettings("lokr"), "lokr_f8_both": lyco.LycoSettings("lokr", factor=8,
                                                                                       decompose_both=True),
                 "locon_tucker": lyco.LycoSettings("locon", tucker=True),
                 "loha_tucker": lyco.LycoSettings("loha", tucker=True),
                 "lokr_tucker": lyco.LycoSettings("lokr", tucker=True)}


@pytest.mark.parametrize("family, algo", [("sd1", a) for a in ALGO_SETTINGS] + [("sdxl", "lokr"),
                                                                                  ("sdxl", "lokr_f8_both")])
def test_saved_tensors_are_lycoris_names_shapes_and_alphas(family, algo, full_unets):
    ref = REF["families"][family]["tensors"]
    sd_model = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=full_unets[family]))
    net = LoRANetwork(sd_model, family, dim=REF["dim"], alpha=REF["alpha"], conv_dim=REF["conv_dim"],
                      conv_alpha=REF["conv_alpha"], train_text_encoder=False, lyco=ALGO_SETTINGS[algo])
    sd = net.kohya_state_dict()
    got: dict = {}
    for k, v in sd.items():
        name, key = k.split(".", 1)
        got.setdefault(name, {})[key.replace(".weight", "") if algo.startswith("locon") else key] = list(v.shape)
    want = {n: {k.replace(".weight", ""): s for k, s in d.items()} for n, d in ref[algo].items()}
    assert got == want
    alphas = {n: round(p.scale * p.dim, 6) for n, p in net.pairs.items()}
    assert alphas == ref[algo + ":alpha"]


def _reference_script():
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "data", "lycoris_targets_reference.py")
    spec = importlib.util.spec_from_file_location("lycoris_targets_reference", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("preset", ["full", "attn-only", "ia3"])
def test_text_encoder_layers_are_lycoris_on_the_same_clip(sd1, preset):
    """The layers (and for the ia3 preset IA3's axis per layer) LyCORIS picks on the same CLIP; the ia3 preset
    with its names read as suffixes (tests/data/lycoris_targets_reference.py says why)."""
    import lycoris.kohya as lk
    from lycoris.config import PRESET
    clip = getattr(sd1.cond_stage_model, "wrapped", sd1.cond_stage_model).transformer
    if preset == "ia3":
        name, algo = _reference_script().ia3_preset(), "ia3"
    else:
        name, algo = "_te_ref", "loha"
        PRESET[name] = {k: (list(v) if isinstance(v, list) else v) for k, v in PRESET[preset].items()}
    try:
        ref = lk.create_network(1.0, 4, 1, None, clip, nn.Module(), preset=name, algo=algo)
    finally:
        del PRESET[name]
        if preset == "ia3":
            _reference_script().ia3_preset(False)
    want = sorted(m.lora_name for m in ref.text_encoder_loras)
    got = sorted(t.kohya_name for t in text_encoder_targets(sd1, "sd1", layers=LYCO_TE[preset]))
    assert got == want and len(got) == models.TEXT_LAYERS * {"attn-only": 4, "ia3": 3}.get(preset, 6)
    if preset == "ia3":
        net = LoRANetwork(sd1, "sd1", train_unet=False, lyco=lyco.LycoSettings("ia3", preset="ia3"))
        assert {n: int(p.on_input) for n, p in net.pairs.items()} == {
            m.lora_name: int(m.on_input) for m in ref.text_encoder_loras}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_ia3_preset_scales_the_axes_lycoris_scales(family):
    """On sd-scripts' full-size UNets: which ia3-preset layers IA3 scales on the input side (ff.net.2), and the
    saved tensors' names and shapes."""
    unet = _full_size_unet(family)
    sd_model = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=unet))
    net = LoRANetwork(sd_model, family, train_text_encoder=False, lyco=lyco.LycoSettings("ia3", preset="ia3"))
    want = REF["families"][family]["tensors"]["ia3:on_input"]
    assert {n: int(p.on_input) for n, p in net.pairs.items()} == want and 0 < sum(want.values()) < len(want)
    sd = net.kohya_state_dict()
    for n, pair in net.pairs.items():
        layer = next(t.module for t in net.targets if t.kohya_name == n)
        assert sd[f"{n}.weight"].shape == (layer.weight.shape[1 if pair.on_input else 0],)
        assert set(k for k in sd if k.startswith(n + ".")) == {f"{n}.weight", f"{n}.on_input"}


LAYERS = {
    "linear": lambda: nn.Linear(24, 40),
    "linear_big": lambda: nn.Linear(64, 96),
    "conv3_stride2": lambda: nn.Conv2d(16, 32, 3, stride=2, padding=1),
    "conv1x1": lambda: nn.Conv2d(16, 48, 1),
    "conv_in": lambda: nn.Conv2d(4, 32, 3, padding=1),
}
CASES = [("loha", {}), ("lokr", {}), ("lokr", {"factor": 4}), ("lokr", {"decompose_both": True, "factor": 4}),
         ("lokr", {"full_matrix": True}), ("lokr", {"unbalanced_factorization": True}),
         ("loha", {"use_tucker": True}), ("lokr", {"use_tucker": True})]


def _lycoris_module(algo, layer, dim, alpha, kw):
    cls = LohaModule if algo == "loha" else LokrModule
    return cls("lora_test", layer, 1.0, dim, alpha, **kw)


def _our_pair(algo, layer, dim, alpha, kw):
    s = lyco.LycoSettings(algo, factor=kw.get("factor", -1), decompose_both=kw.get("decompose_both", False),
                          full_matrix=kw.get("full_matrix", False), unbalanced=kw.get("unbalanced_factorization",
                                                                                      False),
                          tucker=kw.get("use_tucker", False))
    return lyco.make_pair(s, tuple(layer.weight.shape), dim, alpha)


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("algo, kw", CASES)
def test_init_is_lycoris_init_and_a_no_op(layer, algo, kw):
    torch.manual_seed(0)
    org = LAYERS[layer]()
    torch.manual_seed(11)
    ref = _lycoris_module(algo, org, 4, 2.0, kw)
    torch.manual_seed(11)
    ours = _our_pair(algo, org, 4, 2.0, kw)
    want = {k: v for k, v in ref.state_dict().items() if k not in ("scalar",)}
    got = dict(ours.tensors(), alpha=ours.alpha)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)  # same RNG draws in the same order
    assert float(ours.delta_weight().abs().max()) == 0.0


def _randomise(ref, g):
    """Every factor random (the init zeroes one); DoRA's magnitude moved off the host weight's norm."""
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n == "dora_scale":
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _same_as_lycoris(ref, twin, ours, org, make_forward, g, multiplier=0.7, names=None):
    """LyCORIS' module applied to ``twin`` against ours patched into ``org`` (same weights): the same output and
    the same gradient for every trained tensor. ``names``: our tensor names -> LyCORIS' parameters where they
    differ (FullModule's weight/bias hold the difference until apply_to)."""
    names = names or {}
    missing = []
    params = dict(ref.named_parameters())
    ours.load_tensors({f"m.{k}": v for k, v in ref.state_dict().items()}
                      | {f"m.{o}": params[r].detach() for o, r in names.items()}, "m", missing)
    assert not missing
    ref.apply_to()
    ref.multiplier = multiplier
    net = types.SimpleNamespace(multiplier=multiplier, training=True, module_dropout=None, dropout=None,
                                rank_dropout=None, _passes_through=lambda: False)
    plain = type(org).forward.__get__(org)
    org.forward = make_forward(net, ours, org, plain)
    x = torch.randn((3, 7, org.in_features) if isinstance(org, nn.Linear) else (2, org.in_channels, 9, 9),
                    generator=g)
    y_ref, y = twin(x), org(x)
    assert float((y - plain(x)).abs().max()) > 1e-3  # the module changes the layer
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    (y_ref * y_ref.detach().cos()).sum().backward()
    (y * y.detach().cos()).sum().backward()
    ref_grads = dict(ref.named_parameters())
    ours_names = {names.get(k, k) for k, _ in ours.named_parameters()}
    assert ours_names == set(ref_grads) - ({"scalar"} - ours_names)  # (a trained scalar only with use_scalar)
    for k, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[names.get(k, k)].grad, rtol=1e-4, atol=1e-5, msg=k)


def _weight_forward(net, ours, org, plain):
    return LoRANetwork._weight_forward(net, ours, org, plain)


def _pair_forward(net, ours, org, plain):
    return LoRANetwork._pair_forward(net, ours, plain)


def _twins(layer):
    torch.manual_seed(0)
    org = LAYERS[layer]()
    twin = LAYERS[layer]()
    twin.load_state_dict(org.state_dict())
    return org, twin


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("algo, kw", CASES)
def test_forward_and_gradients_are_lycoris(layer, algo, kw):
    org, twin = _twins(layer)
    ref = _lycoris_module(algo, twin, 4, 3.0, kw)
    g = torch.Generator().manual_seed(5)
    _randomise(ref, g)
    _same_as_lycoris(ref, twin, _our_pair(algo, org, 4, 3.0, kw), org, _weight_forward, g)


@pytest.mark.parametrize("layer", ["conv3_stride2", "conv_in"])
def test_tucker_locon_is_lycoris(layer):
    """algo=locon with use_tucker: 1x1 down, kxk lora_mid core, 1x1 up; init (same draws), output, gradients."""
    from lycoris.modules.locon import LoConModule
    org, twin = _twins(layer)
    torch.manual_seed(3)
    ref = LoConModule("x", twin, 1.0, 4, 2.0, use_tucker=True)
    torch.manual_seed(3)
    ours = LoRAPair(org.in_channels, org.out_channels, 4, 2.0, org.kernel_size, org.stride, org.padding, tucker=True)
    want = {k: v for k, v in ref.state_dict().items() if k != "scalar"}
    got = {k: v for k, v in ours.state_dict().items()}
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    g = torch.Generator().manual_seed(5)
    _randomise(ref, g)
    _same_as_lycoris(ref, twin, ours, org, _pair_forward, g)


DORA_CASES = [("locon", {}), ("locon", {"use_tucker": True}), ("loha", {}), ("loha", {"use_tucker": True}),
              ("lokr", {}), ("lokr", {"decompose_both": True, "factor": 4})]


def _lycoris_dora(algo, layer, kw, on_output, dora=True):
    from lycoris.modules.locon import LoConModule
    kw = dict(kw, weight_decompose=dora, wd_on_out=on_output)
    if algo == "locon":
        return LoConModule("x", layer, 1.0, 4, 2.0, **kw)
    return _lycoris_module(algo, layer, 4, 2.0, kw)


def _our_dora(algo, layer, kw, on_output, dora=True):
    if algo != "locon":
        ours = _our_pair(algo, layer, 4, 2.0, kw)
    elif isinstance(layer, nn.Linear):
        ours = LoRAPair(layer.in_features, layer.out_features, 4, 2.0)
    else:
        ours = LoRAPair(layer.in_channels, layer.out_channels, 4, 2.0, layer.kernel_size, layer.stride,
                        layer.padding, tucker=kw.get("use_tucker", False) and layer.kernel_size != (1, 1))
    if dora:
        ours.init_dora(layer.weight, on_output)
    return ours


@pytest.mark.parametrize("on_output", [True, False], ids=["per_output", "per_input"])
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("algo, kw", DORA_CASES)
def test_dora_modules_are_lycoris(layer, algo, kw, on_output):
    """dora_wd (both magnitude layouts, wd_on_output): the saved tensors at the start (magnitude = the host
    weight's norm, same RNG draws for the factors), then with every tensor moved: output and gradients (the
    magnitude's included) against LyCORIS' own module, at multiplier 0.7 (LyCORIS interpolates DoRA's factor)."""
    org, twin = _twins(layer)
    torch.manual_seed(3)
    ref = _lycoris_dora(algo, twin, kw, on_output)
    torch.manual_seed(3)
    ours = _our_dora(algo, org, kw, on_output)
    want = {k: v for k, v in ref.state_dict().items() if k != "scalar"}
    got = ours.file_tensors()
    assert got.keys() == want.keys() and "dora_scale" in got
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    g = torch.Generator().manual_seed(5)
    _randomise(ref, g)
    _same_as_lycoris(ref, twin, ours, org, _weight_forward, g)


def test_factorization_is_lycoris():
    from lycoris.functional import factorization
    for d in (1, 4, 7, 64, 127, 128, 250, 320, 360, 640, 768, 1024, 1280, 2816):
        for f in (-1, 2, 4, 8, 16, 3):
            assert lyco.factorization(d, f) == factorization(d, f), (d, f)


def _dataset(tmp_path):
    return train_data.make_dataset(str(tmp_path / "d"), n_concept=3, repeats=2)


def _cfg(tmp_path, img, out, **kw):
    c = {"train_data_dir": img, "resolution": 64, "train_batch_size": 2, "output_dir": str(tmp_path / out),
         "output_name": "ly", "network_dim": 4, "network_alpha": 2, "learning_rate": 2e-3, "text_encoder_lr": 1e-3,
         "max_train_epochs": 2, "seed": 3, "save_precision": "float", "network_module": "lycoris.kohya"}
    c.update(kw)
    return parse_train_config(c, base_dir=str(tmp_path))


DORA_ARGS = {None: [], "output": ["dora_wd=True"], "input": ["dora_wd=True", "wd_on_output=False"]}


@pytest.mark.parametrize("algo, tucker, dora", [("loha", False, None), ("lokr", False, None), ("locon", False, None),
                                               ("locon", True, None), ("loha", True, None),
                                               ("locon", False, "output"), ("loha", True, "input"),
                                               ("lokr", False, "output")])
def test_training_writes_lycoris_files_that_load_fully(sd1, tmp_path, algo, tucker, dora):
    img, _ = _dataset(tmp_path)
    before = models.model_state_hash(sd1)
    events = []
    nargs = [f"algo={algo}", "conv_dim=2"] + (["use_tucker=True"] if tucker else []) + DORA_ARGS[dora]
    res = run_training(ModelHost(sd1, "m"), _cfg(tmp_path, img, "o", network_args=nargs), on_event=events.append)
    assert res.status == "done" and res.steps == 6
    start = next(e.message for e in events if e.kind == "start")
    kind = {"loha": "LoHa", "lokr": "LoKr", "locon": "LoRA"}[algo] + (f" + DoRA (per {dora})" if dora else "")
    assert start.startswith(kind + " (LyCORIS preset full)"), start
    notes = [e.message for e in events if e.kind == "note"]
    assert len(notes) == len(set(notes)), notes  # check_support's notes are not said a second time
    assert any("A1111's built-in Lora" in n for n in notes) == (dora == "output")
    assert models.model_state_hash(sd1) == before
    sd = load_tensors(res.final)
    md = read_metadata(res.final)
    assert md["ss_network_module"] == "lycoris.kohya"
    assert json.loads(md["ss_network_args"]) == dict({a.split("=")[0]: a.split("=")[1] for a in nargs[1:]},
                                                     algo=algo)
    names = {k.split(".")[0] for k in sd}
    unet = {t.kohya_name: t.module for t in lycoris_unet_targets(sd1.model.diffusion_model, "sd1", "full", True)}
    te = {t.kohya_name for t in text_encoder_targets(sd1, "sd1")}
    assert names == set(unet) | te and "lora_unet_conv_in" in names
    net = load_network(res.final, "sd1", layer_names=set(layer_mapping(sd1)))
    assert len(net.report.matched) == net.report.total_modules == len(names)
    # the UNet (conv_in and the time embedding included) and the text encoder learned something
    zero_half = {"loha": "hada_w2_a", "lokr": "lokr_w2_b", "locon": "lora_up.weight"}[algo]
    if tucker:
        assert any(k.endswith((".lora_mid.weight", ".hada_t1")) for k in sd)
    for n in ("lora_unet_conv_in", "lora_unet_time_embedding_linear_1", "lora_unet_mid_block_attentions_0_proj_in",
              "lora_te_text_model_encoder_layers_0_self_attn_q_proj"):
        key = f"{n}.{zero_half}" if f"{n}.{zero_half}" in sd else f"{n}.lokr_w2"  # (LoKr: a whole w2)
        assert sd[key].abs().max() > 0, key
    # each module is what LyCORIS builds on that layer with these settings: same tensor names and shapes
    from lycoris.modules.locon import LoConModule
    # With DoRA also: the layer with what our <lora:> loader adds gives LyCORIS' own forward of the file's module.
    ours = {mod.ctx.module_key: mod for mods in net.modules.values() for _, mod in mods}
    kw = {"use_tucker": tucker} if not dora else {"use_tucker": tucker, "weight_decompose": True,
                                                   "wd_on_out": dora == "output"}
    for n, layer in unet.items():
        is_conv3 = isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1)
        dim, alpha = (2, 2.0) if is_conv3 else (4, 2.0)  # conv_alpha defaults to network_alpha (LyCORIS)
        ref = (LoConModule("x", layer, 1.0, dim, alpha, **kw) if algo == "locon"
               else _lycoris_module(algo, layer, dim, alpha, kw))
        want = {k: tuple(v.shape) for k, v in ref.state_dict().items() if k != "scalar"}
        got = {k.split(".", 1)[1]: tuple(v.shape) for k, v in sd.items() if k.split(".")[0] == n}
        assert got == want, n
        assert float(sd[f"{n}.alpha"]) == float(ref.alpha), n
        if dora:
            _loaded_module_is_lycoris_forward(ref, layer, ours[n], sd, n)


@pytest.mark.parametrize("dora", [False, True], ids=["plain", "dora"])
@pytest.mark.parametrize("layer", ["linear", "conv3_stride2"])
@pytest.mark.parametrize("algo, kw", [("locon", {}), ("loha", {}), ("lokr", {"decompose_both": True, "factor": 4}),
                                      ("lokr", {"full_matrix": True})])
def test_rank_stabilised_scale_is_lycoris(layer, algo, kw, dora):
    """rs_lora: scale alpha/sqrt(dim); the saved alpha (alpha·sqrt(dim)) is LyCORIS' own, so loaders reading
    alpha/dim apply the trained scale; output and gradients as LyCORIS'."""
    org, twin = _twins(layer)
    torch.manual_seed(3)
    ref = _lycoris_dora(algo, twin, dict(kw, rs_lora=True), True, dora)
    torch.manual_seed(3)
    ours = _our_dora(algo, org, kw, True, dora)
    ours.use_rs_scale()
    want = {k: v for k, v in ref.state_dict().items() if k != "scalar"}
    got = ours.file_tensors()
    torch.testing.assert_close(got["alpha"], want["alpha"], rtol=0, atol=0)
    assert float(got["alpha"]) / ours.dim == pytest.approx(ref.scale, rel=1e-6) and ours.scale == ref.scale
    g = torch.Generator().manual_seed(5)
    _randomise(ref, g)
    _same_as_lycoris(ref, twin, ours, org, _pair_forward if algo == "locon" and not dora else _weight_forward, g)


def _loaded_module_is_lycoris_forward(ref, layer, loaded, sd, name, multiplier=0.8):
    """LyCORIS' module with the file's tensors, run on a copy of ``layer`` at ``multiplier`` (DoRA's factor is
    interpolated there), against the layer's own op with our loader's delta added to its weight. (Not LyCORIS'
    get_merged_weight: in lycoris-lora 4.1.3 it applies alpha/dim twice for LoHa/LoKr; its forward, the function
    it trains and the one A1111 and ComfyUI follow, applies it once.)"""
    import copy
    import torch.nn.functional as F
    twin = copy.deepcopy(layer)
    ref.org_module = [twin]
    ref.load_state_dict({k.split(".", 1)[1]: v for k, v in sd.items() if k.split(".")[0] == name}, strict=False)
    ref.apply_to()
    ref.multiplier = multiplier
    ref.eval()
    g = torch.Generator().manual_seed(1)
    w = layer.weight.detach()
    delta, db = loaded.delta(w, multiplier)[:2]
    # (the tiny models' mid block attends over one latent pixel: softmax of one score has no gradient, so the
    # q/k of its self-attention learn nothing, exactly so on some CPUs)
    if not re.search(r"mid_block_attentions_\d+_transformer_blocks_\d+_attn1_to_[qk]$", name):
        assert float(delta.abs().max()) > 0, name
    b = layer.bias if db is None else layer.bias + db
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            x = torch.randn(3, layer.in_features, generator=g)
            y = F.linear(x, w + delta, b)
        else:
            x = torch.randn(2, layer.in_channels, 8, 8, generator=g)
            y = F.conv2d(x, w + delta, b, layer.stride, layer.padding, layer.dilation, layer.groups)
        torch.testing.assert_close(y, twin(x), rtol=1e-5, atol=1e-5, msg=name)


def _projection_twin(host: nn.Module, target) -> nn.Module:
    """The layer sd-scripts' HF CLIP has where ours has an open_clip MHA: a Linear with a row block of the MHA's
    in_proj (``target.part`` q/k/v), or a copy of the host layer."""
    import copy
    if isinstance(host, nn.Conv2d):
        return copy.deepcopy(host)
    if target.part is None:  # (a plain Linear: LyCORIS takes the MHA's out_proj class for a quantised one)
        w, b = host.weight, host.bias
    else:
        i = "qkv".index(target.part)
        w, b = host.in_proj_weight.chunk(3)[i], host.in_proj_bias.chunk(3)[i]
    twin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        twin.weight.copy_(w)
        if b is not None:
            twin.bias.copy_(b)
    return twin


def test_dora_on_multi_head_attention_is_lycoris_on_each_projection(tmp_path):
    """SD2's open_clip text encoder keeps q/k/v in one in_proj_weight (sd-scripts' HF CLIP has four Linears):
    each projection gets its own magnitude, per input columns here, and the file's q/k/v/out modules are what
    LyCORIS' LoConModule does on a Linear with that projection's weight."""
    from lycoris.modules.locon import LoConModule
    sd2 = models.a1111_embedding_hijack(models.make_sd2(seed=1), "sd2")
    img, _ = _dataset(tmp_path)
    events = []
    res = run_training(ModelHost(sd2, "m"), _cfg(tmp_path, img, "o", max_train_epochs=1, network_args=[
        "algo=locon", "dora_wd=True", "wd_on_output=False", "preset=attn-mlp"]), on_event=events.append)
    assert res.status == "done"
    sd = load_tensors(res.final)
    # the UNet's Linear proj_in/out are 1x1 convs in sd-scripts' SD2 UNet: their magnitudes too are 4-D
    proj = "lora_unet_down_blocks_1_attentions_0_proj_in"
    assert sd[f"{proj}.lora_down.weight"].dim() == 4 and sd[f"{proj}.dora_scale"].shape[2:] == (1, 1)
    assert any("DoRA on SD2" in e.message for e in events if e.kind == "note")
    net = load_network(res.final, "sd2", layer_names=set(layer_mapping(sd2)))
    assert len(net.report.matched) == net.report.total_modules
    layers = layer_mapping(sd2)
    checked = 0
    for layer_name, mods in net.modules.items():
        for target, mod in mods:
            n = mod.ctx.module_key
            if not n.startswith("lora_te"):
                continue
            twin = _projection_twin(layers[layer_name], target)
            assert tuple(sd[f"{n}.dora_scale"].shape) == (1, twin.in_features), n
            ref = LoConModule("x", twin, 1.0, 4, 2.0, weight_decompose=True, wd_on_out=False)
            _loaded_module_is_lycoris_forward(ref, twin, mod, sd, n)
            checked += 1
    assert checked == len({k.split(".")[0] for k in sd if k.startswith("lora_te")}) > 0
    assert any(k.endswith("_q_proj.dora_scale") for k in sd)


def test_network_weights_that_do_not_fit_are_said_not_dropped(sd1, tmp_path):
    """Continuing a DoRA file: with the same settings it loads whole; a plain LoRA run says the magnitudes are
    not used and how to keep them; another rank or network type stops before training with what to set."""
    img, _ = _dataset(tmp_path)
    dora = ["algo=locon", "dora_wd=True"]
    first = run_training(ModelHost(sd1, "m"), _cfg(tmp_path, img, "a", max_train_epochs=1, network_args=dora))

    def notes_of(out, **kw):
        events = []
        res = run_training(ModelHost(sd1, "m"), _cfg(tmp_path, img, out, max_train_epochs=1,
                                                     network_weights=first.final, **kw), on_event=events.append)
        assert res.status == "done"
        return " ".join(e.message for e in events if e.kind == "note")

    text = notes_of("same", network_args=dora)
    assert "(0 tensors not in that file)" in text and "are not used" not in text
    text = notes_of("plain", network_module="networks.lora", network_args=[])
    assert "not used (e.g. " in text and "dora_wd=True" in text
    before = models.model_state_hash(sd1)
    with pytest.raises(TrainingError, match=r"other shapes than this network's .*network \(8, 32\).*dim_from_w"):
        run_training(ModelHost(sd1, "m"), _cfg(tmp_path, img, "rank", network_weights=first.final, network_dim=8,
                                               network_args=dora))
    # as that message says: the ranks from the file
    text = notes_of("dims", network_dim=8, network_args=dora, dim_from_weights=True)
    assert "(0 tensors not in that file)" in text and "are not used" not in text
    with pytest.raises(TrainingError, match="none of its tensors belong to this network"):
        run_training(ModelHost(sd1, "m"), _cfg(tmp_path, img, "loha", network_weights=first.final,
                                               network_args=["algo=loha"]))
    assert models.model_state_hash(sd1) == before


def test_network_args_dropout_is_the_lycoris_neuron_dropout(sd1, tmp_path):
    """LyCORIS takes its dropout from network_args (sd-scripts' network_dropout does not reach it): honoured, in the
    metadata, and range-checked like the other dropouts."""
    img, _ = _dataset(tmp_path)
    res = run_training(ModelHost(sd1, "m"), _cfg(tmp_path, img, "o", max_train_epochs=1,
                                                 network_args=["algo=locon", "dropout=0.25"]))
    assert res.status == "done" and read_metadata(res.final)["ss_network_dropout"] == "0.25"
    errors, _ = check_support(_cfg(tmp_path, img, "x", network_args=["algo=locon", "dropout=1.5"]), "sd1")
    assert any("dropout=1.5 must be at least 0 and below 1" in e for e in errors), errors


@pytest.mark.parametrize("args", [["algo=loha", "conv_dim=2", "preset=full"],
                                  ["algo=locon", "conv_dim=2", "dora_wd=True", "rs_lora=True"],
                                  ["algo=ia3", "preset=ia3"], ["algo=full", "preset=attn-only", "rank_dropout=0.2", "rank_dropout_scale=True"],
                                  ["algo=diag-oft", "preset=attn-mlp", "constraint=0.01", "rescaled=True",
                                   "train_norm=True"],
                                  ["algo=locon", "conv_dim=2", "use_scalar=True"],
                                  ["algo=lokr", "preset=attn-mlp", "use_scalar=True", "factor=4"],
                                  ["algo=glora", "conv_dim=2", "use_scalar=True", "rs_lora=True"]],
                         ids=["loha", "locon_dora_rs", "ia3", "full", "oft_norm", "locon_scalar", "lokr_scalar",
                              "glora_scalar_rs"])
def test_resume_gives_the_same_weights(sd1, tmp_path, args):
    img, _ = _dataset(tmp_path)
    full = run_training(ModelHost(sd1, "m"), _cfg(tmp_path, img, "a", network_args=args, lr_scheduler="cosine"))
    seen = {"step": 0}
    part = run_training(ModelHost(sd1, "m"), _cfg(tmp_path, img, "b", network_args=args, lr_scheduler="cosine"),
                        on_event=lambda e: e.kind == "step" and seen.update(step=max(seen["step"], e.step)),
                        should_cancel=lambda: seen["step"] >= 3)
    assert part.status == "cancelled" and part.state_file and part.steps >= 3
    resumed = run_training(ModelHost(sd1, "m"), _cfg(tmp_path, img, "b", network_args=args, lr_scheduler="cosine"),
                           resume=part.state_file)
    assert resumed.status == "done" and resumed.steps == full.steps == 6
    a, b = load_tensors(full.final), load_tensors(resumed.final)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    if "use_scalar=True" in args:  # the scalar trained and went into the file folded: a whole, loadable LoRA
        assert not any(k.endswith(".scalar") for k in a)
        net = load_network(full.final, "sd1", layer_names=set(layer_mapping(sd1)))
        assert len(net.report.matched) == net.report.total_modules == len({k.split(".")[0] for k in a})
        first = {"locon": "lora_up.weight", "lokr": "lokr_w1", "glora": "b2.weight"}[args[0].split("=")[1]]
        assert all(float(a[k].abs().max()) > 0 for k in a if k.endswith(first))
    if "rs_lora=True" in args:  # alpha·dim/sqrt(dim): network_alpha 2 at rank 4, conv_alpha (= 2) at rank 2
        assert float(a["lora_unet_mid_block_attentions_0_proj_in.alpha"]) == 4.0
        assert float(a["lora_unet_conv_in.alpha"]) == pytest.approx(2 * 2 ** 0.5, rel=1e-6)


@pytest.mark.parametrize("args", [["algo=lokr", "preset=attn-mlp", "factor=4"],
                                  ["algo=lokr", "preset=attn-mlp", "factor=4", "dora_wd=True"],
                                  ["algo=diag-oft", "preset=attn-mlp", "constraint=0.01", "rescaled=True"],
                                  ["algo=glora", "preset=attn-mlp"]],
                         ids=["lokr", "dokr", "oft", "glora"])
def test_fast_path_trains_lokr_like_the_plain_step(sd1, tmp_path, args):
    img, _ = _dataset(tmp_path)
    cfg = dict(network_args=args, max_train_epochs=4)

    def run(out, fast):
        host = ModelHost(sd1, "m")
        c = _cfg(tmp_path, img, out, **cfg)
        t = Trainer(host, c, plan_for(host, c), fast=fast)
        return t, t.run()

    ta, a = run("plain", False)
    tb, b = run("fast", True)
    assert "flat LoRA buffer" in tb.fast_desc, tb.fast_desc
    wa, wb = load_tensors(a.final), load_tensors(b.final)
    assert wa.keys() == wb.keys() and not any("conv_in" in k or "resnets" in k for k in wa)  # attn-mlp: no convs
    for k in wa:
        # (a zero-start tensor that never moved a tenth of one AdamW step had no real gradient, only float noise
        # whose summation order decides the update: the tiny mid block's self-attention q/k, over one latent pixel)
        if k.endswith("oft_blocks") and max(float(wa[k].abs().max()), float(wb[k].abs().max())) < 2e-4:
            continue
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-4, msg=k)
    learned = {"diag-oft": "oft_blocks", "glora": "a2.weight"}.get(args[0].split("=")[1], "lokr_w2_b")
    assert max(float(wa[k].abs().max()) for k in wa if k.endswith(learned)) > 1e-3  # it did learn
    if "dora_wd=True" in args:  # the magnitudes too (they start at the host weight's norms)
        start = LoRANetwork(sd1, "sd1", 4, 2.0, lyco=lyco.lyco_settings("lycoris.kohya", {"algo": "lokr",
                            "preset": "attn-mlp", "dora_wd": "True"}, [])).kohya_state_dict()
        moved = [k for k in wa if k.endswith("dora_scale") and not torch.equal(wa[k], start[k])]
        assert len(moved) == len([k for k in wa if k.endswith("dora_scale")]) > 0


def test_what_cannot_be_trained_is_refused_with_what_to_change(sd1, tmp_path):
    img, _ = _dataset(tmp_path)
    cases = {
        ("algo=dylora", "block_size=2"): r"algo=dylora: .* use network_module = networks.dylora with network_args "
                                         r"unit=2, .* LoRA Studio trains algo=lora, locon, loha, lokr, ia3, full, "
                                         r"diag-oft, boft, glora",
        ("algo=tlora",): r"algo=tlora: LoRA Studio trains algo=lora, locon",
        ("algo=diag-oft", "constraint=-1"): r"constraint=-1: use 0 \(no cap\) or a positive number",
        ("algo=loha", "preset=mine.toml"): r"preset=mine.toml: no such file .*a relative path is read from the "
                                           r"config file's folder",
        ("algo=loha", "down_lr_weight=cosine"): r"down_lr_weight: block learning rates .* LyCORIS does not read",
        ("algo=lokr", "factor=0"): r"factor=0: use -1",
        # LyCORIS reads anything but "false" as True: "0" would train DoRA in sd-scripts
        ("algo=locon", "dora_wd=0"): r"dora_wd=0: write True or False \(LyCORIS reads every value except 'false'",
        ("algo=loha", "use_tucker=ture"): r"use_tucker=ture: write True or False",
    }
    for nargs, msg in cases.items():
        cfg = _cfg(tmp_path, img, "x", network_args=list(nargs))
        errors, _ = check_support(cfg, "sd1")
        assert any(__import__("re").search(msg, e) for e in errors), (nargs, errors)
        host = ModelHost(sd1, "m")
        with pytest.raises(TrainingError, match=msg):
            Trainer(host, cfg, plan_for(host, cfg)).run()
    errors, _ = check_support(_cfg(tmp_path, img, "x", network_module="networks.lora_flux"), "sd1")
    assert any("networks.lora_flux' cannot be trained here" in e for e in errors), errors
    cfg = _cfg(tmp_path, img, "x", network_args=["algo=loha"], scale_weight_norms=1.0)
    assert check_support(cfg, "sd1")[0] == []  # LyCORIS' max-norm for LoHa/LoKr (test below)
    # LyCORIS' LoCon max-norm (through the scalar) with use_scalar, Tucker factors and DoRA (tests below)
    cfg = _cfg(tmp_path, img, "x", network_args=["algo=locon", "use_scalar=True"], scale_weight_norms=1.0)
    assert check_support(cfg, "sd1")[0] == []
    cfg = _cfg(tmp_path, img, "x", network_args=["algo=loha", "use_scalar=True"], scale_weight_norms=1.0)
    assert check_support(cfg, "sd1")[0] == []  # (LoHa/LoKr's cap includes the scalar)
    _, notes = check_support(_cfg(tmp_path, img, "x", network_args=["algo=ia3", "use_scalar=True"]), "sd1")
    assert any("use_scalar changes nothing with algo=ia3" in n for n in notes), notes
    cfg = _cfg(tmp_path, img, "x", network_args=["algo=locon", "use_cp=True"], scale_weight_norms=1.0)
    assert check_support(cfg, "sd1")[0] == []
    # what LyCORIS itself ignores is said, not dropped silently
    _, notes = check_support(_cfg(tmp_path, img, "x", network_args=["algo=loha", "factor=4", "loraplus_lr_ratio=4"],
                                  network_dropout=0.1), "sd1")
    text = " ".join(notes)
    assert "shape LoKr modules only" in text and "LoRA+ ratios change nothing" in text
    assert "network_dropout / network_args dropout is not applied" in text
    cfg = _cfg(tmp_path, img, "x", network_args=["algo=locon", "dora_wd=True"], scale_weight_norms=1.0)
    errors, notes = check_support(cfg, "sd1")
    assert not errors and any("caps the norm of the delta before DoRA's renormalisation" in n for n in notes)
    errors, notes = check_support(_cfg(tmp_path, img, "x", network_args=["algo=locon", "dora_wd=True",
                                                                         "dropout=0.1"]), "sd1")
    text = " ".join(notes)
    assert not errors and "not applied with algo=locon with dora_wd" in text
    assert "A1111's built-in Lora (1.10) assumes per-input files" in text and "wd_on_output=False" in text
    assert "ComfyUI only nearly as trained" in text
    # ComfyUI's OFT/BOFT (measured against its weight_adapter code): as trained at strength 1, without rescale
    _, notes = check_support(_cfg(tmp_path, img, "x", network_args=["algo=diag-oft", "rescaled=True"]), "sd1")
    assert any(n.startswith("diag-oft files apply in ComfyUI as trained at strength 1 only") and
               "ignores the rescaled scales" in n for n in notes), notes
    _, notes = check_support(_cfg(tmp_path, img, "x", network_args=["algo=boft"], network_dim=16), "sd1")
    assert any(n.startswith("boft files apply in ComfyUI") and "rescaled" not in n for n in notes), notes
    _, notes = check_support(_cfg(tmp_path, img, "x", network_args=["algo=locon"]), "sd1")
    assert not any("ComfyUI" in n for n in notes), notes
    _, notes = check_support(_cfg(tmp_path, img, "x", network_args=["algo=locon", "dora_wd=True",
                                                                    "wd_on_output=False"]), "sd2")
    assert any(n.startswith("DoRA on SD2: ComfyUI and A1111's built-in Lora (1.10) skip the proj_in/proj_out")
               for n in notes), notes
    _, notes = check_support(_cfg(tmp_path, img, "x", network_args=["algo=full"]), "sd2")
    assert any(n.startswith("algo=full on SD2: ComfyUI skips the proj_in/proj_out") for n in notes), notes
    for family in ("sd1", "sdxl"):
        _, notes = check_support(_cfg(tmp_path, img, "x", network_args=["algo=full", "dora_wd=True"]), family)
        assert not any("on SD2" in n for n in notes), notes
    _, notes = check_support(_cfg(tmp_path, img, "x", network_args=["algo=locon", "dora_wd=True",
                                                                    "wd_on_output=False"]), "sd1")
    assert not any("built-in Lora" in n for n in notes), notes
    _, notes = check_support(_cfg(tmp_path, img, "x", network_args=["algo=loha", "wd_on_output=False"]), "sd1")
    assert any("changes nothing without dora_wd=True" in n for n in notes), notes
    # IA3 / full: the switches their LyCORIS modules take and ignore are named
    errors, notes = check_support(_cfg(tmp_path, img, "x", scale_weight_norms=1.0, network_args=[
        "algo=ia3", "dora_wd=True", "use_tucker=True", "rank_dropout=0.1"]), "sd1")
    text = " ".join(notes)
    assert not errors and "dora_wd, use_tucker change nothing with algo=ia3" in text
    assert "scale_weight_norms changes nothing with algo=ia3" in text and "rank_dropout is not applied" in text
    assert "LyCORIS recommends preset=ia3" in text and "built-in Lora (1.10) fails on those layers" in text
    _, notes = check_support(_cfg(tmp_path, img, "x", network_args=["algo=locon", "rank_dropout_scale=True",
                                                                    "rank_dropout=0.1"]), "sd1")
    assert any("already scales the kept channels by 1/(1 - rank_dropout)" in n for n in notes), notes
    _, notes = check_support(_cfg(tmp_path, img, "x", network_args=["algo=boft", "rank_dropout_scale=True"]), "sd1")
    assert any("rank_dropout_scale changes nothing with algo=boft" in n for n in notes), notes
    _, notes = check_support(_cfg(tmp_path, img, "x", network_args=["algo=lokr", "train_norm=True",
                                                                    "rank_dropout=0.1"]), "sd1")
    assert any("rank_dropout is not applied to the norm modules" in n for n in notes), notes
    errors, notes = check_support(_cfg(tmp_path, img, "x", network_args=["algo=diag-oft", "rs_lora=True",
                                                                         "dora_wd=True"]), "sd1")
    assert not errors and any("dora_wd, rs_lora change nothing with algo=diag-oft" in n for n in notes), notes
    _, notes = check_support(_cfg(tmp_path, img, "x", network_args=["algo=loha", "constraint=0.1"]), "sd1")
    assert any("constraint / rescaled shape diag-OFT and BOFT modules only" in n for n in notes), notes
    errors, notes = check_support(_cfg(tmp_path, img, "x", network_args=["algo=full", "preset=ia3"]), "sd1")
    assert not errors and not any("recommends" in n for n in notes)
    # GLoRA: what its LyCORIS module ignores, and the loader that cannot read its layout
    errors, notes = check_support(_cfg(tmp_path, img, "x", scale_weight_norms=1.0, network_args=[
        "algo=glora", "dora_wd=True", "use_tucker=True", "rank_dropout=0.1", "rs_lora=True"]), "sd1")
    text = " ".join(notes)
    assert not errors and "dora_wd, use_tucker change nothing with algo=glora" in text and "rs_lora" not in text
    assert "scale_weight_norms changes nothing with algo=glora" in text
    assert "rank_dropout is not applied with algo=glora" in text and "network with errors" in text
    # dim_from_weights: every LyCORIS file gives each module its own (test_train_lyco_preset.py)
    for algo in ("glora", "ia3", "loha", "full", "lokr", "diag-oft", "boft"):
        assert check_support(_cfg(tmp_path, img, "x", network_args=[f"algo={algo}"], dim_from_weights=True),
                             "sd1")[0] == [], algo
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("layer", ["linear", "conv3_stride2"])
@pytest.mark.parametrize("algo, kw", [("loha", {}), ("loha", {"use_tucker": True}), ("lokr", {}),
                                      ("lokr", {"decompose_both": True, "factor": 4}),
                                      ("lokr", {"use_tucker": True, "factor": 4})])
def test_max_norm_of_loha_and_lokr_is_lycoris(layer, algo, kw):
    """scale_weight_norms on LoHa / LoKr: LyCORIS' apply_max_norm (LoHa through its scalar, folded into hada_w1_a
    when saved; LoKr on every factor): the same (scaled, norm), saved tensors and output afterwards."""
    org, twin = _twins(layer)
    ref = _lycoris_module(algo, twin, 4, 3.0, kw)
    g = torch.Generator().manual_seed(5)
    _randomise(ref, g)
    ours = _our_pair(algo, org, 4, 3.0, kw)
    missing = []
    ours.load_tensors({f"m.{k}": v for k, v in ref.state_dict().items()}, "m", missing)
    assert not missing
    for max_norm in (0.05, 1e6):  # one that caps, one that leaves it
        want_scaled, want_norm = ref.apply_max_norm(max_norm)
        scaled, norm = ours.apply_max_norm(max_norm)
        assert bool(scaled) == bool(want_scaled)
        torch.testing.assert_close(norm, torch.as_tensor(want_norm, dtype=norm.dtype), rtol=1e-5, atol=0)
    want = ref.custom_state_dict()
    for k, v in ours.file_tensors().items():
        torch.testing.assert_close(v, want[k].detach(), rtol=1e-5, atol=1e-7, msg=k)
    ref.apply_to()
    ref.multiplier = 1.0
    net = types.SimpleNamespace(multiplier=1.0, training=False, module_dropout=None, dropout=None,
                                rank_dropout=None, _passes_through=lambda: False)
    org.forward = _weight_forward(net, ours, org, type(org).forward.__get__(org))
    x = torch.randn((3, 7, org.in_features) if isinstance(org, nn.Linear) else (2, org.in_channels, 9, 9),
                    generator=g)
    with torch.no_grad():
        torch.testing.assert_close(org(x), twin(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer", ["linear", "conv3_stride2"])
@pytest.mark.parametrize("kw", [{}, {"use_tucker": True}, {"use_scalar": True}, {"weight_decompose": True}],
                         ids=["plain", "tucker", "use_scalar", "dora"])
def test_max_norm_of_locon_is_lycoris(layer, kw):
    """scale_weight_norms on LyCORIS' LoCon: its apply_max_norm caps the delta (Tucker core and scalar included,
    DoRA's magnitude not) through the scalar, which the file holds folded into lora_up: the same (scaled, norm),
    saved tensors and output; twice, so a second cap starts from the first one's scalar."""
    from lycoris.modules.locon import LoConModule
    org, twin = _twins(layer)
    dora = kw.get("weight_decompose", False)
    ref = LoConModule("x", twin, 1.0, 4, 3.0, **dict(kw, wd_on_out=True) if dora else kw)
    g = torch.Generator().manual_seed(5)
    _randomise(ref, g)
    ours = _our_dora("locon", org, kw, True, dora)
    if kw.get("use_scalar"):
        ours.enable_scalar()
    else:
        ours.enable_fixed_scalar()
    ours._set_alpha(3.0, 4)
    missing = []
    ours.load_tensors({f"m.{k}": v for k, v in ref.state_dict().items()}, "m", missing)
    assert not missing
    for max_norm in (0.05, 0.02, 1e6):  # two that cap, one that leaves it
        want_scaled, want_norm = ref.apply_max_norm(max_norm)
        scaled, norm = ours.apply_max_norm(max_norm)
        assert bool(scaled) == bool(want_scaled)
        torch.testing.assert_close(norm, torch.as_tensor(want_norm, dtype=norm.dtype), rtol=1e-5, atol=0)
    assert float(ours.scalar) < 1
    want = ref.custom_state_dict()
    for k, v in ours.file_tensors().items():
        torch.testing.assert_close(v, want[k].detach().reshape(v.shape), rtol=1e-5, atol=1e-7, msg=k)
    # a resume state keeps lora_up and the scalar apart, and gives the module back as it was
    raw = {f"m.{k}": v.detach().clone() for k, v in ours.file_tensors(raw=True).items()}
    back = _our_dora("locon", org, kw, True, dora)
    back.enable_scalar() if kw.get("use_scalar") else back.enable_fixed_scalar()
    back.load_tensors(raw, "m", missing)
    assert float(back.scalar) == float(ours.scalar) and torch.equal(back.lora_up.weight, ours.lora_up.weight)
    ref.apply_to()
    ref.multiplier = 1.0
    net = types.SimpleNamespace(multiplier=1.0, training=False, module_dropout=None, dropout=None,
                                rank_dropout=None, _passes_through=lambda: False)
    make = _weight_forward if dora else _pair_forward
    org.forward = make(net, ours, org, type(org).forward.__get__(org))
    x = torch.randn((3, 7, org.in_features) if isinstance(org, nn.Linear) else (2, org.in_channels, 9, 9),
                    generator=g)
    with torch.no_grad():
        torch.testing.assert_close(org(x), twin(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("args", [["algo=locon", "use_tucker=True", "conv_dim=2"],
                                  ["algo=lora", "dora_wd=True", "use_scalar=True"]], ids=["tucker", "dora_scalar"])
def test_scale_weight_norms_trains_lycoris_locon(sd1, tmp_path, args):
    """LoCon with Tucker factors, or DoRA with use_scalar, under scale_weight_norms: the cap applies (keys are
    scaled and every saved module's delta is within it), the file loads fully, the model is as before, and an
    interrupted run resumed from its state ends with the same weights as one that ran through."""
    img, _ = _dataset(tmp_path)
    before = models.model_state_hash(sd1)
    events = []
    kw = dict(network_args=args, learning_rate=5e-2, scale_weight_norms=0.05)
    res = run_training(ModelHost(sd1, "m"), _cfg(tmp_path, img, "o", **kw), on_event=events.append)
    assert res.status == "done" and models.model_state_hash(sd1) == before
    steps = [e for e in events if e.kind == "step"]
    assert max(e.extra["keys_scaled"] for e in steps) > 0
    sd = load_tensors(res.final)
    net = load_network(res.final, "sd1", layer_names=set(layer_mapping(sd1)))
    names = {k.split(".")[0] for k in sd}
    assert len(net.report.matched) == net.report.total_modules == len(names)
    for n in names:
        up, down = sd[f"{n}.lora_up.weight"].flatten(1), sd[f"{n}.lora_down.weight"]
        if f"{n}.lora_mid.weight" in sd:
            d = torch.einsum("oa,abhw,bi->oihw", up, sd[f"{n}.lora_mid.weight"], down.flatten(1))
        else:
            d = up @ down.flatten(1)
        assert float(d.norm() * sd[f"{n}.alpha"] / down.shape[0]) <= 0.05 * (1 + 1e-4), n
    seen = {"step": 0}
    part = run_training(ModelHost(sd1, "m"), _cfg(tmp_path, img, "b", **kw),
                        on_event=lambda e: e.kind == "step" and seen.update(step=max(seen["step"], e.step)),
                        should_cancel=lambda: seen["step"] >= 3)
    assert part.status == "cancelled" and part.state_file and part.steps >= 3
    resumed = run_training(ModelHost(sd1, "m"), _cfg(tmp_path, img, "b", **kw), resume=part.state_file)
    assert resumed.status == "done" and resumed.steps == res.steps
    again = load_tensors(resumed.final)
    for k, v in sd.items():
        torch.testing.assert_close(again[k], v, rtol=0, atol=1e-6, msg=k)


def test_scale_weight_norms_trains_a_loha(sd1, tmp_path):
    """A shipped kohya_ss LoHa preset sets scale_weight_norms = 1: it runs, the job logs the max-norm numbers and
    every saved module's delta is within the cap."""
    img, _ = _dataset(tmp_path)
    events = []
    res = run_training(ModelHost(sd1, "m"), _cfg(tmp_path, img, "o", network_args=["algo=loha"], learning_rate=5e-2,
                                                 scale_weight_norms=0.05), on_event=events.append)
    assert res.status == "done"
    steps = [e for e in events if e.kind == "step"]
    assert steps and all("max_key_norm" in e.extra for e in steps)
    assert max(e.extra["keys_scaled"] for e in steps) > 0
    sd = load_tensors(res.final)
    for n in {k.split(".")[0] for k in sd}:
        d = (sd[f"{n}.hada_w1_a"] @ sd[f"{n}.hada_w1_b"]) * (sd[f"{n}.hada_w2_a"] @ sd[f"{n}.hada_w2_b"])
        assert float(d.norm() * sd[f"{n}.alpha"] / 4) <= 0.05 * (1 + 1e-4), n


# ---- IA3 and full (native fine-tuning) ---------------------------------------------------------------------------
NO_RANK_CASES = [("ia3", {}), ("ia3", {"train_on_input": True}), ("full", {})]
FULL_NAMES = {"diff": "weight", "diff_b": "bias"}  # ours -> FullModule's parameters


def _no_rank_pair(algo, layer, kw):
    return lyco.make_pair(lyco.LycoSettings(algo), tuple(layer.weight.shape), 4, 1.0, bias=layer.bias is not None,
                          on_input=kw.get("train_on_input", False))


def _no_rank_module(algo, layer, kw):
    return (IA3Module if algo == "ia3" else FullModule)("lora_test", layer, 1.0, 4, 1.0, **kw)


@pytest.mark.parametrize("layer", ["linear", "conv3_stride2", "conv1x1"])
@pytest.mark.parametrize("algo, kw", NO_RANK_CASES)
def test_ia3_and_full_start_as_lycoris_and_save_its_tensors(layer, algo, kw):
    """Zero start (an exact no-op) and the file's tensors: IA3's weight + on_input, full's diff + diff_b, no alpha."""
    org = LAYERS[layer]()
    w = org.weight.detach().clone()
    ref, ours = _no_rank_module(algo, org, kw), _no_rank_pair(algo, org, kw)
    if algo == "full":
        ref.apply_to()  # (its custom_state_dict is weight - original, the weight being W + diff once applied)
    want = ref.state_dict() if algo == "ia3" else ref.custom_state_dict()
    got = ours.file_tensors()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].shape == want[k].shape and torch.equal(got[k].to(want[k].dtype), want[k]), k
    assert float(ours.weight_delta(w, 1.0).abs().max()) == 0.0


@pytest.mark.parametrize("layer", ["linear", "conv3_stride2", "conv1x1"])
@pytest.mark.parametrize("algo, kw", NO_RANK_CASES)
def test_ia3_and_full_forward_and_gradients_are_lycoris(layer, algo, kw):
    org, twin = _twins(layer)
    ref = _no_rank_module(algo, twin, kw)
    g = torch.Generator().manual_seed(5)
    _randomise(ref, g)
    _same_as_lycoris(ref, twin, _no_rank_pair(algo, org, kw), org, _weight_forward, g,
                     names=FULL_NAMES if algo == "full" else None)


@pytest.mark.parametrize("family, args", [
    ("sd1", ["algo=ia3", "preset=ia3"]), ("sd2", ["algo=ia3", "preset=ia3"]), ("sd1", ["algo=ia3", "conv_dim=2"]),
    ("sd1", ["algo=full", "preset=attn-mlp"]), ("sd2", ["algo=full", "preset=attn-only"]),
    ("sd1", ["algo=full", "conv_dim=2", "preset=unet-convblock-only"]),
    ("sd1", ["algo=diag-oft", "preset=attn-mlp", "constraint=0.01", "rescaled=True"]),
    ("sd2", ["algo=diag-oft", "preset=attn-only", "network_dim=8"]),
    ("sd1", ["algo=boft", "preset=attn-mlp", "network_dim=8", "rescaled=True", "constraint=0.01"]),
    ("sd1", ["algo=glora", "conv_dim=2", "use_scalar=True"]), ("sd2", ["algo=glora", "preset=attn-mlp"])])
def test_ia3_full_and_oft_training_writes_files_lycoris_runs_as_trained(family, args, tmp_path):
    """A short run: the model unchanged afterwards, the file's modules are the preset's layers (on SD2 the open_clip
    MHA as sd-scripts' separate q/k/v/out Linears, only k and v for the ia3 preset), every module loads in our
    <lora:>, and each one is what LyCORIS' own IA3Module / FullModule / DiagOFTModule, loaded with the file's
    tensors, does on that layer."""
    model = (models.make_sd1(seed=6) if family == "sd1"
             else models.a1111_embedding_hijack(models.make_sd2(seed=1), "sd2"))
    img, _ = _dataset(tmp_path)
    before = models.model_state_hash(model)
    events = []
    dim = next((int(a.split("=")[1]) for a in args if a.startswith("network_dim=")), 4)
    res = run_training(ModelHost(model, "m"), _cfg(tmp_path, img, "o", max_train_epochs=1, network_dim=dim,
                                                   network_args=[a for a in args if "network_dim" not in a]),
                       on_event=events.append)
    assert res.status == "done", [e.message for e in events if e.kind == "error"]
    assert models.model_state_hash(model) == before
    algo = args[0].split("=")[1]
    preset = next((a.split("=")[1] for a in args if a.startswith("preset=")), "full")
    start = next(e.message for e in events if e.kind == "start")
    kind = {"ia3": "IA3", "full": "Full fine-tune", "diag-oft": "Diag-OFT", "boft": "BOFT", "glora": "GLoRA"}[algo]
    assert start.startswith(kind + f" (LyCORIS preset {preset})"), start
    sd = load_tensors(res.final)
    assert json.loads(read_metadata(res.final)["ss_network_args"])["algo"] == algo
    assert any(k.endswith(".alpha") for k in sd) == (algo in OFT_MODULES or algo == "glora")  # (OFT: constraint)
    unet = {t.kohya_name for t in lycoris_unet_targets(model.model.diffusion_model, family, preset,
                                                       lyco_preset_convs(preset))}
    te = set()
    for t in text_encoder_targets(model, family, layers=LYCO_TE[preset]) if preset in LYCO_TE else []:
        te |= {f"{t.kohya_name}_{p}_proj" for p in t.parts} if t.kind == "mha" else {t.kohya_name}
    names = {k.split(".")[0] for k in sd}
    assert names == unet | te and unet
    if family == "sd2" and preset == "ia3":
        assert not any(n.endswith(("_q_proj", "_out_proj")) for n in te) and any(n.endswith("_k_proj") for n in te)
    mha_note = [e.message for e in events
                if e.kind == "note" and "applies its attention modules only when" in e.message]
    assert len(mha_note) == (family == "sd2" and (algo == "full" or preset == "ia3")), mha_note
    net = load_network(res.final, family, layer_names=set(layer_mapping(model)))
    assert len(net.report.matched) == net.report.total_modules == len(names)
    layers = layer_mapping(model)
    checked = set()
    for layer_name, mods in net.modules.items():
        for target, mod in mods:
            n = mod.ctx.module_key
            twin = _projection_twin(layers[layer_name], target)
            if algo == "ia3":
                ref = IA3Module("x", twin, 1.0, train_on_input=bool(float(sd[f"{n}.on_input"])))
            elif algo in OFT_MODULES:
                blocks = sd[f"{n}.oft_blocks"]
                assert blocks.shape[-3] * blocks.shape[-1] == twin.weight.shape[0]
                ref = OFT_MODULES[algo][0]("x", twin, 1.0, blocks.shape[-1], constraint=float(sd[f"{n}.alpha"]),
                                           rescaled=f"{n}.rescale" in sd)
            elif algo == "glora":
                from lycoris.modules.glora import GLoRAModule
                ref = GLoRAModule("x", twin, 1.0, sd[f"{n}.a2.weight"].shape[0], float(sd[f"{n}.alpha"]))
            else:
                ref = FullModule("x", twin, 1.0)
            own = sd
            if isinstance(twin, nn.Linear) and sd.get(f"{n}.a1.weight", torch.zeros(1)).dim() == 4:
                # (SD2 proj_in/out, saved as the 1x1 convs sd-scripts trains: the same numbers on the Linear)
                own = {k: v.flatten(1) if k.startswith(n + ".") and v.dim() == 4 else v for k, v in sd.items()}
            _loaded_module_is_lycoris_forward(ref, twin, mod, own, n)  # (fails on a module that learned nothing)
            checked.add(n)
    assert checked == names
    if algo == "full":  # biases train too; on SD2 those inside the MHA's in_proj_bias and out_proj
        bias = [k for k in sd if k.endswith(".diff_b")]
        assert bias and max(float(sd[k].abs().max()) for k in bias) > 0
        if family == "sd2":
            for p in ("q", "v", "out"):
                assert float(sd[f"lora_te_text_model_encoder_layers_0_self_attn_{p}_proj.diff_b"].abs().max()) > 0


# ---- train_norm ----------------------------------------------------------------------------------------------------
NORM_LAYERS = {"groupnorm": lambda: nn.GroupNorm(4, 32), "layernorm": lambda: nn.LayerNorm(24),
               "groupnorm32": lambda: __import__("ldm.modules.diffusionmodules.util",
                                                 fromlist=["x"]).GroupNorm32(4, 32)}


@pytest.mark.parametrize("layer", list(NORM_LAYERS))
def test_norm_modules_are_lycoris(layer):
    """train_norm: LyCORIS' NormModule on the same layer: zero start, its tensors, and with random values the same
    output and gradients (ldm's GroupNorm32 computes in fp32, as our module does)."""
    torch.manual_seed(0)
    org = NORM_LAYERS[layer]()
    with torch.no_grad():
        org.weight.normal_(1, 0.2)
        org.bias.normal_(0, 0.2)
    twin = NORM_LAYERS[layer]()
    twin.load_state_dict(org.state_dict())
    ref = NormModule("lora_test", twin, 1.0)
    ours = lyco.NormPair(org.weight.numel(), True)
    assert {k: v.shape for k, v in ours.file_tensors().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    g = torch.Generator().manual_seed(5)
    _randomise(ref, g)
    missing = []
    ours.load_tensors({f"m.{k}": v for k, v in ref.state_dict().items()}, "m", missing)
    assert not missing
    ref.apply_to()
    ref.multiplier = 0.7
    net = types.SimpleNamespace(multiplier=0.7, training=True, module_dropout=None, _passes_through=lambda: False)
    plain = type(org).forward.__get__(org)
    org.forward = LoRANetwork._norm_forward(net, ours, org, plain)
    x = torch.randn((2, 32, 5, 5) if "group" in layer else (3, 7, 24), generator=g)
    y_ref, y = twin(x), org(x)
    assert float((y - plain(x)).abs().max()) > 1e-3
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    (y_ref * y_ref.detach().cos()).sum().backward()
    (y * y.detach().cos()).sum().backward()
    grads = dict(ref.named_parameters())
    for k, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads[k].grad, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("family, args", [("sd1", ["algo=locon", "preset=attn-mlp", "train_norm=True"]),
                                          ("sd1", ["algo=loha", "conv_dim=2", "train_norm=True"]),
                                          ("sd2", ["algo=ia3", "preset=unet-convblock-only", "train_norm=True"])])
def test_train_norm_trains_the_norm_layers_lycoris_picks(family, args, tmp_path):
    """The norm layers of the preset's blocks train (w_norm/b_norm, LyCORIS' names) beside the other modules; the
    file loads whole in our <lora:>, each norm module is what LyCORIS' NormModule does with the file's tensors,
    and the model is as before."""
    model = models.make_sd1(seed=6) if family == "sd1" else models.make_sd2(seed=1)
    img, _ = _dataset(tmp_path)
    before = models.model_state_hash(model)
    res = run_training(ModelHost(model, "m"), _cfg(tmp_path, img, "o", max_train_epochs=1, network_args=args))
    assert res.status == "done" and models.model_state_hash(model) == before
    sd = load_tensors(res.final)
    preset = next((a.split("=")[1] for a in args if a.startswith("preset=")), "full")
    norms = {t.kohya_name: t.module for t in lycoris_unet_targets(model.model.diffusion_model, family, preset,
                                                                  True, norms=True) if t.kind == "norm"}
    assert norms and {k.split(".")[0] for k in sd if k.endswith((".w_norm", ".b_norm"))} == set(norms)
    assert any(n.endswith("_norm1") and "resnets" in n for n in norms) == (preset != "attn-mlp")
    assert any(n.endswith("transformer_blocks_0_norm3") for n in norms) == (preset != "unet-convblock-only")
    net = load_network(res.final, family, layer_names=set(layer_mapping(model)))
    assert len(net.report.matched) == net.report.total_modules == len({k.split(".")[0] for k in sd})
    loaded = {mod.ctx.module_key: mod for mods in net.modules.values() for _, mod in mods}
    g = torch.Generator().manual_seed(1)
    for n, layer in norms.items():
        import copy
        import torch.nn.functional as F
        twin = copy.deepcopy(layer)
        ref = NormModule("x", twin, 0.8)
        ref.load_state_dict({k.split(".", 1)[1]: v for k, v in sd.items() if k.split(".")[0] == n}, strict=False)
        ref.apply_to()
        dw, db = loaded[n].delta(layer.weight.detach(), 0.8)[:2]
        assert float(dw.abs().max()) > 0 and float(db.abs().max()) > 0, n
        with torch.no_grad():
            if isinstance(layer, nn.GroupNorm):
                x = torch.randn(2, layer.num_channels, 4, 4, generator=g)
                y = F.group_norm(x, layer.num_groups, layer.weight + dw, layer.bias + db, layer.eps)
            else:
                x = torch.randn(2, 5, layer.normalized_shape[0], generator=g)
                y = F.layer_norm(x, layer.normalized_shape, layer.weight + dw, layer.bias + db, layer.eps)
            torch.testing.assert_close(y, twin(x), rtol=1e-5, atol=1e-5, msg=n)


# ---- diag-OFT ------------------------------------------------------------------------------------------------------
OFT_CASES = [{}, {"constraint": 0.05}, {"rescaled": True}, {"constraint": 0.05, "rescaled": True}]


OFT_MODULES = {"diag-oft": (DiagOFTModule, 4), "boft": (ButterflyOFTModule, 16)}  # (LyCORIS' class, dim used)


def _oft_pair(layer, dim, kw, algo="diag-oft"):
    s = lyco.LycoSettings(algo, constraint=kw.get("constraint", 0.0), rescaled=kw.get("rescaled", False))
    return lyco.make_pair(s, tuple(layer.weight.shape), dim, None)


def _oft_twins(algo, layer, kw):
    cls, dim = OFT_MODULES[algo]
    org, twin = _twins(layer)
    return org, twin, cls("lora_test", twin, 1.0, dim, 1.0, **kw), _oft_pair(org, dim, kw, algo)


@pytest.mark.parametrize("algo", list(OFT_MODULES))
@pytest.mark.parametrize("layer", ["linear", "linear_big", "conv3_stride2", "conv1x1"])
@pytest.mark.parametrize("kw", OFT_CASES)
def test_diag_oft_and_boft_start_as_lycoris_and_save_its_tensors(layer, kw, algo):
    org, _, ref, ours = _oft_twins(algo, layer, kw)
    want = ref.state_dict()
    got = ours.file_tensors()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k].to(got[k].dtype)), k
    assert float(ours.weight_delta(org.weight, 1.0).abs().max()) == 0.0


@pytest.mark.parametrize("algo", list(OFT_MODULES))
@pytest.mark.parametrize("multiplier", [1.0, 0.7])
@pytest.mark.parametrize("layer", ["linear", "linear_big", "conv3_stride2", "conv1x1"])
@pytest.mark.parametrize("kw", OFT_CASES)
def test_diag_oft_and_boft_forward_and_gradients_are_lycoris(layer, kw, multiplier, algo):
    """Random blocks (their norm past the constraint's cap where one is set) and rescales: LyCORIS' module at
    multiplier 1 (diag-OFT: its fused-formula path) and 0.7 (its general path), outputs and gradients."""
    org, twin, ref, ours = _oft_twins(algo, layer, kw)
    g = torch.Generator().manual_seed(5)
    _randomise(ref, g)
    if kw.get("constraint"):
        q = ref.oft_blocks - ref.oft_blocks.transpose(-1, -2)
        assert float(q.norm()) > ref.constraint  # the cap is in play
    _same_as_lycoris(ref, twin, ours, org, _weight_forward, g, multiplier=multiplier)


def test_boft_layout_is_lycoris_and_an_impossible_one_is_named():
    from lycoris.functional.general import power2factorization
    for d in (4, 32, 40, 48, 96, 320, 640, 768, 1024, 1280, 2048, 2816):
        for f in (-1, 2, 4, 8, 16, 32, 64):
            assert lyco.power2factorization(d, f) == power2factorization(d, f), (d, f)
    with pytest.raises(ValueError, match="BOFT cannot split 320 output channels .* at most 4"):
        _oft_pair(nn.Linear(8, 320), 4, {}, "boft")
    sd1 = models.make_sd1(seed=1)
    with pytest.raises(ValueError, match=r"lora_\w+: BOFT cannot split"):
        LoRANetwork(sd1, "sd1", dim=5, lyco=lyco.LycoSettings("boft"))


def test_diag_oft_max_norm_is_lycoris():
    org = LAYERS["linear_big"]()
    ref, ours = DiagOFTModule("lora_test", org, 1.0, 8, 1.0), _oft_pair(org, 8, {})
    _randomise(ref, torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours.oft_blocks.copy_(ref.oft_blocks)
    for max_norm in (0.5, 100.0):
        scaled_ref, norm_ref = ref.apply_max_norm(max_norm)
        scaled, norm = ours.apply_max_norm(max_norm)
        assert bool(scaled) == bool(scaled_ref) and float(norm) == pytest.approx(float(norm_ref), rel=1e-6)
        torch.testing.assert_close(ours.oft_blocks, ref.oft_blocks)


# ---- rank dropout (rank_dropout_scale) -----------------------------------------------------------------------------
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "rank_dropout_scale"])
@pytest.mark.parametrize("algo", ["loha", "lokr", "locon_dora", "full"])
def test_rank_dropout_is_lycoris_draw_for_draw(algo, scaled):
    """In training, LyCORIS drops whole output rows of the rebuilt delta with one torch.rand per module and call,
    and with rank_dropout_scale divides the mask by its mean. With the same seed before each call, its module and
    ours give the same outputs and gradients."""
    from lycoris.modules.locon import LoConModule
    org, twin = _twins("linear_big")
    kw = dict(rank_dropout=0.3, rank_dropout_scale=scaled)
    if algo == "full":
        ref, ours = FullModule("lora_test", twin, 1.0, **kw), _no_rank_pair("full", org, {})
    elif algo == "locon_dora":
        ref = LoConModule("lora_test", twin, 1.0, 4, 2.0, weight_decompose=True, wd_on_out=True, **kw)
        ours = _our_dora("locon", org, {}, True)
    else:
        ref, ours = _lycoris_module(algo, twin, 4, 2.0, kw), _our_pair(algo, org, 4, 2.0, {})
    ours.rank_dropout_scale = scaled
    g = torch.Generator().manual_seed(5)
    _randomise(ref, g)
    names = FULL_NAMES if algo == "full" else {}
    params = dict(ref.named_parameters())
    missing = []
    ours.load_tensors({f"m.{k}": v for k, v in ref.state_dict().items()}
                      | {f"m.{o}": params[r].detach() for o, r in names.items()}, "m", missing)
    assert not missing
    ref.apply_to()
    ref.train()
    net = types.SimpleNamespace(multiplier=1.0, training=True, module_dropout=None, dropout=None, rank_dropout=0.3,
                                _passes_through=lambda: False)
    plain = type(org).forward.__get__(org)
    org.forward = LoRANetwork._weight_forward(net, ours, org, plain)
    x = torch.randn(3, 7, org.in_features, generator=g)
    outs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        y_ref = twin(x)
        torch.manual_seed(seed)
        y = org(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        outs.append(y)
    assert not torch.allclose(outs[0], outs[1])  # the masks differ from call to call
    (outs[1] * outs[1].detach().cos()).sum().backward()
    (y_ref * y_ref.detach().cos()).sum().backward()
    for k, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, params[names.get(k, k)].grad, rtol=1e-4, atol=1e-5, msg=k)


# ---- use_scalar ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", ["linear", "conv3_stride2", "conv1x1"])
@pytest.mark.parametrize("algo, kw", [("locon", {}), ("locon_dora", {}), ("loha", {}), ("lokr", {}),
                                      ("lokr", {"decompose_both": True, "factor": 4}), ("lokr", {"full_matrix": True})])
def test_use_scalar_is_lycoris(layer, algo, kw):
    """use_scalar: LyCORIS' start (scalar 0, the usually-zero factor at random, the same draws in the same order),
    its file (the scalar folded into lora_up / hada_w1_a / lokr_w1), its output and gradients (the scalar's too)
    once everything is random, and a file loaded back sets the scalar to 1."""
    from lycoris.modules.locon import LoConModule
    org, twin = _twins(layer)
    dora = algo == "locon_dora"
    torch.manual_seed(11)
    if algo.startswith("locon"):
        ref = LoConModule("x", twin, 1.0, 4, 2.0, use_scalar=True, weight_decompose=dora, wd_on_out=True)
    else:
        ref = _lycoris_module(algo, twin, 4, 2.0, dict(kw, use_scalar=True))
    ours = _our_dora("locon", org, {}, True, dora) if algo.startswith("locon") else _our_pair(algo, org, 4, 2.0, kw)
    ours.enable_scalar()
    torch.manual_seed(11)
    ours.reset_parameters()
    if dora:
        ours.init_dora(org.weight, True)
    # (a no-op; DoRA's renormalisation leaves float rounding, as LyCORIS' own start does)
    assert float(ours.scalar) == 0.0 and float(ours.weight_delta(org.weight, 1.0).abs().max()) < 1e-6
    want = ref.custom_state_dict()
    got = ours.file_tensors()
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(want[k].reshape(got[k].shape).shape)
                                                            for k in got}
    if not algo.startswith("locon"):  # (LoCon's nn.Linear/Conv2d draw their own init first in LyCORIS)
        for k in got:
            torch.testing.assert_close(got[k], want[k].reshape(got[k].shape), rtol=0, atol=0, msg=k)
    else:
        assert float(got["lora_up.weight"].abs().max()) == 0.0 and float(ours.lora_up.weight.abs().max()) > 0
    g = torch.Generator().manual_seed(5)
    _randomise(ref, g)
    raw = {k: k for k, _ in ours.named_parameters()}  # (LyCORIS' state_dict holds the scalar folded in)
    _same_as_lycoris(ref, twin, ours, org, _pair_forward if algo == "locon" else _weight_forward, g, names=raw)
    want, got = ref.custom_state_dict(), ours.file_tensors()  # the scalar folded into the same factor
    for k in got:
        torch.testing.assert_close(got[k], want[k].reshape(got[k].shape), rtol=1e-6, atol=1e-7, msg=k)
    saved = {f"m.{k}": v.detach() for k, v in ours.file_tensors().items()}
    back = _our_dora("locon", org, {}, True, dora) if algo.startswith("locon") else _our_pair(algo, org, 4, 2.0, kw)
    back.enable_scalar()
    missing = []
    back.load_tensors(saved, "m", missing)
    assert not missing and float(back.scalar) == 1.0
    torch.testing.assert_close(back.weight_delta(org.weight, 1.0), ours.weight_delta(org.weight, 1.0))


# ---- GLoRA ----------------------------------------------------------------------------------------------------------
def _glora_twins(layer, use_scalar=False, rs_lora=False):
    from lycoris.modules.glora import GLoRAModule
    org, twin = _twins(layer)
    torch.manual_seed(11)
    ref = GLoRAModule("x", twin, 1.0, 4, 2.0, use_scalar=use_scalar, rs_lora=rs_lora)
    ours = lyco.make_pair(lyco.LycoSettings("glora"), tuple(org.weight.shape), 4, 2.0)
    if rs_lora:
        ours.use_rs_scale()
    if use_scalar:
        ours.enable_scalar()
    torch.manual_seed(11)
    ours.reset_parameters()
    return org, twin, ref, ours


@pytest.mark.parametrize("use_scalar", [False, True], ids=["plain", "use_scalar"])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_glora_starts_as_lycoris_and_saves_its_tensors(layer, use_scalar):
    """LyCORIS' GLoRAModule: the same draws in the same order (its layers' own start included), a no-op start, its
    file's keys and shapes (a1/a2/b1/b2 .weight, alpha), use_scalar's scalar folded into a2 and b2."""
    org, _, ref, ours = _glora_twins(layer, use_scalar)
    want = ref.custom_state_dict()
    got = ours.file_tensors()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    assert float(ours.weight_delta(org.weight, 1.0).abs().max()) == 0.0
    assert float(got["a1.weight"].abs().max()) > 0 and ours.scale == ref.scale


@pytest.mark.parametrize("rs_lora", [False, True], ids=["alpha", "rs_lora"])
@pytest.mark.parametrize("use_scalar", [False, True], ids=["plain", "use_scalar"])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_glora_forward_and_gradients_are_lycoris(layer, use_scalar, rs_lora):
    """Output and gradients of every trained tensor (the scalar's included) against LyCORIS' GLoRAModule with the
    same random factors, at multiplier 0.7; a saved file loaded back gives the same delta with the scalar at 1."""
    org, twin, ref, ours = _glora_twins(layer, use_scalar, rs_lora)
    assert ours.scale == pytest.approx(ref.scale, rel=1e-7)
    # rs_lora: LyCORIS' GLoRA saves the plain alpha, which every loader (LyCORIS' own too) reads as alpha/dim, a
    # weaker scale than it trained with; ours saves alpha·√dim as LyCORIS' LoCon/LoHa/LoKr do
    assert float(ours.file_tensors()["alpha"]) / 4 == pytest.approx(ref.scale, rel=1e-6)
    ref.alpha.fill_(float(ours.alpha))  # (its forward uses ref.scale; the buffer only feeds our load below)
    g = torch.Generator().manual_seed(5)
    _randomise(ref, g)
    raw = {k: k for k, _ in ours.named_parameters()}  # (LyCORIS' state_dict holds the scalar folded in)
    _same_as_lycoris(ref, twin, ours, org, _weight_forward, g, names=raw)
    want = ref.custom_state_dict()
    for k, v in ours.file_tensors().items():
        torch.testing.assert_close(v, want[k], rtol=1e-6, atol=1e-7, msg=k)
    back = lyco.make_pair(lyco.LycoSettings("glora"), tuple(org.weight.shape), 4, 2.0)
    if use_scalar:
        back.enable_scalar()
    missing = []
    back.load_tensors({f"m.{k}": v.detach() for k, v in ours.file_tensors().items()}, "m", missing)
    assert not missing and float(back.scalar) == 1.0 and back.scale == pytest.approx(ours.scale, rel=1e-6)
    torch.testing.assert_close(back.weight_delta(org.weight, 1.0), ours.weight_delta(org.weight, 1.0))
