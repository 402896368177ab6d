"""Closed-form checks where no peer tool is installed (kohya OFT, old oft_diag, A1 semantics, scale rules, dtypes).

Expected values are written out here independently (numpy / explicit loops), never taken from lib_lora.
"""
import math

import numpy as np
import pytest
import torch
from torch import nn

from lib_lora.networks import LoraError, ModuleContext, build_module, describe
from lib_lora.networks.lora import LoRA


def ctx(writer="kohya", key="lora_unet_x", cfg=None):
    return ModuleContext(writer=writer, adapter_config=cfg, module_key=key)


def rnd(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


# ---------------------------------------------------------------- kohya OFT (sd-scripts networks/oft.py)
def np_kohya_oft(W, blocks, alpha, m):
    """sd-scripts OFTModule.get_weight + merge_to, in numpy float64."""
    W = W.astype(np.float64)
    B = blocks.astype(np.float64)
    n, bs, _ = B.shape
    O = W.shape[0]
    Q = B - B.transpose(0, 2, 1)
    norm = np.sqrt((Q ** 2).sum())
    c = alpha * O
    Q = Q * ((min(norm, c) + 1e-8) / (norm + 1e-8))
    eye = np.eye(bs)
    out = np.empty_like(W)
    Wf = W.reshape(O, -1)
    outf = out.reshape(O, -1)
    for k in range(n):
        R = (eye + Q[k]) @ np.linalg.inv(eye - Q[k])  # Cayley
        Rw = m * (R - eye) + eye  # block_R_weighted
        outf[k * bs:(k + 1) * bs] = Rw.T @ Wf[k * bs:(k + 1) * bs]  # einsum 'k n m, k n p -> k m p'
    return out


@pytest.mark.parametrize("m", [1.0, 0.5])
@pytest.mark.parametrize("shape", [(32, 24), (32, 16, 3, 3)])
@pytest.mark.parametrize("alpha", [1e-3, 1.0])  # clamped / not clamped
def test_kohya_oft(shape, alpha, m):
    W = rnd(*shape, seed=1)
    blocks = rnd(4, 8, 8, seed=2) * 0.1
    t = {"oft_blocks": blocks, "alpha": torch.tensor(alpha)}
    mod = build_module(t, ctx("kohya", "oft_unet_down_blocks_0_attentions_0_proj_in"))
    assert mod.kind == "oft" and "kohya" in describe(mod)
    dW, _ = mod.delta(W, m)
    expected = np_kohya_oft(W.numpy(), blocks.numpy(), alpha, m)
    np.testing.assert_allclose((W + dW).numpy(), expected, rtol=1e-4, atol=1e-5)
    assert np.abs(expected - W.numpy()).max() > 1e-3


def test_kohya_oft_alpha_zero_is_noop_but_lycoris_is_unconstrained():
    W = rnd(32, 24, seed=1)
    blocks = rnd(4, 8, 8, seed=2) * 0.1
    t = {"oft_blocks": blocks, "alpha": torch.tensor(0.0)}
    kohya = build_module(t, ctx("kohya", "oft_unet_x"))
    assert kohya.delta(W, 1.0)[0].abs().max() < 1e-6  # kohya always clamps: c = 0 => Q ~ 0
    lyco = build_module(t, ctx("lycoris", "lora_unet_x"))
    expected = np_kohya_oft(W.numpy(), blocks.numpy(), 1e9, 1.0)  # unconstrained
    np.testing.assert_allclose((W + lyco.delta(W, 1.0)[0]).numpy(), expected, rtol=1e-4, atol=1e-5)


def test_kohya_detected_by_key_prefix_without_metadata():
    W = rnd(32, 24, seed=1)
    t = {"oft_blocks": rnd(4, 8, 8, seed=2) * 0.1, "alpha": torch.tensor(0.0)}
    assert build_module(t, ctx("unknown", "oft_unet_x")).delta(W, 1.0)[0].abs().max() < 1e-6


# ---------------------------------------------------------------- old LyCORIS oft_diag (R stored directly, A1 is_R)
@pytest.mark.parametrize("m", [1.0, 0.5])
def test_old_oft_diag(m):
    n, bs = 4, 8
    rng = np.random.default_rng(0)
    R = np.stack([np.linalg.qr(rng.standard_normal((bs, bs)))[0] for _ in range(n)])
    W = rnd(32, 16, 3, 3, seed=3)
    mod = build_module({"oft_diag": torch.tensor(R, dtype=torch.float32)}, ctx("lycoris"))
    assert "old oft_diag" in describe(mod)
    Wf = W.numpy().reshape(32, -1).astype(np.float64)
    exp = Wf.copy()
    for k in range(n):
        rot = R[k].T @ Wf[k * bs:(k + 1) * bs]
        exp[k * bs:(k + 1) * bs] = Wf[k * bs:(k + 1) * bs] + m * (rot - Wf[k * bs:(k + 1) * bs])
    got = (W + mod.delta(W, m)[0]).numpy().reshape(32, -1)
    np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-5)


def test_oft_block_mismatch_is_error():
    mod = build_module({"oft_blocks": rnd(4, 8, 8), "alpha": torch.tensor(0.0)}, ctx("lycoris"))
    with pytest.raises(LoraError, match="output channels"):
        mod.delta(rnd(30, 8), 1.0)


# ---------------------------------------------------------------- norm
@pytest.mark.parametrize("with_b", [True, False])
def test_norm_closed_form(with_b):
    w, wn, bn = rnd(32, seed=1), rnd(32, seed=2), rnd(32, seed=3)
    t = {"w_norm": wn}
    if with_b:
        t["b_norm"] = bn
    mod = build_module(t, ctx("lycoris"))
    dW, dB = mod.delta(w, 0.25)
    torch.testing.assert_close(w + dW, w + 0.25 * wn)
    if with_b:
        torch.testing.assert_close(dB, 0.25 * bn)
    else:
        assert dB is None


# ---------------------------------------------------------------- IA3
def test_ia3_conv_on_output_broadcasts_per_output_channel():
    # A1 views w as (O, 1) here, which fails against (O, I, k, k); the right broadcast is (O, 1, 1, 1)
    W = rnd(8, 4, 3, 3, seed=1)
    w = rnd(1, 8, 1, 1, seed=2)
    mod = build_module({"weight": w, "on_input": torch.tensor(0)}, ctx("lycoris"))
    dW, dB = mod.delta(W, 0.5)
    exp = W.clone()
    for o in range(8):
        exp[o] = W[o] * (1 + 0.5 * w.flatten()[o])
    torch.testing.assert_close(W + dW, exp)
    assert dB is None  # LyCORIS merge leaves the bias alone


def test_ia3_linear_on_input():
    W, w = rnd(8, 5, seed=1), rnd(5, seed=2)
    mod = build_module({"weight": w, "on_input": torch.tensor(True)}, ctx("lycoris"))
    exp = torch.stack([W[:, i] * (1 + w[i]) for i in range(5)], dim=1)
    torch.testing.assert_close(W + mod.delta(W, 1.0)[0], exp)
    with pytest.raises(LoraError, match="input channels"):
        mod.delta(rnd(8, 6), 1.0)


def test_bare_weight_is_not_ia3():
    with pytest.raises(LoraError, match="weight"):
        build_module({"weight": rnd(8)}, ctx())


# ---------------------------------------------------------------- dyn (A1 rebuild_conventional)
def test_dyn_slices_rank_keeps_full_rank_scale():
    up, down = rnd(16, 8, seed=1), rnd(8, 12, seed=2)
    W = torch.zeros(16, 12)
    mod = build_module({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(4.0)}, ctx())
    exp = (4.0 / 8) * (up[:, :3] @ down[:3])  # scale alpha / FULL rank, as A1
    torch.testing.assert_close(mod.delta(W, 1.0, dyn=3)[0], exp)
    torch.testing.assert_close(mod.delta(W, 1.0, dyn=8)[0], 0.5 * up @ down)
    torch.testing.assert_close(mod.delta(W, 1.0, dyn=100)[0], 0.5 * up @ down)


def test_dyn_ignored_with_lora_mid_and_other_types():
    t = {"lora_up.weight": rnd(16, 4, 1, 1), "lora_down.weight": rnd(4, 8, 1, 1), "lora_mid.weight": rnd(4, 4, 3, 3)}
    mod = build_module(t, ctx())
    W = torch.zeros(16, 8, 3, 3)
    torch.testing.assert_close(mod.delta(W, 1.0, dyn=2)[0], mod.delta(W, 1.0)[0])
    assert any("dyn" in w for w in mod.warnings)


def test_lora_conv_and_tucker_closed_form():
    up, down, mid = rnd(16, 4, 1, 1, seed=1), rnd(4, 8, 1, 1, seed=2), rnd(4, 4, 3, 3, seed=3)
    mod = build_module({"lora_up.weight": up, "lora_down.weight": down, "lora_mid.weight": mid,
                        "alpha": torch.tensor(2.0)}, ctx())
    exp = torch.zeros(16, 8, 3, 3)
    for o in range(16):
        for i in range(8):
            for a in range(4):
                for b in range(4):
                    exp[o, i] += up[o, a, 0, 0] * mid[a, b] * down[b, i, 0, 0]
    torch.testing.assert_close(mod.delta(torch.zeros(16, 8, 3, 3), 1.0)[0], 0.5 * exp, rtol=1e-5, atol=1e-5)
    assert describe(mod) == "locon rank 4 (conv 3x3, tucker)"


# ---------------------------------------------------------------- alpha / scale rules (§1.1)
def lora_t(alpha=None, rank=4, **extra):
    t = {"lora_up.weight": rnd(6, rank, seed=1), "lora_down.weight": rnd(rank, 5, seed=2), **extra}
    if alpha is not None:
        t["alpha"] = alpha
    return t


@pytest.mark.parametrize("writer,expected", [("kohya", 1.0), ("lycoris", 1.0), ("unknown", 0.0), ("peft", 0.0)])
def test_alpha_zero_follows_writer(writer, expected):
    mod = build_module(lora_t(torch.tensor(0.0)), ctx(writer))
    assert mod.scale == expected
    assert bool(mod.warnings) == (expected == 0.0)


def test_alpha_missing_means_scale_one():
    assert build_module(lora_t(None), ctx("unknown")).scale == 1.0


@pytest.mark.parametrize("alpha", [torch.tensor(2.0, dtype=torch.float16), torch.tensor([2.0], dtype=torch.bfloat16),
                                   torch.tensor(2.0, dtype=torch.float64), 2.0, 2])
def test_alpha_storage_forms(alpha):
    assert build_module(lora_t(alpha), ctx()).scale == 0.5


def test_alpha_fp16_rounding_is_kept():
    a = torch.tensor(0.1, dtype=torch.float16)  # stored value 0.0999755859375
    assert build_module(lora_t(a), ctx()).scale == pytest.approx(0.0999755859375 / 4, rel=0, abs=1e-12)


def test_scale_key_overrides_alpha():
    mod = build_module(lora_t(torch.tensor(2.0), scale=torch.tensor(0.3)), ctx())
    assert mod.scale == pytest.approx(0.3)


def test_bad_alpha_shape_is_error():
    with pytest.raises(LoraError, match="alpha"):
        build_module(lora_t(torch.tensor([1.0, 2.0])), ctx())


def test_alpha_key_in_peft_file_is_honoured_over_metadata():
    t = {"lora_A.weight": rnd(4, 5), "lora_B.weight": rnd(6, 4), "alpha": torch.tensor(2.0)}
    mod = build_module(t, ctx("peft", "unet.a.b", {"r": 4, "lora_alpha": 8}))
    assert mod.scale == 0.5


def test_lokr_full_matrix_scale_is_one_and_rank_from_w2_b():
    w1, w2 = rnd(2, 3, seed=1), rnd(4, 5, seed=2)
    mod = build_module({"lokr_w1": w1, "lokr_w2": w2, "alpha": torch.tensor(7.0)}, ctx())
    assert mod.rank() is None and mod.scale == 1.0
    torch.testing.assert_close(mod.delta(torch.zeros(8, 15), 1.0)[0], torch.kron(w1, w2))
    mod = build_module({"lokr_w1": w1, "lokr_w2_a": rnd(4, 2), "lokr_w2_b": rnd(2, 5), "alpha": torch.tensor(1.0)},
                       ctx())
    assert mod.rank() == 2 and mod.scale == 0.5
    assert describe(mod) == "lokr rank 2 (w1 full, w2 a/b)"


def test_loha_closed_form():
    w1a, w1b, w2a, w2b = rnd(6, 3, seed=1), rnd(3, 5, seed=2), rnd(6, 3, seed=3), rnd(3, 5, seed=4)
    mod = build_module({"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b,
                        "alpha": torch.tensor(1.5)}, ctx())
    torch.testing.assert_close(mod.delta(torch.zeros(6, 5), 2.0)[0], 2.0 * 0.5 * (w1a @ w1b) * (w2a @ w2b))


# ---------------------------------------------------------------- GLoRA old layout (A1's formula, with alpha/r)
def test_glora_old_layout_closed_form():
    O, I, r = 12, 10, 3
    a1, a2, b1, b2 = rnd(r, I, seed=1), rnd(I, r, seed=2), rnd(r, I, seed=3), rnd(O, r, seed=4)
    W = rnd(O, I, seed=5)
    mod = build_module({"a1.weight": a1, "a2.weight": a2, "b1.weight": b1, "b2.weight": b2,
                        "alpha": torch.tensor(1.5)}, ctx("lycoris"))
    exp = 0.7 * (1.5 / r) * (b2 @ b1 + W @ a2 @ a1)
    torch.testing.assert_close(mod.delta(W, 0.7)[0], exp, rtol=1e-5, atol=1e-5)
    assert "old layout" in describe(mod)


def test_glora_square_layer_layout_tiebreak():
    # both shape tests pass when O == I; CU: old only if a2.shape[0] == O
    O = I = 8
    r = 2
    new = {"a1.weight": rnd(I, r, seed=1), "a2.weight": rnd(r, I, seed=2), "b1.weight": rnd(O, r, seed=3),
           "b2.weight": rnd(r, I, seed=4), "alpha": torch.tensor(1.0)}
    W = rnd(O, I, seed=5)
    mod = build_module(new, ctx("lycoris"))
    exp = (1.0 / r) * (new["b1.weight"] @ new["b2.weight"] + W @ new["a1.weight"] @ new["a2.weight"])
    torch.testing.assert_close(mod.delta(W, 1.0)[0], exp, rtol=1e-5, atol=1e-5)
    assert "new layout" in describe(mod)


# ---------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_give_fp32_deltas(dtype):
    t32 = {"lora_up.weight": rnd(16, 4, seed=1), "lora_down.weight": rnd(4, 8, seed=2), "alpha": torch.tensor(2.0)}
    th = {k: v.to(dtype) for k, v in t32.items()}
    W = rnd(16, 8, seed=3).to(dtype)
    dW, _ = build_module(th, ctx()).delta(W, 1.0)
    assert dW.dtype == torch.float32
    up, down = th["lora_up.weight"].float(), th["lora_down.weight"].float()
    torch.testing.assert_close(dW, 0.5 * (up @ down), rtol=1e-6, atol=1e-6)  # exact fp32 product of half inputs


@pytest.mark.parametrize("t", [
    {"hada_w1_a": rnd(8, 2), "hada_w1_b": rnd(2, 6), "hada_w2_a": rnd(8, 2), "hada_w2_b": rnd(2, 6)},
    {"lokr_w1": rnd(2, 2), "lokr_w2_a": rnd(4, 2), "lokr_w2_b": rnd(2, 3)},
    {"oft_blocks": rnd(2, 4, 4) * 0.1, "alpha": torch.tensor(0.0)},
    {"weight": rnd(8), "on_input": torch.tensor(0)},
    {"diff": rnd(8, 6), "diff_b": rnd(8)},
    {"lora_up.weight": rnd(8, 2), "lora_down.weight": rnd(2, 6), "dora_scale": rnd(8, 1).abs()},
])
def test_every_type_fp32_from_bf16(t):
    th = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in t.items()}
    W = rnd(8, 6, seed=9).to(torch.float16)
    dW, dB = build_module(th, ctx("lycoris")).delta(W, 0.5)
    assert dW.dtype == torch.float32 and dW.shape == W.shape
    assert dB is None or dB.dtype == torch.float32


# ---------------------------------------------------------------- shapes
def test_conv1x1_lora_on_linear_and_back():
    up, down = rnd(16, 4, 1, 1, seed=1), rnd(4, 8, 1, 1, seed=2)
    mod = build_module({"lora_up.weight": up, "lora_down.weight": down}, ctx())
    dW = mod.delta(torch.zeros(16, 8), 1.0)[0]  # SD2/SDXL proj_in is Linear, kohya wrote conv 1x1
    torch.testing.assert_close(dW, up.flatten(1) @ down.flatten(1))
    mod2 = build_module({"lora_up.weight": up.flatten(1), "lora_down.weight": down.flatten(1)}, ctx())
    assert mod2.delta(torch.zeros(16, 8, 1, 1), 1.0)[0].shape == (16, 8, 1, 1)


def test_inpaint_conv_in_pads_input_channels():
    up, down = rnd(32, 4, 1, 1, seed=1), rnd(4, 4, 3, 3, seed=2)
    mod = build_module({"lora_up.weight": up, "lora_down.weight": down}, ctx())
    dW = mod.delta(torch.zeros(32, 9, 3, 3), 1.0)[0]
    assert dW.shape == (32, 9, 3, 3) and dW[:, 4:].abs().max() == 0 and dW[:, :4].abs().max() > 0


def test_shape_mismatch_is_error():
    mod = build_module(lora_t(), ctx())
    with pytest.raises(LoraError, match="does not fit"):
        mod.delta(torch.zeros(7, 5), 1.0)


# ---------------------------------------------------------------- registry errors
def test_zero_size_tensor_is_error():
    with pytest.raises(LoraError, match="empty"):
        build_module({"lora_up.weight": torch.zeros(6, 0), "lora_down.weight": torch.zeros(0, 5)}, ctx())


def test_unknown_suffixes_are_named():
    with pytest.raises(LoraError, match="foo_bar"):
        build_module({"foo_bar": rnd(3), "alpha": torch.tensor(1.0)}, ctx())


def test_incomplete_lora_is_error():
    with pytest.raises(LoraError, match="lora_down.weight"):
        build_module({"lora_up.weight": rnd(6, 4)}, ctx())


def test_extra_suffix_warns():
    mod = build_module(lora_t(None, strange=rnd(2)), ctx())
    assert any("strange" in w for w in mod.warnings)


def test_dora_scale_orientation_from_shape():
    W = rnd(6, 5, seed=3)
    out = build_module(lora_t(None, dora_scale=rnd(6, 1).abs() + 1), ctx("lycoris"))
    inp = build_module(lora_t(None, dora_scale=rnd(1, 5).abs() + 1), ctx("lycoris"))
    assert "per-output" in describe(out) and "per-input" in describe(inp)
    # per-output: every row of W' has norm d_o; per-input: every column has norm d_i
    d_o = out.magnitude.flatten()
    torch.testing.assert_close((W + out.delta(W, 1.0)[0]).norm(dim=1), d_o, rtol=1e-5, atol=1e-5)
    d_i = inp.magnitude.flatten()
    torch.testing.assert_close((W + inp.delta(W, 1.0)[0]).norm(dim=0), d_i, rtol=1e-5, atol=1e-5)
    with pytest.raises(LoraError, match="dora_scale"):
        build_module(lora_t(None, dora_scale=rnd(3, 1)), ctx("lycoris")).delta(W, 1.0)


# ---------------------------------------------------------------- trainable twin
@pytest.mark.parametrize("layer", [nn.Linear(12, 20), nn.Conv2d(8, 16, 3, padding=1)])
def test_trainable_twin_kohya_init(layer):
    torch.manual_seed(0)
    twin = LoRA.trainable_twin(layer, rank=4, alpha=2)
    assert set(twin.state_dict()) == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert twin.lora_up.weight.abs().max() == 0
    down = twin.lora_down.weight
    fan_in = down[0].numel()
    bound = 1 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)) => U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert down.abs().max() <= bound and down.abs().max() > 0.5 * bound
    assert float(twin.alpha) == 2.0 and twin.scale == 0.5
    # round trip: a trained twin's state_dict loads as our LoRA with the same delta as its forward
    with torch.no_grad():
        twin.lora_up.weight.normal_()
    mod = build_module({k: v for k, v in twin.state_dict().items()}, ctx())
    x = torch.randn(2, 12) if isinstance(layer, nn.Linear) else torch.randn(2, 8, 5, 5)
    dW = mod.delta(layer.weight, 1.0)[0]
    y = (nn.functional.linear(x, dW) if isinstance(layer, nn.Linear)
         else nn.functional.conv2d(x, dW, padding=1))
    torch.testing.assert_close(y, twin(x), rtol=1e-4, atol=1e-5)


def test_lokr_w1_factorised_w2_full():
    # a layout LyCORIS' own constructor never produces, but the format allows (A1/CU read it)
    w1a, w1b, w2 = rnd(2, 3, seed=1), rnd(3, 4, seed=2), rnd(5, 6, 3, 3, seed=3)
    mod = build_module({"lokr_w1_a": w1a, "lokr_w1_b": w1b, "lokr_w2": w2, "alpha": torch.tensor(1.5)}, ctx())
    assert mod.rank() == 3 and describe(mod) == "lokr rank 3 (w1 a/b, w2 full)"
    w1 = w1a @ w1b
    exp = torch.zeros(10, 24, 3, 3)
    for i in range(2):
        for j in range(4):
            exp[i * 5:(i + 1) * 5, j * 6:(j + 1) * 6] = w1[i, j] * w2
    torch.testing.assert_close(mod.delta(torch.zeros(10, 24, 3, 3), 1.0)[0], 0.5 * exp, rtol=1e-5, atol=1e-5)
