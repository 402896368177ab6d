"""UNet key mapping checked against independent oracles:

- the real ldm UNetModel (stable-diffusion-sdkit) built on the meta device with SD1 / SD2 configs, and an SDXL
  skeleton built from the same ldm blocks whose keys+shapes are checked against diffusers' SDXL UNet2DConditionModel
  through diffusers' own `convert_ldm_unet_checkpoint`;
- `convert_ldm_unet_checkpoint` (ldm -> diffusers) used in reverse to get the expected (diffusers name, ldm name)
  pairs; `lycoris.utils.convert_diffusers_name_to_compvis` as a second opinion;
- a hand-written §4.3 table for SDXL / SD1;
- keys written by peft (`get_peft_model_state_dict`), diffusers (`convert_state_dict_to_kohya`) and LyCORIS
  (`lycoris.kohya.create_network`) for diffusers UNets.
"""
import re

import pytest
import torch

from lib_lora.formats import FAMILIES, detect_family, group_modules, map_module_key, map_module_key_with_reason, \
    split_key


SD1_LDM = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
               num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
               transformer_depth=1, context_dim=768, legacy=False)
SD2_LDM = dict(SD1_LDM, num_heads=-1, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)
# SDXL levels: no attention at level 0, depth 2 at level 1, depth 10 at level 2 and the middle. sdkit's ldm takes
# one depth for all levels, so the tree is built at depth 10 and level-1 blocks >= 2 are dropped afterwards.
SDXL_LDM = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2],
                num_res_blocks=2, channel_mult=[1, 2, 4], num_head_channels=64, use_spatial_transformer=True,
                transformer_depth=10, context_dim=[2048] * 10, use_linear_in_transformer=True, legacy=False)
SDXL_LEVEL1_EXTRA = re.compile(r"^(input_blocks\.[45]|output_blocks\.[345])\.1\.transformer_blocks\.([2-9])\.")
SDXL_DIFFUSERS = dict(sample_size=128, in_channels=4, out_channels=4,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
                      attention_head_dim=(5, 10, 20), use_linear_projection=True, cross_attention_dim=2048,
                      addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=2816)


def _ldm_state_dict(cfg):
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    with torch.device("meta"):
        return UNetModel(**cfg).state_dict()


@pytest.fixture(scope="module")
def ldm_sd():
    """{family: ldm/sgm UNet state dict on meta}."""
    out = {"sd1": _ldm_state_dict(SD1_LDM), "sd2": _ldm_state_dict(SD2_LDM)}
    xl = {k: v for k, v in _ldm_state_dict(SDXL_LDM).items() if not SDXL_LEVEL1_EXTRA.match(k)}
    with torch.device("meta"):  # sgm's label_emb (adm_in_channels 2816 -> 1280 -> 1280)
        xl.update({"label_emb.0.0.weight": torch.empty(1280, 2816), "label_emb.0.0.bias": torch.empty(1280),
                   "label_emb.0.2.weight": torch.empty(1280, 1280), "label_emb.0.2.bias": torch.empty(1280)})
    out["sdxl"] = xl
    return out


CONVERTER_CONFIG = {"sd1": {"layers_per_block": 2}, "sd2": {"layers_per_block": 2},
                    "sdxl": {"layers_per_block": 2, "addition_embed_type": "text_time"}}


@pytest.fixture(scope="module")
def pairs(ldm_sd):
    """{family: {diffusers module name: ldm module name}} from diffusers' converter (values carry the ldm key)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    out = {}
    for fam, sd in ldm_sd.items():
        conv = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: k for k in sd}, CONVERTER_CONFIG[fam])
        assert set(conv.values()) == set(sd)  # the oracle covers every ldm tensor
        out[fam] = {d[: -len(".weight")]: l[: -len(".weight")] for d, l in conv.items() if d.endswith(".weight")}
    return out


def _a1(ldm_module):
    return "diffusion_model_" + ldm_module.replace(".", "_")


def _us(name):
    return name.replace(".", "_")


def test_sdxl_skeleton_is_real_sdxl(ldm_sd):
    """The SDXL skeleton is validated against diffusers' SDXL UNet: converting it gives exactly its keys/shapes."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    with torch.device("meta"):
        du = UNet2DConditionModel(**SDXL_DIFFUSERS)
    dsd = du.state_dict()
    conv = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in ldm_sd["sdxl"].items()},
                                       dict(du.config))
    assert set(conv) == set(dsd)
    assert all(conv[k].shape == dsd[k].shape for k in conv)


@pytest.mark.parametrize("family", FAMILIES)
def test_kohya_diffusers_names_map_like_the_converter(pairs, family):
    bad = {}
    for d, l in pairs[family].items():
        want = _a1(l)
        for mk in ("lora_unet_" + _us(d), "unet." + d, "lycoris_" + _us(d)):
            got = map_module_key(mk, family)
            if got is None or got.name != want or got.part is not None or got.component != "unet":
                bad[mk] = (got, want)
    assert not bad, list(bad.items())[:5]
    assert len(pairs[family]) > 300


@pytest.mark.parametrize("family", FAMILIES)
def test_compvis_names_map_to_themselves(ldm_sd, family):
    """kohya-SDXL style (lora_unet_ + sgm name), ComfyUI (diffusion_model. dotted) and kohya OFT all land on the
    layer they name; this also proves the block-layout validation accepts every real layer."""
    mods = sorted({k[: -len(".weight")] for k in ldm_sd[family] if k.endswith(".weight")})
    for m in mods:
        for mk in ("lora_unet_" + _us(m), "diffusion_model." + m, "oft_unet_" + _us(m), "model.diffusion_model." + m):
            t, why = map_module_key_with_reason(mk, family)
            assert t is not None and t.name == _a1(m), (mk, why)


def test_lycoris_converter_agrees(pairs):
    """lycoris.utils.convert_diffusers_name_to_compvis agrees except where it is known not to handle a name:
    conv_norm_out and add_embedding (no rule) and SD1/SD2's up_blocks_0 upsampler (it always writes `_2_conv`)."""
    from lycoris.utils import convert_diffusers_name_to_compvis
    for family in FAMILIES:
        differ = set()
        for d, l in pairs[family].items():
            ours = map_module_key("lora_unet_" + _us(d), family).name
            theirs = convert_diffusers_name_to_compvis("lora_unet_" + _us(d))
            if ours.replace("diffusion_model_", "lora_unet_", 1) != theirs:
                differ.add(d)
        expected = {"conv_norm_out"} | ({"up_blocks.0.upsamplers.0.conv"} if family != "sdxl"
                                        else {"add_embedding.linear_1", "add_embedding.linear_2"})
        assert differ == expected, family


# §4.3 written out by hand: (diffusers-style kohya name, expected ldm/sgm name or None)
SDXL_TABLE = [
    ("conv_in", "input_blocks_0_0"), ("conv_out", "out_2"), ("conv_norm_out", "out_0"),
    ("time_embedding_linear_1", "time_embed_0"), ("time_embedding_linear_2", "time_embed_2"),
    ("add_embedding_linear_1", "label_emb_0_0"), ("add_embedding_linear_2", "label_emb_0_2"),
    ("down_blocks_0_resnets_0_conv1", "input_blocks_1_0_in_layers_2"),
    ("down_blocks_0_resnets_1_time_emb_proj", "input_blocks_2_0_emb_layers_1"),
    ("down_blocks_0_downsamplers_0_conv", "input_blocks_3_0_op"),
    ("down_blocks_1_resnets_0_conv_shortcut", "input_blocks_4_0_skip_connection"),
    ("down_blocks_1_attentions_0_proj_in", "input_blocks_4_1_proj_in"),
    ("down_blocks_1_attentions_1_transformer_blocks_1_attn2_to_k", "input_blocks_5_1_transformer_blocks_1_attn2_to_k"),
    ("down_blocks_1_downsamplers_0_conv", "input_blocks_6_0_op"),
    ("down_blocks_2_attentions_0_transformer_blocks_9_ff_net_0_proj",
     "input_blocks_7_1_transformer_blocks_9_ff_net_0_proj"),
    ("down_blocks_2_attentions_1_norm", "input_blocks_8_1_norm"),
    ("down_blocks_2_resnets_1_norm2", "input_blocks_8_0_out_layers_0"),
    ("mid_block_resnets_0_norm1", "middle_block_0_in_layers_0"),
    ("mid_block_attentions_0_transformer_blocks_9_attn1_to_out_0",
     "middle_block_1_transformer_blocks_9_attn1_to_out_0"),
    ("mid_block_resnets_1_conv2", "middle_block_2_out_layers_3"),
    ("up_blocks_0_resnets_0_conv1", "output_blocks_0_0_in_layers_2"),
    ("up_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "output_blocks_0_1_transformer_blocks_0_attn1_to_q"),
    ("up_blocks_0_attentions_2_proj_out", "output_blocks_2_1_proj_out"),
    ("up_blocks_0_upsamplers_0_conv", "output_blocks_2_2_conv"),
    ("up_blocks_1_resnets_2_conv_shortcut", "output_blocks_5_0_skip_connection"),
    ("up_blocks_1_attentions_1_transformer_blocks_1_norm3", "output_blocks_4_1_transformer_blocks_1_norm3"),
    ("up_blocks_1_upsamplers_0_conv", "output_blocks_5_2_conv"),
    ("up_blocks_2_resnets_0_time_emb_proj", "output_blocks_6_0_emb_layers_1"),
    ("up_blocks_2_resnets_2_conv2", "output_blocks_8_0_out_layers_3"),
    # not SDXL layers
    ("down_blocks_0_attentions_0_proj_in", None), ("up_blocks_2_attentions_0_proj_in", None),
    ("up_blocks_2_upsamplers_0_conv", None), ("down_blocks_2_downsamplers_0_conv", None),
    ("down_blocks_1_attentions_0_transformer_blocks_2_attn1_to_q", None), ("up_blocks_3_resnets_0_conv1", None),
    ("down_blocks_3_resnets_0_conv1", None), ("mid_block_attentions_0_transformer_blocks_10_attn1_to_q", None),
]
SD1_TABLE = [
    ("down_blocks_0_attentions_0_proj_in", "input_blocks_1_1_proj_in"),
    ("down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_v", "input_blocks_2_1_transformer_blocks_0_attn2_to_v"),
    ("down_blocks_2_downsamplers_0_conv", "input_blocks_9_0_op"),
    ("down_blocks_3_resnets_1_conv2", "input_blocks_11_0_out_layers_3"),
    ("mid_block_attentions_0_proj_out", "middle_block_1_proj_out"),
    ("up_blocks_0_resnets_2_conv1", "output_blocks_2_0_in_layers_2"),
    ("up_blocks_0_upsamplers_0_conv", "output_blocks_2_1_conv"),
    ("up_blocks_1_upsamplers_0_conv", "output_blocks_5_2_conv"),
    ("up_blocks_2_upsamplers_0_conv", "output_blocks_8_2_conv"),
    ("up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2", "output_blocks_11_1_transformer_blocks_0_ff_net_2"),
    ("down_blocks_3_downsamplers_0_conv", None), ("up_blocks_3_upsamplers_0_conv", None),
    ("up_blocks_0_attentions_0_proj_in", None), ("add_embedding_linear_1", None),
    ("down_blocks_0_attentions_0_transformer_blocks_1_attn1_to_q", None),
]


@pytest.mark.parametrize("family, table", [("sdxl", SDXL_TABLE), ("sd1", SD1_TABLE), ("sd2", SD1_TABLE)])
def test_hand_table(family, table):
    for d, want in table:
        for mk in ("lora_unet_" + d, "lycoris_" + d):
            t, why = map_module_key_with_reason(mk, family)
            if want is None:
                assert t is None and why, (mk, t)
            else:
                assert t is not None and t.name == "diffusion_model_" + want, (mk, t, why)


def test_reasons_are_human():
    t, why = map_module_key_with_reason("lora_unet_input_blocks_7_1_transformer_blocks_9_attn1_to_q", "sd1")
    assert t is None and "not a module of SD1.5" in why and "SDXL-only block" in why
    t, why = map_module_key_with_reason("lora_unet_down_blocks_0_attentions_0_proj_in", "sdxl")
    assert t is None and "not a module of SDXL" in why and "SD1.5/SD2.x-only block" in why
    t, why = map_module_key_with_reason("lora_unet_double_blocks_0_img_attn_qkv", "sdxl")
    assert t is None and "Flux" in why
    t, why = map_module_key_with_reason("lora_prior_unet_down_blocks_0", "sd1")
    assert t is None and "Stable Cascade" in why
    t, why = map_module_key_with_reason("something_else", "sd1")
    assert t is None and "unknown key prefix" in why
    t, why = map_module_key_with_reason("lora_unet_input_blocks_1_0_in_layers_1", "sd1")  # SiLU, no weights
    assert t is None and "ResBlock" in why


def test_old_diffusers_processor_keys():
    keys = ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight",
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight",
            "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.up.weight"]
    mk0, s0 = split_key(keys[0])
    assert (mk0, s0) == ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q",
                         "_lora.down.weight")
    assert map_module_key(mk0, "sd1").name == "diffusion_model_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    mk1, s1 = split_key(keys[1])
    assert s1 == "_lora.up.weight"
    assert map_module_key(mk1, "sd1").name == "diffusion_model_input_blocks_1_1_transformer_blocks_0_attn1_to_out_0"
    # diffusers 0.21-0.23 LoRACompatible form
    mk, s = split_key("unet.mid_block.attentions.0.proj_in.lora.down.weight")
    assert s == "lora.down.weight" and map_module_key(mk, "sdxl").name == "diffusion_model_middle_block_1_proj_in"


# ---------------------------------------------------------------------------------------------------------------
# Keys written by peer tools for diffusers UNets.
TINY_SD1 = dict(sample_size=16, in_channels=4, out_channels=4,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, block_out_channels=(32, 32, 64, 64),
                layers_per_block=2, attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32)
TINY_SDXL = dict(sample_size=16, in_channels=4, out_channels=4,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(32, 32, 64), layers_per_block=2, transformer_layers_per_block=(1, 2, 3),
                 attention_head_dim=8, use_linear_projection=True, cross_attention_dim=2048, norm_num_groups=32,
                 addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80)
PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "time_emb_proj", "conv", "conv_in", "conv_out", "linear_1", "linear_2"]


def _peft_state(cfg):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=2, target_modules=PEFT_TARGETS), unet)
    return {"unet." + k: v for k, v in get_peft_model_state_dict(unet).items()}


def _a1_names(sd):
    return {_a1(k[: -len(".weight")]) for k in sd if k.endswith(".weight")}


@pytest.mark.parametrize("family, cfg", [("sd1", TINY_SD1), ("sdxl", TINY_SDXL)])
def test_peft_and_diffusers_kohya_keys_all_map(ldm_sd, family, cfg):
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    real = _a1_names(ldm_sd[family])
    peft_sd = _peft_state(cfg)
    groups = group_modules(peft_sd)
    assert all(set(g) == {"lora_A.weight", "lora_B.weight"} for g in groups.values())
    peft_targets = {}
    for mk in groups:
        t, why = map_module_key_with_reason(mk, family)
        assert t is not None and t.name in real, (mk, t, why)
        peft_targets[mk] = t
    assert len(set(peft_targets.values())) == len(groups)  # no two modules collapse onto one layer
    kohya_sd = convert_state_dict_to_kohya(peft_sd)
    kgroups = group_modules(kohya_sd)
    assert all(set(g) == {"lora_down.weight", "lora_up.weight", "alpha"} for g in kgroups.values())
    kohya_targets = {map_module_key(mk, family) for mk in kgroups}
    assert None not in kohya_targets and kohya_targets == set(peft_targets.values())
    # family detection on these peer-written files (no metadata): cross-attention width decides
    for sd in (peft_sd, kohya_sd):
        info = detect_family({k: tuple(v.shape) for k, v in sd.items()}, {})
        assert info.family == family, info.evidence


def test_lycoris_kohya_writer_keys_all_map(ldm_sd, tmp_path):
    """LyCORIS (lycoris.kohya.create_network) names the modules of a diffusers UNet + HF CLIP text encoder the
    kohya way, including GroupNorm/LayerNorm (train_norm); every key must land on a real SD1 layer."""
    from lycoris.kohya import LycorisNetworkKohya, create_network
    from transformers import CLIPTextConfig, CLIPTextModel
    from diffusers import UNet2DConditionModel
    preset = tmp_path / "preset.toml"
    preset.write_text('enable_conv = true\n'
                      'unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]\n'
                      'unet_target_name = ["conv_in", "conv_out", "time_embedding.linear_1", '
                      '"time_embedding.linear_2", "conv_norm_out"]\n'
                      'text_encoder_target_module = ["CLIPEncoderLayer"]\n'
                      'text_encoder_target_name = []\n')
    saved = {k: getattr(LycorisNetworkKohya, k) for k in dir(LycorisNetworkKohya) if k.isupper()}
    try:
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**TINY_SD1)
        te = CLIPTextModel(CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4))
        net = create_network(1.0, 4, 2, None, te, unet, algo="lora", preset=str(preset), train_norm=True,
                             conv_dim=4, conv_alpha=2)
        net.apply_to(te, unet, apply_text_encoder=True, apply_unet=True)
        sd = net.state_dict()
    finally:
        for k, v in saved.items():
            setattr(LycorisNetworkKohya, k, v)
    real_unet = _a1_names(ldm_sd["sd1"])
    # kohya/LyCORIS TE naming is lora_te_ + HF module path; A1111's is transformer_ + the same path (SD1)
    te_names = {"lora_te_" + _us(n): "transformer_" + _us(n) for n, _ in te.named_modules() if n}
    groups = group_modules(sd)
    assert any(k.endswith(".w_norm") for k in sd) and any(k.startswith("lora_te_") for k in sd)
    n_unet = n_te = 0
    for mk, g in groups.items():
        t, why = map_module_key_with_reason(mk, "sd1")
        assert t is not None, (mk, why)
        if t.component == "unet":
            assert t.name in real_unet, mk
            n_unet += 1
        else:
            assert t.name == te_names[mk] and t.component == "te1"
            n_te += 1
    assert n_unet > 100 and n_te >= 2 * 8
    assert detect_family({k: tuple(v.shape) for k, v in sd.items()}, {}).family == "sd1"
    # a sanity check that the oracle is not vacuous: the wrong family rejects SD1 down_blocks_0 attentions
    assert any(map_module_key(mk, "sdxl") is None for mk in groups)
