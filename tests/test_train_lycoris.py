"""Training LyCORIS networks (network_module = "lycoris.kohya", algo=lora/locon/loha/lokr).

References, none of them our code:
- tests/data/lycoris_targets_reference.json: the layers LyCORIS' own kohya wrapper (lycoris.kohya.create_network)
  picks on sd-scripts' own SD1/SD2/SDXL UNets for every preset, and the tensors (names, shapes, alpha) it saves
  for them (written by tests/data/lycoris_targets_reference.py from an sd-scripts checkout);
- LyCORIS itself (lycoris-lora, a test-only peer): its create_network on the tiny models' CLIP text encoders, and
  its LohaModule / LokrModule on real layers for the initialisation, the forward output and the gradients.
"""
import json
import os
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
from lib_lora.train.targets import lyco_preset_convs, lycoris_unet_targets, text_encoder_targets
from lib_lora.train.trainer import Trainer, TrainingError

lycoris = pytest.importorskip("lycoris")
from lycoris.modules.loha import LohaModule  # noqa: E402
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


@pytest.mark.parametrize("preset", ["full", "attn-only"])
def test_text_encoder_layers_are_lycoris_on_the_same_clip(sd1, preset):
    import lycoris.kohya as lk
    from lycoris.config import PRESET
    clip = getattr(sd1.cond_stage_model, "wrapped", sd1.cond_stage_model).transformer
    p = {k: (list(v) if isinstance(v, list) else v) for k, v in PRESET[preset].items()}
    PRESET["_te_ref"] = p
    try:
        ref = lk.create_network(1.0, 4, 1, None, clip, nn.Module(), preset="_te_ref", algo="loha")
    finally:
        del PRESET["_te_ref"]
    want = sorted(m.lora_name for m in ref.text_encoder_loras)
    got = sorted(t.kohya_name for t in text_encoder_targets(sd1, "sd1", attention_only=preset == "attn-only"))
    assert got == want and len(got) == models.TEXT_LAYERS * (4 if preset == "attn-only" else 6)


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


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("algo, kw", CASES)
def test_forward_and_gradients_are_lycoris(layer, algo, kw):
    """Every factor randomised (the init zeroes one), our patched layer against LyCORIS' module on a twin layer:
    the same output and the same gradient for every factor."""
    torch.manual_seed(0)
    org = LAYERS[layer]()
    twin = LAYERS[layer]()
    twin.load_state_dict(org.state_dict())
    ref = _lycoris_module(algo, twin, 4, 3.0, kw)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    ours = _our_pair(algo, org, 4, 3.0, kw)
    missing = []
    ours.load_tensors({f"m.{k}": v for k, v in ref.state_dict().items()}, "m", missing)
    assert not missing
    ref.apply_to()
    net = types.SimpleNamespace(multiplier=0.7, training=True, module_dropout=None, rank_dropout=None,
                                _passes_through=lambda: False)
    ref.multiplier = 0.7
    org.forward = LoRANetwork._weight_forward(net, ours, org, type(org).forward.__get__(org))
    x = torch.randn((3, 7, org.in_features) if isinstance(org, nn.Linear) else (2, org.in_channels, 9, 9),
                    generator=g)
    y_ref, y = twin(x), org(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    (y_ref * y_ref.detach().cos()).sum().backward()
    (y * y.detach().cos()).sum().backward()
    ref_grads = dict(ref.named_parameters())
    for k, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[k].grad, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("layer", ["conv3_stride2", "conv_in"])
def test_tucker_locon_is_lycoris(layer):
    """algo=locon with use_tucker: 1x1 down, kxk lora_mid core, 1x1 up; init (same draws), output, gradients."""
    from lycoris.modules.locon import LoConModule
    torch.manual_seed(0)
    org = LAYERS[layer]()
    twin = LAYERS[layer]()
    twin.load_state_dict(org.state_dict())
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
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    ours.load_state_dict(ref.state_dict(), strict=False)
    ref.apply_to()
    net = types.SimpleNamespace(multiplier=0.7, training=True, dropout=None, rank_dropout=None,
                                _passes_through=lambda: False)
    ref.multiplier = 0.7
    org.forward = LoRANetwork._pair_forward(net, ours, type(org).forward.__get__(org))
    x = torch.randn((2, org.in_channels, 9, 9), generator=g)
    y_ref, y = twin(x), org(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    (y_ref * y_ref.detach().cos()).sum().backward()
    (y * y.detach().cos()).sum().backward()
    ref_grads = dict(ref.named_parameters())
    for k, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[k].grad, rtol=1e-4, atol=1e-5, msg=k)


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


@pytest.mark.parametrize("algo, tucker", [("loha", False), ("lokr", False), ("locon", False), ("locon", True),
                                         ("loha", True)])
def test_training_writes_lycoris_files_that_load_fully(sd1, tmp_path, algo, tucker):
    img, _ = _dataset(tmp_path)
    before = models.model_state_hash(sd1)
    events = []
    nargs = [f"algo={algo}", "conv_dim=2"] + (["use_tucker=True"] if tucker else [])
    res = run_training(ModelHost(sd1, "m"), _cfg(tmp_path, img, "o", network_args=nargs), on_event=events.append)
    assert res.status == "done" and res.steps == 6
    start = next(e.message for e in events if e.kind == "start")
    assert start.startswith({"loha": "LoHa", "lokr": "LoKr", "locon": "LoRA"}[algo] + " (LyCORIS preset full)"), start
    assert models.model_state_hash(sd1) == before
    sd = load_tensors(res.final)
    md = read_metadata(res.final)
    assert md["ss_network_module"] == "lycoris.kohya"
    assert json.loads(md["ss_network_args"]) == dict({"algo": algo, "conv_dim": "2"}, **(
        {"use_tucker": "True"} if tucker else {}))
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
    for n, layer in unet.items():
        is_conv3 = isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1)
        dim, alpha = (2, 2.0) if is_conv3 else (4, 2.0)  # conv_alpha defaults to network_alpha (LyCORIS)
        ref = (LoConModule("x", layer, 1.0, dim, alpha, use_tucker=tucker) if algo == "locon"
               else _lycoris_module(algo, layer, dim, alpha, {"use_tucker": tucker}))
        want = {k: tuple(v.shape) for k, v in ref.state_dict().items() if k != "scalar"}
        got = {k.split(".", 1)[1]: tuple(v.shape) for k, v in sd.items() if k.split(".")[0] == n}
        assert got == want, n
        assert float(sd[f"{n}.alpha"]) == float(ref.alpha), n


def test_network_args_dropout_is_the_lycoris_neuron_dropout(sd1, tmp_path):
    """LyCORIS takes its dropout from network_args (sd-scripts' network_dropout does not reach it): honoured, in the
    metadata, and range-checked like the other dropouts."""
    img, _ = _dataset(tmp_path)
    res = run_training(ModelHost(sd1, "m"), _cfg(tmp_path, img, "o", max_train_epochs=1,
                                                 network_args=["algo=locon", "dropout=0.25"]))
    assert res.status == "done" and read_metadata(res.final)["ss_network_dropout"] == "0.25"
    errors, _ = check_support(_cfg(tmp_path, img, "x", network_args=["algo=locon", "dropout=1.5"]), "sd1")
    assert any("dropout=1.5 must be at least 0 and below 1" in e for e in errors), errors


def test_resume_of_a_loha_run_gives_the_same_weights(sd1, tmp_path):
    img, _ = _dataset(tmp_path)
    args = ["algo=loha", "conv_dim=2", "preset=full"]
    full = run_training(ModelHost(sd1, "m"), _cfg(tmp_path, img, "a", network_args=args, lr_scheduler="cosine"))
    seen = {"step": 0}
    part = run_training(ModelHost(sd1, "m"), _cfg(tmp_path, img, "b", network_args=args, lr_scheduler="cosine"),
                        on_event=lambda e: seen.update(step=max(seen["step"], e.step)),
                        should_cancel=lambda: seen["step"] >= 3)
    assert part.status == "cancelled" and part.state_file
    resumed = run_training(ModelHost(sd1, "m"), _cfg(tmp_path, img, "b", network_args=args, lr_scheduler="cosine"),
                           resume=part.state_file)
    assert resumed.status == "done" and resumed.steps == full.steps == 6
    a, b = load_tensors(full.final), load_tensors(resumed.final)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_fast_path_trains_lokr_like_the_plain_step(sd1, tmp_path):
    img, _ = _dataset(tmp_path)
    cfg = dict(network_args=["algo=lokr", "preset=attn-mlp", "factor=4"], max_train_epochs=4)

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
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-4, msg=k)
    assert max(float(wa[k].abs().max()) for k in wa if k.endswith("lokr_w2_b")) > 1e-3  # it did learn


def test_what_cannot_be_trained_is_refused_with_what_to_change(sd1, tmp_path):
    img, _ = _dataset(tmp_path)
    cases = {
        ("algo=ia3",): r"algo=ia3: LoRA Studio trains algo=lora, locon, loha, lokr",
        ("algo=loha", "use_scalar=True"): r"use_scalar=True: the trained scalar cannot be trained here yet",
        ("algo=lokr", "dora_wd=True"): r"weight decomposition \(DoRA\)",
        ("algo=loha", "preset=mine.toml"): r"preset=mine.toml: use one of full, full-lin",
        ("algo=loha", "down_lr_weight=cosine"): r"down_lr_weight: block learning rates .* LyCORIS does not read",
        ("algo=lokr", "factor=0"): r"factor=0: use -1",
    }
    for nargs, msg in cases.items():
        cfg = _cfg(tmp_path, img, "x", network_args=list(nargs))
        errors, _ = check_support(cfg, "sd1")
        assert any(__import__("re").search(msg, e) for e in errors), (nargs, errors)
        host = ModelHost(sd1, "m")
        with pytest.raises(TrainingError, match=msg):
            Trainer(host, cfg, plan_for(host, cfg)).run()
    errors, _ = check_support(_cfg(tmp_path, img, "x", network_module="networks.dylora"), "sd1")
    assert any("networks.dylora' cannot be trained here" in e for e in errors), errors
    cfg = _cfg(tmp_path, img, "x", network_args=["algo=loha"], scale_weight_norms=1.0)
    assert any("scale_weight_norms" in e for e in check_support(cfg, "sd1")[0])
    cfg = _cfg(tmp_path, img, "x", network_args=["algo=locon", "use_cp=True"], scale_weight_norms=1.0)
    assert any("scale_weight_norms" in e and "Tucker" in e for e in check_support(cfg, "sd1")[0])
    # what LyCORIS itself ignores is said, not dropped silently
    _, notes = check_support(_cfg(tmp_path, img, "x", network_args=["algo=loha", "factor=4", "loraplus_lr_ratio=4"],
                                  network_dropout=0.1), "sd1")
    text = " ".join(notes)
    assert "shape LoKr modules only" in text and "LoRA+ ratios change nothing" in text
    assert "network_dropout / network_args dropout is not applied" in text
    assert not os.path.exists(tmp_path / "x")
