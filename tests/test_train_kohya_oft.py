"""OFT as sd-scripts trains it (network_module = "networks.oft").

Reference: sd-scripts' own OFTModule (networks/oft.py), run by tests/data/kohya_oft_reference.py on three layers
(random oft_blocks, a cap that bites and one that does not, multiplier 1 and 0.7); its outputs and gradients are in
tests/data/kohya_oft_reference.safetensors. The rest in closed form: the layers sd-scripts' OFTNetwork picks (its
attention / all-linear / conv switches), the file's keys (oft_unet_*, oft_blocks, alpha = the constraint), the
model untouched, and the file read back by our <lora:> loader giving the trained module's weights.
"""
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
from lib_lora.train.config import parse_train_config
from lib_lora.train.lora_net import LoRANetwork
from lib_lora.train.lyco import KohyaOftPair
from lib_lora.train.run import plan_for, run_training
from lib_lora.train.support import check_support
from lib_lora.train.trainer import Trainer, TrainingError

REF = load_tensors(os.path.join(os.path.dirname(__file__), "data", "kohya_oft_reference.safetensors"))
LAYERS = {
    "linear": (lambda: nn.Linear(24, 40), 4),
    "conv3_stride2": (lambda: nn.Conv2d(16, 32, 3, stride=2, padding=1), 4),
    "conv1x1": (lambda: nn.Conv2d(16, 48, 1), 8),
}


@pytest.mark.parametrize("multiplier", [1.0, 0.7])
@pytest.mark.parametrize("alpha", [1e-3, 10.0])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_output_and_gradient_are_sd_scripts_oft(layer, alpha, multiplier):
    key = f"{layer}.a{alpha:g}.m{multiplier:g}"
    torch.manual_seed(0)
    make, blocks = LAYERS[layer]
    org = make()
    assert torch.equal(org.weight, REF[f"{layer}.layer_weight"])
    pair = KohyaOftPair(tuple(org.weight.shape), blocks, alpha)
    assert tuple(pair.oft_blocks.shape) == tuple(REF[f"{key}.oft_blocks"].shape)
    assert float(pair.weight_delta(org.weight, 1.0).abs().max()) == 0.0  # zero start: a no-op
    missing = []
    pair.load_tensors({"m.oft_blocks": REF[f"{key}.oft_blocks"]}, "m", missing)
    assert not missing
    net = types.SimpleNamespace(multiplier=multiplier, training=True, module_dropout=None, dropout=None,
                                rank_dropout=None, _passes_through=lambda: False)
    plain = type(org).forward.__get__(org)
    org.forward = LoRANetwork._weight_forward(net, pair, org, plain)
    y = org(REF[f"{layer}.x"])
    torch.testing.assert_close(y, REF[f"{key}.y"], rtol=1e-5, atol=1e-5)
    (y * y.detach().cos()).sum().backward()
    # (the gradient goes through a matrix inverse in fp32: another CPU's kernels differ in the 4th digit)
    torch.testing.assert_close(pair.oft_blocks.grad, REF[f"{key}.grad"], rtol=1e-3, atol=1e-5)
    assert float(pair.file_tensors()["alpha"]) == pytest.approx(alpha)


@pytest.fixture(scope="module")
def sd1():
    return models.make_sd1(seed=4)


def _cfg(tmp_path, img, out, **kw):
    c = {"network_module": "networks.oft", "max_train_epochs": 2, "network_dim": 4, "learning_rate": 1e-2}
    c.update(kw)
    return parse_train_config(train_data.job_config(img, tmp_path / out, **c), base_dir=str(tmp_path))


def _loaded_is_trained(model, family, path, sd):
    """Our <lora:> loader reads the file whole, and each module's delta is the one a KohyaOftPair with the file's
    blocks gives on that layer (the pair is the sd-scripts module above)."""
    layers = layer_mapping(model)
    net = load_network(path, family, layer_names=set(layers))
    names = {k.split(".")[0] for k in sd}
    assert len(net.report.matched) == net.report.total_modules == len(names)
    for layer_name, mods in net.modules.items():
        for _, mod in mods:
            n = mod.ctx.module_key
            w = layers[layer_name].weight.detach()
            blocks = sd[f"{n}.oft_blocks"]
            pair = KohyaOftPair(tuple(w.shape), blocks.shape[0], float(sd[f"{n}.alpha"]))
            pair.load_tensors({f"{n}.oft_blocks": blocks}, n, [])
            want = pair.weight_delta(w, 0.8)
            assert float(want.abs().max()) > 0, n
            torch.testing.assert_close(mod.delta(w, 0.8)[0], want, rtol=1e-4, atol=1e-6, msg=n)


def test_attention_oft_run_writes_sd_scripts_file(sd1, tmp_path):
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=2)
    before = models.model_state_hash(sd1)
    events = []
    res = run_training(ModelHost(sd1, "m"), _cfg(tmp_path, img, "o", network_alpha=1e-3), on_event=events.append)
    assert res.status == "done" and models.model_state_hash(sd1) == before
    start = next(e.message for e in events if e.kind == "start")
    assert start.startswith("OFT (4 blocks per layer, constraint 0.001)"), start
    text = " ".join(res.notes)
    assert "trains the UNet only" in text and "OFT's constraint" not in text
    assert "A1111's built-in Lora (1.10) finds none of the layers" in text
    assert "on SD1/SD2" not in text and len(set(res.notes)) == len(res.notes)  # (the run knows its model; once)
    assert "ComfyUI loads none of such a file" in text and "algo=diag-oft" in text
    md = read_metadata(res.final)
    assert md["ss_network_module"] == "networks.oft" and float(md["ss_network_alpha"]) == pytest.approx(1e-3)
    sd = load_tensors(res.final)
    names = {k.split(".")[0] for k in sd}
    # sd-scripts' default: the Linear layers of the attention modules (attn1/attn2 q, k, v, out), UNet only
    want = {"oft_unet_" + n[len("lora_unet_"):] for n in LoRANetwork(sd1, "sd1", 4, 1.0, train_text_encoder=False).pairs
            if re.search(r"_attn[12]_", n)}
    assert names == want and want
    assert {k.split(".", 1)[1] for k in sd} == {"oft_blocks", "alpha"}
    assert all(float(sd[k]) == pytest.approx(1e-3) for k in sd if k.endswith(".alpha"))
    assert all(sd[k].shape[0] == 4 for k in sd if k.endswith("oft_blocks"))
    _loaded_is_trained(sd1, "sd1", res.final, sd)


def test_all_linear_and_conv_on_sdxl_and_resume(tmp_path):
    model = models.make_sdxl(seed=2)
    before = models.model_state_hash(model)
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=2)
    host = ModelHost(model, "m")
    args = ["enable_all_linear=True", "enable_conv=True"]
    cfg = _cfg(tmp_path, img, "a", network_args=args, network_alpha=0.01)
    full = Trainer(host, cfg, plan_for(host, cfg)).run()
    assert full.status == "done" and models.model_state_hash(model) == before
    sd = load_tensors(full.final)
    want = {"oft_unet_" + n[len("lora_unet_"):] for n in LoRANetwork(model, "sdxl", 4, 1.0, conv_dim=4,
                                                                     train_text_encoder=False).pairs}
    assert {k.split(".")[0] for k in sd} == want
    _loaded_is_trained(model, "sdxl", full.final, sd)
    _, resumed = train_data.cancelled_then_resumed(host, _cfg(tmp_path, img, "b", network_args=args,
                                                              network_alpha=0.01), at_step=3)
    b = load_tensors(resumed.final)
    for k in sd:
        torch.testing.assert_close(sd[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_what_sd_scripts_reads_otherwise_is_refused_or_said(sd1, tmp_path):
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=1, repeats=1)
    errors, _ = check_support(_cfg(tmp_path, img, "x", network_args=["enable_conv=False"]), "sd1")
    assert any("enable_conv=False: sd-scripts reads any value of enable_conv as True" in e for e in errors)
    errors, notes = check_support(_cfg(tmp_path, img, "x", network_alpha=1, scale_weight_norms=1.0,
                                       network_dropout=0.1, network_args=["conv_dim=4", "loraplus_lr_ratio=4",
                                                                          "down_lr_weight=cosine"]), "sd1")
    text = " ".join(notes)
    assert not errors, errors
    assert "network_alpha = 1 is OFT's constraint" in text and "suggests e.g. 1e-3" in text
    assert "scale_weight_norms is not used" in text
    assert "conv_dim, loraplus_lr_ratio, down_lr_weight" not in text  # (one note, in the order of its list)
    assert "conv_dim, down_lr_weight, loraplus_lr_ratio, network_dropout not used with networks.oft" in text
    assert "not supported yet" not in text
    assert any("dim_from_weights with networks.oft" in e for e in check_support(
        _cfg(tmp_path, img, "x", dim_from_weights=True, network_weights="a.safetensors"), "sd1")[0])
    # 320 channels do not split into 3 blocks: the job stops at once and names the layer
    cfg = _cfg(tmp_path, img, "x", network_dim=3)
    with pytest.raises(TrainingError, match=r"oft_unet_.*attn1_to_q: networks.oft splits the \d+ output"):
        Trainer(ModelHost(sd1, "m"), cfg, plan_for(ModelHost(sd1, "m"), cfg)).run()


def test_large_blocks_on_several_cpu_threads():
    """SD's feed-forward layers give kohya OFT blocks of hundreds of rows; oneMKL's batched inverse fails for those
    with more than one CPU thread (torch 2.13), so a CPU run or merge crashed. The rotation must be I + 2Q(I - Q)^-1
    per block (closed form of the Cayley transform) with two threads too."""
    from lib_lora.networks.oft import cayley
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pair = KohyaOftPair((512, 32), 2, constraint=1.0)  # 2 blocks of 256 rows
        with torch.no_grad():
            pair.oft_blocks.normal_(std=0.01)
        r = pair.rotation()
        merged = cayley(pair.oft_blocks.detach().float(), 1.0 * 512, kohya=True)
    finally:
        torch.set_num_threads(threads)
    b = pair.oft_blocks.detach().double()
    q = b - b.transpose(-1, -2)
    eye = torch.eye(256, dtype=torch.float64)
    expected = torch.stack([(eye + qi) @ torch.linalg.inv(eye - qi) for qi in q])
    assert torch.allclose(r.double(), expected, atol=1e-5) and torch.allclose(merged.double(), expected, atol=1e-5)
    assert not torch.allclose(r, torch.eye(256).expand_as(r), atol=1e-3)  # (a real rotation, not the identity)
