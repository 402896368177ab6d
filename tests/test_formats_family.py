"""Family detection (lora-formats.md §5). Widths come from the models' definitions: CLIP-L 768, OpenCLIP ViT-H 1024,
bigG 1280, SDXL cross-attention context 768 + 1280 = 2048, the SDXL refiner's 1280."""
import pytest

from lib_lora.formats import detect_family

R = 4


def kohya_sd1(context=768, te_width=768, layers=12):
    s = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": (R, 320),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (R, context),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": (320, R),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.alpha": (),
    }
    for i in range(layers):
        s[f"lora_te_text_model_encoder_layers_{i}_mlp_fc1.lora_down.weight"] = (R, te_width)
    return s


def kohya_sdxl():
    return {
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k.lora_down.weight": (R, 2048),
        "lora_unet_output_blocks_0_1_proj_in.lora_down.weight": (R, 1280),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (R, 768),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (R, 1280),
    }


def attn1_only():
    return {f"lora_unet_up_blocks_1_attentions_{j}_transformer_blocks_0_attn1_to_q.lora_down.weight": (R, 640)
            for j in range(3)}


def test_sd1_from_keys():
    info = detect_family(kohya_sd1(), {})
    assert info.family == "sd1" and info.refused is None
    assert "768" in info.evidence


def test_sd2_from_context_te_width_and_layer_count():
    assert detect_family(kohya_sd1(context=1024, te_width=1024, layers=23), {}).family == "sd2"
    assert detect_family(kohya_sd1(context=1024, layers=0), {}).family == "sd2"
    info = detect_family({"lora_te_text_model_encoder_layers_20_mlp_fc2.lora_down.weight": (R, 4096)}, {})
    assert info.family == "sd2", info.evidence  # layer index > 11 under lora_te_


@pytest.mark.parametrize("shapes", [
    kohya_sdxl(),
    {"lora_unet_input_blocks_7_1_transformer_blocks_9_attn1_to_q.lora_down.weight": (R, 1280)},
    {"lora_unet_label_emb_0_0.lora_down.weight": (R, 2816)},
    {"unet.add_embedding.linear_1.lora_A.weight": (R, 2816)},
    {"text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": (R, 1280)},
    {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": (R, 2048)},
    {"unet.up_blocks.0.attentions.0.proj_in.lora_A.weight": (R, 1280)},  # output_blocks_0_1: SDXL only
])
def test_sdxl_evidence(shapes):
    info = detect_family(shapes, {})
    assert info.family == "sdxl", info.evidence


def test_lora_te_only_file_768_is_ambiguous_between_sd1_and_sdxl():
    info = detect_family({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (R, 768)}, {})
    assert info.family is None and set(info.key_candidates) == {"sd1", "sdxl"}
    assert detect_family({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (R, 768)},
                         {"ss_base_model_version": "sdxl_base_v1-0"}).family == "sdxl"


def test_attn1_only_is_ambiguous_without_metadata():
    info = detect_family(attn1_only(), {})
    assert info.family is None and info.refused is None
    assert "identical shapes" in info.evidence and "no family metadata" in info.evidence


@pytest.mark.parametrize("meta, fam", [
    ({"ss_base_model_version": "sd_v1"}, "sd1"), ({"ss_base_model_version": "sd_v2_v"}, "sd2"),
    ({"ss_base_model_version": "sd_1.5"}, "sd1"), ({"ss_v2": "True"}, "sd2"), ({"ss_v2": "False"}, "sd1"),
    ({"modelspec.architecture": "stable-diffusion-v2-768-v/lora"}, "sd2"),
    ({"modelspec.architecture": "stable-diffusion-v1/lora"}, "sd1"),
])
def test_metadata_resolves_ambiguity(meta, fam):
    info = detect_family(attn1_only(), meta)
    assert info.family == fam and info.metadata_family == fam


def test_metadata_sdxl_with_structure_that_is_not_sdxl():
    shapes = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": (R, 320)}
    info = detect_family(shapes, {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"})
    assert info.family is None and "SDXL" in info.evidence and set(info.key_candidates) == {"sd1", "sd2"}
    # the same up-block attention exists in all three families: metadata decides
    assert detect_family(attn1_only(), {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}).family \
        == "sdxl"


def test_stale_metadata_loses_to_keys():
    info = detect_family(kohya_sd1(), {"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False"})
    assert info.family == "sd1" and info.metadata_family == "sdxl"
    assert "stale" in info.evidence and "SDXL" in info.evidence


def test_metadata_and_keys_agree():
    info = detect_family(kohya_sdxl(), {"ss_base_model_version": "sdxl_base_v1-0"})
    assert info.family == "sdxl" and "sdxl_base_v1-0" in info.evidence


@pytest.mark.parametrize("shapes, meta, refused", [
    ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (R, 3072)}, {}, "Flux"),
    ({"lora_unet_single_blocks_3_linear1.lora_down.weight": (R, 3072)}, {}, "Flux"),
    ({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": (R, 3072)}, {}, "DiT"),
    ({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": (R, 1536)}, {}, "SD3"),
    ({"lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": (R, 4096)}, {}, "SD3"),
    ({"lora_prior_unet_down_blocks_0_0_channelwise_0.lora_down.weight": (R, 2048)}, {}, "Cascade"),
    ({"base_model.model.blocks.0.attn.qkv.lora_A.weight": (R, 1152)}, {}, "DiT"),
    (attn1_only(), {"ss_base_model_version": "flux1"}, "Flux"),
    (attn1_only(), {"modelspec.architecture": "stable-diffusion-3-medium/lora"}, "SD3"),
    ({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": (R, 1280)}, {}, "refiner"),
    ({}, {"modelspec.architecture": "stable-diffusion-xl-v1-refiner/lora"}, "refiner"),
])
def test_refused_families(shapes, meta, refused):
    info = detect_family(shapes, meta)
    assert info.family is None and info.refused and refused in info.refused, (info.refused, info.evidence)
    msg = info.refusal_message("/x/y/some_lora.safetensors")
    assert "'some_lora.safetensors' is a" in msg and "supports SD1.x, SD2.x and SDXL only" in msg


def test_keys_override_refusing_metadata():
    info = detect_family(kohya_sd1(), {"ss_base_model_version": "flux1"})
    assert info.family == "sd1" and info.refused is None and "using the keys" in info.evidence


def test_contradicting_keys():
    shapes = dict(kohya_sd1(), **kohya_sdxl())
    info = detect_family(shapes, {})
    assert info.family is None and "contradict" in info.evidence


def test_empty_file_is_ambiguous():
    info = detect_family({}, {})
    assert info.family is None and info.refused is None
