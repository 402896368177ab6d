"""The trainable LoRA network: kohya's targets and names on the host's ldm/sgm modules, and exact forward math."""

import pytest
import torch

import models


def state_fingerprint(model):
    """Weights, grads flags and devices (models.model_state_hash), plus train/eval flags and leftover patches."""
    return (models.model_state_hash(model), tuple(m.training for m in model.modules()),
            tuple("forward" in m.__dict__ for m in model.modules()))
from lib_lora.train.host_guard import guarded
from lib_lora.train.lora_net import LoRANetwork


@pytest.fixture(scope="module")
def sd1():
    return models.make_sd1(seed=1)


def test_sd1_targets_match_kohya_counts_and_names(sd1):
    # kohya networks/lora.py on SD1.5: 16 transformers x 12 Linear/1x1 = 192 UNet modules; 6 per CLIP layer.
    net = LoRANetwork(sd1, "sd1", dim=4, alpha=2)
    n_layers = len(sd1.cond_stage_model.transformer.text_model.encoder.layers)
    assert net.counts() == {"unet": 192, "te1": 6 * n_layers}
    names = {t.kohya_name for t in net.targets}
    # names as kohya writes them (training-anchors §3.2)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k" in names
    assert "lora_unet_mid_block_attentions_0_proj_in" in names
    assert "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2" in names
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2" in names
    # with conv_dim kohya (C3Lier) adds resnets and samplers. SD1.5: 22 resnets x (conv1, conv2, time_emb_proj) = 66,
    # 14 conv_shortcut (in != out), 3 downsamplers + 3 upsamplers = 86; 192 + 86 = 278
    c3 = LoRANetwork(sd1, "sd1", dim=4, alpha=2, conv_dim=4, conv_alpha=1)
    assert c3.counts()["unet"] == 278
    cnames = {t.kohya_name for t in c3.targets}
    assert "lora_unet_up_blocks_1_resnets_2_conv1" in cnames
    assert "lora_unet_down_blocks_0_downsamplers_0_conv" in cnames
    assert "lora_unet_up_blocks_0_upsamplers_0_conv" in cnames
    assert "lora_unet_down_blocks_0_resnets_0_time_emb_proj" in cnames


def _rand_lora(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_forward_equals_merged_weights_and_host_untouched(sd1):
    unet = sd1.model.diffusion_model
    before = state_fingerprint(sd1)
    net = LoRANetwork(sd1, "sd1", dim=4, alpha=2, train_text_encoder=False)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    ctx = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = unet(x, t, context=ctx)
        with net.attached():
            same = unet(x, t, context=ctx)  # kohya init: up = 0, so an exact no-op
        assert torch.equal(base, same)
        _rand_lora(net)
        with net.attached():
            got = unet(x, t, context=ctx)
        assert state_fingerprint(sd1) == before
        # independent expectation: merge W + (alpha/dim) up@down into a copy of the weights
        backup = {}
        for tgt in net.targets:
            pair = net.pairs[tgt.kohya_name]
            w = tgt.module.weight
            backup[tgt.host_name] = w.clone()
            d = pair.lora_up.weight.flatten(1) @ pair.lora_down.weight.flatten(1) * (2 / 4)
            w += d.reshape(w.shape)
        want = unet(x, t, context=ctx)
        for tgt in net.targets:
            tgt.module.weight.copy_(backup[tgt.host_name])
    assert not torch.allclose(got, base)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert state_fingerprint(sd1) == before


def test_guard_restores_flags_on_failure(sd1):
    before = state_fingerprint(sd1)
    sd1.model.diffusion_model.input_blocks[1].train()  # a mixed state must come back as it was
    mixed = state_fingerprint(sd1)
    with pytest.raises(RuntimeError):
        with guarded([sd1]):
            net = LoRANetwork(sd1, "sd1", dim=2, alpha=1)
            net.attach()
            sd1.train()
            raise RuntimeError("boom")
    assert state_fingerprint(sd1) == mixed
    sd1.model.diffusion_model.input_blocks[1].eval()
    assert state_fingerprint(sd1) == before


def test_sd2_mha_lora_matches_merged_in_proj():
    sd2 = models.make_sd2(seed=2)
    net = LoRANetwork(sd2, "sd2", dim=4, alpha=4, train_unet=False)
    te = sd2.cond_stage_model
    tokens = torch.randint(0, 49407, (1, 77), generator=torch.Generator().manual_seed(3))
    _rand_lora(net, seed=5)
    with torch.no_grad():
        with net.attached():
            got = te.encode_with_transformer(tokens)
        block = te.model.transformer.resblocks[0]
        attn = block.attn
        kb = "lora_te_text_model_encoder_layers_0_self_attn_"
        d = [net.pairs[kb + p + "_proj"] for p in "qkv"]
        dq = torch.cat([(p.lora_up.weight @ p.lora_down.weight) for p in d], 0)
        o = net.pairs[kb + "out_proj"]
        w_in, w_out = attn.in_proj_weight.clone(), attn.out_proj.weight.clone()
        fc = net.pairs["lora_te_text_model_encoder_layers_0_mlp_fc1"]
        w_fc = block.mlp.c_fc.weight.clone()
        attn.in_proj_weight += dq
        attn.out_proj.weight += o.lora_up.weight @ o.lora_down.weight
        block.mlp.c_fc.weight += fc.lora_up.weight @ fc.lora_down.weight
        fc2 = net.pairs["lora_te_text_model_encoder_layers_0_mlp_fc2"]
        w_fc2 = block.mlp.c_proj.weight.clone()
        block.mlp.c_proj.weight += fc2.lora_up.weight @ fc2.lora_down.weight
        want = te.encode_with_transformer(tokens)
        attn.in_proj_weight.copy_(w_in)
        attn.out_proj.weight.copy_(w_out)
        block.mlp.c_fc.weight.copy_(w_fc)
        block.mlp.c_proj.weight.copy_(w_fc2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _mha_case(dropouts, seed=2):
    sd2 = models.make_sd2(seed=seed)
    net = LoRANetwork(sd2, "sd2", dim=4, alpha=4, train_unet=False, **dropouts)
    _rand_lora(net, seed=5)
    attn = sd2.cond_stage_model.model.transformer.resblocks[0].attn
    x = torch.randn(3, 7, attn.embed_dim, generator=torch.Generator().manual_seed(1))
    x = x if getattr(attn, "batch_first", False) else x.transpose(0, 1)
    mask = torch.full((7, 7), float("-inf")).triu(1)  # (open_clip's causal mask)
    return net, attn, x, mask


def test_sd2_mha_projection_by_projection_equals_the_weight_delta():
    """With kohya's dropouts the TE attention runs projection by projection; without drawing anything it gives
    what torch's own MultiheadAttention gives with the deltas merged, attention weights included."""
    net, attn, x, mask = _mha_case({})
    prefix = "lora_te_text_model_encoder_layers_0_self_attn_"
    with torch.no_grad():
        merged = torch.nn.MultiheadAttention(attn.embed_dim, attn.num_heads,
                                             batch_first=getattr(attn, "batch_first", False))
        merged.load_state_dict(attn.state_dict())
        for i, part in enumerate("qkv"):
            merged.in_proj_weight[i * attn.embed_dim:(i + 1) * attn.embed_dim] += net.pairs[prefix + part + "_proj"] \
                .delta_weight()
        merged.out_proj.weight += net.pairs[prefix + "out_proj"].delta_weight()
        want, want_w = merged(x, x, x, need_weights=True, attn_mask=mask)
        net.train()
        net._mha_by_activation = lambda *a: True
        with net.attached():
            got, got_w = attn(x, x, x, need_weights=True, attn_mask=mask)
            got_bool, _ = attn(x, x, x, need_weights=False, attn_mask=mask.isinf())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_w, want_w, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_bool, want, rtol=1e-4, atol=1e-5)
    # fp8_base stores the projections in FP8: both paths compute from the same fp32 copy
    kept = attn.in_proj_weight.data, attn.out_proj.weight.data
    attn.in_proj_weight.data = kept[0].to(torch.float8_e4m3fn)
    attn.out_proj.weight.data = kept[1].to(torch.float8_e4m3fn)
    try:
        with torch.no_grad(), net.attached():
            outs = []
            for by_activation in (True, False):
                net._mha_by_activation = lambda *a, v=by_activation: v
                outs.append(attn(x, x, x, need_weights=False, attn_mask=mask)[0])
    finally:
        attn.in_proj_weight.data, attn.out_proj.weight.data = kept
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dropouts", [{"rank_dropout": 0.5}, {"dropout": 0.5}])
def test_sd2_mha_lora_dropouts_act_as_in_sd_scripts(dropouts):
    """sd-scripts' SD2 text encoder has a Linear LoRA per projection, so its dropouts reach the attention LoRAs;
    here they did nothing there (train == eval). Dropout keeps the expectation: with LoRAs on v and out only (the
    output is linear in them) the mean over many draws is the eval output."""
    net, attn, x, mask = _mha_case(dropouts)
    prefix = "lora_te_text_model_encoder_layers_0_self_attn_"
    with torch.no_grad():
        for part in ("q_proj", "k_proj"):
            net.pairs[prefix + part].lora_up.weight.zero_()
        with net.attached():
            net.eval()
            want = attn(x, x, x, need_weights=False, attn_mask=mask)[0]
            net.train()
            torch.manual_seed(0)
            draws = torch.stack([attn(x, x, x, need_weights=False, attn_mask=mask)[0] for _ in range(1500)])
    spread = (draws[0] - want).norm()
    assert spread > 1e-3 * want.norm()  # (a draw differs from eval)
    assert (draws.mean(0) - want).norm() < 0.1 * spread


def test_module_dropout_reaches_the_sd2_attention_loras():
    net, attn, x, mask = _mha_case({"module_dropout": 1.0})
    with torch.no_grad():
        base = attn(x, x, x, need_weights=False, attn_mask=mask)[0]
        with net.attached():
            net.train()
            dropped = attn(x, x, x, need_weights=False, attn_mask=mask)[0]
            net.eval()
            applied = attn(x, x, x, need_weights=False, attn_mask=mask)[0]
    torch.testing.assert_close(dropped, base)
    assert (applied - base).abs().max() > 1e-3


def test_sd2_proj_in_saved_4d_like_kohya():
    sd2 = models.make_sd2(seed=0)
    net = LoRANetwork(sd2, "sd2", dim=4, alpha=1, train_text_encoder=False)
    sd = net.kohya_state_dict(torch.float16)
    assert sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].dim() == 4
    assert sd["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"].dim() == 2
    assert sd["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"].dtype == torch.float16


def test_sdpa_attention_matches_stock_attention(sd1):
    from lib_lora.train.attention import sdpa_attention

    unet = sd1.model.diffusion_model
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 900])
    ctx = torch.randn(2, 77, 768, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = unet(x, t, context=ctx)
        with sdpa_attention(unet) as s:
            assert len(s.mods) == 32  # 16 transformers x (attn1, attn2)
            got = unet(x, t, context=ctx)
    assert not any("forward" in m.__dict__ for m in unet.modules())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
