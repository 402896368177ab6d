"""DyLoRA (network_module = "networks.dylora", the kohya_ss GUI's Kohya DyLoRA type).

Reference: sd-scripts' own DyLoRAModule (networks/dylora.py), run by tests/data/dylora_reference.py on three layers
with AdamW; its start, every step's output and trained rank, and the tensors after four steps are in
tests/data/dylora_reference.safetensors. Our module must give the same numbers, step for step: every rank takes
part in the forward, only the drawn block of unit ranks trains, and the ranks outside it get no gradient, so AdamW
leaves them and their state alone that step. The rest is checked in closed form: outside training the module is
the plain LoRA its file holds; the run's file is a kohya LoRA with sd-scripts' metadata that loads whole; resume is
exact; gradient checkpointing does not change the result.
"""
import os
import random
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
from lib_lora.train.config import parse_train_config
from lib_lora.train.lora_net import DyLoraPair, LoRANetwork
from lib_lora.train.run import plan_for, run_training
from lib_lora.train.support import check_support
from lib_lora.train.trainer import Trainer, TrainingError

REF = load_tensors(os.path.join(os.path.dirname(__file__), "data", "dylora_reference.safetensors"))
LAYERS = {
    "linear": lambda: nn.Linear(24, 40),
    "conv3_stride2": lambda: nn.Conv2d(16, 32, 3, stride=2, padding=1),
    "conv1x1": lambda: nn.Conv2d(16, 48, 1),
}


def _net(rng, training=True):
    ns = types.SimpleNamespace(training=training, multiplier=1.0, _draw_no=0, _dylora_rng=rng,
                               _passes_through=lambda: False)
    ns._dylora_first = lambda p: LoRANetwork._dylora_first(ns, p)
    return ns


def _pair(layer, unit):
    return DyLoraPair(tuple(layer.weight.shape), 4, 2.0, unit, getattr(layer, "stride", 1),
                      getattr(layer, "padding", 0))


@pytest.mark.parametrize("unit", [1, 2])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_steps_are_sd_scripts_dylora_step_for_step(layer, unit):
    key = f"{layer}.unit{unit}"
    torch.manual_seed(0)
    org = LAYERS[layer]()
    assert torch.equal(org.weight, REF[f"{key}.layer_weight"])
    torch.manual_seed(11)
    pair = _pair(org, unit)
    pair.reset_parameters()
    start = pair.tensors()
    for k in ("lora_down.weight", "lora_up.weight"):  # the same draws, row by row
        torch.testing.assert_close(start[k].reshape(REF[f"{key}.start.{k}"].shape), REF[f"{key}.start.{k}"],
                                   rtol=0, atol=0, msg=k)
    missing = []
    pair.load_tensors({"m.lora_down.weight": REF[f"{key}.start.lora_down.weight"],
                       "m.lora_up.weight": REF[f"{key}.random.lora_up.weight"]}, "m", missing)
    assert not missing
    # sd-scripts draws with Python's random from one seed; the network's draws continue one sequence here
    net = _net(random.Random(123))
    plain = type(org).forward.__get__(org)
    org.forward = LoRANetwork._dylora_forward(net, pair, plain)
    opt = torch.optim.AdamW(pair.parameters(), lr=0.05, weight_decay=0.1)
    ranks = REF[f"{key}.ranks"].tolist()
    assert len(set(ranks)) > 1
    for step, rank in enumerate(ranks):
        net._draw_no += 1
        y = org(REF[f"{key}.x{step}"])
        assert pair.draw[1] == rank
        torch.testing.assert_close(y, REF[f"{key}.y{step}"], rtol=1e-5, atol=1e-5, msg=f"step {step}")
        opt.zero_grad(set_to_none=True)
        (y * y.detach().cos()).sum().backward()
        trained = {i for i, a in enumerate(pair.lora_A) if a.grad is not None}
        assert trained == set(range(rank, rank + unit))  # no gradient at all elsewhere
        opt.step()
    end = pair.tensors()
    for k in ("lora_down.weight", "lora_up.weight"):
        torch.testing.assert_close(end[k].reshape(REF[f"{key}.end.{k}"].shape), REF[f"{key}.end.{k}"], rtol=1e-5,
                                   atol=1e-6, msg=k)


@pytest.mark.parametrize("layer", list(LAYERS))
def test_outside_training_it_is_the_plain_lora_of_its_file(layer):
    """Samples and validation: every rank at alpha/dim, no draw, no sqrt factor, the multiplier applied."""
    torch.manual_seed(0)
    org = LAYERS[layer]()
    pair = _pair(org, 2)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in pair.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    net = _net(random.Random(0), training=False)
    net.multiplier = 0.6
    plain = type(org).forward.__get__(org)
    org.forward = LoRANetwork._dylora_forward(net, pair, plain)
    x = torch.randn((3, 24) if layer == "linear" else (2, 16, 9, 9), generator=g)
    t = pair.tensors()
    delta = (t["lora_up.weight"].flatten(1) @ t["lora_down.weight"].flatten(1)).reshape(org.weight.shape) * 0.5
    if layer == "linear":
        want = nn.functional.linear(x, org.weight + 0.6 * delta, org.bias)
    else:
        want = nn.functional.conv2d(x, org.weight + 0.6 * delta, org.bias, org.stride, org.padding)
    torch.testing.assert_close(org(x), want, rtol=1e-5, atol=1e-5)
    assert pair.draw[0] == -1  # nothing drawn


@pytest.fixture(scope="module")
def sd1():
    return models.make_sd1(seed=4)


def _cfg(tmp_path, img, out, **kw):
    c = {"network_module": "networks.dylora", "max_train_epochs": 2, "network_args": ["unit=2", "conv_dim=4"],
         "learning_rate": 5e-3}
    c.update(kw)
    return parse_train_config(train_data.job_config(img, tmp_path / out, **c), base_dir=str(tmp_path))


def test_dylora_run_writes_a_kohya_lora_of_networks_lora_layers(sd1, tmp_path):
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=2)
    before = models.model_state_hash(sd1)
    host = ModelHost(sd1, "m")
    cfg = _cfg(tmp_path, img, "o")
    events = []
    res = run_training(host, cfg, on_event=events.append)
    assert res.status == "done" and models.model_state_hash(sd1) == before
    start = next(e.message for e in events if e.kind == "start")
    assert start.startswith("DyLoRA (unit 2)"), start
    assert any("CUDA graphs are off" in n for n in res.notes)
    md = read_metadata(res.final)
    assert md["ss_network_module"] == "networks.dylora" and md["ss_network_dim"] == "4"
    assert "unit" in md["ss_network_args"]
    sd = load_tensors(res.final)
    # sd-scripts' DyLoRA takes networks.lora's layers (3x3 convs with conv_dim), at network_dim and network_alpha
    want = set(LoRANetwork(sd1, "sd1", 4, 2.0, conv_dim=4).pairs)
    assert {k.split(".")[0] for k in sd} == want
    assert all(sd[k].shape[0] == 4 for k in sd if k.endswith("lora_down.weight"))
    assert all(float(sd[k]) == 2.0 for k in sd if k.endswith(".alpha"))
    ups = [k for k in sd if k.endswith("lora_up.weight")]
    assert sum(float(sd[k].abs().max()) > 0 for k in ups) == len(ups)
    net = load_network(res.final, "sd1", layer_names=set(layer_mapping(sd1)))
    assert len(net.report.matched) == net.report.total_modules == len(want)


def test_resume_is_exact_and_checkpointing_changes_nothing(sd1, tmp_path):
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=2)
    host = ModelHost(sd1, "m")
    full = Trainer(host, _cfg(tmp_path, img, "a"), plan_for(host, _cfg(tmp_path, img, "a"))).run()
    cfg = _cfg(tmp_path, img, "b")
    _, resumed = train_data.cancelled_then_resumed(host, cfg, at_step=3)
    a, b = load_tensors(full.final), load_tensors(resumed.final)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    # the recompute of a checkpointed block uses the rows drawn for its micro-batch, not new ones
    cfg = _cfg(tmp_path, img, "c", gradient_checkpointing=True)
    c = load_tensors(Trainer(host, cfg, plan_for(host, cfg)).run().final)
    for k in a:
        torch.testing.assert_close(a[k], c[k], rtol=1e-4, atol=1e-6, msg=k)


def test_sd2_text_encoder_attention_trains_and_loads(tmp_path):
    """SD2's open_clip MultiheadAttention: q/k/v/out as four DyLoRA modules (sd-scripts' HF CLIP has four
    Linears); the file loads whole."""
    model = models.a1111_embedding_hijack(models.make_sd2(seed=1), "sd2")
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=2)
    before = models.model_state_hash(model)
    host = ModelHost(model, "m")
    cfg = _cfg(tmp_path, img, "o", network_args=["unit=1"], max_train_epochs=1)
    res = Trainer(host, cfg, plan_for(host, cfg)).run()
    assert res.status == "done" and models.model_state_hash(model) == before
    sd = load_tensors(res.final)
    te = [k for k in sd if k.startswith("lora_te_") and "self_attn_q_proj.lora_up" in k]
    assert te and all(float(sd[k].abs().max()) > 0 for k in te)
    net = load_network(res.final, "sd2", layer_names=set(layer_mapping(model)))
    assert len(net.report.matched) == net.report.total_modules == len({k.split(".")[0] for k in sd})


def test_what_sd_scripts_refuses_or_ignores_is_said(sd1, tmp_path):
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=1, repeats=1)
    cases = {
        ("unit=3",): r"unit=3 with network_dim = 4: .* multiple of it",
        ("conv_dim=2",): r"conv_dim=2 with network_dim = 4: sd-scripts' DyLoRA needs conv_dim equal to network_dim",
        ("unit=0",): r"unit=0 must be at least 1",
    }
    for nargs, msg in cases.items():
        cfg = _cfg(tmp_path, img, "x", network_args=list(nargs))
        assert any(__import__("re").search(msg, e) for e in check_support(cfg, "sd1")[0]), nargs
        host = ModelHost(sd1, "m")
        with pytest.raises(TrainingError, match=msg):
            Trainer(host, cfg, plan_for(host, cfg)).run()
    errors, notes = check_support(_cfg(tmp_path, img, "x", scale_weight_norms=1.0), "sd1")
    assert not errors and any("scale_weight_norms is not used with networks.dylora" in n for n in notes)
    events = []  # (and the run trains without it, as sd-scripts does after its warning)
    cfg = _cfg(tmp_path, img, "y", scale_weight_norms=1e-6, max_train_epochs=1)
    assert Trainer(ModelHost(sd1, "m"), cfg, plan_for(ModelHost(sd1, "m"), cfg),
                   on_event=events.append).run().status == "done"
    assert not any("keys_scaled" in e.extra for e in events if e.kind == "step")
    errors, _ = check_support(_cfg(tmp_path, img, "x", dim_from_weights=True, network_weights="a.safetensors"), "sd1")
    assert any("dim_from_weights with networks.dylora" in e for e in errors)
    errors, notes = check_support(_cfg(tmp_path, img, "x", network_dropout=0.1, network_args=[
        "unit=1", "conv_dim=4", "conv_alpha=1", "rank_dropout=0.1", "down_lr_weight=0,0,0,0,0,0,0,0,0,0,0,0",
        "loraplus_lr_ratio=4"]), "sd1")
    text = " ".join(notes)
    assert not errors, errors
    assert "rank_dropout, network_dropout not applied with networks.dylora" in text
    assert "conv_alpha is not read by networks.dylora" in text
    assert "down_lr_weight are not read by networks.dylora" in text
    assert "not supported yet" not in text  # (unit and LoRA+ are read)
    assert not os.path.exists(tmp_path / "x") and os.path.exists(tmp_path / "y")


def test_loraplus_moves_the_lora_b_rows(sd1):
    """sd-scripts' DyLoRA: LoRA+ puts the lora_B rows (lora_up) in a group at lr x ratio."""
    net = LoRANetwork(sd1, "sd1", 4, 2.0, dylora_unit=1)
    groups = net.param_groups(1e-3, 5e-4, loraplus=(4.0, None))
    plus = next(g for g in groups if g["name"] == "unet plus")
    ups = {id(p) for pair in net.pairs.values() if "unet" in pair_name(net, pair) for p in pair.lora_B}
    assert plus["lr"] == pytest.approx(4e-3) and {id(p) for p in plus["params"]} == ups
    assert not any(g["name"] == "text_encoder plus" for g in groups)


def pair_name(net, pair):
    return next(n for n, p in net.pairs.items() if p is pair)


def test_kohya_gui_dylora_preset_trains(tmp_path):
    gui = {"LoRA_type": "Kohya DyLoRA", "network_dim": 8, "conv_dim": 8, "conv_alpha": 1, "unit": 2,
           "train_data_dir": "img", "output_dir": "out", "pretrained_model_name_or_path": "m.safetensors"}
    cfg = parse_train_config(dict(gui), source="preset.json")
    assert cfg.network_module == "networks.dylora" and "unit=2" in cfg.network_args
    assert check_support(cfg, "sd1")[0] == []
    gui["conv_dim"] = 1  # (the GUI's default: sd-scripts stops on it)
    cfg = parse_train_config(dict(gui), source="preset.json")
    assert any("conv_dim=1 with network_dim = 8" in e for e in check_support(cfg, "sd1")[0])


def test_sdxl_with_accumulation_then_a_start_from_the_file(tmp_path):
    """SDXL (both text encoders, TE2's open_clip MHA as q/k/v/out), two micro-batches per step (each draws its
    own ranks), then a second run that starts from the first file (network_weights): it loads whole, row by row,
    and the model is untouched by both."""
    model = models.make_sdxl(seed=2)
    before = models.model_state_hash(model)
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=2)
    host = ModelHost(model, "m")
    cfg = _cfg(tmp_path, img, "a", network_args=["unit=2"], gradient_accumulation_steps=2, max_train_epochs=1)
    first = Trainer(host, cfg, plan_for(host, cfg)).run()
    assert first.status == "done" and models.model_state_hash(model) == before
    sd = load_tensors(first.final)
    for te in ("lora_te1_", "lora_te2_"):
        assert any(k.startswith(te) and k.endswith("lora_up.weight") and float(sd[k].abs().max()) > 0 for k in sd)
    net = load_network(first.final, "sdxl", layer_names=set(layer_mapping(model)))
    assert len(net.report.matched) == net.report.total_modules == len({k.split(".")[0] for k in sd})
    events = []
    cfg = _cfg(tmp_path, img, "b", network_args=["unit=2"], max_train_epochs=1, network_weights=first.final,
               learning_rate=1e-12, text_encoder_lr=1e-12)
    second = Trainer(host, cfg, plan_for(host, cfg), on_event=events.append).run()
    assert second.status == "done" and models.model_state_hash(model) == before
    assert not any("not fully match" in e.message or "lacks" in (e.message or "") for e in events if e.kind == "note")
    again = load_tensors(second.final)
    for k in sd:  # (an LR of 1e-12: the start is the file, moved by nothing visible)
        torch.testing.assert_close(again[k], sd[k], rtol=1e-5, atol=1e-6, msg=k)
