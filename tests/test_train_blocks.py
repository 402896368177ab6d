"""Block-wise learning rates, block ranks and LoRA+ (sd-scripts' network_args).

References: tests/data/block_lr_reference.json, written by sd-scripts' own functions from networks/lora.py (see
tests/data/block_lr_reference.py) for the block index of every UNet module and for the weights and ranks; and a
closed form for the optimizer groups: AdamW's first step moves every weight by lr x g/(|g| + eps), so with weight
decay 0 the largest change in a module is its group's learning rate.
"""
import json
import os

import pytest
import torch

import models
import train_data
from lib_lora.formats.safetensors_io import load_tensors, read_metadata, save_file_atomic
from lib_lora.host.base import ModelHost
from lib_lora.train import blocks as B
from lib_lora.train.config import parse_train_config
from lib_lora.train.lora_net import LoRANetwork
from lib_lora.train.run import plan_for
from lib_lora.train.support import check_support
from lib_lora.train.targets import unet_targets
from lib_lora.train.trainer import Trainer, TrainingError

REF = json.load(open(os.path.join(os.path.dirname(__file__), "data", "block_lr_reference.json")))


@pytest.fixture(scope="module")
def sd1():
    return models.make_sd1(seed=4)


@pytest.fixture(scope="module")
def sdxl():
    return models.make_sdxl(seed=4)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_block_index_of_every_unet_module_is_sd_scripts(family, sd1, sdxl):
    model = sd1 if family == "sd1" else sdxl
    names = [t.kohya_name for t in unet_targets(model.model.diffusion_model, family, conv=True)]
    want = REF["families"][family]["block_index"]
    assert sorted(names) == sorted(want)
    assert {n: B.block_index(n, family) for n in names} == want
    assert B.block_index("lora_te1_text_model_encoder_layers_0_mlp_fc1", family) == -1


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_block_lr_weights_are_sd_scripts(family):
    for case in REF["families"][family]["lr_cases"]:
        notes = []
        got = B.block_lr_weights(dict(case["args"]), family, notes)
        assert got == pytest.approx(case["weights"], abs=1e-12), case["args"]
        side, mid = (9, 3) if family == "sdxl" else (12, 1)
        wrong = [k for k, v in case["args"].items() if k != "block_lr_zero_threshold"
                 and (k == "mid_lr_weight" or "," in v) and len(v.split(",")) != (mid if k[0] == "m" else side)]
        assert sorted(wrong) == sorted(n.split()[1].rstrip(":") for n in notes), (case["args"], notes)
    assert B.block_lr_weights({"rank_dropout": "0.1"}, family, []) is None


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_block_dims_are_sd_scripts(family):
    lr_cases = REF["families"][family]["lr_cases"]
    for case in REF["families"][family]["dim_cases"]:
        lr = None if case["lr_case"] is None else B.block_lr_weights(dict(lr_cases[case["lr_case"]]["args"]),
                                                                     family, [])
        got = B.block_dims(dict(case["args"]), family, case["network_dim"], case["network_alpha"], case["conv_dim"],
                           case["conv_alpha"], lr)
        assert [got.dims, got.alphas, got.conv_dims, got.conv_alphas] == case["result"], case["args"]
    assert B.block_dims({}, family, 8, 4.0, None, None, None) is None


def test_wrong_block_args_say_what_to_write(sd1):
    with pytest.raises(B.BlockArgsError, match=r"presets cosine, sine, linear, reverse_linear, zeros"):
        B.block_lr_weights({"down_lr_weight": "cosin"}, "sd1", [])
    with pytest.raises(B.BlockArgsError, match=r"needs 23 comma-separated values .*13-21 output blocks.*got 25"):
        B.block_dims({"block_dims": ",".join(["4"] * 25)}, "sdxl", 8, 4.0, None, None, None)
    with pytest.raises(B.BlockArgsError, match=r"loraplus_lr_ratio=x: not a number"):
        B.loraplus_ratios({"loraplus_lr_ratio": "x"})
    assert B.loraplus_ratios({"loraplus_lr_ratio": "16", "loraplus_text_encoder_lr_ratio": "4"}) == (16.0, 4.0)
    assert B.loraplus_ratios({"loraplus_lr_ratio": "16", "loraplus_unet_lr_ratio": "0"}) == (16.0, 16.0)
    # the pre-flight check knows the model: the same message before anything is queued
    cfg = parse_train_config({"train_data_dir": "/x", "network_args": ["block_dims=" + ",".join(["4"] * 23)]})
    errors, _ = check_support(cfg, "sd1")
    assert any("block_dims needs 25" in e and "IN00-IN11" in e for e in errors), errors
    assert check_support(cfg)[0] == []  # without a model the length cannot be judged
    cfg = parse_train_config({"train_data_dir": "/x", "network_args": ["loraplus_lr_ratio=16"],
                              "optimizer_type": "Prodigy"})
    assert any("LoRA+ with Prodigy" in n for n in check_support(cfg, "sd1")[1])


def test_param_groups_follow_blocks_and_loraplus(sdxl):
    lr_w = B.block_lr_weights({"down_lr_weight": "reverse_linear", "mid_lr_weight": "1,0,2"}, "sdxl", [])
    dims = B.block_dims({}, "sdxl", 4, 2.0, None, None, lr_w)
    net = LoRANetwork(sdxl, "sdxl", dim=4, alpha=2.0, blocks=dims)
    # input block 8 (weight 0 at the end of 'reverse_linear') and the middle block's attention hold no module
    assert {B.block_index(n, "sdxl") for n in net.skipped} == {9, 11} and all(lr_w[B.block_index(n, "sdxl")] == 0 for n in net.skipped)
    assert not any(lr_w[B.block_index(n, "sdxl")] == 0 for n in net.pairs if n.startswith("lora_unet_"))
    groups = net.param_groups(1e-3, 1e-4, lr_w, (8.0, None))
    by_param = {id(p): g for g in groups for p in g["params"]}
    for name, pair in net.pairs.items():
        if name.startswith("lora_unet_"):
            w = lr_w[B.block_index(name, "sdxl")]
            assert by_param[id(pair.lora_down.weight)]["lr"] == pytest.approx(1e-3 * w)
            assert by_param[id(pair.lora_up.weight)]["lr"] == pytest.approx(8e-3 * w)
            assert by_param[id(pair.lora_up.weight)]["name"].endswith(" plus")
        else:
            assert by_param[id(pair.lora_down.weight)]["lr"] == by_param[id(pair.lora_up.weight)]["lr"] == 1e-4
    assert sum(len(g["params"]) for g in groups) == 2 * len(net.pairs)
    assert all(g["lr"] == pytest.approx(g["lr_scale"] * (1e-4 if g["name"] == "text_encoder" else 1e-3))
               for g in groups)


def _start_file(model, path, nargs):
    """A start LoRA with every weight non-zero (so both halves get a gradient on the first step)."""
    notes = []
    lr_w = B.block_lr_weights(nargs, "sd1", notes)
    net = LoRANetwork(model, "sd1", dim=4, alpha=4.0, blocks=B.block_dims(nargs, "sd1", 4, 4.0, None, None, lr_w))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_file_atomic(net.kohya_state_dict(torch.float32), str(path))
    return lr_w


@pytest.mark.parametrize("fast", [True, False])
def test_first_adamw_step_moves_each_module_by_its_groups_lr(sd1, tmp_path, fast):
    nargs = {"down_lr_weight": "cosine", "mid_lr_weight": "0", "up_lr_weight": "linear",
             "loraplus_unet_lr_ratio": "4", "loraplus_text_encoder_lr_ratio": "2"}
    start = tmp_path / "start.safetensors"
    lr_w = _start_file(sd1, start, nargs)
    img, _ = train_data.make_dataset(str(tmp_path / "data"), n_concept=2, repeats=1)
    cfg = parse_train_config({
        "train_data_dir": img, "resolution": 64, "train_batch_size": 1, "output_dir": str(tmp_path / "out"),
        "output_name": "b", "network_dim": 4, "network_alpha": 4, "unet_lr": 1e-3, "text_encoder_lr": 5e-4,
        "max_train_steps": 1, "seed": 1, "save_precision": "float", "optimizer_type": "AdamW",
        "optimizer_args": ["weight_decay=0"], "network_weights": str(start), "fast_path": fast,
        "network_args": [f"{k}={v}" for k, v in nargs.items()]}, base_dir=str(tmp_path))
    host = ModelHost(sd1, "m")
    events = []
    tr = Trainer(host, cfg, plan_for(host, cfg), on_event=events.append)
    res = tr.run()
    before, after = load_tensors(str(start)), load_tensors(res.files[-1])
    assert set(after) == set(before)
    seen = set()
    for key in after:
        if not key.endswith(".weight"):
            continue
        name = key.split(".")[0]
        if name.startswith("lora_unet_"):
            lr = 1e-3 * lr_w[B.block_index(name, "sd1")] * (4 if "lora_up" in key else 1)
        else:
            lr = 5e-4 * (2 if "lora_up" in key else 1)
        moved = float((after[key] - before[key]).abs().max())
        assert moved == pytest.approx(lr, rel=2e-3), (key, moved, lr)
        seen.add(round(lr, 9))
    assert len(seen) > 10  # many distinct learning rates were checked
    # the mid block (weight 0) has no module: reported, and absent from the file
    assert not any("mid_block" in k for k in after)
    text = " ".join(tr.notes)
    assert "module(s) get no LoRA: they have rank 0 or a block learning-rate weight of 0" in text
    assert "mid_block" in text
    assert "optimizer groups: unet_block1 lr 0.00099, unet_block1 plus lr 0.00396, unet_block2 lr 0.000959" in text
    # the progress reports the UNet's base learning rate, not the first block's
    assert [e for e in events if e.kind == "step"][-1].lr == pytest.approx(1e-3)
    meta = read_metadata(res.files[-1])
    assert "down_lr_weight" in json.loads(meta["ss_network_args"])


def test_block_dims_give_each_module_its_rank_and_alpha(sd1, tmp_path):
    dims = ",".join(str(1 + i % 4) for i in range(25))
    alphas = ",".join(str(0.5 + i % 2) for i in range(25))
    img, _ = train_data.make_dataset(str(tmp_path / "data"), n_concept=2, repeats=1)
    cfg = parse_train_config({
        "train_data_dir": img, "resolution": 64, "train_batch_size": 1, "output_dir": str(tmp_path / "out"),
        "output_name": "d", "network_dim": 8, "learning_rate": 1e-3, "max_train_steps": 1, "seed": 1,
        "network_args": [f"block_dims={dims}", f"block_alphas={alphas}", "conv_dim=2", "conv_alpha=1"]},
        base_dir=str(tmp_path))
    host = ModelHost(sd1, "m")
    res = Trainer(host, cfg, plan_for(host, cfg)).run()
    sd = load_tensors(res.files[-1])
    n_conv = 0
    for key, v in sd.items():
        if not key.endswith("lora_down.weight"):
            continue
        name = key.split(".")[0]
        alpha = float(sd[f"{name}.alpha"])
        if not name.startswith("lora_unet_"):
            assert v.shape[0] == 8 and alpha == 1.0  # the text encoder keeps network_dim / network_alpha
            continue
        i = B.block_index(name, "sd1")
        if v.dim() == 4 and v.shape[2:] == (3, 3):
            n_conv += 1
            assert (v.shape[0], alpha) == (2, 1.0)  # conv_dim for every block (sd-scripts)
        else:
            assert (v.shape[0], alpha) == (1 + i % 4, 0.5 + i % 2), name
    assert n_conv > 0


def test_a_network_with_nothing_left_is_refused(sd1, tmp_path):
    img, _ = train_data.make_dataset(str(tmp_path / "data"), n_concept=2, repeats=1)
    cfg = parse_train_config({
        "train_data_dir": img, "resolution": 64, "output_dir": str(tmp_path / "out"), "max_train_steps": 1,
        "learning_rate": 1e-3, "network_train_unet_only": True,
        "network_args": ["down_lr_weight=zeros", "mid_lr_weight=0", "up_lr_weight=zeros"]}, base_dir=str(tmp_path))
    host = ModelHost(sd1, "m")
    with pytest.raises(TrainingError, match="no module is left to train"):
        Trainer(host, cfg, plan_for(host, cfg)).run()
    assert not os.path.exists(tmp_path / "out" / "lora.safetensors")


def test_resume_with_block_groups_gives_the_same_weights(sd1, tmp_path):
    """The optimizer state of 30-odd groups goes through the per-weight state file and back."""
    from lib_lora.train.run import run_training

    img, _ = train_data.make_dataset(str(tmp_path / "data"), n_concept=3, repeats=2)

    def cfg(out):
        return parse_train_config({
            "train_data_dir": img, "resolution": 64, "output_dir": str(tmp_path / out), "output_name": "r",
            "network_dim": 4, "learning_rate": 1e-3, "text_encoder_lr": 5e-4, "max_train_epochs": 2, "seed": 5,
            "save_precision": "float", "lr_scheduler": "cosine",
            "network_args": ["down_lr_weight=sine+.1", "up_lr_weight=linear", "loraplus_lr_ratio=8"]},
            base_dir=str(tmp_path))

    full = run_training(ModelHost(sd1, "m"), cfg("a"))
    seen = {"step": 0}
    part = run_training(ModelHost(sd1, "m"), cfg("b"), on_event=lambda e: e.kind == "step" and seen.update(step=max(seen["step"], e.step)),
                        should_cancel=lambda: seen["step"] >= 4)
    assert part.status == "cancelled" and part.state_file and part.steps >= 3
    resumed = run_training(ModelHost(sd1, "m"), cfg("b"), resume=part.state_file)
    assert resumed.status == "done" and resumed.steps == full.steps == 12
    a, b = load_tensors(full.final), load_tensors(resumed.final)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_dim_from_weights_keeps_the_files_ranks_with_block_settings(sd1, tmp_path):
    """Block learning rates with dim_from_weights built the blocks from network_dim (4) while the file had rank 8:
    the start weights did not fit (a raw reshape error). The file's ranks win, block_dims is ignored with a note
    (sd-scripts' create_network_from_weights), and the block weights still drop the mid block."""
    from lib_lora.train.run import run_training

    img, _ = train_data.make_dataset(str(tmp_path / "data"), n_concept=2, repeats=1)
    base = {"train_data_dir": img, "resolution": 64, "learning_rate": 1e-3, "max_train_steps": 1, "seed": 1,
            "save_precision": "float"}
    first = run_training(ModelHost(sd1, "m"), parse_train_config(dict(base, output_dir=str(tmp_path / "a"),
                                                                      network_dim=8, network_alpha=8)))
    res = run_training(ModelHost(sd1, "m"), parse_train_config(dict(
        base, output_dir=str(tmp_path / "b"), network_dim=4, network_weights=first.final, dim_from_weights=True,
        network_args=["mid_lr_weight=0", "block_dims=" + ",".join(["2"] * 25)])))
    w = load_tensors(res.final)
    assert {v.shape[0] for k, v in w.items() if k.endswith("lora_down.weight")} == {8}
    assert not any("mid_block" in k for k in w)
    assert any("block_dims ignored: dim_from_weights takes the ranks from the network_weights file" in n
               for n in res.notes)
