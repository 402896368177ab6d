"""Our LoRA / DoRA types against PEFT 0.13.2's own merge_and_unload() (the writer's merge).

PEFT files carry no alpha: the scale comes from the adapter config (diffusers lora_adapter_metadata), given to us
as ModuleContext.adapter_config. lora_B is zero-initialised by PEFT and the DoRA magnitude equals ||W||, so both
are randomised first.
"""
import copy

import pytest
import torch
from torch import nn

from lib_lora.networks import ModuleContext, build_module

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

TARGETS = ["0", "2", "3"]


def make_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.Conv2d(3, 8, 3, padding=1))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def group(sd):
    out = {}
    for k, v in sd.items():
        for suffix in ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector"):
            if k.endswith("." + suffix):
                out.setdefault(k[: -len(suffix) - 1], {})[suffix] = v.detach().clone()
                break
        else:
            raise AssertionError(f"unexpected PEFT key {k}")
    return out


def peft_case(m=1.0, **cfg_kw):
    base = make_model()
    orig = {n: p.detach().clone() for n, p in base.named_parameters()}
    cfg = LoraConfig(target_modules=TARGETS, **cfg_kw)
    pm = get_peft_model(copy.deepcopy(base), cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))
    sd = get_peft_model_state_dict(pm)
    if m != 1.0:
        for mod in pm.modules():
            if isinstance(mod, LoraLayer):
                mod.scale_layer(m)
    merged = pm.merge_and_unload()
    expected = {n: p.detach().clone() for n, p in merged.named_parameters()}
    # metadata as diffusers writes it (LoraConfig fields); no alpha keys in the file
    meta = {k: v for k, v in cfg.to_dict().items() if k in ("r", "lora_alpha", "use_rslora", "use_dora",
                                                            "rank_pattern", "alpha_pattern")}
    return orig, group(sd), expected, meta


def check(orig, groups, expected, meta, m):
    assert set(groups) == {f"base_model.model.{t}" for t in TARGETS}
    for t in TARGETS:
        key = f"base_model.model.{t}"
        mod = build_module(groups[key], ModuleContext("peft", meta, key))
        W = orig[f"{t}.weight"]
        dW, dB = mod.delta(W, m)
        assert dB is None
        assert (expected[f"{t}.weight"] - W).abs().max() > 1e-2  # merge must do something
        torch.testing.assert_close(W + dW, expected[f"{t}.weight"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(orig[f"{t}.bias"], expected[f"{t}.bias"])


@pytest.mark.parametrize("m", [1.0, 0.5])
@pytest.mark.parametrize("rslora", [False, True])
def test_peft_lora(rslora, m):
    orig, groups, expected, meta = peft_case(m, r=4, lora_alpha=6, use_rslora=rslora)
    check(orig, groups, expected, meta, m)


def test_peft_rank_alpha_pattern():
    orig, groups, expected, meta = peft_case(1.0, r=4, lora_alpha=6, rank_pattern={"2": 8},
                                             alpha_pattern={"2": 3, "3": 16})
    assert groups["base_model.model.2"]["lora_A.weight"].shape[0] == 8
    check(orig, groups, expected, meta, 1.0)


def test_peft_metadata_prefixed_form():
    # diffusers packs the config as '<component>.<field>' keys; the component is the module key's first part
    orig, groups, expected, meta = peft_case(1.0, r=4, lora_alpha=6)
    key = "base_model.model.2"
    packed = {f"base_model.{k}": v for k, v in meta.items()}
    mod = build_module(groups[key], ModuleContext("peft", packed, key))
    W = orig["2.weight"]
    torch.testing.assert_close(W + mod.delta(W, 1.0)[0], expected["2.weight"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m", [1.0, 0.5])
def test_peft_dora(m):
    orig, groups, expected, meta = peft_case(m, r=4, lora_alpha=6, use_dora=True)
    for g in groups.values():
        assert "lora_magnitude_vector" in g
    check(orig, groups, expected, meta, m)
    mod = build_module(groups["base_model.model.0"], ModuleContext("peft", meta, "base_model.model.0"))
    assert mod.is_dora and mod.formula == "peft"


def test_peft_dora_rslora():
    orig, groups, expected, meta = peft_case(1.0, r=4, lora_alpha=6, use_dora=True, use_rslora=True)
    check(orig, groups, expected, meta, 1.0)


def test_peft_without_metadata_is_scale_one():
    # no alpha key and no metadata: diffusers sets lora_alpha = r, i.e. scale 1
    orig, groups, expected, meta = peft_case(1.0, r=4, lora_alpha=4)
    check(orig, groups, expected, None, 1.0)


def test_peft_lora_b_bias_closed_form():
    # peft 0.13.2 has no lora_bias option; check Δb = m·s·lora_B.bias in closed form
    torch.manual_seed(0)
    A, B, bias = torch.randn(4, 16), torch.randn(32, 4), torch.randn(32)
    meta = {"r": 4, "lora_alpha": 2}
    mod = build_module({"lora_A.weight": A, "lora_B.weight": B, "lora_B.bias": bias},
                       ModuleContext("peft", meta, "unet.x"))
    W = torch.randn(32, 16)
    dW, dB = mod.delta(W, 0.7)
    torch.testing.assert_close(dW, 0.7 * 0.5 * (B @ A))
    torch.testing.assert_close(dB, 0.7 * 0.5 * bias)


@pytest.mark.parametrize("dora", [False, True])
def test_formats_split_key_suffixes_are_understood(dora):
    # integration with lib_lora.formats.keymap: every suffix split_key returns for a PEFT file must be consumed
    from lib_lora.formats.keymap import group_modules

    base = make_model()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=TARGETS, r=4, lora_alpha=6, use_dora=dora))
    sd = get_peft_model_state_dict(pm)
    groups = group_modules(sd.keys())
    assert len(groups) == len(TARGETS)
    for mk, sub in groups.items():
        mod = build_module({suffix: sd[k] for suffix, k in sub.items()}, ModuleContext("peft", None, mk))
        assert mod.is_dora == dora and not mod.warnings
