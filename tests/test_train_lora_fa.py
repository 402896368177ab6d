"""LoRA-FA (network_module = "networks.lora_fa", the kohya_ss GUI's LoRA-FA type): sd-scripts' networks/lora_fa.py
freezes lora_down at a normal start (std sqrt(2 / (in_dim + dim)), in_dim without the kernel) and trains lora_up;
the file is a plain kohya LoRA. Checked in closed form: the downs never move and have that spread, the ups do, the
optimizer holds the ups only, and the file loads whole in our <lora:>.
"""
import math

import pytest
import torch

import models
import train_data
from lib_lora.apply.layers import layer_mapping
from lib_lora.apply.loader import load_network
from lib_lora.formats.safetensors_io import load_tensors, read_metadata
from lib_lora.host.base import ModelHost
from lib_lora.train.config import parse_train_config
from lib_lora.train.lora_net import LoRANetwork
from lib_lora.train.run import plan_for
from lib_lora.train.support import check_support
from lib_lora.train.trainer import Trainer


@pytest.fixture(scope="module")
def sd1():
    return models.make_sd1(seed=4)


def _cfg(tmp_path, img, out, **kw):
    c = {"network_module": "networks.lora_fa", "max_train_epochs": 2, "save_every_n_epochs": 1}
    c.update(kw)
    return parse_train_config(train_data.job_config(img, tmp_path / out, **c), base_dir=str(tmp_path))


def test_lora_fa_trains_lora_up_only_from_the_papers_start(sd1, tmp_path):
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=2)
    before = models.model_state_hash(sd1)
    host = ModelHost(sd1, "m")
    cfg = _cfg(tmp_path, img, "o", network_args=["conv_dim=4", "conv_alpha=1"])
    tr = Trainer(host, cfg, plan_for(host, cfg))
    res = tr.run()
    assert res.status == "done" and models.model_state_hash(sd1) == before
    md = read_metadata(res.final)
    assert md["ss_network_module"] == "networks.lora_fa"
    first, last = load_tensors(res.final.replace(".safetensors", "-000001.safetensors")), load_tensors(res.final)
    downs = [k for k in last if k.endswith("lora_down.weight")]
    ups = [k for k in last if k.endswith("lora_up.weight")]
    assert downs and len(downs) == len(ups) and any("conv1" in k for k in downs)  # (LoCon convs too)
    for k in downs:  # frozen: the same after epoch 1 and epoch 2
        assert torch.equal(first[k], last[k]), k
    assert all(float(last[k].abs().max()) > 0 for k in ups)
    assert sum(not torch.equal(first[k], last[k]) for k in ups) == len(ups)
    # the start's spread, pooled over layers of one size (a kernel does not count in in_dim)
    for k in downs:
        w = last[k]
        rank, in_dim = w.shape[0], w.shape[1]
        want = math.sqrt(2.0 / (in_dim + rank))
        if w.numel() >= 2000:
            assert float(w.std()) == pytest.approx(want, rel=0.1), k
    net = load_network(res.final, "sd1", layer_names=set(layer_mapping(sd1)))
    assert len(net.report.matched) == net.report.total_modules == len(downs)


def test_lora_fa_optimizer_holds_the_ups_and_resume_is_exact(sd1, tmp_path):
    net = LoRANetwork(sd1, "sd1", dim=4, alpha=2, lora_fa=True)
    groups = net.param_groups(1e-3, 5e-4)
    held = {id(p) for g in groups for p in g["params"]}
    assert held == {id(p.lora_up.weight) for p in net.pairs.values()}
    assert not any(p.lora_down.weight.requires_grad for p in net.pairs.values())
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=2)
    host = ModelHost(sd1, "m")
    full = Trainer(host, _cfg(tmp_path, img, "a"), plan_for(host, _cfg(tmp_path, img, "a"))).run()
    _, resumed = train_data.cancelled_then_resumed(host, _cfg(tmp_path, img, "b"), at_step=3)
    a, b = load_tensors(full.final), load_tensors(resumed.final)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_lora_fa_settings_sd_scripts_does_not_use_are_said(tmp_path):
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=1, repeats=1)
    errors, notes = check_support(_cfg(tmp_path, img, "x", network_args=["loraplus_lr_ratio=16"]), "sd1")
    assert not errors and any("LoRA+ ratios are not used with networks.lora_fa" in n for n in notes)
    errors, _ = check_support(_cfg(tmp_path, img, "x", network_module="networks.loha2"), "sd1")
    assert any("networks.lora_fa (LoRA-FA), networks.dylora (DyLoRA), networks.oft (OFT)" in e for e in errors)


def test_scale_weight_norms_caps_lora_fa_as_sd_scripts_does(sd1, tmp_path):
    """sd-scripts' lora_fa.py has lora.py's apply_max_norm_regularization: up and down (the frozen one too) times
    sqrt(ratio), so every module's |up·down|·alpha/dim ends at or under the cap."""
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=2)
    host = ModelHost(sd1, "m")
    cfg = _cfg(tmp_path, img, "o", scale_weight_norms=0.02, learning_rate=5e-2, max_train_epochs=1)
    assert check_support(cfg, "sd1")[0] == []
    events = []
    res = Trainer(host, cfg, plan_for(host, cfg), on_event=events.append).run()
    assert res.status == "done"
    assert max(e.extra["keys_scaled"] for e in events if e.kind == "step" and "keys_scaled" in e.extra) > 0
    sd = load_tensors(res.final)
    downs = [k for k in sd if k.endswith("lora_down.weight")]
    capped = 0
    for k in downs:
        n = k.split(".")[0]
        up, down = sd[f"{n}.lora_up.weight"].flatten(1), sd[k].flatten(1)
        norm = float((up @ down).norm() * sd[f"{n}.alpha"] / down.shape[0])
        assert norm <= 0.02 * (1 + 1e-4), n
        spread = math.sqrt(2.0 / (sd[k].shape[1] + down.shape[0]))
        capped += float(down.std()) < 0.9 * spread  # (a frozen down scaled with its up)
    assert capped > 0
